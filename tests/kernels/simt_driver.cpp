// Every emulated CUDA kernel once, for the sanitizer builds (tests/kernels/test_simt.py, tests/simt.py):
// ThreadSanitizer reports shared-memory races between the emulated threads (a missing __syncthreads),
// AddressSanitizer out-of-bounds shared or global memory.  Values are checked against identities that need no
// CPU kernel: the addition theorem sum_lm Y_lm(x)^2 = (L+1)^2 / (4 pi) and its zero gradient, synthesis of a
// point's own basis row equal to the basis rows' dot products, and decoding an encoded point back.
// Usage: simt_driver [quick|full]  (quick: L = 16 and 33; full adds 1, 2, 17, 32, 64 and 128).
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "kernels.h"

extern "C" int locdiff_simt_misuse(const char* which, char* err, size_t errlen);

namespace {

int failures = 0;

void expect(bool ok, const std::string& what) {
  if (!ok) {
    std::printf("FAIL %s\n", what.c_str());
    ++failures;
  }
}

std::vector<double> points(int n, unsigned seed) {
  std::mt19937 g(seed);
  std::uniform_real_distribution<double> z(-1, 1), lon(-180, 180);
  std::vector<double> p(2 * n);
  for (int i = 0; i < n; ++i) {
    p[2 * i] = std::asin(z(g)) * 180.0 / M_PI;
    p[2 * i + 1] = lon(g);
  }
  if (n > 1) p[0] = 90.0;  // a pole
  return p;
}

template <typename T>
void run(int L, double tol) {
  using namespace locdiff;
  const std::string tag = std::string(sizeof(T) == 4 ? "float32" : "float64") + " L=" + std::to_string(L);
  const int n = 37, K = (L + 1) * (L + 1);
  const std::vector<double> pd = points(n, L);
  std::vector<T> p(pd.begin(), pd.end()), Y((size_t)n * K), w(L + 1);
  for (int l = 0; l <= L; ++l) w[l] = (T)(1.0 - 0.5 * l / (L + 1));
  cuda::sh_basis<T>(p.data(), Y.data(), n, L, nullptr, nullptr);
  for (int i = 0; i < n; ++i) {
    double s = 0;
    for (int k = 0; k < K; ++k) s += (double)Y[(size_t)i * K + k] * Y[(size_t)i * K + k];
    expect(std::fabs(s * 4 * M_PI / K - 1) < tol, "sh_basis addition theorem " + tag);
  }
  std::vector<T> Yw((size_t)n * K), grad(2 * n);
  cuda::sh_basis<T>(p.data(), Yw.data(), n, L, w.data(), nullptr);
  cuda::sh_basis_backward<T>(p.data(), Y.data(), grad.data(), n, L, nullptr, nullptr);
  for (int i = 1; i < n; ++i)  // d/dx of (1/2) sum Y^2 = 0 (the pole's row 0 is a limit: skipped)
    expect(std::fabs((double)grad[2 * i]) + std::fabs((double)grad[2 * i + 1]) < 50 * tol * K,
           "sh_basis_backward of the addition theorem " + tag);
  cuda::sh_basis_backward<T>(p.data(), Yw.data(), grad.data(), n, L, w.data(), nullptr);

  // Synthesis of point 1's row on a small grid: the value at cell (j, k) is Y(p1) . Y(cell).
  const int nlat = 5, nlon = 11;
  std::vector<T> map((size_t)2 * nlat * nlon), cells(2 * nlat * nlon), Yc((size_t)nlat * nlon * K);
  for (int j = 0; j < nlat; ++j)
    for (int k = 0; k < nlon; ++k) {
      cells[2 * (j * nlon + k)] = (T)(90.0 - (j + 0.5) * 180.0 / nlat);
      cells[2 * (j * nlon + k) + 1] = (T)(-180.0 + (k + 0.5) * 360.0 / nlon);
    }
  cuda::sh_basis<T>(cells.data(), Yc.data(), nlat * nlon, L, nullptr, nullptr);
  cuda::sh_synthesis<T>(Y.data() + K, map.data(), 2, L, nlat, nlon, nullptr);
  for (int c = 0; c < nlat * nlon; ++c) {
    double dot = 0;
    for (int k = 0; k < K; ++k) dot += (double)Y[(size_t)K + k] * Yc[(size_t)c * K + k];
    expect(std::fabs(map[c] - dot) < tol * K, "sh_synthesis " + tag);
  }

  // Decode points 1..3 back (and a mixture's top 3 with KEEP = 32).
  for (int cand : {0, 20}) {
    DecodeOptions opt;
    opt.top_k = 3;
    opt.candidates = cand;
    std::vector<T> oc(3 * 2 * 3), os(3 * 3);
    cuda::shdd_decode<T>(Y.data() + K, oc.data(), os.data(), 3, L, opt, nullptr);
    if (L >= 8)
      for (int i = 0; i < 3; ++i) {
        const double dlat = oc[6 * i] - pd[2 * (i + 1)];
        double dlon = std::fmod(oc[6 * i + 1] - pd[2 * (i + 1) + 1] + 540.0, 360.0) - 180.0;
        dlon *= std::cos(pd[2 * (i + 1)] * M_PI / 180);
        expect(std::hypot(dlat, dlon) < (sizeof(T) == 4 ? 1e-2 : 1e-6), "shdd_decode round trip " + tag);
      }
  }
}

}  // namespace

int main(int argc, char** argv) {
  const bool full = argc > 1 && std::strcmp(argv[1], "full") == 0;
  // quick: the float and double compute paths of each kernel (float basis up to L = 16, synthesis up to 32)
  std::vector<int> degrees = {16, 33};
  if (full) degrees.insert(degrees.end(), {1, 2, 17, 32, 64, 128});
  for (int L : degrees) {
    run<double>(L, 1e-11);
    run<float>(L, 2e-5);
    std::printf("L = %d done\n", L);
    std::fflush(stdout);
  }
  char err[4096];
  expect(locdiff_simt_misuse("reduce", err, sizeof err) == 0, std::string("reduce kernel: ") + err);
  if (failures) return 1;
  std::printf("all kernels ran\n");
  return 0;
}
