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

VERSION = 1
SIGNALS = ("none", "mode_score", "top_similarity")  # what a group is chosen by (known at query time)
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


def _scan(maps: np.ndarray, answers: Optional[np.ndarray], truths: Optional[np.ndarray] = None,
          thresholds: Optional[np.ndarray] = None):
    """One pass over the items, a chunk at a time: the region scores [N] of the ``truths`` and the region
    areas [N, T] (km^2) at ``thresholds`` [N, T] (None where not asked)."""
    N, nlat, nlon = maps.shape
    scores = None if truths is None else np.empty(N)
    areas = None if thresholds is None else np.empty(thresholds.shape)
    if truths is not None:
        cell = np.array([np.ravel_multi_index(cell_of(a, b, nlat, nlon), (nlat, nlon)) for a, b in truths])
    for i, j in _chunks(N):
        m, key, area = _keys(maps[i:j], None if answers is None else answers[i:j])
        if truths is not None:
            kt = key[np.arange(j - i), cell[i:j]]
            scores[i:j] = (m * (key < kt[:, None])).sum(axis=1)
        if thresholds is not None:
            _, above, cum_area = _sorted_profile(m, key, area)
            for r in range(j - i):
                count = np.searchsorted(above[r], thresholds[i + r] + _EPS, side="right")
                areas[i + r] = cum_area[r, np.maximum(count, 1) - 1]
    return scores, areas


def region_scores(prob_maps, truths, answers=None) -> np.ndarray:
    """Per item, the probability of the cells denser than its true cell [N] (``calibration.truth_mass``,
    of the maps floored at the ``answers`` [N, 2] when given): the conformal score of the regions."""
    maps, truths = _as_arrays(prob_maps, truths)
    return _scan(maps, _answers(answers, maps.shape[0]), truths=truths)[0]


def _thresholds(thresholds, n: int) -> np.ndarray:
    t = np.asarray(thresholds, dtype=np.float64)
    return np.broadcast_to(t.reshape(-1, 1) if t.ndim <= 1 else t, (n, 1 if t.ndim <= 1 else t.shape[1]))


def region_masks(prob_maps, thresholds, answers=None) -> np.ndarray:
    """Boolean masks [N, nlat, nlon]: the cells whose denser cells hold at most ``thresholds`` [N] (a
    conformal region; a threshold just below p gives the raw p region), of the maps floored at ``answers``."""
    maps, _ = _as_arrays(prob_maps, np.zeros((len(prob_maps), 2)))
    answers = _answers(answers, maps.shape[0])
    t = _thresholds(thresholds, maps.shape[0])[:, 0]
    out = np.zeros((maps.shape[0], maps.shape[1] * maps.shape[2]), dtype=bool)
    for i, j in _chunks(maps.shape[0]):
        m, key, area = _keys(maps[i:j], None if answers is None else answers[i:j])
        order, above, _ = _sorted_profile(m, key, area)
        np.put_along_axis(out[i:j], order, above <= t[i:j, None] + _EPS, 1)
    return out.reshape(maps.shape)


def region_areas_km2(prob_maps, thresholds, answers=None) -> np.ndarray:
    """Areas (km^2) of the regions of ``region_masks``: [N] for thresholds [N], [N, T] for [N, T]."""
    maps, _ = _as_arrays(prob_maps, np.zeros((len(prob_maps), 2)))
    t = np.asarray(thresholds, dtype=np.float64)
    areas = _scan(maps, _answers(answers, maps.shape[0]), thresholds=_thresholds(t, maps.shape[0]))[1]
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
        if self.version != VERSION:
            raise ValueError(f"calibration version {self.version!r} is not supported (this package reads {VERSION})")

    # -- query time
    @property
    def sizes(self) -> Tuple[int, ...]:
        """Calibration items per group."""
        return tuple(len(s) for s in self.region)

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
        return {"version": self.version, "signal": self.signal, "edges": list(self.edges),
                "region": [list(s) for s in self.region], "radius": [list(s) for s in self.radius],
                "map_size": list(self.map_size), "settings": dict(self.settings)}

    @classmethod
    def from_dict(cls, d: Any) -> "ConformalCalibration":
        if not isinstance(d, dict):
            raise TypeError(f"calibration: expected a JSON object, got {type(d).__name__}")
        known = {"version", "signal", "edges", "region", "radius", "map_size", "settings"}
        if set(d) != known:
            raise ValueError(f"calibration: expected keys {sorted(known)}, got {sorted(d)}")
        if d["version"] != VERSION:
            raise ValueError(f"calibration version {d['version']!r} is not supported (this package reads {VERSION})")
        for key in ("edges", "region", "radius", "map_size"):
            if not isinstance(d[key], list):
                raise TypeError(f"calibration {key} must be a list")
        return cls(d["signal"], tuple(d["edges"]), tuple(tuple(s) for s in d["region"]),
                   tuple(tuple(s) for s in d["radius"]), tuple(d["map_size"]), dict(d["settings"]), d["version"])

    def describe(self) -> str:
        g = "one group" if len(self.sizes) == 1 else f"{len(self.sizes)} groups by {self.signal}"
        return f"conformal, {sum(self.sizes)} calibration items in {g} ({', '.join(map(str, self.sizes))})"


# ---------------------------------------------------------------------- fitting


