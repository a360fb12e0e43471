"""The gallery of a retrieval-conditioned LocDiff: reference (embedding, location) pairs.

Why: on places the training set never saw, the location of the single most similar reference
embedding (GeoCLIP-style retrieval) carries information that a parametric p(location | embedding)
smooths away (BENCHMARKS.md section 3).  A retrieval-conditioned LocDiff (``retrieval_k > 0``)
looks up the ``k`` most similar gallery entries of its input and gives the denoiser their
similarities and locations (as SHDD vectors), so the diffusion model learns when to trust them.

At training time every sample is looked up with part of the gallery hidden, to teach both regimes
a user meets (``sample_holdout``): for half of the rows only the sample itself (places the gallery
covers: other shots of the same place stay visible), for the others a whole random region, a
spherical cap that contains the sample at a uniformly random position (places it does not cover:
like a photo taken somewhere in an unseen region, its true location may lie near the region's edge,
with lookalikes just beyond it, or deep inside).  Centring the cap on the sample instead, so that the
nearest visible entry was always at least the radius away, taught the model to distrust neighbours
that on unseen regions were right (BENCHMARKS.md section 3).  At inference nothing is hidden.  A small
gallery is saved with the model (``save_pretrained``); a gallery of millions of rows stays in its
``EmbeddingStore`` (memory-mapped), searched through a ``GalleryIndex`` (exact or FAISS), and models
reference it by path and content hash (``Gallery.attach``); training then draws each sample's visible
neighbours from the store's precomputed neighbour lists (``visible_neighbours``), so a step's cost does
not grow with the gallery.
"""

from __future__ import annotations

import math
from typing import Dict, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..checks import check_float, check_int, validate_coords, validate_embeddings
from ..data.index import GalleryIndex
from ..data.store import EmbeddingStore
from ..kernels.geometry import EARTH_RADIUS_KM, great_circle_km, latlon_to_xyz, unit_rows, xyz_to_latlon
from .aggregate import SampleAggregator
from .shdd import SHDDDecoder, SHDDEncoder


SELF_KM = 1e-3  # the smallest hold-out radius (1 m): hides the sample itself


class Gallery(nn.Module):
    """Reference pairs, either in memory as buffers: ``embeddings`` [G, D] (L2-normalised, float32) and
    ``coords`` [G, 2] (lat, lon degrees, float32), filled by ``set``; or a whole ``EmbeddingStore`` with
    its ``GalleryIndex``, attached by ``attach`` (the buffers then stay empty and are not saved)."""

    def __init__(self, dim: int):
        super().__init__()
        self.register_buffer("embeddings", torch.zeros(0, dim))
        self.register_buffer("coords", torch.zeros(0, 2))
        self.index: Optional[GalleryIndex] = None

    def __len__(self) -> int:
        return len(self.index) if self.index is not None else self.coords.shape[0]

    @property
    def store(self) -> Optional[EmbeddingStore]:
        return self.index.store if self.index is not None else None

    def attach(self, index: GalleryIndex) -> "Gallery":
        """Makes ``index``'s store the gallery (memory-mapped, never copied into the model)."""
        if index.store.dim != self.dim:
            raise ValueError(f"the gallery store has width {index.store.dim} but the model expects {self.dim}")
        self.index = index
        dev = self.embeddings.device
        self.embeddings, self.coords = torch.zeros(0, self.dim, device=dev), torch.zeros(0, 2, device=dev)
        return self

    def store_coords(self, rows: Tensor) -> Tensor:
        """Coordinates [..., 2] float64 of store rows (NaN where a row index is -1)."""
        c = torch.from_numpy(np.asarray(self.store.coords[rows.clamp_min(0).cpu().numpy()]))
        return c.masked_fill((rows < 0).cpu()[..., None], float("nan"))

    @property
    def dim(self) -> int:
        return self.embeddings.shape[1]

    def set(self, embeddings, coords) -> "Gallery":
        """Replaces the gallery (validated; embeddings are L2-normalised)."""
        e = validate_embeddings(embeddings, "gallery embeddings", self.dim)
        c = validate_coords(coords, "gallery coords")
        if e.shape[0] != c.shape[0]:
            raise ValueError(f"gallery embeddings has {e.shape[0]} rows but gallery coords has {c.shape[0]}")
        dev = self.embeddings.device
        self.embeddings = unit_rows(e).to(dev)
        self.coords = c.float().to(dev)
        return self

    def resize_like(self, state: dict, prefix: str) -> None:
        """Gives the buffers the shapes stored in ``state`` so that load_state_dict can fill them."""
        for name in ("embeddings", "coords"):
            t = state.get(prefix + name)
            if t is not None:
                setattr(self, name, torch.empty_like(t, device=getattr(self, name).device))

    @torch.no_grad()
    def search(self, query: Tensor, k: int, center: Optional[Tensor] = None, holdout_km: Optional[Tensor] = None,
               chunk: int = 512) -> Tuple[Tensor, Tensor]:
        """The ``k`` most similar entries of each (normalised) query [B, D] by cosine similarity:
        (similarities [B, k], coords [B, k, 2] float64), best first.  With ``center`` [B, 2] and
        ``holdout_km`` [B], entries within holdout_km of center are skipped; where fewer than k
        remain, similarities are -inf and coords NaN."""
        if len(self) == 0:
            raise ValueError("the gallery is empty: call LocDiff.set_gallery(embeddings, coords) "
                             "(the Trainer does it with the training data)")
        if self.index is not None:
            if center is not None:
                raise ValueError("a store-backed gallery hides hold-out regions through the store's neighbour "
                                 "lists (visible_neighbours), not by searching")
            sims, rows = self.index.search(query, k)
            return sims.to(query.device), self.store_coords(rows).to(query.device)
        q = query.float().to(self.embeddings.device)
        kk = min(k, len(self))
        gxyz = latlon_to_xyz(self.coords.double()) if center is not None else None  # float64: 1 km is 1e-8 in cos
        sims, idx = [], []
        for i in range(0, q.shape[0], chunk):
            s = q[i:i + chunk] @ self.embeddings.T
            if center is not None:
                c = latlon_to_xyz(center[i:i + chunk].double().to(s.device))
                cos_r = torch.cos((holdout_km[i:i + chunk].to(s.device).double() / EARTH_RADIUS_KM).clamp(max=math.pi))
                s = s.masked_fill(c @ gxyz.T >= cos_r[:, None], float("-inf"))
            v, j = s.topk(kk, dim=-1)
            sims.append(v)
            idx.append(j)
        sims, idx = torch.cat(sims), torch.cat(idx)
        coords = self.coords.double()[idx]
        coords[~torch.isfinite(sims)] = float("nan")
        if kk < k:
            pad = k - kk
            sims = F.pad(sims, (0, pad), value=float("-inf"))
            coords = torch.cat([coords, coords.new_full((coords.shape[0], pad, 2), float("nan"))], 1)
        return sims, coords


