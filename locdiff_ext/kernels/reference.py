"""Slow, obviously-correct float64 PyTorch references that the tests (and benchmarks) compare with.

Written straight from the textbook formulas, vectorised over points only: a Python loop over
(l, m).  Same conventions as the kernels (design.md section 2).
"""

from __future__ import annotations

import math
from typing import Tuple

import torch
from torch import Tensor

from .geometry import great_circle_km, grid_points  # noqa: F401  (great_circle_km: tests and benchmarks use it from here)
from .ops import num_coeffs


def legendre_normalized(L: int, x: Tensor) -> dict:
    """Fully normalised associated Legendre functions Pbar_lm(x), no Condon-Shortley phase, with
    Pbar_lm = sqrt((2l+1)/(4 pi) (l-m)!/(l+m)!) P_l^m.  Returns {(l, m): tensor} for 0 <= m <= l <= L.

    Sectoral: Pbar_mm = sqrt((2m+1)/(2m)) sqrt(1-x^2) Pbar_{m-1,m-1};  Pbar_00 = 1/sqrt(4 pi).
    Then Pbar_lm = a_lm (x Pbar_{l-1,m} - b_lm Pbar_{l-2,m}) with
    a_lm = sqrt((4l^2-1)/(l^2-m^2)), b_lm = sqrt(((l-1)^2-m^2)/(4(l-1)^2-1))."""
    x = x.to(torch.float64)
    u = torch.sqrt(torch.clamp(1.0 - x * x, min=0.0))
    P = {(0, 0): torch.full_like(x, 1.0 / math.sqrt(4.0 * math.pi))}
    for m in range(1, L + 1):
        P[(m, m)] = math.sqrt((2.0 * m + 1.0) / (2.0 * m)) * u * P[(m - 1, m - 1)]
    for m in range(0, L + 1):
        for l in range(m + 1, L + 1):
            a = math.sqrt((4.0 * l * l - 1.0) / (l * l - m * m))
            prev2 = P.get((l - 2, m))
            b = math.sqrt(((l - 1) ** 2 - m * m) / (4.0 * (l - 1) ** 2 - 1.0)) if prev2 is not None else 0.0
            P[(l, m)] = a * (x * P[(l - 1, m)] - (b * prev2 if prev2 is not None else 0.0))
    return P


def sh_basis_ref(coords: Tensor, L: int) -> Tensor:
    """Real orthonormal SH at coords [N, 2] (lat, lon degrees) -> [N, (L+1)^2], float64."""
    coords = coords.to(torch.float64)
    theta = torch.deg2rad(90.0 - coords[:, 0])
    phi = torch.deg2rad(coords[:, 1])
    P = legendre_normalized(L, torch.cos(theta))
    # cos(theta) loses the sign of sin(theta) only at theta in [0, pi], where sin >= 0: fine.
    out = torch.empty(coords.shape[0], num_coeffs(L), dtype=torch.float64, device=coords.device)
    for l in range(L + 1):
        for m in range(-l, l + 1):
            if m == 0:
                v = P[(l, 0)]
            elif m > 0:
                v = math.sqrt(2.0) * P[(l, m)] * torch.cos(m * phi)
            else:
                v = math.sqrt(2.0) * P[(l, -m)] * torch.sin(-m * phi)
            out[:, l * l + l + m] = v
    return out


def shdd_encode_ref(coords: Tensor, L: int, weights: Tensor | None = None) -> Tensor:
    """SHDD vector: the basis, times an optional per-degree weight."""
    Y = sh_basis_ref(coords, L)
    if weights is not None:
        deg = torch.cat([torch.full((2 * l + 1,), l) for l in range(L + 1)])
        Y = Y * weights.to(torch.float64)[deg]
    return Y


def sh_synthesis_ref(coeffs: Tensor, nlat: int, nlon: int) -> Tensor:
    """Dense synthesis: basis at every grid point times the coefficients -> [B, nlat, nlon]."""
    L = math.isqrt(coeffs.shape[-1]) - 1
    g = grid_points(nlat, nlon, device=coeffs.device)
    Y = sh_basis_ref(g, L)
    return (coeffs.to(torch.float64) @ Y.T).reshape(coeffs.shape[0], nlat, nlon)


def dense_decode(coeffs: Tensor, basis_at_grid: Tensor, grid: Tensor) -> Tuple[Tensor, Tensor]:
    """The naive decoder the kernels are measured against: a precomputed basis at the grid
    [G, K], one matmul and an argmax.  Returns coords [B, 2] and scores [B]."""
    values = coeffs @ basis_at_grid.T
    score, idx = values.max(dim=1)
    return grid[idx], score
