// The separable spherical-harmonic transform on the cell-centred equiangular grid, for W coefficient
// rows at a time (the lanes of lane_fft.h): used by sh_synthesis, its adjoint (the backward pass)
// and the decoder's coarse map.
//
//   synthesis  f(t_j, p_k) = sum_m [ gc_m(j) sqrt2 cos(m p_k) + gs_m(j) sqrt2 sin(m p_k) ]   (m = 0: gc_0)
//              gc_m(j) = sum_l c_{l,m} Pbar_lm(cos t_j),  gs_m(j) = sum_l c_{l,-m} Pbar_lm(cos t_j)
//
// Legendre stage: rings come in north/south pairs (t, pi - t) with Pbar_lm(-x) = (-1)^(l+m) Pbar_lm(x),
// so one pass over l yields the even and odd parts E, O of both rings (north E + O, south E - O): half
// the work.  For each order m the Pbar values of a group of ring pairs are computed once (recurrence in
// l, vectorised over the pairs) and reused for all W rows; the inner loop is an outer product of
// 4 ring pairs x W rows held in registers.  Fourier stage: one real FFT per ring (any nlon; even nlon
// as a half-length complex FFT), all W rows in the lanes.  The adjoint runs the transposed stages in
// reverse order.  O(B (L^2 nlat / 2 + nlat nlon log nlon)) instead of O(B L nlat nlon) for direct sums.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "lane_fft.h"
#include "sh_math.h"

namespace locdiff {

class SeparableGrid {
 public:
  static constexpr int W = lanes::W;
  static constexpr int kTile = 4;  // ring pairs per register tile

  // group: ring pairs per Legendre task (rounded up to the tile).
  SeparableGrid(const SHTables& t, int L, int nlat, int nlon, int group = 16)
      : t_(t), L_(L), M_(L + 1), nlat_(nlat), nlon_(nlon), npairs_((nlat + 1) / 2),
        half_(nlon % 2 == 0 ? nlon / 2 : 0),
        fwd_(half_ ? half_ : nlon, +1), adj_(half_ ? half_ : nlon, -1) {
    group_ = std::max(kTile, (std::min(group, npairs_) + kTile - 1) / kTile * kTile);
    x_.assign(npairs_ + group_, 0.0);  // padded: a group's tail reads zeros
    u_.assign(npairs_ + group_, 0.0);
    for (int j = 0; j < npairs_; ++j) {
      const double th = (j + 0.5) * kPi / nlat;
      x_[j] = std::cos(th);
      u_[j] = std::sin(th);
    }
    moff_.resize(M_ + 1);
    moff_[0] = 0;
    for (int m = 0; m < M_; ++m) moff_[m + 1] = moff_[m] + 2 * (int64_t)W * (L - m + 1);
    // sqrt2 e^{i m phi0}, phi0 = -pi + pi / nlon (the first cell centre), and e^{i 2 pi b / nlon}
    phase_.resize(2 * (size_t)M_);
    for (int m = 0; m < M_; ++m) {
      const double a = std::fmod((double)m * (-kPi + kPi / nlon), 2.0 * kPi);
      phase_[2 * m] = (m ? kSqrt2 : 1.0) * std::cos(a);
      phase_[2 * m + 1] = (m ? kSqrt2 : 1.0) * std::sin(a);
    }
    if (half_) {
      omega_.resize(2 * (size_t)(half_ + 1));
      for (int b = 0; b <= half_; ++b) {
        omega_[2 * b] = std::cos(2.0 * kPi * b / nlon);
        omega_[2 * b + 1] = std::sin(2.0 * kPi * b / nlon);
      }
    }
  }

  int npairs() const { return npairs_; }
  int group() const { return group_; }
  int ngroups() const { return (npairs_ + group_ - 1) / group_; }

