// Mixed-radix complex FFT over W independent transforms side by side ("lanes").
//
// Data layout: element i of all W transforms is re[W] followed by im[W] at offset 2*W*i, so every
// butterfly is a W-wide vector operation (the CPU kernels put W coefficient rows in the lanes).
// Any length: radices 4, 2, 3, 5 are written out; other primes use a generic butterfly with the
// symmetric-pair trick (cost ~ p/2 per output).  Recursive decimation in time, out of place, with the
// combine of each level done in place (for fixed k the inputs q*m + k and the outputs k + m*s are the
// same slots).  sign = +1: x_k = sum_m X_m e^{+2 pi i mk/n} (synthesis); -1: forward (analysis).
#pragma once

#include <cmath>
#include <cstring>
#include <stdexcept>
#include <vector>

#include "sh_math.h"

namespace locdiff {
namespace lanes {

constexpr int W = 8;
typedef double vd __attribute__((vector_size(8 * W)));
// Same vector, byte-aligned: loads and stores through it may touch any double-aligned address.
typedef double vdu __attribute__((vector_size(8 * W), aligned(8)));

inline vd load(const double* p) { return *reinterpret_cast<const vdu*>(p); }
inline void store(double* p, vd v) { *reinterpret_cast<vdu*>(p) = v; }

struct cv {
  vd re, im;
};
inline cv cload(const double* p) { return {load(p), load(p + W)}; }
inline void cstore(double* p, const cv& a) {
  store(p, a.re);
  store(p + W, a.im);
}
inline cv operator+(const cv& a, const cv& b) { return {a.re + b.re, a.im + b.im}; }
inline cv operator-(const cv& a, const cv& b) { return {a.re - b.re, a.im - b.im}; }
inline cv cmul(const cv& a, double wr, double wi) { return {a.re * wr - a.im * wi, a.re * wi + a.im * wr}; }
inline cv scale(const cv& a, double s) { return {a.re * s, a.im * s}; }
// sign * i * a
inline cv rot(const cv& a, int sign) { return sign > 0 ? cv{-a.im, a.re} : cv{a.im, -a.re}; }

class LaneFft {
 public:
  LaneFft(int n, int sign) : n_(n), sign_(sign) {
    if (n < 1) throw std::invalid_argument("LaneFft: length must be >= 1");
    int r = n;
    while (r % 4 == 0) { radix_.push_back(4); r /= 4; }
    while (r % 2 == 0) { radix_.push_back(2); r /= 2; }
    for (int p = 3; (long long)p * p <= r; p += 2)
      while (r % p == 0) { radix_.push_back(p); r /= p; }
    if (r > 1) radix_.push_back(r);
    int nl = n;
    for (int p : radix_) {
      const int m = nl / p;
      std::vector<double> tw(2 * (size_t)(p - 1) * m);
      for (int q = 1; q < p; ++q)
        for (int k = 0; k < m; ++k) {
          const double a = sign * 2.0 * kPi * (double)(((long long)q * k) % nl) / nl;
          tw[2 * ((size_t)(q - 1) * m + k)] = std::cos(a);
          tw[2 * ((size_t)(q - 1) * m + k) + 1] = std::sin(a);
        }
      tw_.push_back(std::move(tw));
      std::vector<double> roots(2 * (size_t)p);
      for (int s = 0; s < p; ++s) {
        roots[2 * s] = std::cos(2.0 * kPi * s / p);
        roots[2 * s + 1] = sign * std::sin(2.0 * kPi * s / p);
      }
      roots_.push_back(std::move(roots));
      max_radix_ = std::max(max_radix_, p);
      nl = m;
    }
  }
  // Doubles of scratch that run() needs.
  size_t scratch_size() const { return 4 * (size_t)W * (max_radix_ + 1); }
  // out[n] = transform of in[n] (layouts above; in and out must not overlap).
  void run(const double* in, double* out, double* scratch) const { rec(in, 1, out, 0, n_, scratch); }

