"""Credible regions and radii that keep their promise: split conformal calibration, per group of inputs
(Mondrian) by a signal known at query time (issue 25).

Why: a probability map's own p region holds the truth for a share of inputs that depends on how well the
model knows its inputs (99.7% of seen places, 61% of unseen ones in the demo), and one temperature
(``calibration.fit_sharpness``) cannot fix both.  Split conformal prediction can: on calibration data
that the model never trained on, each item's score is the probability of the cells denser than its true
cell (``truth_mass``: the truth lies in the raw p region when the score is below p).  The region at level
p is then the raw region cut at the ceil((n + 1) p)-th smallest score of n calibration items, which holds
a new exchangeable item's truth with probability >= p, whatever the model.  The radius around the
answer is calibrated the same way on the answer-to-truth distances.  Doing it per group of a signal that
says how localizable the input is (the best mode's score; LocDiff-R's top neighbour similarity) makes
the promise hold within each group, not only on average over a mix of easy and hard inputs.

The rule is a sorted array and one index, and the fitted state must live in the model's JSON, so it is
written here; tests check it against crepes' Mondrian conformal regressor.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch

from ..checks import check_float, check_int
from ..kernels.geometry import great_circle_km, grid_points, latlon_to_xyz
from .calibration import _as_arrays, _check_level, _densities, cell_of

VERSION = 3  # 2: the learnt 'localizability' signal (score_model); 3: the densest cell refined (``_scan``)
SUPPORTED = (1, 2, 3)  # older files still load, and keep the scores they were fitted with
SIGNALS = ("none", "mode_score", "top_similarity", "localizability")  # what a group is chosen by
FEATURES = ("mode_score", "top_similarity", "similarity_gap", "neighbour_agreement", "neighbour_spread")
LEARN_SHARE = 1 / 3  # of the calibration items, those that fit the localizability score (then not used for cuts)
SETTINGS = ("prior_weight", "hybrid", "num_samples", "steps", "guidance_scale", "aggregate", "map_sharpness")
_EPS = 1e-12  # scores and cell masses are sums of float64 probabilities: equal up to this
FLOOR = 1e-6  # the floor's share of a map's peak density: orders the cells of zero density by distance


def conformal_rank(n: int, p: float) -> int:
    """The finite-sample rule: the region at level p is cut at the ceil((n + 1) p)-th smallest of n
    calibration scores (1-based); more than n means that n items cannot promise p."""
    return int(math.ceil((n + 1) * p - 1e-9))


def needed_items(p: float) -> int:
    """The fewest calibration items that can promise level p: the smallest n with ceil((n + 1) p) <= n."""
    p = _check_level(p)
    if p >= 1.0:
        raise ValueError("p must be below 1: no finite calibration set can promise p = 1")
    n = 1
    while conformal_rank(n, p) > n:
        n += 1
    return n


def conformal_quantile(scores, p: float, what: str = "calibration set") -> float:
    """The ceil((n + 1) p)-th smallest of ``scores``; ValueError (saying the n needed) when n is too small."""
    p = _check_level(p)
    s = np.sort(np.asarray(scores, dtype=np.float64).ravel())
    if p >= 1.0:
        raise ValueError("p must be below 1: no finite calibration set can promise p = 1")
    k = conformal_rank(s.size, p)
    if k > s.size:
        raise ValueError(f"p = {p:g}: the {what} holds n = {s.size} items, too few for this level (the "
                         f"finite-sample rule ceil((n + 1) p) <= n needs n >= {needed_items(p)})")
    return float(s[k - 1])


# ---------------------------------------------------------------------- per-cell scores of maps


@functools.lru_cache(maxsize=8)
def grid_xyz(nlat: int, nlon: int) -> np.ndarray:
    """Unit vectors [nlat * nlon, 3] of the cell centres of ``grid_latlon(nlat, nlon)`` (float64, read-only),
    kept per map size: every region and radius of a map needs them."""
    xyz = latlon_to_xyz(grid_points(nlat, nlon)).double().numpy()
    xyz.flags.writeable = False
    return xyz


def _floored(maps: np.ndarray, answers: Optional[np.ndarray]) -> np.ndarray:
    """Maps [n, nlat, nlon] with a floor of FLOOR x the peak density, highest at the answer (n, 2) and
    falling with the distance from it.  Why: a map clamped at 0 has large regions of equal (zero) density;
    a truth there would score 1 and turn the region into the whole Earth.  With the floor those cells join
    the region nearest-first, so the regions stay nested and every score is distinct; cells above the
    floor keep their order."""
    if answers is None:
        return maps
    maps, density, area = _densities(maps)
    n, nlat, nlon = maps.shape
    cells = grid_xyz(nlat, nlon)  # [C, 3]
    a = np.asarray(answers, dtype=np.float64).reshape(n, 2)
    ok = ~np.isnan(a).any(axis=1)
    cos = cells @ latlon_to_xyz(torch.from_numpy(np.where(ok[:, None], a, 0.0))).numpy().T  # [C, n]
    peak = density.reshape(n, -1).max(axis=1)
    floor = FLOOR * peak[:, None] * (0.5 * (1.0 + cos.T) + 1e-3) * ok[:, None]
    out = (density.reshape(n, -1) + floor) * area.reshape(1, -1)
    return (out / out.sum(axis=1, keepdims=True)).reshape(maps.shape)


def _keys(maps: np.ndarray, answers: Optional[np.ndarray]):
    """For maps [n, nlat, nlon] (floored at the ``answers``, if given): the probabilities [n, C], the sort
    keys [n, C] (minus the density, float32: cells whose densities agree to 7 digits count as equal) and
    the cell areas [C] (km^2).  A cell's region score is the probability of the cells of smaller key."""
    maps, density, area = _densities(_floored(maps, answers))
    n = maps.shape[0]
    return maps.reshape(n, -1), (-density.reshape(n, -1)).astype(np.float32), area.reshape(-1)