  // Per-thread buffers (doubles).
  struct Work {
    std::vector<double> cw;     // coefficients of W rows, per m: [l - m][cos W | sin W]
    std::vector<double> g;      // Legendre sums of a group's rings: [2 group][M][cos W | sin W]
    std::vector<double> ptab;   // Pbar of the group's pairs for one m: [L + 1][group]
    std::vector<double> pmm;    // sectoral Pbar_mm of each pair, carried from m to m + 1
    std::vector<double> spec, fbuf, scratch;  // Fourier stage
  };
  void init(Work& w) const {
    w.cw.assign(moff_[M_], 0.0);
    w.g.assign(2 * (size_t)group_ * M_ * 2 * W, 0.0);
    w.ptab.assign((size_t)M_ * group_, 0.0);
    w.pmm.assign(group_, 0.0);
    const size_t n = half_ ? half_ + 1 : nlon_;
    w.spec.assign(2 * W * n, 0.0);
    w.fbuf.assign(2 * W * n, 0.0);
    w.scratch.assign(std::max(fwd_.scratch_size(), adj_.scratch_size()), 0.0);
  }

  // Rows [0, rows) of coeffs (row stride K = M^2) into the lane layout; missing rows are zero.
  template <typename T>
  void load_coeffs(const T* coeffs, int rows, Work& w) const {
    for (int m = 0; m <= L_; ++m) {
      double* c = w.cw.data() + moff_[m];
      for (int l = m; l <= L_; ++l) {
        double* cl = c + 2 * W * (l - m);
        const int64_t kc = (int64_t)l * l + l + m, ks = (int64_t)l * l + l - m;
        for (int v = 0; v < W; ++v) {
          const bool in = v < rows;
          cl[v] = in ? (double)coeffs[v * (int64_t)M_ * M_ + kc] : 0.0;
          cl[W + v] = (in && m) ? (double)coeffs[v * (int64_t)M_ * M_ + ks] : 0.0;
        }
      }
    }
  }
  // The lane layout back into rows [0, rows) of out (the adjoint's result).
  template <typename T>
  void store_coeffs(const Work& w, int rows, T* out) const {
    for (int m = 0; m <= L_; ++m) {
      const double* c = w.cw.data() + moff_[m];
      for (int l = m; l <= L_; ++l) {
        const double* cl = c + 2 * W * (l - m);
        const int64_t kc = (int64_t)l * l + l + m, ks = (int64_t)l * l + l - m;
        for (int v = 0; v < rows; ++v) {
          out[v * (int64_t)M_ * M_ + kc] = (T)cl[v];
          if (m) out[v * (int64_t)M_ * M_ + ks] = (T)cl[W + v];
        }
      }
    }
  }

  // Local index in w.g of ring pair p (first pair p0): north ring at p - p0, south at group + p - p0.
  const double* ring_sums(const Work& w, int local) const { return w.g.data() + (size_t)local * M_ * 2 * W; }
  double* ring_sums(Work& w, int local) const { return w.g.data() + (size_t)local * M_ * 2 * W; }
  int north_ring(int pair) const { return pair; }
  int south_ring(int pair) const { return nlat_ - 1 - pair; }  // == north_ring for the middle ring of odd nlat

  // f(ring, slot) for each ring of the group of pairs starting at p0: the north then the south ring of
  // each pair (the middle ring of an odd nlat once); slot indexes ring_sums (south slots from group()).
  template <typename F>
  void for_each_ring(int p0, F&& f) const {
    const int np = std::min(group_, npairs_ - p0);
    for (int i = 0; i < np; ++i) {
      f(north_ring(p0 + i), i);
      if (south_ring(p0 + i) != north_ring(p0 + i)) f(south_ring(p0 + i), group_ + i);
    }
  }

