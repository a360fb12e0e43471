"""The CUDA kernels (csrc/sh_cuda.cu) executed on the CPU under the SIMT emulation (csrc/simt_emulation.h):
every kernel, block and warp as the source writes them, compared with the CPU ops.  No GPU needed; what only a
GPU shows (speed, the device's own rounding of sin/exp) is left to tests/kernels/test_cuda.py and
benchmarks/gpu_check.sh."""

import math
import os
import subprocess

import pytest
import torch

import locdiff_ext as ld
from locdiff_ext.kernels.geometry import EARTH_RADIUS_KM
from locdiff_ext.kernels.reference import great_circle_km

import simt
from helpers import random_coords

pytestmark = pytest.mark.skipif(simt.unavailable_reason() is not None, reason=str(simt.unavailable_reason()))

DEGREES = [1, 2, 16, 17, 32, 33, 64, 128]
DTYPES = [torch.float64, torch.float32]


@pytest.fixture(scope="module")
def cuda_emu(tmp_path_factory):
    return simt.EmulatedCuda(simt.build(tmp_path_factory.mktemp("simt")))


def _rel(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-300)).item()


# float32 tolerances as in test_cuda.py: the float compute path (sh_basis L <= 16, synthesis L <= 32) within
# 1e-5 of float64; above it, double arithmetic rounded once, like the CPU.
@pytest.mark.parametrize("L", DEGREES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [1, 37])
def test_basis(cuda_emu, L, dtype, n):
    c = random_coords(n - 7 if n > 7 else n, seed=L, extras=n > 7).to(dtype)
    got, cpu = cuda_emu.sh_basis(c, L), ld.sh_basis(c, L)
    if dtype == torch.float64:
        assert _rel(got, cpu) <= 1e-12
    else:
        torch.testing.assert_close(got, cpu, rtol=1e-5, atol=1e-5 if L <= 16 else 1e-6)


@pytest.mark.parametrize("L", [16, 17, 33])
@pytest.mark.parametrize("dtype", DTYPES)
def test_basis_weights(cuda_emu, L, dtype):
    c = random_coords(20, seed=3).to(dtype)
    w = torch.linspace(1.0, 0.2, L + 1, dtype=dtype)
    got, cpu = cuda_emu.sh_basis(c, L, w), ld.shdd_encode(c, L, w)
    torch.testing.assert_close(got, cpu, rtol=1e-12 if dtype == torch.float64 else 1e-5,
                               atol=1e-14 if dtype == torch.float64 else 1e-5)


