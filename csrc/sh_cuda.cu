// CUDA kernels.  Work is spread over orders m (one thread per m of a point, ring or candidate)
// rather than one thread per point, so that writes of a degree's row are coalesced and a warp
// shares one point's recurrence.  Arithmetic in double, outputs in T; except that sh_basis and
// sh_synthesis with float32 data up to degrees kFloatBasisMaxL / kFloatSynthesisMaxL run their
// recurrences and sums in float (compute type C): consumer GPUs run double at 1/32-1/64 of the float
// rate.  Angles are formed and reduced in double (a few operations per thread), then their sin and cos
// and the recurrence round in float (the reason for those degree limits, see below).
// The same source runs on the CPU in CI under the SIMT emulation (cuda_launch.h, simt_emulation.h; tests/kernels/
// test_simt.py): every launch goes through launch(), dynamic shared memory through LOCDIFF_DYNAMIC_SHARED.
#include <cfloat>
#include <map>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <vector>

#include "cuda_launch.h"
#include "kernels.h"
#include "sh_math.h"
#include "tables.h"

namespace locdiff {
namespace cuda {

namespace {

void check(cudaError_t err, const char* what) {
  if (err != cudaSuccess) {
    // The runtime also keeps a failed call's error as the thread's last error: clear it, or the next
    // launch's check(cudaGetLastError()) would report this one again (found under the SIMT emulation).
    cudaGetLastError();
    throw std::runtime_error(std::string("locdiff CUDA error in ") + what + ": " + cudaGetErrorString(err));
  }
}

// Highest degrees whose float32 sh_basis / sh_synthesis compute in float; above them they compute in
// double like float64 data.  Chosen from a float emulation of these kernels on the CPU
// (benchmarks/cuda_float_emulation.py, BENCHMARKS.md 1g): the float recurrence's error grows with L
// (cos(theta) rounded to float near the poles, the rounded recurrence coefficients) and stays within
// 1e-5 (basis: absolute; synthesis: relative to the map's largest value) only up to about L = 16 for
// the basis (5e-6) and L = 48 for synthesis (9e-6; 32 kept, 5e-6, for margin).  At L = 64: 1e-4, 2e-5.
constexpr int kFloatBasisMaxL = 16;
constexpr int kFloatSynthesisMaxL = 32;

// The recurrence tables in compute type C (the float copy for the float32 compute path).
template <typename C>
struct Tab {
  const C *a, *b, *sect, *logsect;
};

struct DeviceTables {
  double *a = nullptr, *b = nullptr, *e = nullptr, *sect = nullptr, *logsect = nullptr;
  float *fa = nullptr, *fb = nullptr, *fsect = nullptr, *flogsect = nullptr;
  int L = -1;
  SHTables view() const { return SHTables{a, b, e, sect, logsect, L}; }
  void release() {
    cudaFree(a); cudaFree(b); cudaFree(e); cudaFree(sect); cudaFree(logsect);
    cudaFree(fa); cudaFree(fb); cudaFree(fsect); cudaFree(flogsect);
    a = b = e = sect = logsect = nullptr;
    fa = fb = fsect = flogsect = nullptr;
  }
};

// The double tables of a host-side SHTables view (what the decoder's kernels receive).
__host__ __device__ inline Tab<double> tab_view(const SHTables& t) {
  return Tab<double>{t.a, t.b, t.sect, t.logsect};
}

template <typename C>
Tab<C> tab_of(const DeviceTables& dt);
template <>
Tab<double> tab_of<double>(const DeviceTables& dt) { return tab_view(dt.view()); }
template <>
Tab<float> tab_of<float>(const DeviceTables& dt) { return Tab<float>{dt.fa, dt.fb, dt.fsect, dt.flogsect}; }

void upload_float(float** dst, const std::vector<double>& src) {
  std::vector<float> f(src.begin(), src.end());
  check(cudaMalloc(dst, f.size() * sizeof(float)), "cudaMalloc tables");
  check(cudaMemcpy(*dst, f.data(), f.size() * sizeof(float), cudaMemcpyHostToDevice), "copy tables");
}

// Device copy of the recurrence tables (double, and float for the float32 compute path), per
// device, grown like the host cache.
const DeviceTables& device_table_set(int L, int device) {
  static std::mutex mutex;
  static std::map<int, DeviceTables> cache;
  std::lock_guard<std::mutex> lock(mutex);
  DeviceTables& dt = cache[device];
  if (dt.L >= L) return dt;
  auto host = host_tables(L);
  check(cudaDeviceSynchronize(), "device_tables sync");  // old tables may be in use
  dt.release();
  const size_t n = host->a.size(), ns = host->sect.size();
  check(cudaMalloc(&dt.a, n * sizeof(double)), "cudaMalloc tables");
  check(cudaMalloc(&dt.b, n * sizeof(double)), "cudaMalloc tables");
  check(cudaMalloc(&dt.e, n * sizeof(double)), "cudaMalloc tables");
  check(cudaMalloc(&dt.sect, ns * sizeof(double)), "cudaMalloc tables");
  check(cudaMalloc(&dt.logsect, ns * sizeof(double)), "cudaMalloc tables");
  check(cudaMemcpy(dt.a, host->a.data(), n * sizeof(double), cudaMemcpyHostToDevice), "copy tables");
  check(cudaMemcpy(dt.b, host->b.data(), n * sizeof(double), cudaMemcpyHostToDevice), "copy tables");
  check(cudaMemcpy(dt.e, host->e.data(), n * sizeof(double), cudaMemcpyHostToDevice), "copy tables");
  check(cudaMemcpy(dt.sect, host->sect.data(), ns * sizeof(double), cudaMemcpyHostToDevice), "copy tables");
  check(cudaMemcpy(dt.logsect, host->logsect.data(), ns * sizeof(double), cudaMemcpyHostToDevice),
        "copy tables");
  upload_float(&dt.fa, host->a);
  upload_float(&dt.fb, host->b);
  upload_float(&dt.fsect, host->sect);
  upload_float(&dt.flogsect, host->logsect);
  dt.L = host->L;
  return dt;
}

SHTables device_tables(int L, int device) { return device_table_set(L, device).view(); }

int current_device() {
  int d = 0;
  check(cudaGetDevice(&d), "cudaGetDevice");
  return d;
}

constexpr int kThreads = 256;

// Threads per point: a multiple of the warp size covering the orders 0..L (at most a block).
int team_size(int L) {
  int t = ((L + 1 + 31) / 32) * 32;
  return t > kThreads ? kThreads : t;
}

__device__ __forceinline__ int degree_of(int64_t k) {
  int l = (int)sqrt((double)k);
  while ((int64_t)l * l > k) --l;
  while ((int64_t)(l + 1) * (l + 1) <= k) ++l;
  return l;
}

__device__ __forceinline__ void sincos_c(double a, double* s, double* c) { sincos(a, s, c); }
__device__ __forceinline__ void sincos_c(float a, float* s, float* c) { sincosf(a, s, c); }

// Pbar_mm(u) in compute type C (as sh_math.h's sectoral).
__device__ __forceinline__ double sectoral_c(const Tab<double>& t, int m, double u) {
  if (m == 0) return kY00;
  return u <= 0.0 ? 0.0 : exp(t.logsect[m] + m * log(u));
}
__device__ __forceinline__ float sectoral_c(const Tab<float>& t, int m, float u) {
  if (m == 0) return (float)kY00;
  return u <= 0.f ? 0.f : expf(t.logsect[m] + m * logf(u));
}

// sqrt2 cos(m phi), sqrt2 sin(m phi) in C, the angle m phi reduced to [-pi, pi] in double first.
template <typename C>
__device__ __forceinline__ void order_trig(int m, double phi, C* cm, C* sm) {
  double a = m * phi;
  a -= 2.0 * kPi * rint(a / (2.0 * kPi));
  C s, c;
  sincos_c((C)a, &s, &c);
  *cm = (C)kSqrt2 * c;
  *sm = (C)kSqrt2 * s;
}

template <typename T, typename C>
__global__ void basis_kernel(const T* __restrict__ coords, T* __restrict__ out, int64_t n, int L,
                             const T* __restrict__ w, Tab<C> tab, int team) {
  const int per_block = blockDim.x / team;
  const int64_t i = (int64_t)blockIdx.x * per_block + threadIdx.x / team;
  const int lane_m = threadIdx.x % team;
  if (i >= n) return;  // no block-level synchronisation below
  double theta, phi;
  latlon_to_angles((double)coords[2 * i], (double)coords[2 * i + 1], &theta, &phi);
  C x, u;
  {
    double sd, cd;
    sincos(theta, &sd, &cd);  // once per thread; the recurrence below is what runs in C
    x = (C)cd;
    u = (C)sd;
  }
  const int64_t K = (int64_t)(L + 1) * (L + 1);
  T* o = out + i * K;
  for (int m0 = 0; m0 <= L; m0 += team) {
    const int m = m0 + lane_m;
    const bool active = m <= L;
    C cm = 1, sm = 0;
    if (m > 0) order_trig(m, phi, &cm, &sm);
    C p1 = active ? sectoral_c(tab, m, u) : C(0), p2 = 0;
    // Every thread walks l from the team's smallest m so that, at each l, the team writes
    // contiguous columns l*l + l +- m (coalesced).
    for (int l = m0; l <= L; ++l) {
      if (!active || l < m) continue;
      C pv;
      if (l == m) {
        pv = p1;
        p1 = 0;
      } else {
        const int64_t t = tri(l, m);
        pv = tab.a[t] * (x * p1 - tab.b[t] * p2);
      }
      p2 = p1;
      p1 = pv;
      const C wl = w ? (C)w[l] : C(1);
      const int64_t base = (int64_t)l * l + l;
      if (m == 0) {
        o[base] = (T)(pv * wl);
      } else {
        o[base + m] = (T)(pv * wl * cm);
        o[base - m] = (T)(pv * wl * sm);
      }
    }
  }
}

template <typename T>
struct WeightedRow {
  const T* g;
  const T* w;
  __device__ double operator()(int64_t k) const {
    const double v = (double)g[k];
    return w ? v * (double)w[degree_of(k)] : v;
  }
};

template <typename T>
__global__ void basis_backward_kernel(const T* __restrict__ coords, const T* __restrict__ grad_out,
                                      T* __restrict__ grad_coords, int64_t n, int L,
                                      const T* __restrict__ w, SHTables tab, int team) {
  __shared__ double red[2][kThreads];
  const int per_block = blockDim.x / team;
  const int slot = threadIdx.x / team;
  const int64_t i = (int64_t)blockIdx.x * per_block + slot;
  const int lane_m = threadIdx.x % team;
  double ft = 0.0, fp = 0.0;
  if (i < n) {
    double theta, phi;
    latlon_to_angles((double)coords[2 * i], (double)coords[2 * i + 1], &theta, &phi);
    const int64_t K = (int64_t)(L + 1) * (L + 1);
    WeightedRow<T> row{grad_out + i * K, w};
    Derivs d;
    eval_derivs(row, L, tab, theta, phi, lane_m, team, 1, &d);
    ft = d.ft;
    fp = d.fp;
  }
  red[0][threadIdx.x] = ft;
  red[1][threadIdx.x] = fp;
  __syncthreads();
  // Tree sum over the team, which need not be a power of two (96 threads for L = 64..95): halves of the
  // next power of two, each lane adding its partner where the partner is inside the team.
  int half = 1;
  while (2 * half < team) half *= 2;
  for (int s = half; s > 0; s >>= 1) {
    if (lane_m < s && lane_m + s < team) {
      red[0][threadIdx.x] += red[0][threadIdx.x + s];
      red[1][threadIdx.x] += red[1][threadIdx.x + s];
    }
    __syncthreads();
  }
  if (lane_m == 0 && i < n) {
    grad_coords[2 * i] = (T)(-red[0][threadIdx.x] * kDegToRad);
    grad_coords[2 * i + 1] = (T)(red[1][threadIdx.x] * kDegToRad);
  }
}

__device__ __forceinline__ double ring_theta(int j, int nlat) { return (j + 0.5) * kPi / nlat; }
__device__ __forceinline__ double ring_phi(int k, int nlon) { return -kPi + (k + 0.5) * 2.0 * kPi / nlon; }

// Legendre stage for one ring and one coefficient row, threads over m:
// gc[m] = sum_l c[l,m] Pbar_lm(theta), gs[m] = sum_l c[l,-m] Pbar_lm(theta).
template <typename T, typename C>
__device__ void ring_legendre(const T* __restrict__ c, int L, const Tab<C>& tab, double theta, C* gc, C* gs) {
  double sd, cd;
  sincos(theta, &sd, &cd);
  const C x = (C)cd, u = (C)sd;
  for (int m = threadIdx.x; m <= L; m += blockDim.x) {
    C p1 = sectoral_c(tab, m, u), p2 = 0, ac = 0, as = 0;
    for (int l = m; l <= L; ++l) {
      C pv;
      if (l == m) {
        pv = p1;
        p1 = 0;
      } else {
        const int64_t t = tri(l, m);
        pv = tab.a[t] * (x * p1 - tab.b[t] * p2);
      }
      p2 = p1;
      p1 = pv;
      const int64_t base = (int64_t)l * l + l;
      ac += (C)c[base + m] * pv;
      if (m > 0) as += (C)c[base - m] * pv;
    }
    gc[m] = ac;
    gs[m] = as;
  }
}

template <typename T, typename C>
__global__ void synthesis_kernel(const T* __restrict__ coeffs, T* __restrict__ out, int64_t batch,
                                 int L, int nlat, int nlon, Tab<C> tab) {
  LOCDIFF_DYNAMIC_SHARED(double, smem, 2 * (L + 1) * sizeof(C));
  C* gc = reinterpret_cast<C*>(smem);
  C* gs = gc + (L + 1);
  const int64_t bj = blockIdx.x;
  const int64_t b = bj / nlat;
  const int j = (int)(bj % nlat);
  const int64_t K = (int64_t)(L + 1) * (L + 1);
  ring_legendre(coeffs + b * K, L, tab, ring_theta(j, nlat), gc, gs);
  __syncthreads();
  T* o = out + bj * (int64_t)nlon;
  for (int k = threadIdx.x; k < nlon; k += blockDim.x) {
    const double phi = ring_phi(k, nlon);
    C s1, c1;
    sincos_c((C)phi, &s1, &c1);
    C cm = 1, sm = 0, f = gc[0];
    // the rotation's error grows ~ m eps: re-anchored every 64 orders in double, every 16 in float
    const int anchor = sizeof(C) == sizeof(double) ? 63 : 15;
    for (int m = 1; m <= L; ++m) {
      const C cn = cm * c1 - sm * s1;
      sm = sm * c1 + cm * s1;
      cm = cn;
      if ((m & anchor) == 0) {
        order_trig(m, phi, &cm, &sm);
        cm *= (C)(1.0 / kSqrt2);
        sm *= (C)(1.0 / kSqrt2);
      }
      f += (C)kSqrt2 * (gc[m] * cm + gs[m] * sm);
    }
    o[k] = (T)f;
  }
}

// Decoder: one block per coefficient row.  The coarse map is synthesised ring by ring into a
// rolling buffer of three rings in shared memory (never the whole [nlat, nlon] map), local maxima
// are kept per thread (top KEEP in registers), the best candidates are refined by one warp each
// with Newton steps on the sphere, and thread 0 applies the minimum separation.
template <typename T, int KEEP>
__global__ void decode_kernel(const T* __restrict__ coeffs, T* __restrict__ out_coords,
                              T* __restrict__ out_scores, int L, int nlat, int nlon, int top_k,
                              int ncand, int max_iter, double min_sep, SHTables tab) {
  const size_t smem_bytes = sizeof(double) * (2 * (L + 1) + 3 * ncand) + sizeof(float) * 3 * nlon +
                            (sizeof(float) + sizeof(int)) * blockDim.x * KEEP;
  LOCDIFF_DYNAMIC_SHARED(double, smem, smem_bytes);
  double* gc = smem;
  double* gs = gc + (L + 1);
  double* cand_t = gs + (L + 1);          // [ncand]
  double* cand_p = cand_t + ncand;        // [ncand]
  double* cand_v = cand_p + ncand;        // [ncand]
  float* rings = (float*)(cand_v + ncand);  // [3][nlon]
  float* keep_v = rings + 3 * nlon;       // [blockDim][KEEP]
  int* keep_i = (int*)(keep_v + blockDim.x * KEEP);
  __shared__ float red_v[32];
  __shared__ int red_i[32];

  const int64_t b = blockIdx.x;
  const int64_t K = (int64_t)(L + 1) * (L + 1);
  const T* c = coeffs + b * K;

  float kv[KEEP];
  int ki[KEEP];
#pragma unroll
  for (int q = 0; q < KEEP; ++q) {
    kv[q] = -FLT_MAX;
    ki[q] = -1;
  }

  for (int j = 0; j <= nlat; ++j) {
    if (j < nlat) {
      ring_legendre(c, L, tab_view(tab), ring_theta(j, nlat), gc, gs);
      __syncthreads();
      float* rj = rings + (j % 3) * nlon;
      for (int k = threadIdx.x; k < nlon; k += blockDim.x) {
        const float phi = (float)ring_phi(k, nlon);
        float s1, c1;
        sincosf(phi, &s1, &c1);
        float cm = 1.f, sm = 0.f, f = (float)gc[0];
        for (int m = 1; m <= L; ++m) {
          const float cn = cm * c1 - sm * s1;
          sm = sm * c1 + cm * s1;
          cm = cn;
          if ((m & 31) == 0) sincosf(m * phi, &sm, &cm);
          f += 1.41421356f * ((float)gc[m] * cm + (float)gs[m] * sm);
        }
        rj[k] = f;
      }
      __syncthreads();
    }
    if (j >= 1) {
      const int jc = j - 1;
      const float* cur = rings + (jc % 3) * nlon;
      const float* above = jc >= 1 ? rings + ((jc + 2) % 3) * nlon : nullptr;
      const float* below = jc + 1 < nlat ? rings + ((jc + 1) % 3) * nlon : nullptr;
      for (int k = threadIdx.x; k < nlon; k += blockDim.x) {
        const float v = cur[k];
        if (!(v > kv[KEEP - 1])) continue;
        const int kl = k == 0 ? nlon - 1 : k - 1, kr = k == nlon - 1 ? 0 : k + 1;
        if (v < cur[kl] || v < cur[kr]) continue;
        if (above && (v < above[kl] || v < above[k] || v < above[kr])) continue;
        if (below && (v < below[kl] || v < below[k] || v < below[kr])) continue;
        kv[KEEP - 1] = v;
        ki[KEEP - 1] = jc * nlon + k;
#pragma unroll
        for (int q = KEEP - 1; q > 0; --q) {
          if (kv[q] > kv[q - 1]) {
            const float tv = kv[q]; kv[q] = kv[q - 1]; kv[q - 1] = tv;
            const int ti = ki[q]; ki[q] = ki[q - 1]; ki[q - 1] = ti;
          }
        }
      }
    }
  }
  // The next ring (if any) is not written any more; publish the per-thread lists.
#pragma unroll
  for (int q = 0; q < KEEP; ++q) {
    keep_v[threadIdx.x * KEEP + q] = kv[q];
    keep_i[threadIdx.x * KEEP + q] = ki[q];
  }
  __syncthreads();

  // Select the ncand best local maxima by repeated block-wide argmax.
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  for (int r = 0; r < ncand; ++r) {
    float bv = -FLT_MAX;
    int bs = -1;
    for (int s = threadIdx.x; s < blockDim.x * KEEP; s += blockDim.x)
      if (keep_i[s] >= 0 && keep_v[s] > bv) {
        bv = keep_v[s];
        bs = s;
      }
    for (int off = 16; off > 0; off >>= 1) {
      const float ov = __shfl_down_sync(0xffffffffu, bv, off);
      const int os = __shfl_down_sync(0xffffffffu, bs, off);
      if (ov > bv) { bv = ov; bs = os; }
    }
    if (lane == 0) { red_v[warp] = bv; red_i[warp] = bs; }
    __syncthreads();
    if (threadIdx.x == 0) {
      float wv = -FLT_MAX;
      int ws = -1;
      for (int q = 0; q < nwarps; ++q)
        if (red_i[q] >= 0 && red_v[q] > wv) { wv = red_v[q]; ws = red_i[q]; }
      if (ws >= 0) {
        const int idx = keep_i[ws];
        cand_t[r] = ring_theta(idx / nlon, nlat);
        cand_p[r] = ring_phi(idx % nlon, nlon);
        cand_v[r] = (double)wv;
        keep_i[ws] = -1;
      } else {
        cand_t[r] = cand_p[r] = 0.0;
        cand_v[r] = -DBL_MAX;  // marks "no candidate"
      }
    }
    __syncthreads();
  }

  // Refinement: one warp per candidate, lanes split the orders m.
  const double grid_step = fmax(kPi / nlat, 2.0 * kPi / nlon);
  auto coeff = [c](int64_t k) { return (double)c[k]; };
  for (int r = warp; r < ncand; r += nwarps) {
    if (cand_v[r] == -DBL_MAX) continue;  // warp-uniform
    double theta = cand_t[r], phi = cand_p[r], radius = grid_step;
    Derivs d, part;
    eval_derivs(coeff, L, tab, theta, phi, lane, 32, 2, &part);
    d = part;
    for (int off = 16; off > 0; off >>= 1) {
      d.f += __shfl_xor_sync(0xffffffffu, d.f, off);
      d.ft += __shfl_xor_sync(0xffffffffu, d.ft, off);
      d.fp += __shfl_xor_sync(0xffffffffu, d.fp, off);
      d.ftt += __shfl_xor_sync(0xffffffffu, d.ftt, off);
      d.ftp += __shfl_xor_sync(0xffffffffu, d.ftp, off);
      d.fpp += __shfl_xor_sync(0xffffffffu, d.fpp, off);
    }
    for (int it = 0; it < max_iter && radius > 1e-12; ++it) {
      double nt, np;
      const double step = sphere_ascent_step(d, theta, phi, radius, &nt, &np);
      if (step < 1e-12) break;
      if (step < 1e-7 && d.ftt < 0.0) {  // as on the CPU: take a tiny Newton step unverified
        theta = nt;
        phi = np;
        break;
      }
      Derivs dn;
      eval_derivs(coeff, L, tab, nt, np, lane, 32, 2, &dn);
      for (int off = 16; off > 0; off >>= 1) {
        dn.f += __shfl_xor_sync(0xffffffffu, dn.f, off);
        dn.ft += __shfl_xor_sync(0xffffffffu, dn.ft, off);
        dn.fp += __shfl_xor_sync(0xffffffffu, dn.fp, off);
        dn.ftt += __shfl_xor_sync(0xffffffffu, dn.ftt, off);
        dn.ftp += __shfl_xor_sync(0xffffffffu, dn.ftp, off);
        dn.fpp += __shfl_xor_sync(0xffffffffu, dn.fpp, off);
      }
      // The butterfly gives every lane the same sums, so this branch is warp-uniform.
      if (dn.f >= d.f) {
        theta = nt;
        phi = np;
        d = dn;
      } else {
        radius = 0.25 * step;
      }
    }
    if (lane == 0) {
      cand_t[r] = theta;
      cand_p[r] = phi;
      cand_v[r] = d.f;
    }
  }
  __syncthreads();

  if (threadIdx.x == 0) {
    // Sort candidates by value (insertion sort, ncand is small) and keep separated modes.
    for (int a = 1; a < ncand; ++a)
      for (int q = a; q > 0 && cand_v[q] > cand_v[q - 1]; --q) {
        double tv = cand_v[q]; cand_v[q] = cand_v[q - 1]; cand_v[q - 1] = tv;
        tv = cand_t[q]; cand_t[q] = cand_t[q - 1]; cand_t[q - 1] = tv;
        tv = cand_p[q]; cand_p[q] = cand_p[q - 1]; cand_p[q - 1] = tv;
      }
    int kept = 0;
    T* oc = out_coords + b * top_k * 2;
    T* os = out_scores + b * top_k;
    int kept_idx[32];
    for (int a = 0; a < ncand && kept < top_k; ++a) {
      if (cand_v[a] == -DBL_MAX) break;
      bool far = true;
      for (int q = 0; q < kept; ++q)
        if (angular_distance(cand_t[a], cand_p[a], cand_t[kept_idx[q]], cand_p[kept_idx[q]]) < min_sep)
          far = false;
      if (!far) continue;
      kept_idx[kept] = a;
      oc[2 * kept] = (T)(90.0 - cand_t[a] / kDegToRad);
      oc[2 * kept + 1] = (T)wrap_lon_deg(cand_p[a] / kDegToRad);
      os[kept] = (T)cand_v[a];
      ++kept;
    }
    for (; kept < top_k; ++kept) {
      oc[2 * kept] = oc[2 * kept + 1] = (T)NAN;
      os[kept] = (T)(-INFINITY);
    }
  }
}

template <typename T, int KEEP>
void launch_decode(const T* coeffs, T* out_coords, T* out_scores, int64_t batch, int L,
                   const DecodeOptions& opt, double min_sep, const SHTables& tab, cudaStream_t stream) {
  const size_t smem = sizeof(double) * (2 * (L + 1) + 3 * opt.candidates) + sizeof(float) * 3 * opt.nlon +
                      (sizeof(float) + sizeof(int)) * kThreads * KEEP;
  auto kernel = decode_kernel<T, KEEP>;
  check(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem),
        "decode shared memory (grid too large for this GPU: lower nlon)");
  launch(kernel, grid_1d(batch), kThreads, smem, stream, coeffs, out_coords, out_scores, L, opt.nlat, opt.nlon,
         opt.top_k, opt.candidates, opt.max_iter, min_sep, tab);
  check(cudaGetLastError(), "decode_kernel launch");
}

}  // namespace

bool available() {
  int n = 0;
  return cudaGetDeviceCount(&n) == cudaSuccess && n > 0;
}

// float32 data up to max_l: compute in float.
template <typename T>
bool float_compute(int L, int max_l) { return sizeof(T) == sizeof(float) && L <= max_l; }

template <typename T>
void sh_basis(const T* coords, T* out, int64_t n, int L, const T* weights, void* stream) {
  if (n == 0) return;
  const DeviceTables& dt = device_table_set(L, current_device());
  const int team = team_size(L);
  const int per_block = kThreads / team;
  const int64_t blocks = (n + per_block - 1) / per_block;
  if (float_compute<T>(L, kFloatBasisMaxL))
    launch(basis_kernel<T, float>, grid_1d(blocks), kThreads, 0, (cudaStream_t)stream, coords, out, n, L, weights,
           tab_of<float>(dt), team);
  else
    launch(basis_kernel<T, double>, grid_1d(blocks), kThreads, 0, (cudaStream_t)stream, coords, out, n, L, weights,
           tab_of<double>(dt), team);
  check(cudaGetLastError(), "basis_kernel launch");
}

template <typename T>
void sh_basis_backward(const T* coords, const T* grad_out, T* grad_coords, int64_t n, int L,
                       const T* weights, void* stream) {
  if (n == 0) return;
  const SHTables tab = device_tables(L, current_device());
  const int team = team_size(L);
  const int per_block = kThreads / team;
  const int64_t blocks = (n + per_block - 1) / per_block;
  launch(basis_backward_kernel<T>, grid_1d(blocks), kThreads, 0, (cudaStream_t)stream, coords, grad_out, grad_coords,
         n, L, weights, tab, team);
  check(cudaGetLastError(), "basis_backward_kernel launch");
}

template <typename T>
void sh_synthesis(const T* coeffs, T* out, int64_t batch, int L, int nlat, int nlon, void* stream) {
  if (batch == 0 || nlat == 0 || nlon == 0) return;
  const DeviceTables& dt = device_table_set(L, current_device());
  const size_t smem = sizeof(double) * 2 * (L + 1);
  if (float_compute<T>(L, kFloatSynthesisMaxL))
    launch(synthesis_kernel<T, float>, grid_1d(batch * nlat), kThreads, smem, (cudaStream_t)stream, coeffs, out,
           batch, L, nlat, nlon, tab_of<float>(dt));
  else
    launch(synthesis_kernel<T, double>, grid_1d(batch * nlat), kThreads, smem, (cudaStream_t)stream, coeffs, out,
           batch, L, nlat, nlon, tab_of<double>(dt));
  check(cudaGetLastError(), "synthesis_kernel launch");
}

template <typename T>
void shdd_decode(const T* coeffs, T* out_coords, T* out_scores, int64_t batch, int L,
                 const DecodeOptions& opt_in, void* stream) {
  if (batch == 0) return;
  DecodeOptions opt = opt_in;
  if (opt.nlat <= 0) opt.nlat = decode_default_nlat(L);
  if (opt.nlon <= 0) opt.nlon = 2 * opt.nlat;
  if (opt.candidates <= 0) opt.candidates = 2 * opt.top_k + 2;
  if (opt.candidates < opt.top_k) opt.candidates = opt.top_k;
  if (opt.candidates > 32)
    throw std::invalid_argument("CUDA shdd_decode supports top_k and candidates up to 32");
  const double min_sep = opt.min_separation > 0 ? opt.min_separation : kPi / (L + 1);
  const SHTables tab = device_tables(L, current_device());
  if (opt.candidates <= 8)
    launch_decode<T, 8>(coeffs, out_coords, out_scores, batch, L, opt, min_sep, tab, (cudaStream_t)stream);
  else
    launch_decode<T, 32>(coeffs, out_coords, out_scores, batch, L, opt, min_sep, tab, (cudaStream_t)stream);
}

#define LOCDIFF_INSTANTIATE(T)                                                                  \
  template void sh_basis<T>(const T*, T*, int64_t, int, const T*, void*);                     \
  template void sh_basis_backward<T>(const T*, const T*, T*, int64_t, int, const T*, void*);  \
  template void sh_synthesis<T>(const T*, T*, int64_t, int, int, int, void*);                 \
  template void shdd_decode<T>(const T*, T*, T*, int64_t, int, const DecodeOptions&, void*);
LOCDIFF_INSTANTIATE(float)
LOCDIFF_INSTANTIATE(double)
#undef LOCDIFF_INSTANTIATE

}  // namespace cuda
}  // namespace locdiff