  // Legendre stage for pairs [p0, min(p0 + group, npairs)): w.g = gc, gs of each of their rings.
  void legendre(int p0, Work& w) const {
    const int np = std::min(group_, npairs_ - p0), G = group_;
    start_pairs(np, w);
    for (int m = 0; m <= L_; ++m) {
      fill_ptab(p0, m, w);
      const double* c = w.cw.data() + moff_[m];
      const int nl = L_ - m + 1;
      for (int t0 = 0; t0 < np; t0 += kTile) {
        lanes::vd acc[kTile][2][2];  // [pair][even/odd l+m][cos/sin]
        for (int t = 0; t < kTile; ++t)
          for (int a = 0; a < 2; ++a) acc[t][a][0] = acc[t][a][1] = lanes::vd{};
        const double* pt = w.ptab.data() + t0;
        int il = 0;
        for (; il + 1 < nl; il += 2) {
          const lanes::vd c0 = lanes::load(c + 2 * W * il), s0 = lanes::load(c + 2 * W * il + W);
          const lanes::vd c1 = lanes::load(c + 2 * W * (il + 1)), s1 = lanes::load(c + 2 * W * (il + 1) + W);
          const double* p0r = pt + (size_t)il * G;
          const double* p1r = p0r + G;
          for (int t = 0; t < kTile; ++t) {
            acc[t][0][0] += p0r[t] * c0;
            acc[t][0][1] += p0r[t] * s0;
            acc[t][1][0] += p1r[t] * c1;
            acc[t][1][1] += p1r[t] * s1;
          }
        }
        if (il < nl) {
          const lanes::vd c0 = lanes::load(c + 2 * W * il), s0 = lanes::load(c + 2 * W * il + W);
          const double* p0r = pt + (size_t)il * G;
          for (int t = 0; t < kTile; ++t) {
            acc[t][0][0] += p0r[t] * c0;
            acc[t][0][1] += p0r[t] * s0;
          }
        }
        for (int t = 0; t < kTile && t0 + t < np; ++t) {
          const int pair = p0 + t0 + t;
          double* gn = ring_sums(w, t0 + t) + (size_t)m * 2 * W;
          lanes::store(gn, acc[t][0][0] + acc[t][1][0]);
          lanes::store(gn + W, acc[t][0][1] + acc[t][1][1]);
          if (south_ring(pair) != north_ring(pair)) {
            double* gs = ring_sums(w, G + t0 + t) + (size_t)m * 2 * W;
            lanes::store(gs, acc[t][0][0] - acc[t][1][0]);
            lanes::store(gs + W, acc[t][0][1] - acc[t][1][1]);
          }
        }
      }
    }
  }

  // Transpose of legendre(): w.cw += sum over the group's rings of Pbar_lm times their gc, gs (w.g).
  // The middle ring of an odd nlat is counted once.
  void legendre_adjoint(int p0, Work& w) const {
    const int np = std::min(group_, npairs_ - p0), G = group_;
    start_pairs(np, w);
    for (int m = 0; m <= L_; ++m) {
      fill_ptab(p0, m, w);
      double* c = w.cw.data() + moff_[m];
      const int nl = L_ - m + 1;
      for (int t0 = 0; t0 < np; t0 += kTile) {
        lanes::vd eo[kTile][2][2];  // [pair][even/odd][cos/sin]: north + south, north - south
        for (int t = 0; t < kTile; ++t) {
          if (t0 + t >= np) {
            for (int a = 0; a < 2; ++a) eo[t][a][0] = eo[t][a][1] = lanes::vd{};
            continue;
          }
          const int pair = p0 + t0 + t;
          const double* gn = ring_sums(w, t0 + t) + (size_t)m * 2 * W;
          const lanes::vd nc = lanes::load(gn), ns = lanes::load(gn + W);
          lanes::vd sc{}, ss{};
          if (south_ring(pair) != north_ring(pair)) {
            const double* gs = ring_sums(w, G + t0 + t) + (size_t)m * 2 * W;
            sc = lanes::load(gs);
            ss = lanes::load(gs + W);
          }
          eo[t][0][0] = nc + sc;
          eo[t][0][1] = ns + ss;
          eo[t][1][0] = nc - sc;
          eo[t][1][1] = ns - ss;
        }
        const double* pt = w.ptab.data() + t0;
        for (int il = 0; il < nl; ++il) {
          const int par = il & 1;
          const double* pr = pt + (size_t)il * G;
          lanes::vd ac = lanes::load(c + 2 * W * il), as = lanes::load(c + 2 * W * il + W);
          for (int t = 0; t < kTile; ++t) {
            ac += pr[t] * eo[t][par][0];
            as += pr[t] * eo[t][par][1];
          }
          lanes::store(c + 2 * W * il, ac);
          lanes::store(c + 2 * W * il + W, as);
        }
      }
    }
  }

