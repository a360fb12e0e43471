// CPU kernels: OpenMP over points (or rows), loops over m vectorised by the compiler.
// Loops are scheduled dynamically in chunks, so that a thread that loses its core to another process
// holds up only its current chunk; and each region takes region_threads() (threads.h): no more threads
// than the cores other processes leave free, since a region waits for its slowest thread (BENCHMARKS.md 1e).
#include <algorithm>
#include <array>
#include <cmath>
#include <cstring>
#include <limits>
#include <memory>
#include <type_traits>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif
#ifdef _OPENMP
#include <omp.h>
#endif
#if defined(__linux__)
#include <sys/mman.h>
#endif

#include "kernels.h"
#include "parallel.h"
#include "sh_math.h"
#include "separable.h"
#include "tables.h"
#include "threads.h"

namespace locdiff {
namespace cpu {

int max_threads() {
#ifdef _OPENMP
  return omp_get_max_threads();
#else
  return 1;
#endif
}

namespace {

// Large outputs arrive as freshly mapped, untouched pages (torch.empty); faulting them in 4 KiB at
// a time costs more than computing the harmonics.  Ask for transparent huge pages, as numpy does
// for its large arrays (a no-op where THP is off or the pages are already present).
void advise_huge_pages(void* p, size_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = 2u << 20;
  if (bytes < 4 * kHuge) return;
  const uintptr_t begin = ((uintptr_t)p + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t end = ((uintptr_t)p + bytes) & ~(kHuge - 1);
  if (end > begin) madvise((void*)begin, end - begin, MADV_HUGEPAGE);
#else
  (void)p;
  (void)bytes;
#endif
}

// Rolling rows of Pbar_lm for one colatitude, advanced degree by degree ("l-outer"): each step is
// a loop over m that the compiler vectorises, and the row of outputs for degree l is contiguous.
class LegendreRows {
 public:
  LegendreRows(const SHTables& t, int L) : t_(t), L_(L), buf_(3 * (size_t)(L + 2), 0.0) {}

  // Start at degree 0 for cos(theta) = x, sin(theta) = u.
  void reset(double x, double u) {
    std::fill(buf_.begin(), buf_.end(), 0.0);
    x_ = x;
    u_ = u;
    prev2_ = buf_.data();
    prev1_ = buf_.data() + (L_ + 2);
    cur_ = buf_.data() + 2 * (L_ + 2);
    cur_[0] = kY00;
    l_ = 0;
  }

  // Advance to degree l+1; returns the row Pbar_{l+1, 0..l+1}.
  const double* next() {
    double* nxt = prev2_;
    const int l = ++l_;
    const double* a = t_.a + tri(l, 0);
    const double* b = t_.b + tri(l, 0);
    const double* p1 = cur_;    // degree l-1
    const double* p2 = prev1_;  // degree l-2 (zero beyond its last order)
    const double x = x_;
#pragma omp simd
    for (int m = 0; m < l; ++m) nxt[m] = a[m] * (x * p1[m] - b[m] * p2[m]);
    nxt[l] = t_.sect[l] * u_ * p1[l - 1];
    prev2_ = prev1_;
    prev1_ = cur_;
    cur_ = nxt;
    return cur_;
  }
  const double* row() const { return cur_; }

 private:
  SHTables t_;
  int L_;
  std::vector<double> buf_;
  double *prev2_ = nullptr, *prev1_ = nullptr, *cur_ = nullptr;
  double x_ = 1.0, u_ = 0.0;
  int l_ = 0;
};

// sqrt(2) cos(m phi), sqrt(2) sin(m phi) for m = 0..L (entry 0: 1, 0) by complex rotation
// (error grows ~ m eps, 1e-13 at m = 1000).
void trig_table(double phi, int L, double* c, double* s) {
  const double c1 = std::cos(phi), s1 = std::sin(phi);
  double cm = 1.0, sm = 0.0;
  c[0] = 1.0;
  s[0] = 0.0;
  for (int m = 1; m <= L; ++m) {
    const double cn = cm * c1 - sm * s1;
    const double sn = sm * c1 + cm * s1;
    cm = cn;
    sm = sn;
    // Re-anchor every 64 orders to keep the rotation error from accumulating at very high m.
    if ((m & 63) == 0) {
      cm = std::cos(m * phi);
      sm = std::sin(m * phi);
    }
    c[m] = kSqrt2 * cm;
    s[m] = kSqrt2 * sm;
  }
}

// Ring longitudes phi_k = -pi + (k + 1/2) 2 pi / nlon (cell centres); colatitudes likewise.
inline double ring_phi(int k, int nlon) { return -kPi + (k + 0.5) * 2.0 * kPi / nlon; }
inline double ring_theta(int j, int nlat) { return (j + 0.5) * kPi / nlat; }

// Harmonics degree by degree, of one point (V = double, written to its output row O = T: the path
// above kLaneMaxL) or of W points at once, one per SIMD lane (V = O = vd, written to the lanes path's
// tile [K][W]): o[l*l + l + m] = Y_lm w_l.  Vectorising across points keeps every vector full at any L (a
// loop over m is only l long: 1-20 at the degrees most used), and the recurrence coefficients a_lm, b_lm
// are scalars shared by the lanes; one point at a time, the loop over m is what vectorises.  The step for
// degree l and the write of its outputs share one loop over m, so each Pbar_lm is used while still in a
// register.  Rows r1 (degree l-1) and r2 (degree l-2) hold L+2 entries and are zero just past their last
// order, which is all the recurrence reads: no clearing per point.
using lanes::vd;
constexpr int PW = lanes::W;

template <typename V, typename O>
inline void basis_degrees(const SHTables& t, int L, const V& x, const V& u, const V* c, const V* s,
                          const double* w, V* r0, V* r1, V* r2, O* o) {
  const V zero = V();
  r2[0] = zero;
  r1[0] = zero + kY00;
  r1[1] = zero;
  o[0] = static_cast<O>(zero + kY00 * w[0]);
  for (int l = 1; l <= L; ++l) {
    const double* a = t.a + tri(l, 0);
    const double* b = t.b + tri(l, 0);
    const double wl = w[l];
    O* ol = o + (int64_t)l * l + l;
    const V v0 = a[0] * (x * r1[0] - b[0] * r2[0]);
    r0[0] = v0;
    ol[0] = static_cast<O>(v0 * wl);
#pragma omp simd
    for (int m = 1; m < l; ++m) {
      const V v = a[m] * (x * r1[m] - b[m] * r2[m]);
      r0[m] = v;
      const V vw = v * wl;
      ol[m] = static_cast<O>(vw * c[m]);
      ol[-m] = static_cast<O>(vw * s[m]);
    }
    const V vs = t.sect[l] * u * r1[l - 1];  // sectoral Pbar_ll
    r0[l] = vs;
    r0[l + 1] = zero;
    const V vsw = vs * wl;
    ol[l] = static_cast<O>(vsw * c[l]);
    ol[-l] = static_cast<O>(vsw * s[l]);
    V* tmp = r2;
    r2 = r1;
    r1 = r0;
    r0 = tmp;
  }
}

constexpr std::array<double, 19> inverse_factorials() {
  std::array<double, 19> t{};
  double f = 1.0;
  for (int n = 0; n < 19; ++n) {
    if (n > 1) f *= n;
    t[n] = 1.0 / f;
  }
  return t;
}

// 1/n0! - r2/(n0+2)! + r2^2/(n0+4)! - ... up to 1/nmax! (Horner): the tails of the sin and cos series.
inline vd taylor_tail(const vd& r2, int n0, int nmax) {
  static constexpr std::array<double, 19> inv = inverse_factorials();
  vd acc = vd{} + inv[nmax];
  for (int n = nmax - 2; n >= n0; n -= 2) acc = inv[n] - r2 * acc;
  return acc;
}

// sin and cos of W angles with |a| <= 4 (the kernel's colatitudes and wrapped longitudes, radians), to
// about 1 ulp, all lanes at once: a Cody-Waite reduction by pi/2 (pi/2 split in a 33-bit head, so
// k * head is exact, and a tail) to |r| <= pi/4, then Taylor polynomials whose truncation (r^19 / 19!,
// r^20 / 20!) is below 1e-19.  Eight scalar libm calls per block of points cost as much as the
// recurrence itself at L = 10.
inline void sincos_lanes(const vd& a, vd* sin_a, vd* cos_a) {
  typedef long long vl __attribute__((vector_size(8 * PW)));
  constexpr double kTwoOverPi = 0.63661977236758134308;
  constexpr double kPio2Hi = 1.57079632673412561417e+00;  // first 33 bits of pi/2
  constexpr double kPio2Lo = 6.07710050650619224932e-11;  // pi/2 - kPio2Hi
  vd k;
  for (int p = 0; p < PW; ++p) k[p] = std::nearbyint(a[p] * kTwoOverPi);
  const vd r = (a - k * kPio2Hi) - k * kPio2Lo;
  const vd r2 = r * r;
  const vd sr = r - r * r2 * taylor_tail(r2, 3, 17);
  const vd cr = 1.0 - r2 * taylor_tail(r2, 2, 18);
  // quadrant q = k mod 4: (sin, cos) = (sr, cr), (cr, -sr), (-sr, -cr), (-cr, sr)
  const vl q = __builtin_convertvector(k, vl);
  const vl odd = (q & 1) != 0;
  const vd s = odd ? cr : sr, c = odd ? sr : cr;
  *sin_a = ((q & 2) != 0) ? -s : s;
  *cos_a = (((q + 1) & 2) != 0) ? -c : c;
}

// sqrt(2) cos(m phi), sqrt(2) sin(m phi) of W longitudes, m = 0..L, by complex rotation from
// cos(phi), sin(phi) (as trig_table, re-anchored every 64 orders).
inline void trig_lanes(const vd& phi, const vd& c1, const vd& s1, int L, vd* c, vd* s) {
  const vd zero = {};
  vd cm = zero + 1.0, sm = zero;
  c[0] = cm;
  s[0] = zero;
  for (int m = 1; m <= L; ++m) {
    const vd cn = cm * c1 - sm * s1;
    const vd sn = sm * c1 + cm * s1;
    cm = cn;
    sm = sn;
    if ((m & 63) == 0)
      for (int p = 0; p < PW; ++p) {
        cm[p] = std::cos(m * phi[p]);
        sm[p] = std::sin(m * phi[p]);
      }
    c[m] = kSqrt2 * cm;
    s[m] = kSqrt2 * sm;
  }
}

// rows[p * K + k] = tile[k][p] for the first npts points: the lanes-to-rows transpose, 8 x 8 blocks
// in registers where AVX-512 is available.
template <typename T>
inline void transpose_rows(const vd* tile, int64_t K, int npts, T* rows) {
  int64_t k = 0;
#if defined(__AVX512F__)
  static_assert(PW == 8, "the AVX-512 transpose moves 8 x 8 doubles");
  if (npts == PW) {
    for (; k + 8 <= K; k += 8) {
      __m512d r[8], t[8], v[4], o[8];
      for (int q = 0; q < 8; ++q) r[q] = _mm512_loadu_pd(reinterpret_cast<const double*>(tile + k + q));
      for (int q = 0; q < 8; q += 2) {
        t[q] = _mm512_unpacklo_pd(r[q], r[q + 1]);
        t[q + 1] = _mm512_unpackhi_pd(r[q], r[q + 1]);
      }
      for (int h = 0; h < 2; ++h) {  // h = 0: points 0, 2, 4, 6; h = 1: points 1, 3, 5, 7
        v[0] = _mm512_shuffle_f64x2(t[h], t[h + 2], 0x88);
        v[1] = _mm512_shuffle_f64x2(t[h], t[h + 2], 0xDD);
        v[2] = _mm512_shuffle_f64x2(t[h + 4], t[h + 6], 0x88);
        v[3] = _mm512_shuffle_f64x2(t[h + 4], t[h + 6], 0xDD);
        o[h] = _mm512_shuffle_f64x2(v[0], v[2], 0x88);
        o[h + 4] = _mm512_shuffle_f64x2(v[0], v[2], 0xDD);
        o[h + 2] = _mm512_shuffle_f64x2(v[1], v[3], 0x88);
        o[h + 6] = _mm512_shuffle_f64x2(v[1], v[3], 0xDD);
      }
      for (int p = 0; p < 8; ++p) {
        if constexpr (std::is_same<T, double>::value)
          _mm512_storeu_pd(rows + p * K + k, o[p]);
        else
          _mm256_storeu_ps(rows + p * K + k, _mm512_cvtpd_ps(o[p]));
      }
    }
  }
#endif
  for (; k < K; ++k)
    for (int p = 0; p < npts; ++p) rows[p * K + k] = (T)tile[k][p];
}

// Copies a block of finished output rows to its place.  Whole 64-byte lines go out as streaming
// (non-temporal) stores: the output is far larger than the caches and is not read back here, so
// the lines need not be fetched before they are overwritten (a plain store reads each line first,
// about half the memory traffic of a large output).  Partial lines at the ends use plain stores.
template <typename T>
inline void write_out(const T* src, T* dst, int64_t count) {
#if defined(__AVX512F__)
  constexpr int64_t line = 64 / sizeof(T);
  const int64_t head = std::min<int64_t>(count, (int64_t)((64 - ((uintptr_t)dst & 63)) & 63) / (int64_t)sizeof(T));
  if (((uintptr_t)dst & (sizeof(T) - 1)) == 0) {
    std::memcpy(dst, src, head * sizeof(T));
    int64_t i = head;
    for (; i + line <= count; i += line) {
      if constexpr (std::is_same<T, double>::value)
        _mm512_stream_pd(dst + i, _mm512_loadu_pd(src + i));
      else
        _mm512_stream_ps(dst + i, _mm512_loadu_ps(src + i));
    }
    std::memcpy(dst + i, src + i, (count - i) * sizeof(T));
    return;
  }
#endif
  std::memcpy(dst, src, count * sizeof(T));
}

// Up to this degree the lanes path; above it the tile of the lanes path (64 K bytes per block of 8
// points: 166 KB at L = 50) outgrows the caches and one point at a time (one row of 8 K bytes, its
// loop over m long enough to vectorise) was faster (BENCHMARKS.md 1f).
constexpr int kLaneMaxL = 32;

}  // namespace

template <typename T>
int sh_basis(const T* coords, T* out, int64_t n, int L, const T* weights) {
  const auto tables = host_tables(L);
  const SHTables t = tables->view();
  const int64_t K = (int64_t)(L + 1) * (L + 1);
  std::vector<double> w(L + 1, 1.0);
  if (weights)
    for (int l = 0; l <= L; ++l) w[l] = (double)weights[l];
  advise_huge_pages(out, (size_t)n * K * sizeof(T));
  const int64_t nblocks = (n + PW - 1) / PW;
  RegionErrors errs;
  int bad = 0;
#pragma omp parallel if(!in_forked_child()) num_threads(region_threads()) reduction(| : bad)
  {
    const bool lanes = L <= kLaneMaxL;
    std::vector<vd> c, s, rows, tile;
    std::vector<T> block;
    std::vector<double> c1d, s1d, rows1;
    errs.guard([&] {
      if (lanes) {
        c.resize(L + 1);
        s.resize(L + 1);
        rows.resize(3 * (size_t)(L + 2));
        tile.resize(K);
        block.resize(PW * K);
      } else {
        c1d.resize(L + 1);
        s1d.resize(L + 1);
        rows1.resize(3 * (size_t)(L + 2));
      }
    });
#pragma omp for schedule(dynamic, 8)
    for (int64_t blk = 0; blk < nblocks; ++blk) {
      if (errs.failed()) continue;
      const int64_t i0 = blk * PW;
      const int npts = (int)std::min<int64_t>(PW, n - i0);
      vd theta, phi, x, u, c1, s1;
      for (int p = 0; p < PW; ++p) {  // a short last block repeats its last point
        const int64_t i = i0 + std::min(p, npts - 1);
        double lat = (double)coords[2 * i], lon = (double)coords[2 * i + 1];
        if (!(std::isfinite(lat) && std::isfinite(lon) && std::fabs(lat) <= 90.0)) {
          bad |= (std::isfinite(lat) && std::isfinite(lon)) ? kBadLatitude : kBadNonFinite;
          lat = lon = 0.0;  // computed as a valid point; the caller refuses the call
        }
        latlon_to_angles(lat, lon, &theta[p], &phi[p]);
      }
      sincos_lanes(theta, &u, &x);
      if (!lanes) {
        for (int p = 0; p < npts; ++p) {
          trig_table(phi[p], L, c1d.data(), s1d.data());
          basis_degrees(t, L, (double)x[p], (double)u[p], c1d.data(), s1d.data(), w.data(), rows1.data(),
                        rows1.data() + (L + 2), rows1.data() + 2 * (L + 2), out + (i0 + p) * K);
        }
        continue;
      }
      sincos_lanes(phi, &s1, &c1);
      trig_lanes(phi, c1, s1, L, c.data(), s.data());
      basis_degrees(t, L, x, u, c.data(), s.data(), w.data(), rows.data(), rows.data() + (L + 2),
                  rows.data() + 2 * (L + 2), tile.data());
      transpose_rows(tile.data(), K, npts, block.data());
      write_out(block.data(), out + i0 * K, npts * K);
    }
#if defined(__AVX512F__)
    _mm_sfence();  // streaming stores are visible to other threads once the region ends
#endif
  }
  errs.rethrow();
  return bad;
}

template <typename T>
void sh_basis_backward(const T* coords, const T* grad_out, T* grad_coords, int64_t n, int L,
                       const T* weights) {
  const auto tables = host_tables(L);
  const SHTables t = tables->view();
  const int64_t K = (int64_t)(L + 1) * (L + 1);
  std::vector<double> w(L + 1, 1.0);
  if (weights)
    for (int l = 0; l <= L; ++l) w[l] = (double)weights[l];
  std::vector<int> degree_of(K);
  for (int l = 0; l <= L; ++l)
    for (int m = -l; m <= l; ++m) degree_of[(int64_t)l * l + l + m] = l;
#pragma omp parallel for if(!in_forked_child()) num_threads(region_threads()) schedule(dynamic, 64)
  for (int64_t i = 0; i < n; ++i) {
    double theta, phi;
    latlon_to_angles((double)coords[2 * i], (double)coords[2 * i + 1], &theta, &phi);
    const T* g = grad_out + i * K;
    // The gradient of sum_k g_k w_l(k) Y_k(x) w.r.t. x is the gradient of the function with
    // coefficients g_k w_l(k): one derivative evaluation, never the [N, 2, K] Jacobian.
    auto coeff = [&](int64_t k) { return (double)g[k] * w[degree_of[k]]; };
    Derivs d;
    eval_derivs(coeff, L, t, theta, phi, 0, 1, 1, &d);
    // d/dlat = -d/dtheta * pi/180 ; d/dlon = d/dphi * pi/180
    grad_coords[2 * i] = (T)(-d.ft * kDegToRad);
    grad_coords[2 * i + 1] = (T)(d.fp * kDegToRad);
  }
}

template <typename T>
void sh_synthesis(const T* coeffs, T* out, int64_t batch, int L, int nlat, int nlon) {
  const auto tables = host_tables(L);
  const SeparableGrid grid(tables->view(), L, nlat, nlon);
  constexpr int W = SeparableGrid::W;
  const int64_t K = (int64_t)(L + 1) * (L + 1), plane = (int64_t)nlat * nlon;
  advise_huge_pages(out, (size_t)batch * plane * sizeof(T));
  const int64_t nblocks = (batch + W - 1) / W;
  const int ngroups = grid.ngroups();
  RegionErrors errs;
#pragma omp parallel if(!in_forked_child()) num_threads(region_threads())
  {
    SeparableGrid::Work w;
    int64_t loaded = -1;  // row block whose coefficients are in w.cw
    errs.guard([&] { grid.init(w); });
    // Tasks: (row block, group of ring pairs); consecutive tasks of a thread usually share the block.
#pragma omp for collapse(2) schedule(dynamic)
    for (int64_t rb = 0; rb < nblocks; ++rb)
      for (int g = 0; g < ngroups; ++g) errs.guard([&] {
        const int64_t b0 = rb * W;
        const int rows = (int)std::min<int64_t>(W, batch - b0);
        if (loaded != rb) {
          grid.load_coeffs(coeffs + b0 * K, rows, w);
          loaded = rb;
        }
        const int p0 = g * grid.group();
        grid.legendre(p0, w);
        grid.for_each_ring(p0, [&](int ring, int slot) {
          const double* f = grid.fourier(grid.ring_sums(w, slot), w);
          for (int v = 0; v < rows; ++v) {
            T* o = out + (b0 + v) * plane + (int64_t)ring * nlon;
            for (int k = 0; k < nlon; ++k) o[k] = (T)f[(size_t)k * W + v];
          }
        });
      });
  }
  errs.rethrow();
}

template <typename T>
void sh_synthesis_backward(const T* grad_out, T* grad_coeffs, int64_t batch, int L, int nlat, int nlon) {
  const auto tables = host_tables(L);
  const SeparableGrid grid(tables->view(), L, nlat, nlon);
  constexpr int W = SeparableGrid::W;
  const int64_t K = (int64_t)(L + 1) * (L + 1), plane = (int64_t)nlat * nlon;
  const int64_t nblocks = (batch + W - 1) / W;
  RegionErrors errs;
#pragma omp parallel if(!in_forked_child()) num_threads(region_threads())
  {
    SeparableGrid::Work w;
    std::vector<double> f;
    errs.guard([&] {
      grid.init(w);
      f.resize((size_t)W * nlon);
    });
#pragma omp for schedule(dynamic)
    for (int64_t rb = 0; rb < nblocks; ++rb) errs.guard([&] {
      const int64_t b0 = rb * W;
      const int rows = (int)std::min<int64_t>(W, batch - b0);
      std::fill(w.cw.begin(), w.cw.end(), 0.0);
      for (int p0 = 0; p0 < grid.npairs(); p0 += grid.group()) {
        grid.for_each_ring(p0, [&](int ring, int slot) {
          for (int v = 0; v < W; ++v) {
            if (v < rows) {
              const T* g = grad_out + (b0 + v) * plane + (int64_t)ring * nlon;
              for (int k = 0; k < nlon; ++k) f[(size_t)k * W + v] = (double)g[k];
            } else {
              for (int k = 0; k < nlon; ++k) f[(size_t)k * W + v] = 0.0;
            }
          }
          grid.fourier_adjoint(f.data(), grid.ring_sums(w, slot), w);
        });
        grid.legendre_adjoint(p0, w);
      }
      grid.store_coeffs(w, rows, grad_coeffs + b0 * K);
    });
  }
  errs.rethrow();
}

namespace {

struct Candidate {
  double value;
  double theta, phi;
};

// Keeps the `cap` largest candidates, sorted by decreasing value.
class TopList {
 public:
  explicit TopList(int cap) : cap_(cap) { items_.reserve(cap + 1); }
  void clear() { items_.clear(); }
  double threshold() const {
    return (int)items_.size() < cap_ ? -std::numeric_limits<double>::infinity() : items_.back().value;
  }
  void push(const Candidate& c) {
    if ((int)items_.size() == cap_ && !(c.value > items_.back().value)) return;
    auto it = std::upper_bound(items_.begin(), items_.end(), c,
                               [](const Candidate& a, const Candidate& b) { return a.value > b.value; });
    items_.insert(it, c);
    if ((int)items_.size() > cap_) items_.pop_back();
  }
  std::vector<Candidate>& items() { return items_; }

