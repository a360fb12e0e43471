"""Regression tests of issue 9 for the kernel ops: no input aborts the interpreter, allocates without
bound or returns a silently wrong answer.  Calls that could once abort run in a subprocess with a
memory cap, so that a regression fails the test instead of killing the test run."""

import subprocess
import sys
import textwrap

import pytest
import torch

import locdiff_ext as ld
from locdiff_ext import checks
from locdiff_ext.kernels.geometry import great_circle_km
from locdiff_ext.kernels.ops import decode_grid_limits

from helpers import random_coords


def _run_capped(code: str, tmp_path, cap_gib: int = 4) -> subprocess.CompletedProcess:
    prog = "import resource\nresource.setrlimit(resource.RLIMIT_AS, (%d << 30, %d << 30))\n" % (cap_gib, cap_gib)
    prog += "import torch\nimport locdiff_ext as ld\n" + textwrap.dedent(code)
    return subprocess.run([sys.executable, "-c", prog], capture_output=True, text=True, timeout=300, cwd=tmp_path)


def test_huge_integers_give_named_errors_not_an_abort(tmp_path):
    calls = {
        "top_k": "ld.shdd_decode(x, top_k=2**30)",
        "candidates": "ld.shdd_decode(x, candidates=2**30)",
        "nlat": "ld.shdd_decode(x, nlat=2**31)",
        "nlon": "ld.shdd_decode(x, nlon=2**40)",
        "max_iter": "ld.shdd_decode(x, max_iter=2**31)",
        "nlat ": "ld.sh_synthesis(x, 2**31, 4)",
        "nlon ": "ld.sh_synthesis(x, 4, 2**63)",
        "L": "ld.sh_basis(torch.zeros(1, 2), 2**31)",
    }
    code = "x = ld.shdd_encode(torch.tensor([[10.0, 20.0]], dtype=torch.float64), 32)\n"
    for name, call in calls.items():
        code += f"try:\n    {call}\n    print('no error')\nexcept Exception as e:\n    print(type(e).__name__, e)\n"
    proc = _run_capped(code, tmp_path)
    assert proc.returncode == 0, f"the interpreter died (rc {proc.returncode}): {proc.stderr[-2000:]}"
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == len(calls)
    for name, line in zip(calls, lines):
        assert line.startswith("ValueError " + name.strip()), (name, line)


def test_an_allocation_failure_inside_a_kernel_becomes_a_python_error(tmp_path):
    """Straight to the compiled module, past every Python check: the decoder's per-thread candidate
    lists of 2^31 - 1 entries cannot be allocated inside its parallel region.  That used to call
    std::terminate (SIGABRT); the exception must cross the region and reach Python."""
    proc = _run_capped("""
        from locdiff_ext import _C
        x = ld.shdd_encode(torch.tensor([[10.0, 20.0]], dtype=torch.float64), 32)
        c, s = torch.empty(1, 1, 2, dtype=torch.float64), torch.empty(1, 1, dtype=torch.float64)
        try:
            _C.shdd_decode(x.data_ptr(), c.data_ptr(), s.data_ptr(), 1, 32, 1, 66, 132, 2**31 - 1, 30, 0.0, 1, -1, 0)
        except (MemoryError, ValueError) as e:
            print("caught", type(e).__name__)
        print("then", tuple(ld.sh_synthesis(x, 8, 16).shape))  # the thread pool still works
    """, tmp_path, cap_gib=2)
    assert proc.returncode == 0 and proc.stdout.startswith("caught"), (proc.returncode, proc.stderr[-2000:])
    assert "then (1, 8, 16)" in proc.stdout


def test_decode_refuses_grids_coarser_than_the_main_lobe():
    x = ld.shdd_encode(torch.tensor([[10.0, 20.0]], dtype=torch.float64), 32)
    with pytest.raises(ValueError, match="nlat must be in \\[66, 720\\], got 8"):  # once (11.3, 34.8): 1,625 km off
        ld.shdd_decode(x, nlat=8)
    with pytest.raises(ValueError, match="nlon must be in \\[132, "):  # nlon=3 could be 20,000 km off
        ld.shdd_decode(x, nlon=3)
    assert decode_grid_limits(32) == ((66, 720), (132, 1440))
    # every allowed grid, the coarsest included, finds the mode to within a metre
    pts = random_coords(64, seed=3)
    x = ld.shdd_encode(pts, 32)
    for nlat, nlon in [(66, 132), (67, 133), (100, 331), (720, 1440)]:
        modes, _ = ld.shdd_decode(x, nlat=nlat, nlon=nlon)
        assert great_circle_km(modes[:, 0], pts).max().item() < 1e-3, (nlat, nlon)