def _sorted_profile(m: np.ndarray, key: np.ndarray, area: np.ndarray):
    """Cells by increasing key (order [n, C]), the probability of the cells of strictly smaller key than
    each (``above``, non-decreasing along the order) and the cumulative area up to each."""
    order = np.argsort(key, axis=1)
    k = np.take_along_axis(key, order, 1)
    ms = np.take_along_axis(m, order, 1)
    above = np.cumsum(ms, axis=1) - ms
    run_start = np.ones(k.shape, dtype=bool)
    run_start[:, 1:] = k[:, 1:] != k[:, :-1]
    first = np.maximum.accumulate(np.where(run_start, np.arange(k.shape[1])[None, :], 0), axis=1)
    return order, np.take_along_axis(above, first, 1), np.cumsum(area[order], axis=1)


def _answers(answers, n: int) -> Optional[np.ndarray]:
    if answers is None:
        return None
    a = np.asarray(answers.cpu() if isinstance(answers, torch.Tensor) else answers, dtype=np.float64)
    if a.shape != (n, 2):
        raise ValueError(f"answers must be [{n}, 2] (lat, lon), got {a.shape}")
    return a


def _chunks(n: int, size: int = 64):
    return ((i, min(n, i + size)) for i in range(0, n, size))


def _top_cells(m: np.ndarray, key: np.ndarray, area: np.ndarray):
    """Per map: the probability [n] and area [n] (km^2) of its densest cell(s) (the cells of the smallest key),
    and which cells those are [n, C]."""
    top = key == key.min(axis=1, keepdims=True)
    return (m * top).sum(axis=1), (area[None, :] * top).sum(axis=1), top


