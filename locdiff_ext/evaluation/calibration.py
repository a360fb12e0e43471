"""How far to trust a prediction: highest-density credible regions of probability maps, and whether they
are calibrated (issue 10, section 4).

A probability map [nlat, nlon] gives the probability of each cell of ``grid_latlon(nlat, nlon)``.  Its
credible region at level p is the smallest set of cells holding probability >= p: the cells of highest
probability DENSITY (probability / cell area, so that the small cells near the poles are not favoured),
taken in order until their probability reaches p.  A method is calibrated when its p-region contains the
true location for a share p of the test items; among calibrated methods, the smaller regions are better.
A miscalibrated method can be recalibrated on validation data by temperature scaling its maps
(``fit_sharpness``: density^s, one s per method, chosen so that the coverage matches every nominal level
as closely as possible), as classifiers' softmax temperatures are.
"""

from __future__ import annotations

from typing import Dict, Sequence, Tuple

import numpy as np
import torch

from ..checks import check_float
from ..kernels.geometry import EARTH_RADIUS_KM

LEVELS = (0.5, 0.9)


def cell_areas_km2(nlat: int, nlon: int) -> np.ndarray:
    """Areas [nlat] in km^2 of one cell of each ring of ``grid_latlon(nlat, nlon)`` (equal along a ring)."""
    edges = np.deg2rad(90.0 - np.arange(nlat + 1) * 180.0 / nlat)
    return EARTH_RADIUS_KM ** 2 * (2 * np.pi / nlon) * (np.sin(edges[:-1]) - np.sin(edges[1:]))


def _check_map(prob_map) -> np.ndarray:
    m = np.asarray(prob_map.cpu() if isinstance(prob_map, torch.Tensor) else prob_map, dtype=np.float64)
    if m.ndim != 2 or m.size == 0:
        raise ValueError(f"prob_map must be a [nlat, nlon] array, got shape {m.shape}")
    if not np.isfinite(m).all() or (m < 0).any() or m.sum() <= 0:
        raise ValueError("prob_map must hold finite, non-negative probabilities with a positive sum")
    return m / m.sum()


def _check_level(p: float) -> float:
    return check_float(p, "p", 0.0, 1.0, lo_open=True)


def _ranked(m: np.ndarray):
    """Cells by decreasing probability density: (order, cumulative probability, cumulative area km^2)."""
    nlat, nlon = m.shape
    area = np.repeat(cell_areas_km2(nlat, nlon), nlon)
    order = np.argsort(-(m.ravel() / area), kind="stable")
    return order, np.cumsum(m.ravel()[order]), np.cumsum(area[order])


def _cells_needed(cum: np.ndarray, p: float) -> int:
    return min(int(np.searchsorted(cum, p - 1e-12)) + 1, cum.size)


def credible_region(prob_map, p: float = 0.9) -> np.ndarray:
    """Boolean mask [nlat, nlon] of the highest-density region holding probability >= ``p``."""
    m, p = _check_map(prob_map), _check_level(p)
    order, cum, _ = _ranked(m)
    mask = np.zeros(m.size, dtype=bool)
    mask[order[:_cells_needed(cum, p)]] = True
    return mask.reshape(m.shape)


def credible_area_km2(prob_map, p: float = 0.9) -> float:
    """Area in km^2 of the p credible region (the Earth is 5.1e8 km^2)."""
    m, p = _check_map(prob_map), _check_level(p)
    _, cum, cum_area = _ranked(m)
    return float(cum_area[_cells_needed(cum, p) - 1])


def cell_of(lat: float, lon: float, nlat: int, nlon: int) -> Tuple[int, int]:
    """(row, column) of the cell of ``grid_latlon(nlat, nlon)`` that holds (lat, lon) degrees."""
    check_float(lat, "lat", -90.0, 90.0)
    check_float(lon, "lon")
    j = min(int((90.0 - float(lat)) / 180.0 * nlat), nlat - 1)
    k = int(((float(lon) + 180.0) % 360.0) / 360.0 * nlon) % nlon
    return j, k


def region_contains(prob_map, lat: float, lon: float, p: float = 0.9) -> bool:
    """Whether (lat, lon) lies in the p credible region."""
    mask = credible_region(prob_map, p)
    return bool(mask[cell_of(lat, lon, *mask.shape)])


def reliability_levels() -> Tuple[float, ...]:
    """The nominal levels of a reliability plot: 0.05, 0.1, ..., 0.95."""
    return tuple(round(0.05 * i, 2) for i in range(1, 20))


def coverage(prob_maps, truths, levels: Sequence[float] = LEVELS) -> Dict[float, Dict[str, float]]:
    """For each level p: the share of items whose true location lies in their p region ('coverage') and the
    median region area ('median_area_km2').  prob_maps [N, nlat, nlon], truths [N, 2] (lat, lon)."""
    maps, truths = _as_arrays(prob_maps, truths)
    levels = [_check_level(p) for p in levels]
    hits = np.zeros((len(levels), len(maps)), dtype=bool)
    areas = np.zeros((len(levels), len(maps)))
    for i, (m, (lat, lon)) in enumerate(zip(maps, truths)):
        order, cum, cum_area = _ranked(_check_map(m))
        rank = np.empty(order.size, dtype=np.int64)
        rank[order] = np.arange(order.size)
        j, k = cell_of(lat, lon, *m.shape)
        for a, p in enumerate(levels):
            n = _cells_needed(cum, p)
            hits[a, i] = rank[j * m.shape[1] + k] < n
            areas[a, i] = cum_area[n - 1]
    out = {p: {"coverage": float(hits[a].mean()), "median_area_km2": float(np.median(areas[a]))}
           for a, p in enumerate(levels)}
    return out