@pytest.mark.parametrize("dtype,factors", [(torch.float64, [1e-300, 1e-45, 1e40, 1e100, 1e300]),
                                           (torch.float32, [1e-36, 1e-20, 1e20, 1e30])])
def test_decode_is_scale_invariant(dtype, factors):
    a = torch.tensor([[10.0, 20.0], [-45.0, 170.0], [89.0, -3.0]], dtype=torch.float64)
    b = torch.tensor([[-30.0, -60.0], [40.0, 10.0], [0.0, 100.0]], dtype=torch.float64)
    x = (0.7 * ld.shdd_encode(a, 24) + 0.4 * ld.shdd_encode(b, 24)).to(dtype)  # two well-separated modes per row
    ref_modes, ref_scores = ld.shdd_decode(x, top_k=2)
    assert great_circle_km(ref_modes[:, 0], a).max() < 50 and great_circle_km(ref_modes[:, 1], b).max() < 50
    for f in factors:
        modes, scores = ld.shdd_decode(x * f, top_k=2)
        torch.testing.assert_close(modes, ref_modes, equal_nan=True, rtol=0, atol=1e-9 if dtype == torch.float64 else 1e-3)
        finite = torch.isfinite(ref_scores)
        torch.testing.assert_close((scores[finite] / f).double(), ref_scores[finite].double(), rtol=1e-5, atol=0)
    zero_modes, zero_scores = ld.shdd_decode(torch.zeros(2, 25, dtype=dtype))  # no mode: no NaN, no crash
    assert zero_modes.shape == (2, 1, 2)


def test_huge_longitudes_wrap_exactly():
    """1e20 is 280 (mod 360): lon 1e20 is lon -80.  lon * pi/180 in the kernel lost the angle (gave 100)."""
    for lon, same in [(1e20, -80.0), (-1e20, 80.0), (1e17, -80.0), (720.5, 0.5), (-540.0, -180.0)]:
        a = ld.sh_basis(torch.tensor([[12.0, lon]], dtype=torch.float64), 6)
        b = ld.sh_basis(torch.tensor([[12.0, same]], dtype=torch.float64), 6)
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    c = torch.tensor([[12.0, 1e20]], dtype=torch.float64, requires_grad=True)
    ld.sh_basis(c, 4).sum().backward()
    assert torch.isfinite(c.grad).all()


def test_memory_guard_counts_working_memory_against_what_is_available(monkeypatch):
    assert 0 < checks.available_bytes(torch.device("cpu"))
    monkeypatch.setattr(checks, "available_bytes", lambda device: 128 << 20)
    # a 0.4 MB map at L = 1800 needs ~0.28 GB of working memory per thread (the row block's coefficients
    # by order, FFT buffers): refused before anything is allocated
    with pytest.raises(ValueError, match=r"coeffs/nlat/nlon: this call would need 0\.[0-9] GiB"):
        ld.sh_synthesis(torch.zeros(1, 1801 ** 2), 1, 100_000)
    with pytest.raises(ValueError, match="coords/L"):
        ld.sh_basis(torch.zeros(100_000, 2), 100)
    ld.sh_synthesis(torch.zeros(1, 25), 10, 20)  # small work still runs


def test_grid_and_weight_arguments_are_checked():
    """Issue 9, defect 9: grid_latlon(2.5, 4) returned cells ending at -90 and a negative size gave a bare
    RuntimeError; NaN weights gave an all-NaN output; weights with requires_grad silently got no gradient."""
    with pytest.raises(TypeError, match="nlat must be an int"):
        ld.grid_latlon(2.5, 4)
    with pytest.raises(ValueError, match="nlon must be >= 1"):
        ld.grid_latlon(4, -1)
    pts = torch.tensor([[10.0, 20.0]], dtype=torch.float64)
    w = torch.ones(5, dtype=torch.float64)
    w[2] = float("nan")
    with pytest.raises(ValueError, match="weights contains NaN"):
        ld.shdd_encode(pts, 4, weights=w)
    with pytest.raises(ValueError, match="min_separation_km"):
        ld.shdd_decode(ld.shdd_encode(pts, 4), min_separation_km=True)
    with pytest.raises(ValueError, match="weights.detach"):
        ld.shdd_encode(pts, 4, weights=torch.ones(5, dtype=torch.float64, requires_grad=True))