  // Fourier stage of one ring: gcs = [M][cos W | sin W] -> returns f[nlon][W] (in w.fbuf or w.spec).
  const double* fourier(const double* gcs, Work& w) const {
    const int N = nlon_;
    double* spec = w.spec.data();
    std::fill(w.spec.begin(), w.spec.end(), 0.0);
    // Z_m = (gc - i gs) sqrt2 e^{i m phi0}: f_k = sum_m Re(Z_m e^{2 pi i m k / N}); fold m into [0, N).
    for (int m = 0; m <= L_; ++m) {
      const lanes::vd gc = lanes::load(gcs + 2 * W * m), gs = lanes::load(gcs + 2 * W * m + W);
      const double pr = phase_[2 * m], pi = phase_[2 * m + 1];
      const lanes::vd zr = gc * pr + gs * pi, zi = gc * pi - gs * pr;
      const int b = (int)(m % N);
      if (half_) {  // Hermitian half spectrum X_0..X_H, X_b = Z / 2 (X_0, X_H real)
        if (b == 0 || b == half_) {
          add(spec + 2 * W * b, zr, lanes::vd{});
        } else if (b < half_) {
          add(spec + 2 * W * b, 0.5 * zr, 0.5 * zi);
        } else {
          add(spec + 2 * W * (N - b), 0.5 * zr, -0.5 * zi);
        }
      } else {  // full spectrum, real part of the inverse transform
        if (b == 0) {
          add(spec, zr, lanes::vd{});
        } else {
          add(spec + 2 * W * b, 0.5 * zr, 0.5 * zi);
          add(spec + 2 * W * (N - b), 0.5 * zr, -0.5 * zi);
        }
      }
    }
    if (!half_) {
      fwd_.run(spec, w.fbuf.data(), w.scratch.data());
      for (int k = 0; k < N; ++k) lanes::store(spec + (size_t)W * k, lanes::load(w.fbuf.data() + 2 * (size_t)W * k));
      return spec;
    }
    // Half-length complex transform: Z_b = A_b + i B_b, A = X_b + conj(X_{H-b}),
    // B = (X_b - conj(X_{H-b})) e^{2 pi i b / N}; z_j = x_{2j} + i x_{2j+1}.
    const int H = half_;
    double* z = w.fbuf.data();
    for (int b = 0; b < H; ++b) {
      const lanes::cv xb = lanes::cload(spec + 2 * W * b), xc = lanes::cload(spec + 2 * W * (H - b));
      const lanes::cv a = {xb.re + xc.re, xb.im - xc.im};
      const lanes::cv d = lanes::cmul({xb.re - xc.re, xb.im + xc.im}, omega_[2 * b], omega_[2 * b + 1]);
      lanes::cstore(z + 2 * W * b, {a.re - d.im, a.im + d.re});
    }
    fwd_.run(z, spec, w.scratch.data());
    return spec;  // [H][x_2j W | x_2j+1 W] is exactly f[N][W]
  }