def _scan(maps: np.ndarray, answers: Optional[np.ndarray], truths: Optional[np.ndarray] = None,
          thresholds: Optional[np.ndarray] = None, refine: bool = True):
    """One pass over the items, a chunk at a time: the region scores [N] of the ``truths`` and the region
    areas [N, T] (km^2) at ``thresholds`` [N, T] (None where not asked).

    ``refine`` (with ``answers``): inside the densest cell, which every region holds, the score is not 0 but
    the cell's probability times (d / R)^2 (at most 1), d the distance from the answer, R the radius of a
    disc of the cell's area: a region whose cut lies below the cell's probability is the disc around the
    answer holding that share of the cell, area in proportion.  Why: a truth in the densest cell scored 0,
    and where more than p of the inputs (seen places) have their truth there, the p region could not be
    smaller than one cell and held more than p of the truths (BENCHMARKS 6)."""
    N, nlat, nlon = maps.shape
    refine = refine and answers is not None
    scores = None if truths is None else np.empty(N)
    areas = None if thresholds is None else np.empty(thresholds.shape)
    if truths is not None:
        cell = np.array([np.ravel_multi_index(cell_of(a, b, nlat, nlon), (nlat, nlon)) for a, b in truths])
    for i, j in _chunks(N):
        m, key, area = _keys(maps[i:j], None if answers is None else answers[i:j])
        if refine:
            m_top, a_top, top = _top_cells(m, key, area)
        if truths is not None:
            kt = key[np.arange(j - i), cell[i:j]]
            scores[i:j] = (m * (key < kt[:, None])).sum(axis=1)
            if refine:
                inside = top[np.arange(j - i), cell[i:j]] & ~np.isnan(answers[i:j]).any(axis=1)
                d = great_circle_km(torch.from_numpy(np.nan_to_num(answers[i:j])),
                                    torch.from_numpy(np.asarray(truths[i:j], dtype=np.float64))).numpy()
                share = np.minimum(1.0, d ** 2 * np.pi / a_top)
                scores[i:j] = np.where(inside, m_top * share, scores[i:j])
        if thresholds is not None:
            _, above, cum_area = _sorted_profile(m, key, area)
            for r in range(j - i):
                t = thresholds[i + r]
                count = np.searchsorted(above[r], t + _EPS, side="right")
                areas[i + r] = cum_area[r, np.maximum(count, 1) - 1]
                if refine:  # a cut below the densest cell's probability: the disc of that share of it
                    part = t < m_top[r] - _EPS
                    areas[i + r] = np.where(part, a_top[r] * np.clip(t, 0.0, None) / m_top[r], areas[i + r])
    return scores, areas


def region_scores(prob_maps, truths, answers=None, refine: bool = True) -> np.ndarray:
    """Per item, the probability of the cells denser than its true cell [N] (``calibration.truth_mass``,
    of the maps floored at the ``answers`` [N, 2] when given): the conformal score of the regions; with
    ``answers`` and ``refine``, inside the densest cell the share of it nearer the answer (``_scan``)."""
    maps, truths = _as_arrays(prob_maps, truths)
    return _scan(maps, _answers(answers, maps.shape[0]), truths=truths, refine=refine)[0]


def _thresholds(thresholds, n: int) -> np.ndarray:
    t = np.asarray(thresholds, dtype=np.float64)
    return np.broadcast_to(t.reshape(-1, 1) if t.ndim <= 1 else t, (n, 1 if t.ndim <= 1 else t.shape[1]))


def region_masks(prob_maps, thresholds, answers=None) -> np.ndarray:
    """Boolean masks [N, nlat, nlon]: the cells whose denser cells hold at most ``thresholds`` [N] (a
    conformal region; a threshold just below p gives the raw p region), of the maps floored at ``answers``:
    the cells a region touches (the densest cell whole, also where a refined region is a disc inside it)."""
    maps, _ = _as_arrays(prob_maps, np.zeros((len(prob_maps), 2)))
    answers = _answers(answers, maps.shape[0])
    t = _thresholds(thresholds, maps.shape[0])[:, 0]
    out = np.zeros((maps.shape[0], maps.shape[1] * maps.shape[2]), dtype=bool)
    for i, j in _chunks(maps.shape[0]):
        m, key, area = _keys(maps[i:j], None if answers is None else answers[i:j])
        order, above, _ = _sorted_profile(m, key, area)
        np.put_along_axis(out[i:j], order, above <= t[i:j, None] + _EPS, 1)
    return out.reshape(maps.shape)


def region_areas_km2(prob_maps, thresholds, answers=None, refine: bool = True) -> np.ndarray:
    """Areas (km^2) of the regions at ``thresholds``: [N] for thresholds [N], [N, T] for [N, T] (those of
    ``region_masks``, but for a refined region inside the densest cell: its share of that cell's area)."""
    maps, _ = _as_arrays(prob_maps, np.zeros((len(prob_maps), 2)))
    t = np.asarray(thresholds, dtype=np.float64)
    areas = _scan(maps, _answers(answers, maps.shape[0]), thresholds=_thresholds(t, maps.shape[0]), refine=refine)[1]
    return areas if t.ndim == 2 else areas[:, 0]


def radius_scores(answers, truths) -> np.ndarray:
    """Great-circle distances (km) from each answer [N, 2] to its truth [N, 2]: the radius's scores."""
    a = torch.as_tensor(np.asarray(answers, dtype=np.float64))
    t = torch.as_tensor(np.asarray(truths, dtype=np.float64))
    if a.shape != t.shape or a.ndim != 2 or a.shape[1] != 2:
        raise ValueError(f"answers and truths must both be [N, 2], got {tuple(a.shape)} and {tuple(t.shape)}")
    if torch.isnan(a).any():
        raise ValueError("answers contain NaN: every calibration item needs an answer")
    return great_circle_km(a, t).numpy()