 private:
  int cap_;
  std::vector<Candidate> items_;
};

// Local maxima of ring j (8-neighbourhood, wrapping in longitude; rings beyond the poles ignored).
void ring_maxima(const float* above, const float* cur, const float* below, int j, int nlat, int nlon,
                 TopList& top) {
  const double thr = top.threshold();
  for (int k = 0; k < nlon; ++k) {
    const float v = cur[k];
    if (!((double)v >= thr)) continue;
    const int kl = k == 0 ? nlon - 1 : k - 1, kr = k == nlon - 1 ? 0 : k + 1;
    if (v < cur[kl] || v < cur[kr]) continue;
    if (above && (v < above[kl] || v < above[k] || v < above[kr])) continue;
    if (below && (v < below[kl] || v < below[k] || v < below[kr])) continue;
    top.push(Candidate{(double)v, ring_theta(j, nlat), ring_phi(k, nlon)});
  }
}

// f and its first and second derivatives in (colatitude, longitude) at one point, degree by
// degree: each step is a handful of loops over m that vectorise.  Theta-derivatives come from the
// ladder relations on the row Pbar_{l,.}, so they are exact at the poles too.  Same result as
// eval_derivs in sh_math.h (which the CUDA kernels use, one order per lane); tests compare them.
class RowEvaluator {
 public:
  RowEvaluator(const HostTables& ht, int L)
      : ht_(ht), L_(L), leg_(ht.view(), L), cs_(L + 1), sn_(L + 1), dp_(L + 2, 0.0), d2p_(L + 2, 0.0),
        acc_(6 * (size_t)(L + 2), 0.0) {}

