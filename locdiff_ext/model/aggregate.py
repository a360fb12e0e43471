"""From diffusion samples to answers: modes, scores and probability maps (LocDiff's inference head).

For each input, S SHDD vectors are sampled; this module turns them into the top-k modes.
Aggregation 'mean' (default) averages the sampled SHDD vectors and decodes the mean: the mean of
Diracs is a kernel density estimate of the samples, so its modes are where samples concentrate,
top-k alternatives come out naturally, and one decode per input replaces S.  'mode' decodes every
sample and returns the densest sample clusters (robust when samples are few).
Scores are in [0, 1]: how much of the prediction lies within one main-lobe width (pi/(L+1) of arc)
of the mode: for 'mean', the predicted map's mass there relative to that of a single Dirac (1 when
all samples agree, 0.5 when half of the mass is elsewhere); for 'mode', the fraction of samples there.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
from torch import Tensor

from ..kernels.geometry import EARTH_RADIUS_KM, great_circle_km, grid_latlon, grid_points, latlon_to_xyz
from ..kernels.ops import sh_synthesis
from .shdd import SHDDDecoder, SHDDEncoder, gaussian_taper, per_coefficient

AGGREGATES = ("mean", "mode")


class SampleAggregator:
    """Scaled SHDD samples [B, S, K] -> (coords [B, top_k, 2], scores [B, top_k]) and probability maps.

    ``smoothing`` (radians) is the Gaussian taper applied before maps are read as probabilities
    (the SHDD-KL smoothing: no negative side lobes).  A plain object, not a module: it holds no
    weights, only references to the model's SHDD encoder and decoder."""

    def __init__(self, shdd: SHDDEncoder, decoder: SHDDDecoder, smoothing: float):
        self.shdd, self.decoder, self.smoothing = shdd, decoder, float(smoothing)
        self._dirac_mass: Optional[float] = None

    @property
    def lobe_km(self) -> float:
        """Main-lobe width pi/(L+1) of arc in km: the resolution of the representation."""
        return math.pi / (self.shdd.L + 1) * EARTH_RADIUS_KM

    def __call__(self, samples: Tensor, top_k: int, how: str = "mean") -> Tuple[Tensor, Tensor]:
        if how not in AGGREGATES:
            raise ValueError(f"aggregate must be one of {AGGREGATES}, got {how!r}")
        return self.decode_mean(samples, top_k) if how == "mean" else self.decode_mode(samples, top_k)

    def probability_map(self, samples: Tensor, nlat: int = 180, nlon: int = 360, sharpness: float = 1.0) -> Tensor:
        """Per-cell probabilities [B, nlat, nlon] of the sample mean, smoothed with the SHDD-KL
        Gaussian (no negative side lobes), clamped at 0 (uniform where nothing is left), raised to the power
        ``sharpness`` (a density temperature calibrated on validation data; 1: none) and weighted by cell area."""
        coeffs = self.shdd.unscale(samples.mean(dim=1).double())
        coeffs = coeffs * per_coefficient(gaussian_taper(self.shdd.L, self.smoothing)).to(coeffs.device)
        f = sh_synthesis(coeffs, nlat, nlon).clamp(min=0)
        # a mean that is <= 0 everywhere (an untrained model can give one) says nothing: the uniform map
        f = torch.where(f.amax(dim=(1, 2), keepdim=True) > 0, f, torch.ones_like(f))
        if sharpness != 1.0:
            f = (f / f.amax(dim=(1, 2), keepdim=True).clamp(min=1e-300)) ** sharpness
        lat, _ = grid_latlon(nlat, nlon, device=f.device)
        p = f * torch.cos(torch.deg2rad(lat))[None, :, None]
        return p / p.sum(dim=(1, 2), keepdim=True).clamp(min=1e-300)

    def lobe_mass(self, samples: Tensor, coords: Tensor) -> Tensor:
        """Probability mass of the (smoothed) sample mean within one main-lobe width of each
        coordinate: samples [B, S, K], coords [B, k, 2] -> [B, k]."""
        L = self.shdd.L
        nlat = 2 * L + 2  # cells of half the main lobe
        p = self.probability_map(samples, nlat, 2 * nlat).reshape(samples.shape[0], -1)
        cells = latlon_to_xyz(grid_points(nlat, 2 * nlat, device=p.device).to(p))
        cos_lobe = math.cos(math.pi / (L + 1))
        out = []
        for i in range(0, coords.shape[1], 16):  # [B, 16, cells] at a time, whatever top_k
            near = latlon_to_xyz(coords[:, i:i + 16].to(p)) @ cells.T >= cos_lobe
            out.append((near * p[:, None, :]).sum(-1))
        return torch.cat(out, 1) if out else p.new_zeros(coords.shape[:2])

    def decode_mean(self, samples: Tensor, top_k: int) -> Tuple[Tensor, Tensor]:
        """Modes of the sample mean, ordered by their lobe mass relative to a single Dirac's."""
        coords, _ = self.decoder(samples.mean(dim=1).double(), top_k)
        if self._dirac_mass is None:  # the most a prediction can hold within one lobe at this L
            at = torch.zeros(1, 1, 2, dtype=torch.float64, device=samples.device)
            self._dirac_mass = float(self.lobe_mass(self.shdd(at[0]).float()[None], at))
        found = int((~torch.isnan(coords[..., 0])).sum(-1).max()) if coords.numel() else 0  # modes come first
        scores = torch.full(coords.shape[:2], float("-inf"), dtype=torch.float64, device=coords.device)
        mass = (self.lobe_mass(samples, coords[:, :found]) / self._dirac_mass).clamp(max=1.0)
        scores[:, :found] = torch.where(torch.isnan(coords[:, :found, 0]), scores[:, :found], mass.to(scores))
        order = scores.argsort(dim=1, descending=True, stable=True)  # best first by probability mass
        return coords.gather(1, order[..., None].expand(-1, -1, 2).to(coords.device)), scores.gather(1, order)

    def decode_mode(self, samples: Tensor, top_k: int) -> Tuple[Tensor, Tensor]:
        """Each sample decoded; greedily the sample with most others within a lobe, then those removed."""
        B, S, _ = samples.shape
        pts, _ = self.decoder(samples.reshape(B * S, -1).double(), 1)
        pts = pts.reshape(B, S, 2)
        d = great_circle_km(pts[:, :, None, :], pts[:, None, :, :])  # [B, S, S]
        near = (d <= self.lobe_km) & ~torch.isnan(d)
        coords = torch.full((B, top_k, 2), float("nan"), dtype=torch.float64)
        scores = torch.full((B, top_k), float("-inf"), dtype=torch.float64)
        free = torch.ones(B, S, dtype=torch.bool)
        for k in range(top_k):
            if not bool(free.any()):  # every sample is in a cluster already: the rest is padding
                break
            counts = (near & free[:, None, :]).sum(-1).masked_fill(~free, -1)
            best = counts.argmax(-1)
            ok = counts.gather(1, best[:, None])[:, 0] > 0
            rows = torch.arange(B)
            coords[ok, k] = pts[rows, best][ok]
            scores[ok, k] = counts[rows, best][ok].double() / S
            free &= ~near[rows, best]
        return coords, scores


__all__ = ["SampleAggregator", "AGGREGATES"]