# ---------------------------------------------------------------------- the fitted calibration


def _signal(signals: Mapping[str, Any], name: str, n: int) -> np.ndarray:
    if name not in signals:
        raise ValueError(f"signals: the calibration needs {name!r}, which these predictions lack (a model without a "
                         "gallery has only 'mode_score')")
    v = signals[name]
    v = np.asarray(v.cpu() if isinstance(v, torch.Tensor) else v, dtype=np.float64).ravel()
    if v.shape != (n,) or not np.isfinite(v).all():
        raise ValueError(f"signals[{name!r}] must hold {n} finite values")
    return v


def _check_score_model(m: Any) -> Dict[str, Any]:
    """A saved localizability score: {features, mean, scale, weights} (one float per feature), bias."""
    if not isinstance(m, dict) or set(m) != {"features", "mean", "scale", "weights", "bias"}:
        raise ValueError("calibration score_model must be {features, mean, scale, weights, bias}")
    f = m["features"]
    if not (isinstance(f, list) and f and all(x in FEATURES for x in f) and len(set(f)) == len(f)):
        raise ValueError(f"calibration score_model features must be distinct names of {FEATURES}, got {f!r}")
    out = {"features": list(f), "bias": check_float(m["bias"], "calibration score_model bias")}
    for key in ("mean", "scale", "weights"):
        if not (isinstance(m[key], list) and len(m[key]) == len(f)):
            raise ValueError(f"calibration score_model {key} must hold {len(f)} numbers")
        out[key] = [check_float(v, f"calibration score_model {key}[i]") for v in m[key]]
    if min(out["scale"]) <= 0:
        raise ValueError("calibration score_model scale must be positive")
    return out


def localizability(score_model: Mapping[str, Any], signals: Mapping[str, Any], n: int) -> np.ndarray:
    """The learnt score [n] of predictions with ``signals`` {name: [n]} (``fit_localizability``'s model)."""
    X = np.stack([_signal(signals, f, n) for f in score_model["features"]], axis=1)
    z = (X - np.asarray(score_model["mean"])) / np.asarray(score_model["scale"])
    return z @ np.asarray(score_model["weights"]) + score_model["bias"]


def fit_localizability(features: Mapping[str, np.ndarray], region_s: np.ndarray, l2: float = 1e-2) -> Dict[str, Any]:
    """A linear score of the query-time ``features`` {name: [n]} that predicts how little of the map lies
    denser than the truth (minus a ridge regression of the region scores [n]: higher = more localizable).
    Why learnt: no single signal tells seen from unseen inputs well enough for the groups to be pure
    (BENCHMARKS 6); a combination of the neighbours' similarity and agreement does better."""
    names = [f for f in FEATURES if f in features]
    X = np.stack([features[f] for f in names], axis=1)
    mean, scale = X.mean(0), X.std(0)
    keep = scale > 1e-12  # a constant feature says nothing
    names, X, mean, scale = [f for f, k in zip(names, keep) if k], X[:, keep], mean[keep], scale[keep]
    if not names:
        raise ValueError("fit_localizability: every feature is constant on these items")
    Z = np.c_[(X - mean) / scale, np.ones(len(X))]
    reg = l2 * len(X) * np.diag(np.r_[np.ones(len(names)), 0.0])
    w = -np.linalg.solve(Z.T @ Z + reg, Z.T @ np.asarray(region_s, dtype=np.float64))
    return _check_score_model({"features": names, "mean": mean.tolist(), "scale": scale.tolist(),
                               "weights": w[:-1].tolist(), "bias": float(w[-1])})


def _sorted_tuple(x) -> Tuple[float, ...]:
    return tuple(float(v) for v in np.sort(np.asarray(x, dtype=np.float64)))


