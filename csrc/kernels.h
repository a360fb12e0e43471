// Plain C++ entry points of the kernels (no torch, no pybind11).  T is float or double; every
// kernel computes in double.  Coordinates are (lat, lon) in degrees, row-major [N, 2].
#pragma once

#include <cstdint>

namespace locdiff {

// Options of the mode-seeking decoder.
struct DecodeOptions {
  int top_k = 1;
  int nlat = 0;               // coarse grid rings; 0 -> decode_default_nlat(L)
  int nlon = 0;               // points per ring; 0 -> a default for the device
  int candidates = 0;         // local maxima refined per row; 0 -> 2 * top_k + 2
  int max_iter = 30;          // Newton / gradient iterations per candidate (0 = no refinement)
  double min_separation = 0;  // radians between returned modes; <= 0 -> pi / (L + 1)
};

// The options as the bindings receive them (the Python module and the emulated CUDA entry points).
inline DecodeOptions decode_options(int top_k, int nlat, int nlon, int candidates, int max_iter,
                                    double min_separation) {
  DecodeOptions opt;
  opt.top_k = top_k;
  opt.nlat = nlat;
  opt.nlon = nlon;
  opt.candidates = candidates;
  opt.max_iter = max_iter;
  opt.min_separation = min_separation;
  return opt;
}

// Bits of the CPU sh_basis result: coordinates it refused (their rows are left unspecified).
constexpr int kBadNonFinite = 1;  // a NaN or infinite lat or lon
constexpr int kBadLatitude = 2;   // |lat| > 90

namespace cpu {
// Checks the coordinates in the same pass (returns kBad* bits, 0 when all are valid).
template <typename T>
int sh_basis(const T* coords, T* out, int64_t n, int L, const T* weights);
template <typename T>
void sh_basis_backward(const T* coords, const T* grad_out, T* grad_coords, int64_t n, int L,
                       const T* weights);
template <typename T>
void sh_synthesis(const T* coeffs, T* out, int64_t batch, int L, int nlat, int nlon);
// Adjoint of sh_synthesis (the gradient w.r.t. the coefficients): the transposed Fourier and
// Legendre stages, i.e. quadrature-free analysis sum_jk g_jk Y_lm(t_j, p_k).
template <typename T>
void sh_synthesis_backward(const T* grad_out, T* grad_coeffs, int64_t batch, int L, int nlat, int nlon);
template <typename T>
void shdd_decode(const T* coeffs, T* out_coords, T* out_scores, int64_t batch, int L,
                 const DecodeOptions& opt);
int max_threads();
void debug_eval(const double* coeffs, int L, double theta, double phi, int method, double* out6);
}  // namespace cpu

namespace cuda {
bool available();  // compiled with CUDA and a device is visible
template <typename T>
void sh_basis(const T* coords, T* out, int64_t n, int L, const T* weights, void* stream);
template <typename T>
void sh_basis_backward(const T* coords, const T* grad_out, T* grad_coords, int64_t n, int L,
                       const T* weights, void* stream);
template <typename T>
void sh_synthesis(const T* coeffs, T* out, int64_t batch, int L, int nlat, int nlon, void* stream);
template <typename T>
void shdd_decode(const T* coeffs, T* out_coords, T* out_scores, int64_t batch, int L,
                 const DecodeOptions& opt, void* stream);
}  // namespace cuda

}  // namespace locdiff
