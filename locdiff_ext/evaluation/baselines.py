"""Baselines on the same (frozen) embeddings as LocDiff, and the LocDiff-H hybrid.

- ``KNNRetrieval``: GeoCLIP-style retrieval, the location of the most similar gallery embedding
  (cosine similarity).
- ``GridClassifier``: classification over ``num_cells`` near-equal-area cells (a Fibonacci lattice),
  predicting the centre of the most probable cell.
- ``UnitVectorRegressor``: direct regression of the unit vector on the sphere (loss 1 - cos of the
  angle to the truth).
- ``locdiff_h``: the hybrid of the paper: after decoding, snap to the gallery location within the
  predicted mode's main lobe whose embedding is most similar to the query (retrieval restricted
  to the region LocDiff chose); keep the mode where the lobe holds no gallery location.
Inputs are L2-normalised embeddings [N, D] and (lat, lon) degrees [N, 2].
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..kernels.geometry import EARTH_RADIUS_KM, fibonacci_cells, grid_points, latlon_to_xyz, unit_rows, xyz_to_latlon
from .calibration import cell_areas_km2
from .metrics import THRESHOLDS_KM, geolocation_metrics, paired_bootstrap


def _mlp(d_in: int, d_out: int, hidden: int = 256) -> nn.Module:
    return nn.Sequential(nn.Linear(d_in, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, d_out))


def _fit(head: nn.Module, x: Tensor, loss_fn, steps: int, batch: int, lr: float, seed: int) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    head.train()
    for _ in range(steps):
        idx = torch.randint(0, x.shape[0], (batch,), generator=g)
        loss = loss_fn(head(x[idx]), idx)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    return head.eval()


class KNNRetrieval:
    """Top-1 retrieval over a gallery of (embedding, location) pairs."""

    def __init__(self, gallery_emb: Tensor, gallery_coords: Tensor):
        self.emb = unit_rows(gallery_emb.float())
        self.coords = gallery_coords.double()

    @torch.no_grad()
    def predict(self, emb: Tensor, chunk: int = 1024) -> Tensor:
        q = unit_rows(emb.float())
        idx = torch.cat([(q[i:i + chunk] @ self.emb.T).argmax(-1) for i in range(0, q.shape[0], chunk)])
        return self.coords[idx]


class GridClassifier:
    """MLP classifier over Fibonacci cells; predicts the centre of the argmax cell."""

    def __init__(self, num_cells: int = 1024, steps: int = 3000, batch: int = 256, lr: float = 2e-3, seed: int = 0):
        self.cells = fibonacci_cells(num_cells)
        self.steps, self.batch, self.lr, self.seed = steps, batch, lr, seed

    def fit(self, emb: Tensor, coords: Tensor) -> "GridClassifier":
        xyz = latlon_to_xyz(coords.double())
        label = (xyz @ latlon_to_xyz(self.cells).T).argmax(-1)  # nearest cell
        torch.manual_seed(self.seed)
        self.head = _fit(_mlp(emb.shape[1], len(self.cells)), emb.float(),
                         lambda out, idx: F.cross_entropy(out, label[idx]), self.steps, self.batch, self.lr, self.seed)
        return self

    @torch.no_grad()
    def predict(self, emb: Tensor) -> Tensor:
        return self.cells[self.head(emb.float()).argmax(-1)]

    @torch.no_grad()
    def prob_map(self, emb: Tensor, nlat: int = 90, nlon: int = 180) -> Tensor:
        """The softmax over cells as maps [N, nlat, nlon] on ``grid_latlon``: each map cell belongs to its
        nearest class cell, whose probability is spread over its map cells in proportion to their area."""
        probs = torch.softmax(self.head(emb.float()).double(), -1)
        pts = latlon_to_xyz(grid_points(nlat, nlon))
        owner = (pts @ latlon_to_xyz(self.cells).T).argmax(-1)
        area = torch.from_numpy(cell_areas_km2(nlat, nlon)).repeat_interleave(nlon)
        owned = torch.zeros(len(self.cells), dtype=torch.float64).index_add_(0, owner, area)
        maps = probs[:, owner] * (area / owned[owner].clamp(min=1e-300))
        return (maps / maps.sum(-1, keepdim=True)).reshape(-1, nlat, nlon)


class UnitVectorRegressor:
    """MLP regression of the unit vector; loss 1 - cos(angle to the truth)."""

    def __init__(self, steps: int = 3000, batch: int = 256, lr: float = 2e-3, seed: int = 0):
        self.steps, self.batch, self.lr, self.seed = steps, batch, lr, seed

    def fit(self, emb: Tensor, coords: Tensor) -> "UnitVectorRegressor":
        xyz = latlon_to_xyz(coords.double()).float()
        torch.manual_seed(self.seed)
        self.head = _fit(_mlp(emb.shape[1], 3), emb.float(),
                         lambda out, idx: (1 - (F.normalize(out, dim=-1) * xyz[idx]).sum(-1)).mean(),
                         self.steps, self.batch, self.lr, self.seed)
        return self

    @torch.no_grad()
    def predict(self, emb: Tensor) -> Tensor:
        return xyz_to_latlon(self.head(emb.float()))


@torch.no_grad()
def locdiff_h(modes: Tensor, query_emb: Tensor, gallery_emb: Tensor, gallery_coords: Tensor, radius_km: float,
              chunk: int = 256) -> Tensor:
    """LocDiff-H: per query, the gallery location within ``radius_km`` of its LocDiff mode
    [N, 2] that is most similar to the query embedding; the mode itself where none is that close
    (or the mode is NaN)."""
    q = unit_rows(query_emb.float())
    g = unit_rows(gallery_emb.float())
    gxyz = latlon_to_xyz(gallery_coords.double())
    cos_r = math.cos(radius_km / EARTH_RADIUS_KM)
    out = modes.double().clone()
    for i in range(0, modes.shape[0], chunk):
        m = modes[i:i + chunk].double()
        near = (latlon_to_xyz(m) @ gxyz.T) >= cos_r  # [b, G]; NaN modes compare False
        sim = (q[i:i + chunk] @ g.T).masked_fill(~near, float("-inf"))
        best = sim.argmax(-1)
        ok = near.any(-1)
        out[i:i + chunk][ok] = gallery_coords.double()[best[ok]]
    return out


def fit_baselines(emb: Tensor, coords: Tensor, steps: int = 3000, seed: int = 0) -> dict:
    """The three baselines fitted on (embeddings, coords): {'knn', 'grid', 'regression'}."""
    emb_n = unit_rows(emb.float())
    return {"knn": KNNRetrieval(emb, coords), "grid": GridClassifier(steps=steps, seed=seed).fit(emb_n, coords),
            "regression": UnitVectorRegressor(steps=steps, seed=seed).fit(emb_n, coords)}


def method_predictions(locdiff, baselines: dict, gallery_emb: Tensor, gallery_coords: Tensor, queries: Tensor,
                       seed: int = 0, progress: bool = False, modes: Optional[Tensor] = None,
                       variants: Optional[dict] = None) -> dict:
    """{method: predictions [N, 2]} for LocDiff, LocDiff-H (over the gallery) and the fitted baselines
    (``baselines['knn_density']``, an optional object with ``k`` and ``predict(embeddings)``, adds the kNN
    density row); a retrieval-conditioned model's rows are named 'LocDiff-R (k=..)' and 'LocDiff-R + H'.
    The two LocDiff rows come first, then ``variants`` ({name: predictions [N, 2]}: other LocDiff settings,
    e.g. those chosen on validation).  ``modes``: LocDiff's answers [N, top_k, 2] when already computed
    (``locdiff.predict(queries, seed=seed)``, e.g. in the same pass as its probability maps)."""
    if modes is None:
        modes, _, _ = locdiff.predict(queries, top_k=1, seed=seed, progress=progress)
    qn = unit_rows(queries.float())
    grid = baselines["grid"]
    k = locdiff.config.retrieval_k
    name, name_h = ("LocDiff", "LocDiff-H") if k == 0 else (f"LocDiff-R (k={k})", "LocDiff-R + H")
    out = {
        name: modes[:, 0],
        name_h: locdiff_h(modes[:, 0], queries, gallery_emb, gallery_coords, locdiff.lobe_km),
        **(variants or {}),
        "kNN retrieval (top-1)": baselines["knn"].predict(queries),
    }
    if "knn_density" in baselines:
        out[f"kNN density (k={baselines['knn_density'].k})"] = baselines["knn_density"].predict(queries)
    out[f"grid classification ({len(grid.cells)} cells)"] = grid.predict(qn)
    out["unit-vector regression"] = baselines["regression"].predict(qn)
    return out


def compare_methods(locdiff, baselines: dict, gallery_emb: Tensor, gallery_coords: Tensor, queries: Tensor,
                    truth: Tensor, seed: int = 0, paired: bool = False, progress: bool = False,
                    modes: Optional[Tensor] = None, variants: Optional[dict] = None):
    """{method: metrics} of method_predictions against ``truth``; with ``paired``, also
    {'LocDiff row - baseline': metrics.paired_bootstrap(...)} for each LocDiff row (variants included)
    and baseline: returns (metrics, differences)."""
    preds = method_predictions(locdiff, baselines, gallery_emb, gallery_coords, queries, seed, progress, modes, variants)
    metrics = {name: geolocation_metrics(p, truth) for name, p in preds.items()}
    if not paired:
        return metrics
    names = list(preds)
    ours = 2 + len(variants or {})
    diffs = {f"{a} - {b}": paired_bootstrap(preds[a], preds[b], truth, THRESHOLDS_KM, seed=seed)
             for a in names[:ours] for b in names[ours:]}
    return metrics, diffs


__all__ = ["fit_baselines", "method_predictions", "compare_methods", "KNNRetrieval", "GridClassifier",
           "UnitVectorRegressor", "locdiff_h"]