def visible_neighbours(sims: Tensor, coords: Tensor, k: int, center: Tensor, holdout_km: Tensor) -> Tuple[Tensor, Tensor]:
    """The ``k`` best candidates [B, K'] (similarities best first, coords [B, K', 2]) that lie outside each
    row's hold-out cap (``center`` [B, 2], ``holdout_km`` [B]): (similarities [B, k], coords [B, k, 2]),
    -inf / NaN where fewer than k candidates are visible (as ``Gallery.search`` pads)."""
    c = latlon_to_xyz(center.double().cpu())
    x = latlon_to_xyz(torch.nan_to_num(coords.double().cpu(), nan=0.0))
    cos_r = torch.cos((holdout_km.double().cpu() / EARTH_RADIUS_KM).clamp(max=math.pi))
    hidden = (x @ c[:, :, None])[..., 0] >= cos_r[:, None]
    s = sims.float().cpu().masked_fill(hidden | ~torch.isfinite(coords[..., 0].cpu()), float("-inf"))
    # stable: visible candidates keep their similarity order; hidden ones go last
    order = torch.sort((~torch.isfinite(s)).to(torch.int8), dim=1, stable=True).indices[:, :k]
    v = s.gather(1, order)
    out = coords.double().cpu().gather(1, order[..., None].expand(-1, -1, 2)).clone()
    out[~torch.isfinite(v)] = float("nan")
    if v.shape[1] < k:
        pad = k - v.shape[1]
        v = F.pad(v, (0, pad), value=float("-inf"))
        out = torch.cat([out, out.new_full((out.shape[0], pad, 2), float("nan"))], 1)
    return v, out


def holdout_shortfall(sims: Tensor, coords: Tensor, true_coords: Tensor, k: int, max_km: float,
                      seed: int = 0) -> float:
    """The share of rows (candidates ``sims`` [n, K'], ``coords`` [n, K', 2] of rows at ``true_coords``) whose
    training hold-out, drawn as in training, leaves fewer than ``k`` of their K' candidates visible: how
    often a store-trained LocDiff-R sees missing neighbours where an exhaustive search would have found more
    (data/index.py).  Uses and restores torch's global RNG."""
    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        centre, radius = sample_holdout(true_coords, max_km)
    finally:
        torch.random.set_rng_state(state)
    v, _ = visible_neighbours(sims, coords, k, centre, radius)
    return float((~torch.isfinite(v[:, -1])).double().mean())