@dataclass
class ConformalCalibration:
    """A model's fitted regions and radii: per group of the query-time ``signal`` (group g holds the
    inputs whose signal lies in [edges[g - 1], edges[g])), the sorted calibration scores of the regions
    (``region_scores``) and of the radius (``radius_scores``); the map size the scores were measured on
    and the inference settings they hold for.  Saved with the model as calibration.json."""

    signal: str
    edges: Tuple[float, ...]
    region: Tuple[Tuple[float, ...], ...]
    radius: Tuple[Tuple[float, ...], ...]
    map_size: Tuple[int, int]
    settings: Dict[str, Any] = field(default_factory=dict)
    version: int = VERSION
    score_model: Optional[Dict[str, Any]] = None  # for signal 'localizability': a linear score of FEATURES

    def __post_init__(self):
        if self.signal not in SIGNALS:
            raise ValueError(f"calibration signal must be one of {SIGNALS}, got {self.signal!r}")
        self.edges = tuple(check_float(e, "calibration edges[i]") for e in self.edges)
        if list(self.edges) != sorted(self.edges):
            raise ValueError("calibration edges must be ascending")
        groups = len(self.edges) + 1
        if len(self.region) != groups or len(self.radius) != groups:
            raise ValueError(f"calibration: {groups} groups need {groups} score lists for the region and the radius, "
                             f"got {len(self.region)} and {len(self.radius)}")
        self.region = tuple(_sorted_tuple(s) for s in self.region)
        self.radius = tuple(_sorted_tuple(s) for s in self.radius)
        for s in self.region + self.radius:
            if not s or not np.isfinite(s).all() or s[0] < 0:
                raise ValueError("calibration scores must be non-empty, finite and non-negative in every group")
        if not (isinstance(self.map_size, (list, tuple)) and len(self.map_size) == 2):
            raise ValueError(f"calibration map_size must be (nlat, nlon), got {self.map_size!r}")
        self.map_size = tuple(check_int(v, "calibration map_size[i]", 1, 1 << 16) for v in self.map_size)
        if not isinstance(self.settings, dict):
            raise TypeError("calibration settings must be a dict")
        if self.version not in SUPPORTED:
            raise ValueError(f"calibration version {self.version!r} is not supported (this package reads {SUPPORTED})")
        if (self.signal == "localizability") != (self.score_model is not None):
            raise ValueError("calibration: signal 'localizability' needs its score_model, and only it has one")
        if self.score_model is not None:
            self.score_model = _check_score_model(self.score_model)

    # -- query time
    @property
    def refines_top_cell(self) -> bool:
        """Whether its scores refine the densest cell by the distance to the answer (version 3 on, ``_scan``)."""
        return self.version >= 3

    @property
    def sizes(self) -> Tuple[int, ...]:
        """Calibration items per group."""
        return tuple(len(s) for s in self.region)

    def signal_values(self, signals: Mapping[str, Any], n: int) -> np.ndarray:
        """The grouping signal [n] of ``n`` predictions from their ``signals`` {name: [n]} (``Prediction``'s)."""
        if self.signal == "none":
            return np.zeros(n)
        if self.signal != "localizability":
            return _signal(signals, self.signal, n)
        return localizability(self.score_model, signals, n)

    def groups(self, signal_values) -> np.ndarray:
        """The group [N] of inputs whose signal is ``signal_values`` [N] (ignored for signal 'none')."""
        v = np.asarray(signal_values, dtype=np.float64).ravel()
        if self.signal == "none":
            return np.zeros(v.size, dtype=np.int64)
        if np.isnan(v).any():
            raise ValueError(f"signal_values ({self.signal}) contain NaN")
        return np.searchsorted(np.asarray(self.edges), v, side="right").astype(np.int64)

    def _per_group(self, lists, p: float, groups, what: str) -> np.ndarray:
        p = _check_level(p)
        g = np.asarray(groups, dtype=np.int64).ravel()
        if g.size and (g.min() < 0 or g.max() >= len(lists)):
            raise ValueError(f"groups must lie in [0, {len(lists) - 1}]")
        q = np.array([conformal_quantile(s, p, f"{what} calibration group {i} ({self.signal})")
                      if (g == i).any() else np.nan for i, s in enumerate(lists)])
        return q[g]

    def region_threshold(self, p: float, groups) -> np.ndarray:
        """Per input, the probability above which denser cells stop joining its p region [N]."""
        return self._per_group(self.region, p, groups, "region")

    def radius_km(self, p: float, groups) -> np.ndarray:
        """Per input, the geodesic radius around the answer that holds the truth with probability p [N]."""
        return self._per_group(self.radius, p, groups, "radius")

    def mismatch(self, settings: Mapping[str, Any]) -> Optional[str]:
        """Why predictions made with ``settings`` are not covered by this calibration (None: they are)."""
        diffs = [f"{k} = {settings.get(k)!r} (calibrated with {v!r})" for k, v in self.settings.items()
                 if k in settings and settings.get(k) != v]
        return None if not diffs else "predicted with other settings than the calibration's: " + ", ".join(diffs)

    def check_map_size(self, shape) -> None:
        if tuple(shape) != self.map_size:
            raise ValueError(f"map_size: this map is {tuple(shape)}, the calibration was fitted on {self.map_size} "
                             f"maps: call geolocate(..., map_size={self.map_size})")

    # -- persistence
    def to_dict(self) -> Dict[str, Any]:
        d = {"version": self.version, "signal": self.signal, "edges": list(self.edges),
             "region": [list(s) for s in self.region], "radius": [list(s) for s in self.radius],
             "map_size": list(self.map_size), "settings": dict(self.settings), "score_model": self.score_model}
        if self.version == 1:  # saved as it was read: version 1 had no score_model
            del d["score_model"]
        return d

    @classmethod
    def from_dict(cls, d: Any) -> "ConformalCalibration":
        if not isinstance(d, dict):
            raise TypeError(f"calibration: expected a JSON object, got {type(d).__name__}")
        if d.get("version") not in SUPPORTED:  # first: a newer file says so, not which keys it has
            raise ValueError(f"calibration version {d.get('version')!r} is not supported (this package reads {SUPPORTED})")
        known = {"version", "signal", "edges", "region", "radius", "map_size", "settings"}
        if d["version"] != 1:
            known.add("score_model")
        if set(d) != known:
            raise ValueError(f"calibration: expected keys {sorted(known)}, got {sorted(d)}")
        for key in ("edges", "region", "radius", "map_size"):
            if not isinstance(d[key], list):
                raise TypeError(f"calibration {key} must be a list")
        return cls(d["signal"], tuple(d["edges"]), tuple(tuple(s) for s in d["region"]),
                   tuple(tuple(s) for s in d["radius"]), tuple(d["map_size"]), dict(d["settings"]), d["version"],
                   d.get("score_model"))

    def describe(self) -> str:
        g = "one group" if len(self.sizes) == 1 else f"{len(self.sizes)} groups by {self.signal}"
        return f"conformal, {sum(self.sizes)} calibration items in {g} ({', '.join(map(str, self.sizes))})"


