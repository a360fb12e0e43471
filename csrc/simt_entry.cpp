// C entry points of the emulated CUDA kernels (test-only; tests/simt.py builds this with simt_emulation.cpp and
// sh_cuda.cu compiled as C++ under LOCDIFF_SIMT_EMULATION, and loads it with ctypes).  They call the same
// locdiff::cuda functions the CUDA build's bindings call, on host pointers.  Each returns 0, or 1 with the
// error's message in `err`.
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <exception>

#include "kernels.h"

namespace {

template <typename F>
int guarded(char* err, size_t errlen, F f) {
  try {
    f();
    return 0;
  } catch (const std::exception& e) {
    std::snprintf(err, errlen, "%s", e.what());
  } catch (...) {
    std::snprintf(err, errlen, "unknown exception");
  }
  return 1;
}

template <typename T>
T* ptr(uintptr_t p) {
  return reinterpret_cast<T*>(p);
}

}  // namespace

// dtype: 0 float32, 1 float64 (the bindings' codes).
#define LOCDIFF_SIMT_DISPATCH(CALL)                                 \
  return guarded(err, errlen, [&] {                                 \
    if (dtype == 0) { using T = float; CALL; }                      \
    else { using T = double; CALL; }                                \
  })

extern "C" {

int locdiff_simt_sh_basis(int dtype, uintptr_t coords, uintptr_t out, int64_t n, int L, uintptr_t weights, char* err,
                          size_t errlen) {
  LOCDIFF_SIMT_DISPATCH(locdiff::cuda::sh_basis<T>(ptr<T>(coords), ptr<T>(out), n, L, ptr<T>(weights), nullptr));
}

int locdiff_simt_sh_basis_backward(int dtype, uintptr_t coords, uintptr_t grad_out, uintptr_t grad_coords, int64_t n,
                                   int L, uintptr_t weights, char* err, size_t errlen) {
  LOCDIFF_SIMT_DISPATCH(locdiff::cuda::sh_basis_backward<T>(ptr<T>(coords), ptr<T>(grad_out), ptr<T>(grad_coords), n,
                                                            L, ptr<T>(weights), nullptr));
}

int locdiff_simt_sh_synthesis(int dtype, uintptr_t coeffs, uintptr_t out, int64_t batch, int L, int nlat, int nlon,
                              char* err, size_t errlen) {
  LOCDIFF_SIMT_DISPATCH(locdiff::cuda::sh_synthesis<T>(ptr<T>(coeffs), ptr<T>(out), batch, L, nlat, nlon, nullptr));
}

int locdiff_simt_shdd_decode(int dtype, uintptr_t coeffs, uintptr_t out_coords, uintptr_t out_scores, int64_t batch,
                             int L, int top_k, int nlat, int nlon, int candidates, int max_iter,
                             double min_separation, char* err, size_t errlen) {
  const locdiff::DecodeOptions opt = locdiff::decode_options(top_k, nlat, nlon, candidates, max_iter, min_separation);
  LOCDIFF_SIMT_DISPATCH(locdiff::cuda::shdd_decode<T>(ptr<T>(coeffs), ptr<T>(out_coords), ptr<T>(out_scores), batch,
                                                      L, opt, nullptr));
}

}  // extern "C"
