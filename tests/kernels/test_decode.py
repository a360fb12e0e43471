"""sh_synthesis against the dense reference; shdd_decode recovers encoded locations and modes."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import locdiff_ext as ld
from locdiff_ext.kernels import ops
from locdiff_ext.kernels.reference import great_circle_km, sh_synthesis_ref

from helpers import random_coords


GRIDS = [(0, 1, 1), (0, 3, 5), (1, 2, 4), (3, 5, 7), (8, 10, 20), (10, 7, 4), (16, 17, 64), (16, 9, 128),
         (30, 31, 61), (20, 42, 86), (24, 50, 98), (40, 82, 164), (20, 3, 2)]
# odd and even nlat (a middle ring without a partner), odd nlon (full complex FFT), even nlon (half-length
# FFT), nlon <= 2L (orders alias onto the same frequencies), radices 2, 3, 4, 5 and generic primes
# (43 = 86 / 2, 7 x 7 = 98 / 2, 41 = 164 / 4)


@pytest.mark.parametrize("L,nlat,nlon", GRIDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_synthesis_matches_dense_reference(L, nlat, nlon, dtype):
    """The separable transform (ring pairs, mixed-radix FFT) against the dense basis on every kind of grid."""
    g = torch.Generator().manual_seed(L + nlat)
    c = torch.randn(3, (L + 1) ** 2, generator=g, dtype=torch.float64)
    out = ld.sh_synthesis(c.to(dtype), nlat, nlon)
    assert out.shape == (3, nlat, nlon) and out.dtype == dtype
    ref = sh_synthesis_ref(c, nlat, nlon)
    tol = 1e-11 if dtype == torch.float64 else 1e-4
    assert (out.double() - ref).abs().max().item() <= tol * max(1.0, ref.abs().max().item())


@pytest.mark.parametrize("L,nlat,nlon", GRIDS)
def test_synthesis_backward_is_the_adjoint(L, nlat, nlon):
    """<S c, g> = <c, S^T g> to rounding; the CUDA path's batched-matmul adjoint (run here on the CPU) agrees
    with the kernel; 11 rows exercise a partial block of the kernel's 8-row lanes."""
    gen = torch.Generator().manual_seed(7 * L + nlon)
    c = torch.randn(11, (L + 1) ** 2, generator=gen, dtype=torch.float64)
    g = torch.randn(11, nlat, nlon, generator=gen, dtype=torch.float64)
    adj = torch.ops.locdiff.sh_synthesis_backward(g, L)
    lhs, rhs = (ld.sh_synthesis(c, nlat, nlon) * g).sum(), (c * adj).sum()
    assert abs(lhs - rhs) <= 1e-12 * (c.abs().sum() * g.abs().sum())
    assert torch.allclose(adj, ops._synthesis_adjoint_matmul(g, L), rtol=0, atol=1e-12 * float(adj.abs().max()))
    assert torch.allclose(adj, g.reshape(11, -1) @ ld.sh_basis(ops.grid_points(nlat, nlon), L), atol=1e-10)
    adj32 = torch.ops.locdiff.sh_synthesis_backward(g.float(), L)
    assert adj32.dtype == torch.float32 and torch.allclose(adj32.double(), adj, atol=1e-4 * float(adj.abs().max()))


def test_synthesis_gradients():
    c = torch.randn(3, 25, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: ld.sh_synthesis(x, 6, 11), (c,))
    assert torch.autograd.gradgradcheck(lambda x: ld.sh_synthesis(x, 6, 11), (c,))
    batched = torch.randn(2, 3, 16, dtype=torch.float64, requires_grad=True)  # leading dims
    assert torch.autograd.gradcheck(lambda x: ld.sh_synthesis(x, 5, 8), (batched,))


def test_synthesis_of_a_dirac_peaks_at_the_point():
    L = 32
    pt = torch.tensor([[48.8566, 2.3522]], dtype=torch.float64)  # Paris
    m = ld.sh_synthesis(ld.shdd_encode(pt, L), 90, 180)[0]
    lat, lon = ld.grid_latlon(90, 180)
    j, k = divmod(int(m.argmax()), 180)
    assert abs(lat[j] - 48.8566) <= 1.0 and abs(lon[k] - 2.3522) <= 1.0
    # The peak value of a truncated Dirac is sum_l (2l+1)/(4 pi) = (L+1)^2/(4 pi).
    assert m.max().item() <= (L + 1) ** 2 / (4 * math.pi) + 1e-9


@settings(max_examples=25, deadline=None)
@given(
    lat=st.floats(-90, 90, allow_nan=False),
    lon=st.floats(-540, 540, allow_nan=False),
    L=st.sampled_from([8, 16, 64, 128]),
)
def test_decode_encode_roundtrip_within_1km(lat, lon, L):
    pt = torch.tensor([[lat, lon]], dtype=torch.float64)
    coords, scores = ld.shdd_decode(ld.shdd_encode(pt, L))
    assert coords.shape == (1, 1, 2) and scores.shape == (1, 1)
    assert -180.0 <= coords[0, 0, 1].item() < 180.0
    assert great_circle_km(coords[0, 0], pt[0]).item() < 1.0
    assert scores[0, 0].item() == pytest.approx((L + 1) ** 2 / (4 * math.pi), rel=1e-9)