def _as_arrays(prob_maps, truths) -> Tuple[np.ndarray, np.ndarray]:
    """Checked float64 arrays: maps [N, nlat, nlon] (not yet normalised) and truths [N, 2]."""
    maps = np.asarray(prob_maps.cpu() if isinstance(prob_maps, torch.Tensor) else prob_maps, dtype=np.float64)
    truths = np.asarray(truths.cpu() if isinstance(truths, torch.Tensor) else truths, dtype=np.float64)
    if maps.ndim != 3 or truths.shape != (maps.shape[0], 2) or maps.shape[0] == 0:
        raise ValueError(f"prob_maps must be [N, nlat, nlon] and truths [N, 2] with N > 0, got {maps.shape} "
                         f"and {truths.shape}")
    return maps, truths


def _densities(maps: np.ndarray) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(maps normalised to sum 1, probability per km^2, cell areas [1, nlat, nlon]) of maps [N, nlat, nlon]."""
    if not np.isfinite(maps).all() or (maps < 0).any() or (maps.sum(axis=(1, 2)) <= 0).any():
        raise ValueError("prob_maps must hold finite, non-negative probabilities with a positive sum per map")
    maps = maps / maps.sum(axis=(1, 2), keepdims=True)
    area = np.repeat(cell_areas_km2(*maps.shape[1:]), maps.shape[2]).reshape(1, *maps.shape[1:])
    return maps, maps / area, area


def sharpen(prob_maps, s: float) -> np.ndarray:
    """Temperature-scaled maps [N, nlat, nlon]: each cell's probability density raised to the power ``s``
    (> 1 sharpens, < 1 flattens), times the cell's area, renormalised.  The order of the cells by density,
    hence the shape of every credible region, is unchanged; only how many cells each level takes."""
    s = check_float(s, "s", 0.0, 100.0, lo_open=True)
    maps, _ = _as_arrays(prob_maps, np.zeros((len(prob_maps), 2)))
    maps, density, area = _densities(maps)
    d = density / density.reshape(len(maps), -1).max(axis=1)[:, None, None]  # in [0, 1]: no overflow for large s
    out = d ** s * area
    return out / out.sum(axis=(1, 2), keepdims=True)


def truth_mass(prob_maps, truths) -> np.ndarray:
    """Per item, the probability held by the cells of higher density than the true location's cell [N]: the
    truth lies in the p region when this is below p, so a calibrated method's values are uniform on [0, 1]."""
    maps, truths = _as_arrays(prob_maps, truths)
    maps, density, _ = _densities(maps)
    N, nlat, nlon = maps.shape
    cell = np.array([np.ravel_multi_index(cell_of(lat, lon, nlat, nlon), (nlat, nlon)) for lat, lon in truths])
    flat_d, flat_m = density.reshape(N, -1), maps.reshape(N, -1)
    return (flat_m * (flat_d > flat_d[np.arange(N), cell][:, None])).sum(axis=1)


def coverage_gap(prob_maps, truths, levels: Sequence[float] = None) -> float:
    """Mean over ``levels`` (default 0.05 .. 0.95) of |share of truths inside the p region - p|, from
    ``truth_mass``: 0 for perfectly calibrated maps; what the calibration fits minimise."""
    levels = np.array([_check_level(p) for p in (levels or reliability_levels())])
    q = truth_mass(prob_maps, truths)
    return float(np.abs((q[None, :] < levels[:, None]).mean(axis=1) - levels).mean())


def fit_sharpness(prob_maps, truths, levels: Sequence[float] = None, candidates: Sequence[float] = None) -> float:
    """The exponent s of ``sharpen`` (among ``candidates``, default 1/8 .. 8 in 41 geometric steps, and 1)
    whose maps' coverage is closest to the nominal levels (mean absolute gap over ``levels``, default
    0.05 .. 0.95): fit on validation data, then apply to test maps and to the model."""
    cands = sorted(set(np.round(np.geomspace(0.125, 8.0, 41), 4).tolist()) | {1.0}) if candidates is None else candidates
    best = None
    for s in cands:
        gap = coverage_gap(sharpen(prob_maps, s), truths, levels)
        if best is None or gap < best[0] - 1e-12:
            best = (gap, float(s))
    return best[1]


def calibration_table(rows: Dict[str, Dict[float, Dict[str, float]]], levels: Sequence[float] = LEVELS) -> str:
    """Markdown: per method ({method: coverage(...)}), the coverage and median area of each level's region."""
    head = "| method | " + " | ".join(f"{p:.0%} region: coverage | median area (km^2)" for p in levels) + " |"
    out = [head, "|---|" + "---:|---:|" * len(levels)]
    for name, cov in rows.items():
        out.append(f"| {name} | " + " | ".join(f"{cov[p]['coverage'] * 100:.1f}% | {cov[p]['median_area_km2']:.3g}"
                                               for p in levels) + " |")
    return "\n".join(out)
