"""Metrics against known distances, and paired bootstrap intervals between methods."""

import math

import numpy as np
import pytest
import torch

from locdiff_ext.evaluation import geolocation_metrics, markdown_table, paired_bootstrap, paired_table


def test_metrics_against_known_distances():
    true = torch.tensor([[0.0, 0.0]] * 4, dtype=torch.float64)
    # 1 degree of arc = 111.195 km on the mean Earth radius
    pred = torch.tensor([[0.0, 0.005], [0.0, 1.0], [0.0, 10.0], [float("nan"), 0.0]], dtype=torch.float64)
    m = geolocation_metrics(pred, true)
    assert m["acc_1km"] == 25.0 and m["acc_200km"] == 50.0 and m["acc_2500km"] == 75.0
    assert m["median_km"] == pytest.approx(111.195 * 5.5, rel=1e-3)
    assert m["geoscore"] == pytest.approx(np.mean([5000 * math.exp(-d / 1492.7) for d in
                                                   [0.556, 111.195, 1111.95, math.pi * 6371.0088]]), rel=1e-3)
    assert "| LocDiff | 25.0 |" in markdown_table({"LocDiff": m})
    with pytest.raises(ValueError, match="shape"):
        geolocation_metrics(pred[:, :1], true[:, :1])


def test_paired_bootstrap_differences_and_intervals():
    g = torch.Generator().manual_seed(0)
    n = 400
    true = torch.stack([torch.rand(n, generator=g) * 120 - 60, torch.rand(n, generator=g) * 300 - 150], -1).double()
    off = lambda deg: true + torch.tensor([0.0, deg], dtype=torch.float64) / torch.cos(torch.deg2rad(true[:, :1]))
    near, far = off(1.0), off(10.0)  # ~111 km and ~1100 km east of the truth
    # a is near for the first 300 items, far for the rest; b is near for the first 100 only
    a = torch.where(torch.arange(n)[:, None] < 300, near, far)
    b = torch.where(torch.arange(n)[:, None] < 100, near, far)
    d = paired_bootstrap(a, b, true)
    assert set(d) == {"acc_200km", "acc_750km", "acc_2500km"}
    diff, lo, hi = d["acc_200km"]
    assert diff == pytest.approx(50.0) and lo < 50.0 < hi and lo > 40.0  # clearly better: the interval excludes 0
    assert d["acc_2500km"] == (0.0, 0.0, 0.0)  # both always within 2500 km
    same = paired_bootstrap(a, a, true)
    assert all(v == (0.0, 0.0, 0.0) for v in same.values())
    # NaN predictions are misses, as in geolocation_metrics
    nan = a.clone()
    nan[:300] = float("nan")
    assert paired_bootstrap(nan, a, true)["acc_200km"][0] == pytest.approx(-75.0)
    assert "| a - b | +50.0 (" in paired_table({"a - b": d})
    # same seed, same interval
    assert paired_bootstrap(a, b, true, seed=3) == paired_bootstrap(a, b, true, seed=3)
    with pytest.raises(ValueError, match="shape"):
        paired_bootstrap(a[:10], b, true)
    with pytest.raises(ValueError, match="empty"):
        paired_bootstrap(a[:0], b[:0], true[:0])
    with pytest.raises(ValueError, match="n_boot"):
        paired_bootstrap(a, b, true, n_boot=0)


def test_paired_bootstrap_over_groups():
    """Items that succeed or fail together (crops of one map tile) are one draw: resampling whole groups
    widens the interval; singleton groups are the item bootstrap."""
    g = torch.Generator().manual_seed(1)
    n = 400
    true = torch.stack([torch.rand(n, generator=g) * 120 - 60, torch.rand(n, generator=g) * 300 - 150], -1).double()
    far = true + torch.tensor([0.0, 10.0], dtype=torch.float64) / torch.cos(torch.deg2rad(true[:, :1]))
    tiles = torch.arange(n) // 40  # 10 tiles of 40 items
    a = torch.where((tiles % 2 == 0)[:, None], true, far)  # a is right on the even tiles, b on tiles 0-3
    b = torch.where((tiles < 4)[:, None], true, far)
    items = paired_bootstrap(a, b, true, thresholds=(200,))["acc_200km"]
    tiled = paired_bootstrap(a, b, true, thresholds=(200,), groups=tiles)["acc_200km"]
    assert items[0] == tiled[0] == pytest.approx(10.0)
    assert items[1] > 0.0 and tiled[1] < 0.0 < tiled[2]  # a win over items, a tie over tiles
    alone = paired_bootstrap(a, b, true, thresholds=(200,), groups=torch.arange(n) * 7)["acc_200km"]
    assert alone == pytest.approx(items)
    with pytest.raises(ValueError, match="groups"):
        paired_bootstrap(a, b, true, groups=torch.zeros(n))
    with pytest.raises(ValueError, match="groups"):
        paired_bootstrap(a, b, true, groups=tiles[:10])