@pytest.mark.parametrize("L", DEGREES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("weighted", [False, True])
def test_basis_backward(cuda_emu, L, dtype, weighted):
    c = random_coords(9, seed=L + 1).clamp(-89.5, 89.5).to(dtype)  # the poles' gradient is a limit
    g = torch.randn(c.shape[0], (L + 1) ** 2, generator=torch.Generator().manual_seed(L), dtype=torch.float64).to(dtype)
    w = torch.linspace(1.0, 0.5, L + 1, dtype=dtype) if weighted else None
    x = c.clone().requires_grad_(True)
    (ld.shdd_encode(x, L, w) * g).sum().backward()
    got = cuda_emu.sh_basis_backward(c, g, L, w)
    assert _rel(got, x.grad) <= (1e-11 if dtype == torch.float64 else 1e-5)


@pytest.mark.parametrize("L,nlat,nlon", [(1, 3, 5), (2, 6, 7), (16, 34, 68), (17, 36, 72), (32, 66, 132),
                                         (33, 68, 137), (64, 40, 260), (128, 12, 520)])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch", [1, 3])
def test_synthesis(cuda_emu, L, nlat, nlon, dtype, batch):
    c = torch.randn(batch, (L + 1) ** 2, generator=torch.Generator().manual_seed(L), dtype=torch.float64).to(dtype)
    got, cpu = cuda_emu.sh_synthesis(c, L, nlat, nlon), ld.sh_synthesis(c, nlat, nlon)
    assert _rel(got, cpu) <= (1e-12 if dtype == torch.float64 else 1e-5)


@pytest.mark.parametrize("L,nlat,nlon", [(8, 18, 36), (33, 20, 40)])
def test_synthesis_adjoint_path(L, nlat, nlon):
    """On CUDA the synthesis adjoint is the torch matmul path (no kernel of its own): checked on CPU tensors
    against the CPU adjoint kernel."""
    from locdiff_ext.kernels.ops import _sh_synthesis_backward_op, _synthesis_adjoint_matmul

    g = torch.randn(3, nlat, nlon, generator=torch.Generator().manual_seed(L), dtype=torch.float64)
    assert _rel(_synthesis_adjoint_matmul(g, L), _sh_synthesis_backward_op(g, L)) <= 1e-12


def _decode_cases():
    for L in [8, 16, 17, 32, 33, 64, 128]:
        for dtype in DTYPES:
            yield L, dtype, 1 if L == 128 else 5


@pytest.mark.parametrize("L,dtype,batch", list(_decode_cases()))
def test_decode(cuda_emu, L, dtype, batch):
    pts = random_coords(batch, seed=L, extras=False)
    x = ld.shdd_encode(pts, L).to(dtype)
    nlat = 2 * L + 2
    got_c, got_s = cuda_emu.shdd_decode(x, L, nlat=nlat, nlon=2 * nlat)
    cpu_c, cpu_s = ld.shdd_decode(x, top_k=1)
    tol_km = 1.0 if dtype == torch.float32 else 1e-6
    assert great_circle_km(got_c[:, 0], pts.to(dtype)).max().item() < max(tol_km, 1e-3)
    assert great_circle_km(got_c[:, 0], cpu_c[:, 0]).max().item() < tol_km
    torch.testing.assert_close(got_s, cpu_s, rtol=1e-5 if dtype == torch.float32 else 1e-12, atol=1e-6)


def _mixture(L, weights, points, dtype=torch.float64):
    p = torch.tensor(points, dtype=torch.float64)
    return (torch.tensor(weights, dtype=torch.float64)[:, None] * ld.shdd_encode(p, L)).sum(0, keepdim=True).to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("top_k,candidates", [(3, 0), (3, 11), (2, 32)])  # KEEP = 8 and 32 instantiations
def test_decode_top_k_candidates(cuda_emu, dtype, top_k, candidates):
    L = 32
    # as many well separated points as modes asked for: a Dirac's side lobes are rings of tied maxima
    x = torch.cat([_mixture(L, [0.5, 0.3, 0.2], [[35.68, 139.69], [-33.87, 151.21], [48.85, 2.35]], dtype),
                   _mixture(L, [0.4, 0.3, 0.2, 0.1], [[89.99, 10.0], [10.0, -170.0], [-60.0, 20.0], [0, 0]], dtype)])
    nlat = 2 * L + 2
    got_c, got_s = cuda_emu.shdd_decode(x, L, top_k=top_k, nlat=nlat, nlon=2 * nlat, candidates=candidates)
    cpu_c, cpu_s = ld.shdd_decode(x, top_k=top_k, candidates=candidates or None)
    assert great_circle_km(got_c, cpu_c).max().item() < (1.0 if dtype == torch.float32 else 1e-6)
    torch.testing.assert_close(got_s, cpu_s, rtol=1e-5 if dtype == torch.float32 else 1e-12, atol=1e-6)


@pytest.mark.parametrize("dtype", DTYPES)
def test_decode_unrefined_and_separation(cuda_emu, dtype):
    L = 17
    x = _mixture(L, [0.55, 0.45], [[20.0, 30.0], [24.0, 36.0]], dtype)
    nlat = 2 * L + 2
    for max_iter in [0, 3]:
        got = cuda_emu.shdd_decode(x, L, top_k=2, nlat=nlat, nlon=2 * nlat, max_iter=max_iter)
        cpu = ld.shdd_decode(x, top_k=2, max_iter=max_iter, refine=max_iter > 0)
        torch.testing.assert_close(got[1], cpu[1], rtol=1e-5 if dtype == torch.float32 else 1e-12, atol=1e-6,
                                   equal_nan=True)
    sep_km = 3000.0  # the two modes are ~700 km apart: only one survives
    got = cuda_emu.shdd_decode(x, L, top_k=2, nlat=nlat, nlon=2 * nlat, min_separation=sep_km / EARTH_RADIUS_KM)
    cpu = ld.shdd_decode(x, top_k=2, min_separation_km=sep_km)
    assert torch.isfinite(got[1][0, 0]) and got[1][0, 1] == -math.inf and cpu[1][0, 1] == -math.inf
    assert great_circle_km(got[0][0, 0], cpu[0][0, 0]).item() < (1.0 if dtype == torch.float32 else 1e-6)


def test_empty_batches_launch_nothing(cuda_emu):
    for dtype in DTYPES:
        assert cuda_emu.sh_basis(torch.empty(0, 2, dtype=dtype), 8).shape == (0, 81)
        assert cuda_emu.sh_synthesis(torch.empty(0, 81, dtype=dtype), 8, 4, 8).shape == (0, 4, 8)
        assert cuda_emu.shdd_decode(torch.empty(0, 81, dtype=dtype), 8)[0].shape == (0, 1, 2)


def test_bad_launches_fail_as_on_a_gpu(cuda_emu):
    """A decoder grid whose shared memory exceeds the device's 227 KB: the error sh_cuda.cu reports."""
    x = ld.shdd_encode(torch.tensor([[10.0, 20.0]]), 16)
    with pytest.raises(RuntimeError, match="decode shared memory.*lower nlon"):
        cuda_emu.shdd_decode(x, 16, top_k=12, nlat=34, nlon=16000)
    with pytest.raises(RuntimeError, match="candidates up to 32"):
        cuda_emu.shdd_decode(x, 16, top_k=1, candidates=33)
    # the failed cudaFuncSetAttribute is not reported again by the next launch (the runtime's last error)
    cuda_emu.shdd_decode(x, 16, top_k=12, nlat=34, nlon=68)
    cuda_emu.sh_basis(torch.zeros(3, 2), 4)


MISUSE = {
    "shared_too_small": "uses 1024 bytes of dynamic shared memory but the launch gave 512",
    "shared_overrun": "wrote past the 512 bytes of dynamic shared memory",
    "shared_above_limit": "65536 bytes of dynamic shared memory requested, 49152 allowed",
    "shared_attribute_too_large": "above the device's 227 KB",
    "block_too_large": "a block of 2048 x 1 x 1 threads",
    "grid_too_large": "a grid of 4294967296 blocks",
    "lane_returns_before_shuffle": r"simt_misuse.cpp:\d+(: lane 31 of warp \d .* returned while lanes|.*names "
                                   r"lanes 0x80000000 that have returned)",
    "lanes_at_two_shuffles": r"meets lanes 0x[0-9a-f]+ at another shuffle",
    "shuffle_at_divergent_barrier": "deadlock",
}


def test_emulation_runs_a_correct_kernel(cuda_emu):
    cuda_emu.misuse("reduce")  # warp shuffles, a static __shared__ array and a barrier: the right sums


@pytest.mark.parametrize("case", sorted(MISUSE))
def test_emulation_catches_misuse(cuda_emu, case):
    with pytest.raises(RuntimeError, match=MISUSE[case]):
        cuda_emu.misuse(case)
    cuda_emu.misuse("reduce")  # and the next launch works


@pytest.mark.slow
@pytest.mark.parametrize("sanitizer", ["thread", "address"])
def test_kernels_under_sanitizer(tmp_path, sanitizer):
    """Every kernel once, small, under ThreadSanitizer (a shared-memory race: a missing __syncthreads) or
    AddressSanitizer (out-of-bounds shared or global memory); tests/kernels/simt_driver.cpp checks values."""
    try:
        exe = simt.build(tmp_path, sanitizer, main=simt.ROOT / "tests" / "kernels" / "simt_driver.cpp")
    except RuntimeError as e:
        if "sanitize" in str(e) and ("cannot find" in str(e) or "No such file" in str(e)):
            pytest.skip(reason=f"no {sanitizer} sanitizer runtime for this compiler")
        raise
    env = dict(os.environ, TSAN_OPTIONS="halt_on_error=1 exitcode=66", ASAN_OPTIONS="detect_leaks=0")  # the device tables live as long as the process, as on a GPU
    proc = subprocess.run([str(exe), "quick"], capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0 and "Sanitizer" not in proc.stderr, proc.stdout[-2000:] + proc.stderr[-6000:]
    assert "all kernels ran" in proc.stdout
