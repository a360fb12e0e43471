"""sh_synthesis vs ducc0's synthesis_2d (the SHT library behind healpy), B maps on the decoder's grid.

The grid is (2L+2) x (4L+4), cell-centred: ducc0's geometry "F1" with phi0 = -pi + pi/nlon is exactly
ours.  Our real coefficients become ducc0's complex ones (m >= 0, healpy order) by a_l0 = c_l0 and, for
m > 0, a_lm = (-1)^m (c_{l,m} - i c_{l,-m}) / sqrt(2) (our real SH have no Condon-Shortley phase; the
complex ones do).  The maps are checked equal before anything is timed.  ducc0 is called once per map
from a Python loop (its alm argument holds components, not a batch), with the same thread count.

Run:  pytest benchmarks/test_bench_synthesis.py --benchmark-json=bench_synthesis.json
"""

import numpy as np
import pytest
import torch

import locdiff_ext as ld

pytest.importorskip("ducc0", reason="ducc0 is not installed (pip install '.[bench]')")

from ducc_reference import ducc_maps, to_ducc_alm  # noqa: E402  (after the skip: it imports ducc0)

DEGREES = [32, 64, 128]
BATCHES = [64, 256]


@pytest.fixture(params=[(d, L, B) for d in (torch.float64, torch.float32) for L in DEGREES for B in BATCHES],
                ids=lambda p: f"{str(p[0])[6:]}-L{p[1]}-B{p[2]}")
def case(request, benchmark):
    """Random coefficients [B, (L+1)^2] of one (dtype, L, B), the decoder's grid, and the benchmark's group."""
    dtype, L, B = request.param
    g = torch.Generator().manual_seed(L)
    x = torch.randn(B, (L + 1) ** 2, generator=g, dtype=torch.float64).to(dtype)
    benchmark.group = f"sh_synthesis L={L} B={B} {str(dtype)[6:]}"
    return x, L, 2 * L + 2, 4 * L + 4


def test_locdiff(benchmark, case):
    x, L, nlat, nlon = case
    ours = ld.sh_synthesis(x, nlat, nlon)
    ref = ducc_maps(to_ducc_alm(x.double().numpy(), L), L, nlat, nlon)
    err = np.abs(ours.double().numpy() - ref).max() / np.abs(ref).max()
    assert err < (1e-12 if x.dtype == torch.float64 else 1e-5), err  # the same maps, or the timing means nothing
    benchmark.extra_info["max_rel_err_vs_ducc0"] = float(err)
    benchmark(ld.sh_synthesis, x, nlat, nlon)


def test_ducc0(benchmark, case):
    x, L, nlat, nlon = case
    alm = to_ducc_alm(x.double().numpy(), L)
    if x.dtype == torch.float32:
        alm = alm.astype(np.complex64)
    benchmark(ducc_maps, alm, L, nlat, nlon)