def _edges(values: np.ndarray, groups: int) -> Tuple[float, ...]:
    """Group boundaries at the signal's quantiles (ties kept in one group)."""
    qs = np.quantile(values, np.arange(1, groups) / groups)
    return tuple(sorted(set(float(q) for q in qs)))


def _fit_groups(signal: str, values, region_s, radius_s, idx, groups: int, map_size, settings) -> ConformalCalibration:
    edges = () if signal == "none" else _edges(values[idx], groups)
    g = np.searchsorted(np.asarray(edges), values[idx], side="right")
    parts = [idx[g == i] for i in range(len(edges) + 1)]
    if any(p.size == 0 for p in parts):  # a boundary with no items above it: drop the empty groups
        keep = [i for i, p in enumerate(parts) if p.size]
        edges = tuple(edges[i - 1] for i in keep[1:])
        parts = [parts[i] for i in keep]
    return ConformalCalibration(signal, edges, tuple(region_s[p] for p in parts), tuple(radius_s[p] for p in parts),
                                map_size, dict(settings))


def fit_conformal(prob_maps, truths, answers, signals: Optional[Mapping[str, Any]] = None,
                  settings: Optional[Mapping[str, Any]] = None, min_group: int = 100, max_groups: int = 4,
                  seed: int = 0) -> Tuple[ConformalCalibration, Dict[str, Any]]:
    """Fits the regions and radius on calibration items (never the test items): maps [N, nlat, nlon],
    truths [N, 2], answers [N, 2], ``signals`` {name in SIGNALS: values [N]} known at query time.

    Groups: up to ``max_groups`` quantile bins of one signal, at least ``min_group`` items each.  The
    signal is chosen on the calibration data by two-fold cross-fitting (fit on one half, measure the other):
    the one whose 90% regions are smallest (geometric mean area), ties to 'none' (coverage holds by
    construction for every choice, so the choice is about size).  Returns (calibration, report)."""
    maps, truths = _as_arrays(prob_maps, truths)
    check_int(min_group, "min_group", 1)
    check_int(max_groups, "max_groups", 1, 64)
    N = maps.shape[0]
    answers = _answers(answers, N)
    region_s = region_scores(maps, truths, answers)
    radius_s = radius_scores(answers, truths)
    cands = {"none": np.zeros(N)}
    for name, v in (signals or {}).items():
        if name not in SIGNALS or name == "none":
            raise ValueError(f"signals: unknown signal {name!r} (known: {SIGNALS[1:]})")
        v = np.asarray(v.cpu() if isinstance(v, torch.Tensor) else v, dtype=np.float64).ravel()
        if v.shape != (N,) or not np.isfinite(v).all():
            raise ValueError(f"signals[{name!r}] must hold {N} finite values")
        cands[name] = v
    settings = dict(settings or {})
    report: Dict[str, Any] = {"n": N, "candidates": {}}
    rng = np.random.default_rng(seed)
    perm = rng.permutation(N)
    halves = (np.sort(perm[: N // 2]), np.sort(perm[N // 2:]))
    names = list(cands)
    cut = np.full((N, len(names)), np.nan)  # each item's 90% cut by the fit on the other half, per candidate
    groups = max(1, min(max_groups, (N // 2) // min_group))
    for c, name in enumerate(names):
        for a, b in (halves, halves[::-1]):
            if a.size < needed_items(0.9) or b.size == 0:
                break
            cal = _fit_groups(name, cands[name], region_s, radius_s, a, groups, maps.shape[1:], settings)
            try:
                cut[b, c] = cal.region_threshold(0.9, cal.groups(cands[name][b]))
            except ValueError:  # a group too small for 90%
                cut[b, c] = np.nan
    ok = ~np.isnan(cut).any(axis=0)
    if ok.any():
        areas = _scan(maps, answers, thresholds=np.where(np.isnan(cut), 1.0, cut))[1]
    for c, name in enumerate(names):
        report["candidates"][name] = float(np.exp(np.log(areas[:, c]).mean())) if ok[c] else float("nan")
    finite = {k: a for k, a in report["candidates"].items() if np.isfinite(a)}
    chosen = min(finite, key=lambda k: (finite[k] * (1 - 1e-9 if k == "none" else 1.0), k)) if finite else "none"
    groups = max(1, min(max_groups, N // min_group)) if chosen != "none" else 1
    cal = _fit_groups(chosen, cands[chosen], region_s, radius_s, np.arange(N), groups, maps.shape[1:], settings)
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
    calibration's groups, lowest signal first.  ``cal`` None: the raw maps' own regions (no radius, no groups)."""
    maps, truths = _as_arrays(prob_maps, truths)
    N = maps.shape[0]
    answers = _answers(answers, N)
    dist = radius_scores(answers, truths)
    levels = [_check_level(p) for p in levels]
    if cal is None:  # the raw region: cells whose denser cells hold less than p
        cuts = np.tile(np.array(levels) - 2 * _EPS, (N, 1))
    else:
        cal.check_map_size(maps.shape[1:])
        g = cal.groups(np.zeros(N) if signal_values is None else signal_values)
        cuts = np.stack([cal.region_threshold(p, g) for p in levels], axis=1)
    scores, areas = _scan(maps, answers, truths, cuts)
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


__all__ = ["ConformalCalibration", "fit_conformal", "conformal_quantile", "conformal_rank", "needed_items",
           "region_scores", "region_masks", "region_areas_km2", "radius_scores", "wilson_interval",
           "conformal_coverage", "coverage_table", "SIGNALS", "SETTINGS"]
