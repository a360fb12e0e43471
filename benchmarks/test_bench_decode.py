"""shdd_decode vs a dense pure-torch decode and vs torch-harmonics InverseRealSHT + argmax, B = 256.

All three evaluate the same coarse grid (nlat = 2L+2 rings x nlon = 4L+4, step below half the
main lobe pi/L); the dense decode has its basis at the grid precomputed (not timed) and does one
float32 matmul + argmax; torch-harmonics synthesises the grid from complex coefficients
(different SH convention, so its argmax is only timed).  locdiff additionally refines each mode
with Newton steps (grid-free precision), which the others do not do: the 'grid only' row times
locdiff without refinement.  extra_info['max_km'] is the worst error in km on decode(encode(x)).

Run:  pytest benchmarks/test_bench_decode.py --benchmark-json=bench_decode.json
"""

import pytest
import torch

import locdiff_ext as ld
from locdiff_ext.kernels.geometry import grid_points
from locdiff_ext.kernels.reference import dense_decode, great_circle_km

try:
    import torch_harmonics
except ImportError:  # pragma: no cover
    torch_harmonics = None

DEGREES = [16, 64, 128]
B = 256


@pytest.fixture(scope="module")
def batch(points_100k):
    coords, _ = points_100k
    return coords[:B]


def _grid(L):
    nlat = 2 * L + 2
    return nlat, 2 * nlat


@pytest.mark.parametrize("L", DEGREES)
@pytest.mark.parametrize("refine", [True, False], ids=["refined", "grid-only"])
def test_locdiff(benchmark, batch, L, refine):
    x = ld.shdd_encode(batch.float(), L)
    benchmark.group = f"shdd_decode L={L} B={B}"
    coords, _ = benchmark(ld.shdd_decode, x, refine=refine)
    benchmark.extra_info["max_km"] = great_circle_km(coords[:, 0], batch).max().item()


@pytest.mark.parametrize("L", DEGREES)
def test_dense(benchmark, batch, L):
    nlat, nlon = _grid(L)
    grid = grid_points(nlat, nlon)
    basis = ld.sh_basis(grid.float(), L)  # [G, K] precomputed, not timed
    x = ld.shdd_encode(batch.float(), L)
    benchmark.group = f"shdd_decode L={L} B={B}"
    rounds = 1 if L >= 128 else 3
    coords, _ = benchmark.pedantic(dense_decode, args=(x, basis, grid.float()), rounds=rounds, iterations=1)
    benchmark.extra_info["max_km"] = great_circle_km(coords, batch).max().item()
    del basis


@pytest.mark.skipif(torch_harmonics is None, reason="torch-harmonics is not installed")
@pytest.mark.parametrize("L", DEGREES)
def test_torch_harmonics(benchmark, L):
    nlat, nlon = _grid(L)
    isht = torch_harmonics.InverseRealSHT(nlat, nlon, lmax=L + 1, mmax=L + 1, grid="equiangular")
    g = torch.Generator().manual_seed(0)
    coeffs = torch.randn(B, L + 1, L + 1, 2, generator=g)
    coeffs = torch.view_as_complex(coeffs)

    def decode():
        maps = isht(coeffs)
        return maps.reshape(B, -1).argmax(dim=1)

    benchmark.group = f"shdd_decode L={L} B={B}"
    benchmark(decode)
