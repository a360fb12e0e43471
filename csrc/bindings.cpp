// pybind11 module locdiff_ext._C.  Thin: it takes data pointers, sizes, a dtype code, a device
// index and a CUDA stream handle from the Python op wrappers (which validate everything) and
// calls the plain C++ kernels with the GIL released.  No torch headers, no libtorch linkage.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>

#include "kernels.h"
#include "threads.h"
#include "sh_math.h"

namespace py = pybind11;
using locdiff::DecodeOptions;

namespace {

enum DType { kFloat32 = 0, kFloat64 = 1 };

template <typename T>
T* ptr(uintptr_t p) {
  return reinterpret_cast<T*>(p);
}

bool has_cuda_build() {
#ifdef LOCDIFF_WITH_CUDA
  return true;
#else
  return false;
#endif
}

void require_cuda() {
  if (!has_cuda_build())
    throw std::runtime_error("locdiff_ext was built without CUDA; reinstall with a CUDA toolkit present");
}

#ifdef LOCDIFF_WITH_CUDA
#include <cuda_runtime.h>
struct DeviceGuard {
  int prev = -1;
  explicit DeviceGuard(int device) {
    cudaGetDevice(&prev);
    if (device >= 0 && device != prev) cudaSetDevice(device);
  }
  ~DeviceGuard() {
    if (prev >= 0) cudaSetDevice(prev);
  }
};
#else
struct DeviceGuard {
  explicit DeviceGuard(int) {}
};
#endif

// Dispatch on (device, dtype).  device < 0: CPU; otherwise a CUDA device index.
#ifdef LOCDIFF_WITH_CUDA
#define LOCDIFF_DISPATCH(dtype, device, CPU_CALL, CUDA_CALL)          \
  do {                                                                \
    py::gil_scoped_release nogil;                                     \
    if ((device) < 0) {                                               \
      if ((dtype) == kFloat32) { using T = float; CPU_CALL; }         \
      else { using T = double; CPU_CALL; }                            \
    } else {                                                          \
      DeviceGuard guard(device);                                      \
      if ((dtype) == kFloat32) { using T = float; CUDA_CALL; }        \
      else { using T = double; CUDA_CALL; }                           \
    }                                                                 \
  } while (0)
#else
#define LOCDIFF_DISPATCH(dtype, device, CPU_CALL, CUDA_CALL)          \
  do {                                                                \
    if ((device) >= 0) require_cuda();                                \
    py::gil_scoped_release nogil;                                     \
    if ((dtype) == kFloat32) { using T = float; CPU_CALL; }           \
    else { using T = double; CPU_CALL; }                              \
  } while (0)
#endif

void check_dtype(int dtype) {
  if (dtype != kFloat32 && dtype != kFloat64) throw std::invalid_argument("dtype code must be 0 or 1");
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "locdiff_ext kernels: real spherical harmonics, SHDD encode/decode (CPU + CUDA)";
  m.attr("MAX_DEGREE") = locdiff::kMaxDegree;
  m.def("has_cuda", &has_cuda_build, "True if the extension was compiled with CUDA kernels");
  m.def("cuda_device_available", []() {
#ifdef LOCDIFF_WITH_CUDA
    return locdiff::cuda::available();
#else
    return false;
#endif
  });
  m.def("num_threads", &locdiff::cpu::max_threads, "OpenMP threads the CPU kernels use");
  m.def("region_threads", &locdiff::region_threads,
        "Threads the next CPU kernel region uses: num_threads() less the cores other processes occupy now");
  m.def("threads_for_load", &locdiff::threads_for_load, py::arg("team"), py::arg("cpus"), py::arg("online"),
        py::arg("runnable"), py::arg("own_runnable"), "region_threads()'s rule on given counts (for tests)");

  m.def("_debug_eval", [](uintptr_t coeffs, int L, double theta, double phi, int method) {
    double o[6];
    locdiff::cpu::debug_eval(ptr<double>(coeffs), L, theta, phi, method, o);
    return py::make_tuple(o[0], o[1], o[2], o[3], o[4], o[5]);
  }, "f, f_t, f_p, f_tt, f_tp, f_pp at (colatitude, longitude) radians: for tests");

  m.def("sh_basis", [](uintptr_t coords, uintptr_t out, int64_t n, int L, uintptr_t weights, int dtype,
                       int device, uintptr_t stream) {
    check_dtype(dtype);
    int bad = 0;  // the CPU kernel checks the coordinates as it reads them (kBad* bits)
    LOCDIFF_DISPATCH(dtype, device,
        bad = locdiff::cpu::sh_basis<T>(ptr<T>(coords), ptr<T>(out), n, L, ptr<T>(weights)),
        locdiff::cuda::sh_basis<T>(ptr<T>(coords), ptr<T>(out), n, L, ptr<T>(weights), (void*)stream));
    return bad;
  }, "CPU: returns bits 1 (a non-finite coordinate), 2 (|lat| > 90); 0 on CUDA, whose caller checks first");

  m.def("sh_basis_backward", [](uintptr_t coords, uintptr_t grad_out, uintptr_t grad_coords, int64_t n,
                                int L, uintptr_t weights, int dtype, int device, uintptr_t stream) {
    check_dtype(dtype);
    LOCDIFF_DISPATCH(dtype, device,
        locdiff::cpu::sh_basis_backward<T>(ptr<T>(coords), ptr<T>(grad_out), ptr<T>(grad_coords), n, L,
                                           ptr<T>(weights)),
        locdiff::cuda::sh_basis_backward<T>(ptr<T>(coords), ptr<T>(grad_out), ptr<T>(grad_coords), n, L,
                                            ptr<T>(weights), (void*)stream));
  });

  m.def("sh_synthesis", [](uintptr_t coeffs, uintptr_t out, int64_t batch, int L, int nlat, int nlon,
                           int dtype, int device, uintptr_t stream) {
    check_dtype(dtype);
    LOCDIFF_DISPATCH(dtype, device,
        locdiff::cpu::sh_synthesis<T>(ptr<T>(coeffs), ptr<T>(out), batch, L, nlat, nlon),
        locdiff::cuda::sh_synthesis<T>(ptr<T>(coeffs), ptr<T>(out), batch, L, nlat, nlon, (void*)stream));
  });

  // CPU only: on CUDA tensors the Python op computes the adjoint with batched matmuls (ops.py).
  m.def("sh_synthesis_backward", [](uintptr_t grad_out, uintptr_t grad_coeffs, int64_t batch, int L, int nlat,
                                    int nlon, int dtype) {
    check_dtype(dtype);
    py::gil_scoped_release nogil;
    if (dtype == kFloat32)
      locdiff::cpu::sh_synthesis_backward<float>(ptr<float>(grad_out), ptr<float>(grad_coeffs), batch, L, nlat, nlon);
    else
      locdiff::cpu::sh_synthesis_backward<double>(ptr<double>(grad_out), ptr<double>(grad_coeffs), batch, L, nlat,
                                                   nlon);
  });

  m.def("shdd_decode", [](uintptr_t coeffs, uintptr_t out_coords, uintptr_t out_scores, int64_t batch,
                          int L, int top_k, int nlat, int nlon, int candidates, int max_iter,
                          double min_separation, int dtype, int device, uintptr_t stream) {
    check_dtype(dtype);
    const DecodeOptions opt = locdiff::decode_options(top_k, nlat, nlon, candidates, max_iter, min_separation);
    LOCDIFF_DISPATCH(dtype, device,
        locdiff::cpu::shdd_decode<T>(ptr<T>(coeffs), ptr<T>(out_coords), ptr<T>(out_scores), batch, L, opt),
        locdiff::cuda::shdd_decode<T>(ptr<T>(coeffs), ptr<T>(out_coords), ptr<T>(out_scores), batch, L, opt,
                                      (void*)stream));
  });
}