def holdout_draws(n: int, generator: Optional[torch.Generator] = None) -> Tensor:
    """The random numbers of ``n`` training hold-out regions [n, 6] float64 (three uniforms, three normals),
    apart from the geometry so that a trainer can draw them for the whole global batch of a step and give
    each process its rows: a torchrun run then hides what the 1-process run hides."""
    return torch.cat([torch.rand(n, 3, dtype=torch.float64, generator=generator),
                      torch.randn(n, 3, dtype=torch.float64, generator=generator)], 1)


def sample_holdout(coords: Tensor, max_km: float, draws: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """Training hold-out regions for samples at ``coords`` [n, 2]: (centres [n, 2] float64, radii [n]
    km).  Half of the rows hide only the sample itself (centre = its location, radius 1 m); the others
    a cap of radius uniform in [max_km / 10, max_km] whose centre lies a distance R * sqrt(u) (u uniform)
    from the sample in a uniform direction, so the sample is uniformly placed inside the cap.  ``draws``
    [n, 6]: the random numbers (``holdout_draws``; the Trainer makes them per step), else drawn from
    torch's global RNG."""
    n = coords.shape[0]
    d = holdout_draws(n) if draws is None else draws.detach().to("cpu", torch.float64)
    if d.shape != (n, 6):
        raise ValueError(f"draws must be [{n}, 6] (holdout_draws), got {tuple(d.shape)}")
    radius = max_km / 10 + d[:, 0] * (max_km - max_km / 10)
    offset = radius * d[:, 1].sqrt() / EARTH_RADIUS_KM  # radians of arc
    here = coords.detach().double().cpu()
    x = latlon_to_xyz(here)
    t = d[:, 3:]
    t = F.normalize(t - (t * x).sum(-1, keepdim=True) * x, dim=-1)  # a random tangent direction
    centre = xyz_to_latlon(x * offset.cos()[:, None] + t * offset.sin()[:, None])
    local = d[:, 2] < 0.5
    centre = torch.where(local[:, None], here, centre)
    radius = torch.where(local, torch.full_like(radius, SELF_KM), radius)
    return centre.to(coords.device), radius.to(coords.device)


def neighbour_features(sims: Tensor, coords: Tensor, shdd: nn.Module, temperature: float) -> Tuple[Tensor, Tensor]:
    """What the denoiser sees of the k neighbours: (scalar features [B, k], prior [B, 2K]).
    Scalars are the similarities (-1 where missing); the prior holds two SHDD vectors, that of the
    best neighbour and the softmax(similarity / temperature)-weighted mean over the k (a kernel
    density of where the lookalikes are)."""
    B, k = sims.shape
    ok = torch.isfinite(sims)
    x = shdd(torch.nan_to_num(coords, nan=0.0).reshape(-1, 2)).reshape(B, k, -1).float()
    x = x * ok[..., None]
    w = torch.softmax(sims.float().masked_fill(~ok, -math.inf) / temperature, dim=-1).nan_to_num(0.0)
    prior = torch.cat([x[:, 0], (w[..., None] * x).sum(1)], dim=-1)
    return torch.where(ok, sims.float(), torch.full_like(sims.float(), -1.0)), prior


SIGNAL_K = 8  # the neighbours whose agreement the query-time signals describe
AGREE_KM = 600.0  # "agrees with the best neighbour": within this distance of it


def query_signals(sims: Tensor, coords: Tensor) -> Dict[str, Tensor]:
    """How localizable each query looks from its neighbours (``sims`` [B, K] best first, -inf where
    missing; ``coords`` [B, K, 2]), float64 [B] each: 'top_similarity'; 'similarity_gap', the best minus
    the 8th similarity; 'neighbour_agreement', the share of the best 8 within 600 km of the best;
    'neighbour_spread', log(1 + the median distance in km of the best 8 to the best).  Why: an input whose
    lookalikes agree on a place is one the gallery has seen (a conformal calibration groups inputs by
    these, ``evaluation.conformal``).  Missing neighbours count as similarity -1, 20,000 km away."""
    k = min(SIGNAL_K, sims.shape[1])
    s = sims[:, :k].double().cpu()
    ok = torch.isfinite(s)
    s = torch.where(ok, s, torch.full_like(s, -1.0))
    c = coords[:, :k].double().cpu()
    d = great_circle_km(c.reshape(-1, 2), c[:, :1].expand(-1, k, -1).reshape(-1, 2)).reshape(-1, k)
    d = torch.where(ok & ok[:, :1] & torch.isfinite(d), d, torch.full_like(d, 20_000.0))
    return {"top_similarity": s[:, 0], "similarity_gap": s[:, 0] - s[:, -1],
            "neighbour_agreement": (d <= AGREE_KM).double().mean(1), "neighbour_spread": torch.log1p(d.median(1).values)}


def neighbour_density(sims: Tensor, coords: Tensor, shdd: nn.Module, k: int, temperature: float) -> Tensor:
    """The kNN density of the best ``k`` of the neighbours (``sims`` [B, K'] best first, ``coords`` [B, K', 2]):
    the softmax(similarity / temperature)-weighted mean of their SHDD vectors [B, (L+1)^2], the
    prior that ``KNNDensity`` decodes and that ``LocDiff.predict`` mixes in (``prior_weight``)."""
    return neighbour_features(sims[:, :k], coords[:, :k], shdd, temperature)[1][:, shdd.dim:]


def snap_to_neighbours(modes: Tensor, sims: Tensor, coords: Tensor, radius_km: float) -> Tensor:
    """LocDiff-H: each mode (``modes`` [B, T, 2]) moved to the location of the most similar of the query's
    neighbours (``sims`` [B, K] best first, ``coords`` [B, K, 2]) within ``radius_km`` of it, and left
    where it is if none is that close.  Why: the diffusion model finds the region, the gallery knows the
    exact spots in it; the paper's hybrid searches the whole gallery around the mode, this searches the
    query's K best matches (one index search, whatever the gallery's size), which hold the spots a
    similar-enough entry would be at."""
    c = coords.to(modes)
    d = great_circle_km(modes[:, :, None, :].expand(-1, -1, c.shape[1], -1), c[:, None, :, :].expand(-1, modes.shape[1], -1, -1))
    near = (d <= radius_km) & torch.isfinite(sims.to(modes.device))[:, None, :]  # NaN distances compare False
    first = near.int().argmax(-1)  # the best-ranked neighbour within the radius
    snapped = c.gather(1, first[..., None].expand(-1, -1, 2))
    return torch.where(near.any(-1)[..., None], snapped, modes)


class KNNDensity:
    """The kNN top-k density baseline: the softmax(similarity / temperature)-weighted mixture of the
    SHDD vectors of the ``k`` most similar gallery entries (the prior a LocDiff-R denoiser sees, a
    kernel density of where the lookalikes are), read like LocDiff's sample mean: its mode is the
    prediction and its smoothed map the probability map, so kNN gets credible regions too.
    ``k`` = 1 is top-1 retrieval; ``smoothing`` (radians, default 3/L) is the maps' Gaussian taper."""

    def __init__(self, gallery_emb: Tensor, gallery_coords: Tensor, k: int = 16, temperature: float = 0.03,
                 L: int = 32, smoothing: Optional[float] = None):
        self.k = check_int(k, "k", 1, 1024)
        self.temperature = check_float(temperature, "temperature", 0.0, lo_open=True)
        check_int(L, "L", 1, 256)
        e = validate_embeddings(gallery_emb, "gallery_emb")
        self.gallery = Gallery(e.shape[1]).set(e, gallery_coords)
        self.shdd = SHDDEncoder(L)
        s = 3.0 / L if smoothing is None else check_float(smoothing, "smoothing", 0.0, lo_open=True)
        self.aggregator = SampleAggregator(self.shdd, SHDDDecoder(self.shdd), s)

    @torch.no_grad()
    def mixture(self, emb: Tensor) -> Tensor:
        """The weighted SHDD mixture of each query's neighbours as one scaled 'sample': [N, 1, K]."""
        q = unit_rows(validate_embeddings(emb, "emb", self.gallery.dim).float())
        sims, coords = self.gallery.search(q, self.k)
        return neighbour_density(sims, coords, self.shdd, self.k, self.temperature)[:, None, :]

    @torch.no_grad()
    def predict(self, emb: Tensor, chunk: int = 1024) -> Tensor:
        """The mixture's mode per query: [N, 2] (lat, lon) float64."""
        return torch.cat([self.aggregator.decoder(self.mixture(emb[i:i + chunk])[:, 0].double(), 1)[0][:, 0]
                          for i in range(0, emb.shape[0], chunk)])

    @torch.no_grad()
    def prob_map(self, emb: Tensor, nlat: int = 90, nlon: int = 180) -> Tensor:
        """Per-cell probabilities [N, nlat, nlon] of the smoothed mixture (SampleAggregator.probability_map)."""
        return self.aggregator.probability_map(self.mixture(emb), nlat, nlon)


__all__ = ["Gallery", "holdout_draws", "sample_holdout", "visible_neighbours", "holdout_shortfall", "neighbour_features",
           "neighbour_density", "snap_to_neighbours", "KNNDensity", "query_signals"]