  // Transpose of fourier(): f[nlon][W] (modified) -> gcs = [M][cos W | sin W].
  void fourier_adjoint(double* f, double* gcs, Work& w) const {
    const int N = nlon_;
    double* spec = w.spec.data();
    if (half_) {
      const int H = half_;
      adj_.run(f, spec, w.scratch.data());  // Z = DFT_H(x_2j + i x_2j+1)
      // G_b = E_b + e^{-2 pi i b / N} O_b, E = (Z_b + conj Z_{H-b}) / 2, O = (Z_b - conj Z_{H-b}) / 2i
      double* g = w.fbuf.data();
      for (int b = 0; b <= H; ++b) {
        const lanes::cv zb = lanes::cload(spec + 2 * W * (b % H)), zc = lanes::cload(spec + 2 * W * ((H - b) % H));
        const lanes::cv e = {0.5 * (zb.re + zc.re), 0.5 * (zb.im - zc.im)};
        const lanes::cv o = {0.5 * (zb.im + zc.im), -0.5 * (zb.re - zc.re)};
        const lanes::cv od = lanes::cmul(o, omega_[2 * b], -omega_[2 * b + 1]);
        lanes::cstore(g + 2 * W * b, e + od);
      }
      spec = g;
    } else {
      double* in = w.fbuf.data();
      for (int k = 0; k < N; ++k) {
        lanes::store(in + 2 * (size_t)W * k, lanes::load(f + (size_t)W * k));
        lanes::store(in + 2 * (size_t)W * k + W, lanes::vd{});
      }
      adj_.run(in, spec, w.scratch.data());
    }
    for (int m = 0; m <= L_; ++m) {
      const int b = (int)(m % N);
      lanes::vd gr, gi;
      if (half_ && b > half_) {
        gr = lanes::load(spec + 2 * W * (N - b));
        gi = -lanes::load(spec + 2 * W * (N - b) + W);
      } else {
        gr = lanes::load(spec + 2 * W * b);
        gi = lanes::load(spec + 2 * W * b + W);
      }
      const double pr = phase_[2 * m], pi = phase_[2 * m + 1];
      lanes::store(gcs + 2 * W * m, gr * pr + gi * pi);
      lanes::store(gcs + 2 * W * m + W, m ? gr * pi - gi * pr : lanes::vd{});
    }
  }

 private:
  static void add(double* p, const lanes::vd& re, const lanes::vd& im) {
    lanes::store(p, lanes::load(p) + re);
    lanes::store(p + W, lanes::load(p + W) + im);
  }

  void start_pairs(int np, Work& w) const {
    for (int i = 0; i < group_; ++i) w.pmm[i] = i < np ? kY00 : 0.0;
  }

  // ptab[l - m][i] = Pbar_lm(x of pair p0 + i); pairs past the group's last are zero (their pmm is 0).  Called for m = 0, 1, ...
  // in order: the sectoral start Pbar_mm = sect[m] u Pbar_{m-1,m-1} is carried in w.pmm.
  void fill_ptab(int p0, int m, Work& w) const {
    const int G = group_;
    double* pt = w.ptab.data();
    const double* xs = x_.data() + p0;
    const double* us = u_.data() + p0;
    if (m > 0)
      for (int i = 0; i < G; ++i) w.pmm[i] *= t_.sect[m] * us[i];
    for (int i = 0; i < G; ++i) pt[i] = w.pmm[i];
    if (m == L_) return;
    {
      const double a = t_.a[tri(m + 1, m)];
      for (int i = 0; i < G; ++i) pt[G + i] = a * xs[i] * pt[i];
    }
    for (int l = m + 2; l <= L_; ++l) {
      const double a = t_.a[tri(l, m)], b = t_.b[tri(l, m)];
      double* cur = pt + (size_t)(l - m) * G;
      const double* p1 = cur - G;
      const double* p2 = cur - 2 * G;
#pragma omp simd
      for (int i = 0; i < G; ++i) cur[i] = a * (xs[i] * p1[i] - b * p2[i]);
    }
  }

  SHTables t_;
  int L_, M_, nlat_, nlon_, npairs_, half_, group_ = kTile;
  lanes::LaneFft fwd_, adj_;
  std::vector<double> x_, u_, phase_, omega_;
  std::vector<int64_t> moff_;
};

}  // namespace locdiff
