"""sh_basis / shdd_encode against the float64 reference and an independent source (scipy)."""

import math

import numpy as np
import pytest
import scipy.special
import torch

import locdiff_ext as ld
from locdiff_ext.kernels.reference import sh_basis_ref, shdd_encode_ref

from helpers import random_coords


def scipy_real_sh(coords: torch.Tensor, L: int) -> np.ndarray:
    """Real orthonormal SH without Condon-Shortley phase from scipy's complex sph_harm_y
    (which includes the phase): Y_lm = sqrt2 (-1)^m Re Y_l^m, Y_l-m = sqrt2 (-1)^m Im Y_l^m."""
    theta = np.deg2rad(90.0 - coords[:, 0].numpy())
    phi = np.deg2rad(coords[:, 1].numpy())
    out = np.empty((coords.shape[0], (L + 1) ** 2))
    for l in range(L + 1):
        for m in range(0, l + 1):
            z = scipy.special.sph_harm_y(l, m, theta, phi)
            if m == 0:
                out[:, l * l + l] = z.real
            else:
                s = math.sqrt(2.0) * (-1) ** m
                out[:, l * l + l + m] = s * z.real
                out[:, l * l + l - m] = s * z.imag
    return out


def rel_err(a, b):
    a = torch.as_tensor(a, dtype=torch.float64)
    b = torch.as_tensor(b, dtype=torch.float64)
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.fixture(scope="module")
def scipy_L200():
    c = random_coords(40, seed=200)
    return c, scipy_real_sh(c, 200)


def test_basis_float64_vs_scipy_every_L_to_200(scipy_L200):
    """Every L in 0..200: column l*l+l+m does not depend on L, so each result must equal the first
    (L+1)^2 columns of scipy's degree-200 basis (random points, both poles, the antimeridian)."""
    c, ref = scipy_L200
    worst = 0.0
    for L in range(201):
        Y = ld.sh_basis(c, L)
        assert Y.shape == (c.shape[0], (L + 1) ** 2) and Y.dtype == torch.float64
        worst = max(worst, rel_err(Y, ref[:, : (L + 1) ** 2]))
    assert worst <= 1e-10


@pytest.mark.parametrize("L", [0, 1, 5, 20, 60, 200])
def test_basis_float64_vs_reference(L):
    c = random_coords(100, seed=100 + L)
    assert rel_err(ld.sh_basis(c, L), sh_basis_ref(c, L)) <= 1e-10


def test_basis_float32_at_L200():
    # Compare at the float32 coordinates the kernel was given: rounding the input itself moves a
    # point by ~1e-5 degrees, which changes degree-200 harmonics by more than 1e-5.
    c = random_coords(200, seed=7).float()
    Y32 = ld.sh_basis(c, 200)
    assert Y32.dtype == torch.float32
    assert (Y32.double() - sh_basis_ref(c.double(), 200)).abs().max().item() <= 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_basis_high_degree_finite_and_addition_theorem(dtype):
    """At L = 1000 every value is finite, and sum_m Y_lm(x)^2 = (2l+1)/(4 pi) for every l
    (addition theorem), which fails loudly if any column is zero or has overflowed."""
    L = 1000
    c = random_coords(6, seed=3).to(dtype)
    Y = ld.sh_basis(c, L)
    assert torch.isfinite(Y).all()
    sq = Y.double() ** 2
    deg = torch.cat([torch.full((2 * l + 1,), l) for l in range(L + 1)])
    per_l = torch.zeros(c.shape[0], L + 1, dtype=torch.float64).index_add_(1, deg, sq)
    expected = (2 * torch.arange(L + 1, dtype=torch.float64) + 1) / (4 * math.pi)
    tol = 1e-9 if dtype == torch.float64 else 1e-4
    assert ((per_l - expected) / expected).abs().max().item() < tol


def test_orthonormality_gauss_legendre():
    L = 24
    x, w = np.polynomial.legendre.leggauss(L + 1)
    nlon = 2 * L + 2
    lat = torch.tensor(np.rad2deg(np.arcsin(x)))  # lat = 90 - theta, cos(theta) = x
    lon = torch.arange(nlon, dtype=torch.float64) * 360.0 / nlon
    grid = torch.stack(torch.meshgrid(lat, lon, indexing="ij"), -1).reshape(-1, 2)
    weights = torch.tensor(w).repeat_interleave(nlon) * (2 * math.pi / nlon)
    Y = ld.sh_basis(grid, L)
    gram = Y.T @ (Y * weights[:, None])
    assert (gram - torch.eye(gram.shape[0], dtype=torch.float64)).abs().max().item() < 1e-12


def test_leading_dims_and_lon_wrap():
    c = random_coords(12, seed=5, extras=False).reshape(3, 4, 2)
    Y = ld.sh_basis(c, 6)
    assert Y.shape == (3, 4, 49)
    shifted = c.clone()
    shifted[..., 1] += 360.0 * 3
    assert torch.allclose(ld.sh_basis(shifted, 6), Y, atol=1e-12)
    shifted[..., 1] -= 360.0 * 7
    assert torch.allclose(ld.sh_basis(shifted, 6), Y, atol=1e-12)


def test_empty_batch():
    for shape in [(0, 2), (3, 0, 2)]:
        Y = ld.sh_basis(torch.zeros(shape, dtype=torch.float64), 4)
        assert Y.shape == shape[:-1] + (25,)


def test_shdd_encode_weights_vs_reference():
    L = 12
    c = random_coords(30, seed=11)
    w = torch.exp(-torch.arange(L + 1, dtype=torch.float64) * (torch.arange(L + 1) + 1) * 1e-3)
    assert rel_err(ld.shdd_encode(c, L, weights=w), shdd_encode_ref(c, L, w)) <= 1e-10
    assert torch.equal(ld.shdd_encode(c, L), ld.sh_basis(c, L))


