"""Geolocation metrics (design.md section 2) and their tables.

% of predictions within 1 / 25 / 200 / 750 / 2500 km of the truth (great-circle, mean Earth
radius), median and mean error in km, and the OSV-5M-style GeoScore 5000 exp(-d / 1492.7).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Dict, Iterable, List, Mapping, Sequence, Tuple

import torch
from torch import Tensor

from ..checks import check_int
from ..kernels.geometry import EARTH_RADIUS_KM, great_circle_km

THRESHOLDS_KM = (1, 25, 200, 750, 2500)


def geolocation_metrics(pred: Tensor, true: Tensor, thresholds: Sequence[float] = THRESHOLDS_KM) -> Dict[str, float]:
    """Metrics of predictions [N, 2] against ground truth [N, 2] (lat, lon degrees).

    Returns {'n', 'acc_1km', ..., 'acc_2500km' (percent), 'median_km', 'mean_km', 'geoscore'}.
    A NaN prediction (a decoder with no mode) counts as a miss at every threshold and as the
    antipodal distance in the mean."""
    pred, true = torch.as_tensor(pred), torch.as_tensor(true)
    if pred.shape != true.shape or pred.dim() != 2 or pred.shape[-1] != 2:
        raise ValueError(f"pred and true must both have shape [N, 2], got {tuple(pred.shape)} and {tuple(true.shape)}")
    if pred.shape[0] == 0:
        raise ValueError("pred/true: cannot compute metrics of an empty set")
    d = great_circle_km(pred, true)
    d = torch.where(torch.isnan(d), torch.full_like(d, math.pi * EARTH_RADIUS_KM), d)
    out: Dict[str, float] = {"n": int(d.numel())}
    for t in thresholds:
        out[f"acc_{t:g}km"] = 100.0 * float((d <= t).double().mean())
    out["median_km"] = float(torch.quantile(d, 0.5))  # the usual median (mean of the middle two)
    out["mean_km"] = float(d.mean())
    out["geoscore"] = float((5000.0 * torch.exp(-d / 1492.7)).mean())
    return out


def paired_bootstrap(pred_a: Tensor, pred_b: Tensor, true: Tensor, thresholds: Sequence[float] = (200, 750, 2500),
                     n_boot: int = 2000, seed: int = 0, groups=None) -> Dict[str, Tuple[float, float, float]]:
    """How much more often method a lands within each threshold than method b on the same test items:
    {'acc_750km': (difference in percentage points, 95% interval low, high)}.

    Why: gaps of a point or two between methods on a thousand test items are within sampling noise;
    resampling the items (the same draw for both methods: a paired bootstrap) says which gaps are not.
    NaN predictions are misses, as in geolocation_metrics.  ``groups`` [N] (ints, e.g. the map tile of
    each item): resample whole groups instead of items (a cluster bootstrap), for items that succeed or
    fail together; items from a few dozen tiles are far fewer independent draws than their count."""
    pred_a, pred_b, true = (torch.as_tensor(x) for x in (pred_a, pred_b, true))
    if not (pred_a.shape == pred_b.shape == true.shape) or true.dim() != 2 or true.shape[-1] != 2:
        raise ValueError(f"pred_a, pred_b and true must all have shape [N, 2], got {tuple(pred_a.shape)}, "
                         f"{tuple(pred_b.shape)} and {tuple(true.shape)}")
    if true.shape[0] == 0:
        raise ValueError("pred_a/pred_b/true: cannot compare methods on an empty set")
    check_int(n_boot, "n_boot", 1)
    da, db = great_circle_km(pred_a, true), great_circle_km(pred_b, true)  # NaN <= t is False: a miss
    gen = torch.Generator().manual_seed(seed)
    if groups is None:
        member = torch.arange(true.shape[0])
    else:
        groups = torch.as_tensor(groups)
        if groups.shape != (true.shape[0],) or groups.dtype.is_floating_point or groups.dtype == torch.bool:
            raise ValueError(f"groups must hold one integer per item [{true.shape[0]}], got {tuple(groups.shape)} "
                             f"{groups.dtype}")
        member = torch.unique(groups, return_inverse=True)[1]
    G = int(member.max()) + 1
    count = torch.bincount(member, minlength=G).double()
    idx = torch.randint(0, G, (n_boot, G), generator=gen)
    out = {}
    for t in thresholds:
        diff = 100.0 * ((da <= t).double() - (db <= t).double())
        total = torch.zeros(G, dtype=torch.float64).index_add_(0, member, diff)
        boot = total[idx].sum(dim=1) / count[idx].sum(dim=1)
        lo, hi = torch.quantile(boot, torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
        out[f"acc_{t:g}km"] = (float(diff.mean()), lo, hi)
    return out


def markdown_table(rows: Mapping[str, Mapping[str, float]], thresholds: Iterable[float] = THRESHOLDS_KM) -> str:
    """{method: metrics} -> a Markdown table with one row per method."""
    thresholds = list(thresholds)
    head = "| method | " + " | ".join(f"{t:g} km" for t in thresholds) + " | median km | mean km | GeoScore | n |"
    sep = "|---|" + "---:|" * (len(thresholds) + 4)
    lines: List[str] = [head, sep]
    for name, m in rows.items():
        accs = " | ".join(f"{m[f'acc_{t:g}km']:.1f}" for t in thresholds)
        lines.append(f"| {name} | {accs} | {m['median_km']:.0f} | {m['mean_km']:.0f} | {m['geoscore']:.0f} | {m['n']} |")
    return "\n".join(lines)


def paired_table(diffs: Mapping[str, Mapping[str, Tuple[float, float, float]]]) -> str:
    """{'a - b': paired_bootstrap(...)} -> a Markdown table of differences with their 95% intervals."""
    keys = list(next(iter(diffs.values())))
    lines = ["| comparison | " + " | ".join(k[4:].replace("km", " km") for k in keys) + " |", "|---|" + "---:|" * len(keys)]
    for name, d in diffs.items():
        lines.append(f"| {name} | " + " | ".join(f"{d[k][0]:+.1f} ({d[k][1]:+.1f} .. {d[k][2]:+.1f})" for k in keys) + " |")
    return "\n".join(lines)


def write_report(path, rows: Mapping[str, Mapping[str, float]], extra: Mapping | None = None) -> None:
    """Per-run JSON ({'results': rows, ...extra}) at ``path``; the Markdown table beside it (.md)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"results": rows, **(extra or {})}, indent=2))
    path.with_suffix(".md").write_text(markdown_table(rows) + "\n")


__all__ = ["THRESHOLDS_KM", "great_circle_km", "geolocation_metrics", "paired_bootstrap", "markdown_table",
           "paired_table", "write_report"]
