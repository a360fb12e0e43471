"""sh_basis vs sphericart (numpy API) vs the float64 reference, N = 100k points, same thread count.

Run:  pytest benchmarks/test_bench_sh_basis.py --benchmark-json=bench_basis.json
``test_locdiff_out`` reuses one output tensor (``out=``); the others return a fresh array each call.
Each case also records its max abs error against the float64 reference on 2000 points
(extra_info['max_err']), so throughput is compared at the precision actually delivered.
"""

import numpy as np
import pytest
import torch

import locdiff_ext as ld
from locdiff_ext.kernels.reference import sh_basis_ref

try:
    import sphericart
except ImportError:  # pragma: no cover
    sphericart = None

DEGREES = [10, 20, 50, 88]
DTYPES = {"float32": (torch.float32, np.float32), "float64": (torch.float64, np.float64)}


def _ref(coords, L):
    return sh_basis_ref(coords[:2000], L)


@pytest.mark.parametrize("L", DEGREES)
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_locdiff(benchmark, points_100k, L, dtype):
    coords, _ = points_100k
    c = coords.to(DTYPES[dtype][0])
    benchmark.group = f"sh_basis L={L} {dtype}"
    out = benchmark(ld.sh_basis, c, L)
    benchmark.extra_info["max_err"] = (out[:2000].double() - _ref(c.double(), L)).abs().max().item()


@pytest.mark.parametrize("L", DEGREES)
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_locdiff_out(benchmark, points_100k, L, dtype):
    """The same call writing into one reused output (out=): no fresh pages for the OS to clear."""
    coords, _ = points_100k
    c = coords.to(DTYPES[dtype][0])
    buf = torch.empty(c.shape[0], (L + 1) ** 2, dtype=c.dtype)
    benchmark.group = f"sh_basis L={L} {dtype}"
    out = benchmark(ld.sh_basis, c, L, out=buf)
    benchmark.extra_info["max_err"] = (out[:2000].double() - _ref(c.double(), L)).abs().max().item()


@pytest.mark.skipif(sphericart is None, reason="sphericart is not installed (pip install sphericart)")
@pytest.mark.parametrize("L", DEGREES)
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_sphericart(benchmark, points_100k, L, dtype):
    coords, xyz = points_100k
    x = xyz.astype(DTYPES[dtype][1])
    sh = sphericart.SphericalHarmonics(L)
    benchmark.group = f"sh_basis L={L} {dtype}"
    out = benchmark(sh.compute, x)
    # sphericart orders m = -l..l per degree like us, with the same real-SH convention.
    c = torch.tensor(np.stack([np.rad2deg(np.arcsin(np.clip(x[:2000, 2].astype(np.float64), -1, 1))),
                               np.rad2deg(np.arctan2(x[:2000, 1], x[:2000, 0]).astype(np.float64))], 1))
    err = np.abs(out[:2000].astype(np.float64) - _ref(c, L).numpy())
    benchmark.extra_info["max_err"] = float(np.nanmax(err)) if np.isfinite(err).all() else float("inf")


@pytest.mark.parametrize("L", DEGREES)
def test_reference(benchmark, points_100k, L):
    coords, _ = points_100k
    benchmark.group = f"sh_basis L={L} float64"
    benchmark.pedantic(sh_basis_ref, args=(coords, L), rounds=1, iterations=1)
    benchmark.extra_info["max_err"] = 0.0