def test_gradcheck_basis_away_from_poles():
    c = random_coords(8, seed=2, extras=False)
    c[:, 0] = c[:, 0].clamp(-85, 85)
    c.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: ld.sh_basis(x, 10), (c,))
    w = torch.linspace(1.0, 0.5, 11, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda x: ld.shdd_encode(x, 10, weights=w), (c,))


def test_gradient_at_high_degree_matches_reference_autograd():
    """The analytic backward against autograd through the float64 reference."""
    L = 40
    c = random_coords(5, seed=9)
    c[:, 0] = c[:, 0].clamp(-89, 89)
    g = torch.randn(c.shape[0], (L + 1) ** 2, dtype=torch.float64)
    c1 = c.clone().requires_grad_(True)
    (ld.sh_basis(c1, L) * g).sum().backward()
    c2 = c.clone().requires_grad_(True)
    (sh_basis_ref(c2, L) * g).sum().backward()
    assert rel_err(c1.grad, c2.grad) < 1e-9


def test_gradient_at_the_pole_is_finite():
    c = torch.tensor([[90.0, 10.0], [-90.0, -40.0]], dtype=torch.float64, requires_grad=True)
    ld.sh_basis(c, 30).sum().backward()
    assert torch.isfinite(c.grad).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_basis_any_batch_size_and_quadrant_boundaries(dtype):
    """The CPU kernel works on 8 points at a time (one per SIMD lane, with its own sin/cos): every batch
    size, a short last block, and angles on the boundaries of its sin/cos argument reduction
    (multiples of 45 degrees in colatitude and longitude) match the float64 reference."""
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    edges = torch.tensor([[lat, lon] for lat in (-90.0, -45.0, 0.0, 45.0, 90.0)
                          for lon in (-180.0, -135.0, -90.0, -45.0, 0.0, 45.0, 135.0, 179.999999, 180.0)],
                         dtype=torch.float64)
    for n in [1, 7, 8, 9, 17, 64, 1001]:
        c = torch.cat([edges, random_coords(n, seed=n)])[:n].to(dtype)
        for L in (0, 3, 10, 20):
            Y = ld.sh_basis(c, L)
            assert Y.shape == (n, (L + 1) ** 2)
            assert (Y.double() - sh_basis_ref(c.double(), L)).abs().max().item() <= tol, (n, L)


def test_basis_checks_coordinates_anywhere_in_a_large_batch():
    """The CPU kernel checks coordinates in its own pass: a bad one deep in a batch is refused with the
    same message as a small batch, a non-finite value first; huge longitudes keep their exact angle."""
    c = random_coords(10_000, seed=9, extras=False)
    for i, value, match in [(5_000, float("nan"), "NaN"), (9_999, 90.000001, "latitude"), (3, -1e300, "latitude")]:
        bad = c.clone()
        bad[i, 0] = value
        with pytest.raises(ValueError, match=match):
            ld.sh_basis(bad, 8)
    bad = c.clone()
    bad[10, 0], bad[20, 1] = 95.0, float("-inf")
    with pytest.raises(ValueError, match="NaN or infinite"):
        ld.sh_basis(bad, 8)
    far = torch.tensor([[10.0, 1e20], [10.0, -1e20], [10.0, 1e-300], [10.0, -1e-300]], dtype=torch.float64)
    near = torch.tensor([[10.0, math.fmod(1e20, 360.0)], [10.0, -math.fmod(1e20, 360.0)], [10.0, 0.0], [10.0, 0.0]],
                        dtype=torch.float64)
    assert (ld.sh_basis(far, 12) - ld.sh_basis(near, 12)).abs().max().item() < 1e-14


def test_out_argument_writes_in_place_and_checks_it():
    c = random_coords(50, seed=12, extras=False).reshape(5, 10, 2)
    expected = ld.sh_basis(c, 6)
    buf = torch.full((5, 10, 49), float("nan"), dtype=torch.float64)
    assert ld.sh_basis(c, 6, out=buf) is buf and torch.equal(buf, expected)
    w = torch.linspace(1.0, 0.5, 7, dtype=torch.float64)
    assert ld.shdd_encode(c, 6, weights=w, out=buf) is buf and torch.equal(buf, ld.shdd_encode(c, 6, weights=w))
    assert ld.shdd_encode(c, 6, out=buf) is buf and torch.equal(buf, expected)
    for bad, exc, match in [
        (torch.empty(5, 10, 48, dtype=torch.float64), ValueError, "shape"),
        (torch.empty(5, 10, 49), TypeError, "dtype"),
        (torch.empty(10, 5, 49, dtype=torch.float64).transpose(0, 1), ValueError, "contiguous"),
        ([0.0], TypeError, "torch.Tensor"),
        (c.new_empty(0), ValueError, "shape"),
    ]:
        with pytest.raises(exc, match=match):
            ld.sh_basis(c, 6, out=bad)
    g = c.clone().requires_grad_(True)
    with pytest.raises(ValueError, match="gradient"):
        ld.sh_basis(g, 6, out=buf)
    big = torch.zeros(4, 4, dtype=torch.float64)  # coords living inside out
    with pytest.raises(ValueError, match="overlaps"):
        ld.sh_basis(big.view(-1)[:4].view(2, 2), 1, out=big.view(-1)[:8].view(2, 4))
    with pytest.raises(ValueError, match="coords"):  # bad coordinates are refused with out= too
        ld.sh_basis(torch.tensor([[95.0, 0.0]], dtype=torch.float64), 6, out=torch.empty(1, 49, dtype=torch.float64))