@pytest.mark.parametrize("L", [8, 16, 64, 128])
def test_decode_batch_float32_and_float64(L):
    pts = random_coords(64, seed=L)
    for dtype, tol_km in [(torch.float64, 1e-3), (torch.float32, 1.0)]:
        coords, _ = ld.shdd_decode(ld.shdd_encode(pts.to(dtype), L))
        assert coords.dtype == dtype
        assert great_circle_km(coords[:, 0], pts).max().item() < tol_km


@pytest.mark.parametrize("L", [16, 64])
def test_two_diracs_give_both_modes(L):
    a = torch.tensor([[35.68, 139.69]], dtype=torch.float64)  # Tokyo
    b = torch.tensor([[-33.87, 151.21]], dtype=torch.float64)  # Sydney
    c = 0.6 * ld.shdd_encode(a, L) + 0.4 * ld.shdd_encode(b, L)
    coords, scores = ld.shdd_decode(c, top_k=2)
    assert great_circle_km(coords[0, 0], a[0]).item() < 25.0  # the heavier one first
    assert great_circle_km(coords[0, 1], b[0]).item() < 25.0
    assert scores[0, 0] > scores[0, 1]


def test_refine_off_returns_grid_points_and_refine_improves():
    L = 32
    pts = random_coords(20, seed=4, extras=False)
    x = ld.shdd_encode(pts, L)
    coarse, s0 = ld.shdd_decode(x, refine=False)
    fine, s1 = ld.shdd_decode(x)
    d0 = great_circle_km(coarse[:, 0], pts)
    d1 = great_circle_km(fine[:, 0], pts)
    step_km = math.pi / (2 * L + 2) * ld.EARTH_RADIUS_KM
    assert d0.max().item() <= step_km
    assert d1.max().item() < 1e-3
    assert (s1 >= s0 - 1e-12).all()


def test_decode_noisy_vector_is_close():
    L = 64
    g = torch.Generator().manual_seed(0)
    pts = random_coords(16, seed=8, extras=False)
    x = ld.shdd_encode(pts, L)
    noisy = x + 0.02 * torch.randn(x.shape, generator=g, dtype=torch.float64) * x.abs().max()
    coords, _ = ld.shdd_decode(noisy)
    assert great_circle_km(coords[:, 0], pts).max().item() < 100.0


def test_decode_pads_when_fewer_modes_than_top_k():
    c = ld.shdd_encode(torch.tensor([[10.0, 10.0]], dtype=torch.float64), 4)
    coords, scores = ld.shdd_decode(c, top_k=30, candidates=30, min_separation_km=21000.0)  # > half the circumference: one mode only
    assert torch.isfinite(coords[0, 0]).all()
    assert torch.isnan(coords[0, 1:]).all() and torch.isinf(scores[0, 1:]).all()


def test_decode_leading_dims_and_empty():
    c = ld.shdd_encode(random_coords(6, seed=1, extras=False).reshape(2, 3, 2), 8)
    coords, scores = ld.shdd_decode(c, top_k=2)
    assert coords.shape == (2, 3, 2, 2) and scores.shape == (2, 3, 2)
    coords, scores = ld.shdd_decode(torch.zeros(0, 81), top_k=3)
    assert coords.shape == (0, 3, 2) and scores.shape == (0, 3)
    assert ld.sh_synthesis(torch.zeros(0, 81), 4, 8).shape == (0, 4, 8)


@pytest.mark.parametrize("L", [1, 7, 40])
def test_both_derivative_evaluators_match_autograd_of_reference(L):
    """The per-order evaluator (used by the CUDA kernels and the CPU backward) and the row-wise
    CPU evaluator both agree with autograd (first and second derivatives) through the float64
    reference, and with each other exactly at the poles where autograd cannot go."""
    from locdiff_ext import _C
    from locdiff_ext.kernels.reference import sh_basis_ref

    g = torch.Generator().manual_seed(L)
    c = torch.randn((L + 1) ** 2, generator=g, dtype=torch.float64)

    def f(tp):
        lat = 90.0 - torch.rad2deg(tp[0])
        lon = torch.rad2deg(tp[1])
        return (sh_basis_ref(torch.stack([lat, lon])[None], L)[0] * c).sum()

    for theta, phi in [(0.3, 1.0), (1.2, -2.5), (2.9, 3.1)]:
        tp = torch.tensor([theta, phi], dtype=torch.float64)
        grad = torch.autograd.functional.jacobian(f, tp)
        hess = torch.autograd.functional.hessian(f, tp)
        expected = [f(tp).item(), grad[0].item(), grad[1].item(), hess[0, 0].item(), hess[0, 1].item(), hess[1, 1].item()]
        scale = max(abs(v) for v in expected) + 1.0
        for method in (0, 1):
            got = _C._debug_eval(c.data_ptr(), L, theta, phi, method)
            assert max(abs(a - b) for a, b in zip(got, expected)) < 1e-9 * scale, (method, got, expected)
    # Near and at the poles, where autograd through the reference's sqrt(1 - x^2) loses digits.
    for theta in (1e-3, 0.0, math.pi - 1e-3, math.pi):
        a = _C._debug_eval(c.data_ptr(), L, theta, 0.7, 0)
        b = _C._debug_eval(c.data_ptr(), L, theta, 0.7, 1)
        assert all(math.isfinite(v) for v in a)
        scale = 1 + max(abs(v) for v in b)
        # Exactly at a pole the per-order form evaluates 1e-8 rad away from it (see sh_math.h).
        tol = 1e-9 if 0.0 < theta < math.pi else 1e-6
        assert max(abs(x - y) for x, y in zip(a, b)) < tol * scale
