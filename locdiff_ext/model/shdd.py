"""SHDD encoder/decoder modules: locations <-> unit-scale SHDD vectors for the diffusion model.

The SHDD vector of a location is the SH expansion of a Dirac delta there, Y_lm(x), optionally
tapered per degree.  By the addition theorem sum_lm Y_lm(x)^2 = (L+1)^2 / (4 pi) at every x, so
each coefficient has mean square 1/(4 pi) (untapered).  The noise schedule assumes unit mean square
per coordinate, so the encoder multiplies by ``scale`` and the decoder divides by it: the factor
lives here and nowhere else (design.md section 4).
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
from torch import Tensor, nn

from ..kernels.ops import num_coeffs, shdd_decode, shdd_encode

WEIGHTINGS = ("none", "gaussian")


def degree_weights(L: int, weighting: str = "none", sigma: Optional[float] = None) -> Optional[Tensor]:
    """Per-degree taper w_l (float64 [L+1]) or None.  'gaussian': w_l = exp(-l(l+1) sigma^2 / 2),
    the heat-kernel smoothing that removes the Gibbs side lobes of a truncated Dirac; sigma in
    radians, default 3/L: the smallest multiple of 1/L that brings the side lobes below 0.1% of
    the peak (1/L leaves 11%, 2/L 1.5%); it widens the main lobe by about 1.7x."""
    if weighting not in WEIGHTINGS:
        raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")
    if weighting == "none":
        return None
    s = (3.0 / max(L, 1)) if sigma is None else float(sigma)
    if not (s > 0 and math.isfinite(s)):
        raise ValueError(f"sigma must be a positive finite number of radians, got {sigma!r}")
    return gaussian_taper(L, s)


def gaussian_taper(L: int, sigma: float) -> Tensor:
    """exp(-l(l+1) sigma^2 / 2) for l = 0..L (float64): the heat-kernel smoothing of width sigma radians
    (0: none), used by the 'gaussian' weighting, the SHDD-KL loss and the probability maps."""
    l = torch.arange(L + 1, dtype=torch.float64)
    return torch.exp(-l * (l + 1) * sigma * sigma / 2)


def per_coefficient(w: Tensor) -> Tensor:
    """Per-degree values [L+1] repeated over the 2l+1 orders of each degree: [(L+1)^2], column order."""
    return torch.repeat_interleave(w, 2 * torch.arange(w.shape[0], device=w.device) + 1)


def unit_scale(L: int, weights: Optional[Tensor]) -> float:
    """Factor that gives SHDD vectors unit mean square per coordinate:
    sqrt(4 pi (L+1)^2 / sum_l (2l+1) w_l^2)  (= sqrt(4 pi) without a taper)."""
    l = torch.arange(L + 1, dtype=torch.float64)
    w2 = torch.ones(L + 1, dtype=torch.float64) if weights is None else weights.double() ** 2
    return math.sqrt(4 * math.pi * num_coeffs(L) / float(((2 * l + 1) * w2).sum()))


class SHDDEncoder(nn.Module):
    """(lat, lon) degrees [..., 2] -> scaled SHDD vectors [..., (L+1)^2]."""

    def __init__(self, L: int, weighting: str = "none", sigma: Optional[float] = None):
        super().__init__()
        self.L = int(L)
        self.weighting = weighting
        w = degree_weights(self.L, weighting, sigma)
        self.sigma = sigma
        self.register_buffer("weights", w if w is not None else torch.empty(0, dtype=torch.float64), persistent=False)
        self.scale = unit_scale(self.L, w)

    @property
    def dim(self) -> int:
        return num_coeffs(self.L)

    def forward(self, coords: Tensor) -> Tensor:
        w = self.weights.to(coords.dtype) if self.weights.numel() else None
        return shdd_encode(coords, self.L, weights=w) * self.scale

    def unscale(self, x: Tensor) -> Tensor:
        """Scaled SHDD vectors back to SH coefficients."""
        return x / self.scale


class SHDDDecoder(nn.Module):
    """Scaled SHDD vectors -> top-k modes (coords [..., top_k, 2], scores [..., top_k])."""

    def __init__(self, encoder: SHDDEncoder, top_k: int = 1, nlat: Optional[int] = None, refine: bool = True,
                 min_separation_km: Optional[float] = None):
        super().__init__()
        self.encoder = encoder
        self.top_k = top_k
        self.nlat = nlat
        self.refine = refine
        self.min_separation_km = min_separation_km

    def forward(self, x: Tensor, top_k: Optional[int] = None) -> Tuple[Tensor, Tensor]:
        coeffs = self.encoder.unscale(x)
        if coeffs.dtype not in (torch.float32, torch.float64):
            coeffs = coeffs.float()
        return shdd_decode(coeffs.detach(), top_k or self.top_k, nlat=self.nlat, refine=self.refine,
                           min_separation_km=self.min_separation_km)