  template <typename T>
  Derivs operator()(const T* c, double theta, double phi) {
    const int L = L_;
    trig_table(phi, L, cs_.data(), sn_.data());
    leg_.reset(std::cos(theta), std::sin(theta));
    std::fill(acc_.begin(), acc_.end(), 0.0);
    double *A0 = acc_.data(), *A1 = A0 + (L + 2), *A2 = A1 + (L + 2);
    double *B0 = A2 + (L + 2), *B1 = B0 + (L + 2), *B2 = B1 + (L + 2);
    double* dp = dp_.data();
    double* d2p = d2p_.data();
    A0[0] = (double)c[0] * kY00;
    for (int l = 1; l <= L; ++l) {
      const double* p = leg_.next();
      const double* al = ht_.alpha.data() + tri(l, 0);
      const double* be = ht_.beta.data() + tri(l, 0);
      dp[0] = -2.0 * be[0] * p[1];
#pragma omp simd
      for (int m = 1; m <= l; ++m) dp[m] = al[m] * p[m - 1] - be[m] * p[m + 1];
      dp[l + 1] = 0.0;
      d2p[0] = -2.0 * be[0] * dp[1];
#pragma omp simd
      for (int m = 1; m <= l; ++m) d2p[m] = al[m] * dp[m - 1] - be[m] * dp[m + 1];
      const T* cl = c + (int64_t)l * l + l;
#pragma omp simd
      for (int m = 0; m <= l; ++m) {
        const double cc = (double)cl[m], cn = (double)cl[-m];
        A0[m] += cc * p[m];
        A1[m] += cc * dp[m];
        A2[m] += cc * d2p[m];
        B0[m] += cn * p[m];
        B1[m] += cn * dp[m];
        B2[m] += cn * d2p[m];
      }
    }
    Derivs d;
    d.f = A0[0];
    d.ft = A1[0];
    d.ftt = A2[0];
    d.fp = d.ftp = d.fpp = 0.0;  // m = 0 has no longitude dependence (B*[0] hold c_l0 again: unused)
    for (int m = 1; m <= L; ++m) {
      const double C = cs_[m], S = sn_[m], mm = m;
      d.f += A0[m] * C + B0[m] * S;
      d.ft += A1[m] * C + B1[m] * S;
      d.ftt += A2[m] * C + B2[m] * S;
      d.fp += mm * (B0[m] * C - A0[m] * S);
      d.ftp += mm * (B1[m] * C - A1[m] * S);
      d.fpp -= mm * mm * (A0[m] * C + B0[m] * S);
    }
    return d;
  }