# ---------------------------------------------------------------------- fitting


def _edges(values: np.ndarray, groups: int) -> Tuple[float, ...]:
    """Group boundaries at the signal's quantiles (ties kept in one group)."""
    qs = np.quantile(values, np.arange(1, groups) / groups)
    return tuple(sorted(set(float(q) for q in qs)))


def _fit_groups(signal: str, values, region_s, radius_s, idx, groups: int, map_size, settings,
                score_model=None) -> ConformalCalibration:
    edges = () if signal == "none" else _edges(values[idx], groups)
    g = np.searchsorted(np.asarray(edges), values[idx], side="right")
    parts = [idx[g == i] for i in range(len(edges) + 1)]
    if any(p.size == 0 for p in parts):  # a boundary with no items above it: drop the empty groups
        keep = [i for i, p in enumerate(parts) if p.size]
        edges = tuple(edges[i - 1] for i in keep[1:])
        parts = [parts[i] for i in keep]
    return ConformalCalibration(signal, edges, tuple(region_s[p] for p in parts), tuple(radius_s[p] for p in parts),
                                map_size, dict(settings), VERSION, score_model if signal == "localizability" else None)


def fit_conformal(prob_maps, truths, answers, signals: Optional[Mapping[str, Any]] = None,
                  settings: Optional[Mapping[str, Any]] = None, min_group: int = 100, max_groups: int = 4,
                  seed: int = 0, learn: bool = True) -> Tuple[ConformalCalibration, Dict[str, Any]]:
    """Fits the regions and radius on calibration items (never the test items): maps [N, nlat, nlon],
    truths [N, 2], answers [N, 2], ``signals`` {name in FEATURES: values [N]} known at query time (a
    ``Prediction``'s).

    Groups: up to ``max_groups`` quantile bins of one signal, at least ``min_group`` items each.  The
    candidates: none, 'mode_score', 'top_similarity' and, where neighbour features are given, the learnt
    'localizability' (``fit_localizability``; ``learn=False`` leaves it out), fitted on a random third of
    the items (LEARN_SHARE), which then take no part in its cuts: a score fitted on the items it groups
    would not be exchangeable with a new input's.  The signal is chosen by two-fold cross-fitting on the other items (fit on one half,
    measure the other): the one whose 90% regions are smallest (geometric mean area), ties to 'none'
    (coverage holds by construction for every choice, so the choice is about size).  The chosen signal's
    cuts are fitted on all items (the localizability's: on all but its learning third).  Returns
    (calibration, report)."""
    maps, truths = _as_arrays(prob_maps, truths)
    check_int(min_group, "min_group", 1)
    check_int(max_groups, "max_groups", 1, 64)
    N = maps.shape[0]
    answers = _answers(answers, N)
    region_s = region_scores(maps, truths, answers)
    radius_s = radius_scores(answers, truths)
    feats = {}
    for name in signals or {}:
        if name not in FEATURES:
            raise ValueError(f"signals: unknown signal {name!r} (known: {FEATURES})")
        feats[name] = _signal(signals, name, N)
    cands = {"none": np.zeros(N), **{k: v for k, v in feats.items() if k in SIGNALS}}
    settings = dict(settings or {})
    report: Dict[str, Any] = {"n": N, "candidates": {}}
    rng = np.random.default_rng(seed)
    perm = rng.permutation(N)
    pool, rest, score_model = np.arange(N), np.arange(N), None  # pool: the items the candidates are compared on
    n_learn = int(N * LEARN_SHARE)
    if learn and set(feats) - {"mode_score"} and n_learn >= 100 and N - n_learn >= 2 * min_group:
        learn, rest = np.sort(perm[:n_learn]), np.sort(perm[n_learn:])
        try:
            score_model = fit_localizability({k: v[learn] for k, v in feats.items()}, region_s[learn])
        except ValueError:  # every feature constant
            rest = np.arange(N)
        else:
            cands["localizability"] = localizability(score_model, feats, N)
            pool = rest
            report["learn_items"] = n_learn
    p = perm if score_model is None else rng.permutation(pool)
    halves = (np.sort(p[: len(p) // 2]), np.sort(p[len(p) // 2:]))
    names = list(cands)
    cut = np.full((N, len(names)), np.nan)  # each item's 90% cut by the fit on the other half, per candidate
    groups = max(1, min(max_groups, (len(pool) // 2) // min_group))
    for c, name in enumerate(names):
        for a, b in (halves, halves[::-1]):
            if a.size < needed_items(0.9) or b.size == 0:
                break
            cal = _fit_groups(name, cands[name], region_s, radius_s, a, groups, maps.shape[1:], settings, score_model)
            try:
                cut[b, c] = cal.region_threshold(0.9, cal.groups(cands[name][b]))
            except ValueError:  # a group too small for 90%
                cut[b, c] = np.nan
    cut = cut[pool]
    ok = ~np.isnan(cut).any(axis=0)
    if ok.any():
        areas = _scan(maps[pool], answers[pool], thresholds=np.where(np.isnan(cut), 1.0, cut))[1]
    for c, name in enumerate(names):
        report["candidates"][name] = float(np.exp(np.log(areas[:, c]).mean())) if ok[c] else float("nan")
    finite = {k: a for k, a in report["candidates"].items() if np.isfinite(a)}
    chosen = min(finite, key=lambda k: (finite[k] * (1 - 1e-9 if k == "none" else 1.0), k)) if finite else "none"
    idx = rest if chosen == "localizability" else np.arange(N)
    groups = max(1, min(max_groups, len(idx) // min_group)) if chosen != "none" else 1
    cal = _fit_groups(chosen, cands[chosen], region_s, radius_s, idx, groups, maps.shape[1:], settings, score_model)
    report.update(chosen=chosen, sizes=cal.sizes)
    return cal, report


# ---------------------------------------------------------------------- evaluation


def wilson_interval(hits: int, n: int, z: float = 1.96) -> Tuple[float, float]:
    """The Wilson score interval of a binomial share hits / n (95% by default)."""
    if n <= 0:
        return (float("nan"), float("nan"))
    p = hits / n
    den = 1 + z * z / n
    mid = (p + z * z / (2 * n)) / den
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    return (max(0.0, mid - half), min(1.0, mid + half))


def _group_coverage(hits: np.ndarray) -> Dict[str, Any]:
    """{n, coverage, lo, hi} of one group's hits (None where the group has no test item)."""
    if hits.size == 0:
        return {"n": 0, "coverage": None, "lo": None, "hi": None}
    lo, hi = wilson_interval(int(hits.sum()), hits.size)
    return {"n": int(hits.size), "coverage": float(hits.mean()), "lo": lo, "hi": hi}


def conformal_coverage(cal: Optional[ConformalCalibration], prob_maps, truths, answers, signal_values=None,
                       levels: Sequence[float] = (0.5, 0.9)) -> Dict[float, Dict[str, float]]:
    """On test items: per level, the share of truths inside the region (with its 95% Wilson interval),
    the median region area, the same for the radius, and (``per_group``) the coverage within each of the
    calibration's groups, lowest signal first.  ``signal_values``: the grouping signal [N], or the
    predictions' signals {name: [N]}.  ``cal`` None: the raw maps' own regions (no radius, no groups)."""
    maps, truths = _as_arrays(prob_maps, truths)
    N = maps.shape[0]
    answers = _answers(answers, N)
    dist = radius_scores(answers, truths)
    levels = [_check_level(p) for p in levels]
    if cal is None:  # the raw region: cells whose denser cells hold less than p
        cuts = np.tile(np.array(levels) - 2 * _EPS, (N, 1))
    else:
        cal.check_map_size(maps.shape[1:])
        if isinstance(signal_values, Mapping):  # a prediction's signals: the calibration's own signal of them
            signal_values = cal.signal_values(signal_values, N)
        g = cal.groups(np.zeros(N) if signal_values is None else signal_values)
        cuts = np.stack([cal.region_threshold(p, g) for p in levels], axis=1)
    scores, areas = _scan(maps, answers, truths, cuts, refine=cal is None or cal.refines_top_cell)
    out = {}
    for a, p in enumerate(levels):
        hits = scores <= cuts[:, a] + _EPS
        lo, hi = wilson_interval(int(hits.sum()), N)
        row = {"coverage": float(hits.mean()), "lo": lo, "hi": hi, "median_area_km2": float(np.median(areas[:, a]))}
        if cal is not None:
            r = cal.radius_km(p, g)
            rh = dist <= r
            rlo, rhi = wilson_interval(int(rh.sum()), N)
            row.update(radius_coverage=float(rh.mean()), radius_lo=rlo, radius_hi=rhi,
                       median_radius_km=float(np.median(r)))
            row["per_group"] = [_group_coverage(hits[g == k]) for k in range(len(cal.sizes))]
        out[p] = row
    return out


def coverage_table(rows: Mapping[str, Mapping[float, Mapping[str, float]]], levels: Sequence[float] = (0.5, 0.9)) -> str:
    """Markdown: per row name, each level's coverage [95% interval], median area and (calibrated) radius."""
    head = "| split, method | " + " | ".join(f"{p:.0%}: coverage [95% CI] | median area (km^2) | radius (km)"
                                             for p in levels) + " |"
    out = [head, "|---|" + "---:|---:|---:|" * len(levels)]
    for name, cov in rows.items():
        cells = []
        for p in levels:
            c = cov[p]
            rad = f"{c['median_radius_km']:.0f} ({c['radius_coverage'] * 100:.1f}%)" if "median_radius_km" in c else "-"
            cells.append(f"{c['coverage'] * 100:.1f}% [{c['lo'] * 100:.1f}, {c['hi'] * 100:.1f}] | "
                         f"{c['median_area_km2']:.3g} | {rad}")
        out.append(f"| {name} | " + " | ".join(cells) + " |")
    groups = [(name, cov) for name, cov in rows.items() if len(cov[levels[0]].get("per_group", ())) > 1]
    if groups:
        out += ["", "Coverage within each group of the calibration (lowest signal first; n test items):"]
        out += [f"- {name}: " + "; ".join(f"{p:.0%}: " + ", ".join(
            f"{100 * g['coverage']:.1f}% (n={g['n']})" if g["n"] else "- (n=0)" for g in cov[p]["per_group"])
            for p in levels)
                for name, cov in groups]
    return "\n".join(out)


__all__ = ["ConformalCalibration", "fit_conformal", "fit_localizability", "localizability", "FEATURES", "conformal_quantile", "conformal_rank", "needed_items",
           "region_scores", "region_masks", "region_areas_km2", "radius_scores", "wilson_interval",
           "conformal_coverage", "coverage_table", "SIGNALS", "SETTINGS"]
