// Shared spherical-harmonic math for the CPU and CUDA kernels.
//
// Conventions (design.md section 2): real, orthonormal SH without the Condon-Shortley phase,
//   Y_l0  = Pbar_l0(cos t)
//   Y_lm  = sqrt(2) Pbar_lm(cos t) cos(m p)      (m > 0)
//   Y_l-m = sqrt(2) Pbar_lm(cos t) sin(m p)      (m > 0)
// where Pbar_lm includes the factor sqrt((2l+1)/(4 pi) (l-m)!/(l+m)!), t = colatitude, p = longitude.
// Column index of (l, m) in a row: l*l + l + m.
//
// Everything is computed in double with fully normalised recurrences (no factorials): the sectoral
// start Pbar_mm = Pbar_00 prod_{k<=m} sqrt((2k+1)/(2k)) sin(t)^m and the three-term recurrence in l.
// In double this stays accurate up to L ~ 1900 (the sectoral term only underflows where the true
// values for l <= L are themselves below ~1e-150), so we cap L at kMaxDegree.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define LD_HD __host__ __device__ __forceinline__
#else
#define LD_HD inline
#endif

namespace locdiff {

constexpr int kMaxDegree = 1800;
constexpr double kPi = 3.14159265358979323846264338327950288;
constexpr double kDegToRad = kPi / 180.0;
constexpr double kSqrt2 = 1.41421356237309504880168872420969808;
constexpr double kY00 = 0.28209479177387814347403972578038630;  // 1 / sqrt(4 pi)

// Index of (l, m >= 0) in the triangular tables.
LD_HD int64_t tri(int l, int m) { return (int64_t)l * (l + 1) / 2 + m; }

// Precomputed per-(l,m) recurrence coefficients; the layout does not depend on L, so one table
// built for the largest L seen serves every smaller L.  Pointers are host or device memory.
struct SHTables {
  const double* a;        // [tri]  Pbar_lm = a_lm (x Pbar_{l-1,m} - b_lm Pbar_{l-2,m})
  const double* b;        // [tri]
  const double* e;        // [tri]  sqrt((2l+1)/(2l-1) (l^2-m^2)): dPbar_lm/dt = (l x Pbar_lm - e_lm Pbar_{l-1,m}) / u
  const double* sect;     // [L+1]  sqrt((2m+1)/(2m)), sect[0] = 1 (sectoral step)
  const double* logsect;  // [L+1]  log(Pbar_00 prod_{k=1..m} sect[k])
  int L;                  // tables valid for degrees 0..L
};

// Fill host tables for degrees 0..L (arrays sized tri(L+1,0) and L+1).
inline void fill_tables(int L, double* a, double* b, double* e, double* sect, double* logsect) {
  for (int l = 0; l <= L; ++l) {
    for (int m = 0; m <= l; ++m) {
      const int64_t i = tri(l, m);
      if (l == m) {
        a[i] = 0.0;
        b[i] = 0.0;
        e[i] = 0.0;
        continue;
      }
      const double ll = l, mm = m;
      a[i] = std::sqrt((4.0 * ll * ll - 1.0) / (ll * ll - mm * mm));
      const double lm1 = ll - 1.0;
      b[i] = (l - 1 > m) ? std::sqrt((lm1 * lm1 - mm * mm) / (4.0 * lm1 * lm1 - 1.0)) : 0.0;
      e[i] = std::sqrt((2.0 * ll + 1.0) / (2.0 * ll - 1.0) * (ll * ll - mm * mm));
    }
  }
  sect[0] = 1.0;
  logsect[0] = std::log(kY00);
  for (int m = 1; m <= L; ++m) {
    sect[m] = std::sqrt((2.0 * m + 1.0) / (2.0 * m));
    logsect[m] = logsect[m - 1] + std::log(sect[m]);
  }
}

// Wrap a longitude in degrees to [-180, 180), exactly: fmod is exact, and r -/+ 360 for |r| in
// [180, 360) is exact too (Sterbenz); lon + 180 first would round a huge or tiny lon.
LD_HD double wrap_lon_deg(double lon) {
  double r = fmod(lon, 360.0);
  if (r >= 180.0) r -= 360.0;
  else if (r < -180.0) r += 360.0;
  return r;
}

// Colatitude/longitude in radians from (lat, lon) degrees; longitudes are wrapped first so that
// m * phi stays accurate for any finite input.
LD_HD void latlon_to_angles(double lat, double lon, double* theta, double* phi) {
  *theta = (90.0 - lat) * kDegToRad;
  *phi = wrap_lon_deg(lon) * kDegToRad;
}

// Pbar_mm(u) = exp(logsect[m] + m log u): closed form of the sectoral recurrence, so that a thread
// (or SIMD lane) owning one m needs no loop over smaller m.  Relative error ~ |exponent| * eps.
LD_HD double sectoral(const SHTables& t, int m, double u) {
  if (m == 0) return kY00;
  if (u <= 0.0) return 0.0;
  return exp(t.logsect[m] + m * log(u));
}

// Partial sums of f(t,p) = sum_lm c_lm Y_lm(t,p) and its derivatives over the orders
// m = m_begin, m_begin + m_step, ... <= L.  Splitting over m lets a CUDA warp share one point.
struct Derivs {
  double f, ft, fp, ftt, ftp, fpp;  // f and partial derivatives in (colatitude t, longitude p)
};

LD_HD void derivs_zero(Derivs* d) { d->f = d->ft = d->fp = d->ftt = d->ftp = d->fpp = 0.0; }
LD_HD void derivs_add(Derivs* d, const Derivs& o) {
  d->f += o.f; d->ft += o.ft; d->fp += o.fp; d->ftt += o.ftt; d->ftp += o.ftp; d->fpp += o.fpp;
}

// Smallest sin(colatitude) used where a formula divides by it; at the exact pole the divided
// quantities are finite limits, which this reproduces to double precision.
constexpr double kMinSin = 1e-150;

// order: 0 = value only, 1 = + first derivatives, 2 = + second derivatives.
// coeff(k) reads coefficient k (a functor so that callers can read float or double, strided or not).
template <typename Coeff>
LD_HD void eval_derivs(const Coeff& coeff, int L, const SHTables& tab, double theta, double phi,
                       int m_begin, int m_step, int order, Derivs* out) {
  double x = cos(theta), u = sin(theta);
  // Second derivatives of the m >= 1 terms cancel O(1/u) parts; keep u >= 1e-8 (6 cm from a pole)
  // so that f_tt stays accurate to ~1e-8 relative there.  First derivatives need no such margin.
  const double u_min = order >= 2 ? 1e-8 : kMinSin;
  if (u < u_min) {
    u = u_min;
    x = x < 0 ? -sqrt(1.0 - u * u) : sqrt(1.0 - u * u);
  }
  const double inv_u = 1.0 / u;
  Derivs acc;
  derivs_zero(&acc);
  for (int m = m_begin; m <= L; m += m_step) {
    double cm = 1.0, sm = 0.0;
    if (m > 0) {
      sm = sin(m * phi);
      cm = cos(m * phi);
      cm *= kSqrt2;
      sm *= kSqrt2;
    }
    double A0 = 0, A1 = 0, A2 = 0, B0 = 0, B1 = 0, B2 = 0;  // sums over l for the cos / sin parts
    if (m == 0) {
      // m = 0: dP_l0/dt = -sqrt(l(l+1)) P_l1 with P_l1 = u Q_l, Q the m=1 recurrence started at
      // Pbar_11 / u: pole-safe first and second derivatives.
      double p2 = 0.0, p1 = kY00;           // P_{l-2,0}, P_{l-1,0}
      double q2 = 0.0, q1 = 0.0;            // Q_{l-2}, Q_{l-1}
      A0 = coeff(0) * kY00;
      for (int l = 1; l <= L; ++l) {
        const int64_t i0 = tri(l, 0);
        const double p = tab.a[i0] * (x * p1 - tab.b[i0] * p2);
        double q;
        if (l == 1) {
          q = kY00 * tab.sect[1];
        } else {
          const int64_t i1 = tri(l, 1);
          q = tab.a[i1] * (x * q1 - tab.b[i1] * q2);
        }
        const double c = coeff((int64_t)l * l + l);
        const double s = sqrt((double)l * (l + 1));
        A0 += c * p;
        if (order >= 1) A1 += c * (-s * u * q);
        if (order >= 2) A2 += c * (s * x * q - (double)l * (l + 1) * p);
        p2 = p1; p1 = p;
        q2 = q1; q1 = q;
      }
    } else {
      double p1 = sectoral(tab, m, u), p2 = 0.0;  // P_{l-1,m} then P_{l-2,m} during the loop
      const double mm = (double)m * m;
      for (int l = m; l <= L; ++l) {
        double p;
        if (l == m) {
          p = p1;
          p1 = 0.0;
        } else {
          const int64_t i = tri(l, m);
          p = tab.a[i] * (x * p1 - tab.b[i] * p2);
        }
        const int64_t base = (int64_t)l * l + l;
        const double cc = coeff(base + m), cs = coeff(base - m);
        A0 += cc * p;
        B0 += cs * p;
        if (order >= 1) {
          const double dp = ((double)l * x * p - tab.e[tri(l, m)] * p1) * inv_u;
          A1 += cc * dp;
          B1 += cs * dp;
          if (order >= 2) {
            const double d2p = -x * inv_u * dp - ((double)l * (l + 1) - mm * inv_u * inv_u) * p;
            A2 += cc * d2p;
            B2 += cs * d2p;
          }
        }
        p2 = p1;
        p1 = p;
      }
    }
    acc.f += A0 * cm + B0 * sm;
    if (order >= 1) {
      acc.ft += A1 * cm + B1 * sm;
      acc.fp += m * (B0 * cm - A0 * sm);
    }
    if (order >= 2) {
      acc.ftt += A2 * cm + B2 * sm;
      acc.ftp += m * (B1 * cm - A1 * sm);
      acc.fpp += -(double)m * m * (A0 * cm + B0 * sm);
    }
  }
  *out = acc;
}

// One trust-region Newton / gradient-ascent step for maximising f on the sphere, in the orthonormal
// frame (e_t, e_p) at (theta, phi), moved along the geodesic (exponential map) so that it is valid
// at the poles.  Returns the step length in radians.
LD_HD double sphere_ascent_step(const Derivs& d, double theta, double phi, double radius,
                                double* new_theta, double* new_phi) {
  double x = cos(theta), u = sin(theta);
  if (u < 1e-12) u = 1e-12;
  const double cot = x / u;
  const double g1 = d.ft, g2 = d.fp / u;
  const double h11 = d.ftt;
  const double h12 = (d.ftp - cot * d.fp) / u;
  const double h22 = d.fpp / (u * u) + cot * d.ft;
  const double det = h11 * h22 - h12 * h12;
  double v1, v2;
  if (h11 < 0.0 && det > 0.0) {  // negative definite: Newton step  v = -H^{-1} g
    v1 = -(h22 * g1 - h12 * g2) / det;
    v2 = -(-h12 * g1 + h11 * g2) / det;
  } else {  // otherwise ascend along the gradient to the trust radius
    const double gn = sqrt(g1 * g1 + g2 * g2);
    if (gn == 0.0) {
      *new_theta = theta;
      *new_phi = phi;
      return 0.0;
    }
    v1 = g1 / gn * radius;
    v2 = g2 / gn * radius;
  }
  double r = sqrt(v1 * v1 + v2 * v2);
  if (r > radius) {
    v1 *= radius / r;
    v2 *= radius / r;
    r = radius;
  }
  if (!(r > 0.0)) {
    *new_theta = theta;
    *new_phi = phi;
    return 0.0;
  }
  const double cp = cos(phi), sp = sin(phi), st = sin(theta), ct = cos(theta);
  // p, e_t (towards increasing colatitude), e_p (east)
  const double px = st * cp, py = st * sp, pz = ct;
  const double tx = ct * cp, ty = ct * sp, tz = -st;
  const double ex = -sp, ey = cp;
  const double wx = v1 * tx + v2 * ex, wy = v1 * ty + v2 * ey, wz = v1 * tz;
  const double cr = cos(r), sr = sin(r) / r;
  const double qx = cr * px + sr * wx, qy = cr * py + sr * wy, qz = cr * pz + sr * wz;
  *new_theta = atan2(sqrt(qx * qx + qy * qy), qz);
  *new_phi = atan2(qy, qx);
  return r;
}

// Great-circle angle between two (colatitude, longitude) points, radians.
LD_HD double angular_distance(double t1, double p1, double t2, double p2) {
  const double s1 = sin(t1), s2 = sin(t2);
  const double ax = s1 * cos(p1), ay = s1 * sin(p1), az = cos(t1);
  const double bx = s2 * cos(p2), by = s2 * sin(p2), bz = cos(t2);
  const double cx = ay * bz - az * by, cy = az * bx - ax * bz, cz = ax * by - ay * bx;
  return atan2(sqrt(cx * cx + cy * cy + cz * cz), ax * bx + ay * by + az * bz);
}

// Default coarse-grid size for mode seeking: step at most half of the main-lobe width pi/L.
LD_HD int decode_default_nlat(int L) { return 2 * L + 2; }

}  // namespace locdiff