 private:
  const HostTables& ht_;
  int L_;
  LegendreRows leg_;
  std::vector<double> cs_, sn_, dp_, d2p_, acc_;
};

// Refines a grid candidate to the local maximum with trust-region Newton steps on the sphere.
template <typename T>
Candidate refine(RowEvaluator& eval, const T* c, Candidate cd, double radius, int max_iter) {
  const double tol = 1e-11;   // radians (~0.06 mm)
  const double final = 1e-7;  // a Newton step this short is taken without re-evaluating: quadratic
                              // convergence leaves ~r^2 error, and f changes by O(|g| r) ~ 1e-14 f
  Derivs d = eval(c, cd.theta, cd.phi);
  cd.value = d.f;
  for (int it = 0; it < max_iter && radius > tol; ++it) {
    double nt, np;
    const double r = sphere_ascent_step(d, cd.theta, cd.phi, radius, &nt, &np);
    if (r < tol) break;
    if (r < final && d.ftt < 0.0) {
      cd.theta = nt;
      cd.phi = np;
      break;
    }
    const Derivs dn = eval(c, nt, np);
    if (dn.f >= d.f) {
      cd.theta = nt;
      cd.phi = np;
      cd.value = dn.f;
      d = dn;
    } else {
      radius = 0.25 * r;
    }
  }
  return cd;
}

}  // namespace

template <typename T>
void shdd_decode(const T* coeffs, T* out_coords, T* out_scores, int64_t batch, int L,
                 const DecodeOptions& opt_in) {
  DecodeOptions opt = opt_in;
  if (opt.nlat <= 0) opt.nlat = decode_default_nlat(L);
  if (opt.nlon <= 0) opt.nlon = 2 * opt.nlat;
  if (opt.candidates <= 0) opt.candidates = 2 * opt.top_k + 2;
  opt.candidates = std::max(opt.candidates, opt.top_k);
  if (opt.min_separation <= 0) opt.min_separation = kPi / (L + 1);
  const int nlat = opt.nlat, nlon = opt.nlon, M = L + 1;
  const auto tables = host_tables(L);
  constexpr int W = SeparableGrid::W;
  const SeparableGrid grid(tables->view(), L, nlat, nlon);
  const int64_t K = (int64_t)M * M;
  const double grid_step = std::max(kPi / nlat, 2.0 * kPi / nlon);
  const int64_t nchunks = (batch + W - 1) / W;

  RegionErrors errs;
#pragma omp parallel if(!in_forked_child()) num_threads(region_threads())
  {
    SeparableGrid::Work w;
    std::unique_ptr<RowEvaluator> eval_ptr;
    // The coarse map arrives ring pair by ring pair: north ring s and south ring nlat-1-s for
    // s = 0, 1, ...  Each hemisphere keeps its last 3 rings per row ([2][3][W][nlon]: never the
    // whole map) and scans a ring for local maxima once both of its neighbours are known; the two
    // sequences meet at the equator.
    std::vector<float> rings;
    std::vector<TopList> tops;
    errs.guard([&] {
      grid.init(w);
      eval_ptr = std::make_unique<RowEvaluator>(*tables, L);
      rings.resize(2 * 3 * (size_t)W * nlon);
      tops.assign(W, TopList(opt.candidates));
    });
#pragma omp for schedule(dynamic)
    for (int64_t cb = 0; cb < nchunks; ++cb) errs.guard([&] {
      RowEvaluator& eval = *eval_ptr;
      const int64_t b0 = cb * W;
      const int rows = (int)std::min<int64_t>(W, batch - b0);
      for (int r = 0; r < rows; ++r) tops[r].clear();
      grid.load_coeffs(coeffs + b0 * K, rows, w);
      auto slot = [&](int side, int seq, int r) {
        return rings.data() + (((size_t)side * 3 + seq % 3) * W + r) * nlon;
      };
      auto ring_of = [&](int side, int seq) { return side ? nlat - 1 - seq : seq; };
      int count[2] = {0, 0};
      for (int p0 = 0; p0 < grid.npairs(); p0 += grid.group()) {
        grid.legendre(p0, w);
        grid.for_each_ring(p0, [&](int, int gslot) {
          const int side = gslot >= grid.group();  // 0: north hemisphere, 1: south
          const double* f = grid.fourier(grid.ring_sums(w, gslot), w);
          const int seq = count[side]++;
          for (int r = 0; r < rows; ++r) {
            float* dst = slot(side, seq, r);
            for (int k = 0; k < nlon; ++k) dst[k] = (float)f[(size_t)k * W + r];
          }
          if (seq >= 1)  // ring seq - 1 of this hemisphere now has both neighbours
            for (int r = 0; r < rows; ++r)
              ring_maxima(seq >= 2 ? slot(side, seq - 2, r) : nullptr, slot(side, seq - 1, r), slot(side, seq, r),
                          ring_of(side, seq - 1), nlat, nlon, tops[r]);
        });
      }
      for (int side = 0; side < 2; ++side) {  // the last ring of each hemisphere: the other's is its neighbour
        const int seq = count[side] - 1, other = count[1 - side] - 1;
        if (seq < 0) continue;
        for (int r = 0; r < rows; ++r)
          ring_maxima(seq >= 1 ? slot(side, seq - 1, r) : nullptr, slot(side, seq, r),
                      other >= 0 ? slot(1 - side, other, r) : nullptr, ring_of(side, seq), nlat, nlon, tops[r]);
      }
      for (int64_t r = 0; r < rows; ++r) {
        const T* c = coeffs + (b0 + r) * K;
        std::vector<Candidate>& cand = tops[r].items();
        if (opt.max_iter > 0)
          for (auto& cd : cand) cd = refine(eval, c, cd, grid_step, opt.max_iter);
        std::stable_sort(cand.begin(), cand.end(),
                         [](const Candidate& a, const Candidate& b) { return a.value > b.value; });
        std::vector<Candidate> kept;
        for (const auto& cd : cand) {
          if ((int)kept.size() == opt.top_k) break;
          bool far = true;
          for (const auto& q : kept)
            if (angular_distance(cd.theta, cd.phi, q.theta, q.phi) < opt.min_separation) far = false;
          if (far) kept.push_back(cd);
        }
        T* oc = out_coords + (b0 + r) * opt.top_k * 2;
        T* os = out_scores + (b0 + r) * opt.top_k;
        for (int q = 0; q < opt.top_k; ++q) {
          if (q < (int)kept.size()) {
            oc[2 * q] = (T)(90.0 - kept[q].theta / kDegToRad);
            oc[2 * q + 1] = (T)wrap_lon_deg(kept[q].phi / kDegToRad);
            os[q] = (T)kept[q].value;
          } else {  // fewer distinct local maxima than top_k
            oc[2 * q] = oc[2 * q + 1] = std::numeric_limits<T>::quiet_NaN();
            os[q] = -std::numeric_limits<T>::infinity();
          }
        }
      }
    });
  }
  errs.rethrow();
}

// Both derivative evaluators at one point, for the tests (method 0: eval_derivs, the per-order
// form the CUDA kernels use; 1: the CPU row form).
void debug_eval(const double* coeffs, int L, double theta, double phi, int method, double* out6) {
  const auto tables = host_tables(L);
  Derivs d;
  if (method == 0) {
    auto coeff = [coeffs](int64_t k) { return coeffs[k]; };
    eval_derivs(coeff, L, tables->view(), theta, phi, 0, 1, 2, &d);
  } else {
    RowEvaluator eval(*tables, L);
    d = eval(coeffs, theta, phi);
  }
  out6[0] = d.f; out6[1] = d.ft; out6[2] = d.fp; out6[3] = d.ftt; out6[4] = d.ftp; out6[5] = d.fpp;
}

#define LOCDIFF_INSTANTIATE(T)                                                                \
  template int sh_basis<T>(const T*, T*, int64_t, int, const T*);                          \
  template void sh_basis_backward<T>(const T*, const T*, T*, int64_t, int, const T*);       \
  template void sh_synthesis<T>(const T*, T*, int64_t, int, int, int);                      \
  template void sh_synthesis_backward<T>(const T*, T*, int64_t, int, int, int);             \
  template void shdd_decode<T>(const T*, T*, T*, int64_t, int, const DecodeOptions&);
LOCDIFF_INSTANTIATE(float)
LOCDIFF_INSTANTIATE(double)
#undef LOCDIFF_INSTANTIATE

}  // namespace cpu
}  // namespace locdiff