 private:
  void rec(const double* in, long long stride, double* out, int level, int n, double* scratch) const {
    const int p = radix_.empty() ? 1 : radix_[level];
    if (n == 1) {
      std::memcpy(out, in, 2 * W * sizeof(double));
      return;
    }
    const int m = n / p;
    const long long step = 2LL * W;
    if (m == 1) {  // last level: p strided inputs, straight into the butterfly
      butterfly(level, p, [&](int q) { return cload(in + q * stride * step); },
                [&](int s, const cv& v) { cstore(out + s * step, v); }, scratch);
      return;
    }
    for (int q = 0; q < p; ++q) rec(in + q * stride * step, stride * p, out + (long long)q * m * step, level + 1, m, scratch);
    const double* tw = tw_[level].data();
    for (int k = 0; k < m; ++k) {
      butterfly(level, p,
                [&](int q) {
                  const cv a = cload(out + ((long long)q * m + k) * step);
                  if (q == 0 || k == 0) return a;
                  const double* w = tw + 2 * ((size_t)(q - 1) * m + k);
                  return cmul(a, w[0], w[1]);
                },
                [&](int s, const cv& v) { cstore(out + ((long long)k + (long long)m * s) * step, v); }, scratch);
    }
  }

  // y_s = sum_q t_q r^(q s), r = e^(sign 2 pi i / p).  All inputs are read before any output is written.
  template <typename In, typename Out>
  void butterfly(int level, int p, In in, Out out, double* scratch) const {
    const int sg = sign_;
    switch (p) {
      case 2: {
        const cv a = in(0), b = in(1);
        out(0, a + b);
        out(1, a - b);
        return;
      }
      case 3: {
        constexpr double h = 0.86602540378443864676372317075293618;  // sqrt(3)/2
        const cv a = in(0), b = in(1), c = in(2);
        const cv s = b + c, d = rot(scale(b - c, h), sg);
        const cv m = a - scale(s, 0.5);
        out(0, a + s);
        out(1, m + d);
        out(2, m - d);
        return;
      }
      case 4: {
        const cv a = in(0), b = in(1), c = in(2), d = in(3);
        const cv s02 = a + c, d02 = a - c, s13 = b + d, d13 = rot(b - d, sg);
        out(0, s02 + s13);
        out(1, d02 + d13);
        out(2, s02 - s13);
        out(3, d02 - d13);
        return;
      }
      case 5: {
        constexpr double c1 = 0.30901699437494742410229341718281906;   // cos(2 pi / 5)
        constexpr double c2 = -0.80901699437494742410229341718281906;  // cos(4 pi / 5)
        constexpr double s1 = 0.95105651629515357211643933337938214;   // sin(2 pi / 5)
        constexpr double s2 = 0.58778525229247312916870595463907277;   // sin(4 pi / 5)
        const cv a = in(0), b = in(1), c = in(2), d = in(3), e = in(4);
        const cv p14 = b + e, m14 = b - e, p23 = c + d, m23 = c - d;
        const cv r1 = a + scale(p14, c1) + scale(p23, c2), r2 = a + scale(p14, c2) + scale(p23, c1);
        const cv i1 = rot(scale(m14, s1) + scale(m23, s2), sg), i2 = rot(scale(m14, s2) - scale(m23, s1), sg);
        out(0, a + p14 + p23);
        out(1, r1 + i1);
        out(4, r1 - i1);
        out(2, r2 + i2);
        out(3, r2 - i2);
        return;
      }
      default: {  // odd prime: pair q with p - q
        const int h = (p - 1) / 2;
        double* sum = scratch;                      // [h][2W]: t_q + t_{p-q}
        double* dif = scratch + 2 * (size_t)W * h;  // [h][2W]: t_q - t_{p-q}
        const cv a = in(0);
        cv total = a;
        for (int q = 1; q <= h; ++q) {
          const cv x = in(q), y = in(p - q);
          cstore(sum + 2 * W * (q - 1), x + y);
          cstore(dif + 2 * W * (q - 1), x - y);
          total = total + x + y;
        }
        const double* roots = roots_[level].data();
        for (int s = 1; s <= h; ++s) {
          cv re = a, im{vd{}, vd{}};
          for (int q = 1; q <= h; ++q) {
            const int idx = (int)(((long long)q * s) % p);
            re = re + scale(cload(sum + 2 * W * (q - 1)), roots[2 * idx]);
            im = im + scale(cload(dif + 2 * W * (q - 1)), roots[2 * idx + 1]);
          }
          const cv ri = {-im.im, im.re};  // i * im (the sign is in the roots)
          out(s, re + ri);
          out(p - s, re - ri);
        }
        out(0, total);
        return;
      }
    }
  }

  int n_, sign_;
  int max_radix_ = 1;
  std::vector<int> radix_;
  std::vector<std::vector<double>> tw_, roots_;
};

}  // namespace lanes
}  // namespace locdiff
