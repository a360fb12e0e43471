"""Conformal credible regions and radii (locdiff_ext.evaluation.conformal): the finite-sample rule, coverage
on synthetic maps whose truths are drawn from known distributions (per group, where one temperature
cannot fit), agreement with a maintained library (crepes), and every bad input."""

import json

import numpy as np
import pytest
import torch

from locdiff_ext.evaluation.calibration import cell_areas_km2, truth_mass
from locdiff_ext.evaluation.conformal import (ConformalCalibration, conformal_coverage, conformal_quantile,
                                              conformal_rank, coverage_table, fit_conformal, needed_items,
                                              region_areas_km2, region_masks, region_scores, wilson_interval)
from locdiff_ext.kernels.geometry import grid_points, latlon_to_xyz, xyz_to_latlon

NLAT, NLON = 24, 48
CELLS = latlon_to_xyz(grid_points(NLAT, NLON)).numpy()
AREA = np.repeat(cell_areas_km2(NLAT, NLON), NLON)


def _world(n, kappa_map, kappa_truth, rng):
    """Maps centred on random answers with concentration ``kappa_map``; truths drawn around the answers
    with ``kappa_truth``: over-confident maps when kappa_map > kappa_truth, under-confident when below."""
    centres = rng.normal(size=(n, 3))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    cos = CELLS @ centres.T  # [C, n]
    maps = (np.exp(kappa_map * (cos - 1)).T * AREA).reshape(n, NLAT, NLON)
    pt = np.exp(kappa_truth * (cos - 1)).T * AREA
    pt /= pt.sum(axis=1, keepdims=True)
    idx = np.array([rng.choice(CELLS.shape[0], p=row) for row in pt])
    truths = grid_points(NLAT, NLON).numpy()[idx]
    answers = xyz_to_latlon(torch.from_numpy(centres)).numpy()
    return maps / maps.sum(axis=(1, 2), keepdims=True), truths, answers


def test_the_finite_sample_rule():
    scores = np.arange(1.0, 21.0)[::-1]  # 20 scores, unsorted
    assert conformal_rank(20, 0.9) == 19 and conformal_quantile(scores, 0.9) == 19.0
    assert conformal_quantile(scores, 0.5) == 11.0  # ceil(21 * 0.5) = 11
    assert conformal_quantile(np.arange(1.0, 10.0), 0.9) == 9.0  # n = 9: ceil(10 * 0.9) = 9, the largest
    assert needed_items(0.9) == 9 and needed_items(0.5) == 1 and needed_items(0.99) == 99
    with pytest.raises(ValueError, match=r"n = 8 items.*needs n >= 9"):
        conformal_quantile(np.arange(8.0), 0.9)
    for bad in (0.0, 1.0, 1.5, -0.1):
        with pytest.raises(ValueError, match="p must"):
            conformal_quantile(scores, bad)
    with pytest.raises(TypeError, match="p must be a number"):
        conformal_quantile(scores, "0.9")


def test_the_rule_agrees_with_crepes_mondrian_regressor():
    """crepes' ConformalRegressor, with the scores as absolute residuals of a zero prediction, gives the
    same per-bin quantile (its interval's upper end) as ours.  (Where (n + 1)(1 - p) is a whole number,
    crepes' float rounding can take one rank more, e.g. n = 104 at p = 0.8: those levels are left out.)"""
    crepes = pytest.importorskip("crepes", reason="crepes (the cross-check library) is in the test extras")
    rng = np.random.default_rng(1)
    scores = rng.exponential(size=300)
    bins = rng.integers(0, 3, 300)
    for p in (0.5, 0.9, 0.95):
        cr = crepes.ConformalRegressor()
        cr.fit(scores, bins=bins)
        theirs = cr.predict_int(y_hat=np.zeros(3), bins=np.arange(3), confidence=p)[:, 1]
        ours = [conformal_quantile(scores[bins == b], p) for b in range(3)]
        np.testing.assert_allclose(ours, theirs, rtol=1e-12)


def test_regions_are_nested_and_hold_the_truth_exactly_when_its_score_is_below_the_cut():
    rng = np.random.default_rng(2)
    maps, truths, answers = _world(40, 30.0, 10.0, rng)
    maps[:, NLAT // 2:] = 0.0  # half of each map is flat zero: the floor orders those cells by distance
    scores = region_scores(maps, truths, answers, refine=False)  # whole cells: the masks' regions exactly
    assert np.all((scores >= 0) & (scores <= 1 + 1e-9))
    assert len(np.unique(np.round(scores, 15))) > 35  # distinct, also where truths fall on zero cells
    refined = region_scores(maps, truths, answers)
    assert np.all(refined >= scores) and np.all(refined[scores > 0] == scores[scores > 0])  # only the densest cell
    for t in (0.2, 0.5, 0.9, 0.999999):
        masks = region_masks(maps, np.full(40, t), answers)
        rows, cols = zip(*[(int((90 - a) / 180 * NLAT), int((b + 180) / 360 * NLON) % NLON) for a, b in truths])
        inside = masks[np.arange(40), np.minimum(rows, NLAT - 1), cols]
        np.testing.assert_array_equal(inside, scores <= t + 1e-12)
        area = region_areas_km2(maps, np.full(40, t), answers, refine=False)
        np.testing.assert_allclose(area, (masks.reshape(40, -1) * AREA).sum(axis=1))
        # refined regions: within the densest cell where the cut lies below its probability, else the same
        fine = region_areas_km2(maps, np.full(40, t), answers)
        several = masks.reshape(40, -1).sum(axis=1) > 1
        assert several.any() and np.all(fine <= area * (1 + 1e-12))
        np.testing.assert_allclose(fine[several], area[several])
    small, large = (region_masks(maps, np.full(40, t), answers) for t in (0.5, 0.9))
    assert not (small & ~large).any()
    # without answers (no floor), on maps without flat parts, the scores are calibration.truth_mass
    smooth, truths, _ = _world(40, 30.0, 10.0, rng)
    np.testing.assert_allclose(region_scores(smooth, truths, None), truth_mass(smooth, truths), atol=1e-12)


def test_a_region_can_be_smaller_than_the_densest_cell_and_keeps_its_promise():
    """Seen places: maps with 80% of their mass in one cell and the truth inside it.  Scored by whole cells,
    every truth scores 0, so the 50% region is that cell and holds all of them; refined by the distance to
    the answer, the 50% region is a disc of about 50 / 80 of the cell and holds 50% of new truths."""
    rng = np.random.default_rng(5)
    n, top = 1200, (NLAT // 2 - 3) * NLON + 7  # a cell near the equator
    maps = np.full((n, NLAT * NLON), 0.2 / (NLAT * NLON - 1))
    maps[:, top] = 0.8
    maps = maps.reshape(n, NLAT, NLON)
    lat0, lon0 = grid_points(NLAT, NLON).numpy()[top]
    half_lat, half_lon = 90 / NLAT, 180 / NLON
    truths = np.c_[lat0 + rng.uniform(-half_lat, half_lat, n), lon0 + rng.uniform(-half_lon, half_lon, n)]
    answers = np.tile([lat0, lon0], (n, 1))
    cal, test = slice(0, 400), slice(400, n)
    whole = region_scores(maps, truths, answers, refine=False)
    assert np.all(whole == 0)  # the old score: no region below one cell
    scores = region_scores(maps, truths, answers)
    assert 0 < scores.min() and scores.max() <= 0.8 + 1e-12
    for p in (0.3, 0.5):
        q = conformal_quantile(scores[cal], p)
        covered = (scores[test] <= q).mean()
        assert abs(covered - p) < 0.06, (p, covered)
        assert (whole[test] <= conformal_quantile(whole[cal], p)).mean() == 1.0
        area = region_areas_km2(maps[:1], [q], answers[:1])[0]
        np.testing.assert_allclose(area, AREA[top] * q / 0.8, rtol=1e-3)  # the floor takes a little mass
        assert region_masks(maps[:1], [q], answers[:1])[0].sum() == 1  # the cell the disc lies in
    # a saved version-2 calibration keeps whole-cell scores; version 3 refines
    assert not ConformalCalibration("none", (), ((0.1,),), ((1.0,),), (NLAT, NLON), version=2).refines_top_cell
    assert ConformalCalibration("none", (), ((0.1,),), ((1.0,),), (NLAT, NLON)).refines_top_cell


def test_mondrian_coverage_holds_in_each_group_where_one_group_cannot():
    """Half the inputs have over-confident maps, half under-confident ones; a signal tells them apart
    (noisily).  Pooled calibration is right on average and wrong in both halves; grouped calibration is
    right in each, at 50% and 90%, for regions and radii, averaged over 4 draws (each 400 calibration +
    400 test items)."""
    cov = {"over": [], "under": [], "over pooled": [], "under pooled": []}
    for seed in range(4):
        rng = np.random.default_rng(10 + seed)
        a, b = _world(400, 40.0, 8.0, rng), _world(400, 4.0, 16.0, rng)
        maps, truths, answers = (np.concatenate([x, y]) for x, y in zip(a, b))
        signal = np.r_[np.ones(400), np.zeros(400)] + rng.normal(0, 0.2, 800)
        perm = rng.permutation(800)
        c, t = perm[:400], perm[400:]
        cal, report = fit_conformal(maps[c], truths[c], answers[c], {"mode_score": signal[c]}, min_group=100, seed=seed)
        assert report["chosen"] == "mode_score" and len(cal.sizes) == 4
        pooled, _ = fit_conformal(maps[c], truths[c], answers[c], seed=seed)
        assert pooled.signal == "none" and pooled.sizes == (400,)
        for name, sel in (("over", t[t < 400]), ("under", t[t >= 400])):
            got = conformal_coverage(cal, maps[sel], truths[sel], answers[sel], signal[sel])
            cov[name].append([got[p][k] for p in (0.5, 0.9) for k in ("coverage", "radius_coverage")])
            got = conformal_coverage(pooled, maps[sel], truths[sel], answers[sel])
            cov[name + " pooled"].append([got[p]["coverage"] for p in (0.5, 0.9)])
    over, under = np.mean(cov["over"], axis=0), np.mean(cov["under"], axis=0)
    for got in (over, under):  # 4 x ~200 items a group: the mean's standard error is ~1.8 points at 50%
        assert abs(got[0] - 0.5) < 0.07 and abs(got[1] - 0.5) < 0.07
        assert abs(got[2] - 0.9) < 0.045 and abs(got[3] - 0.9) < 0.045
    raw = conformal_coverage(None, maps[t], truths[t], answers[t])
    assert raw[0.9]["coverage"] < 0.85 and "median_radius_km" not in raw[0.9]
    po, pu = np.mean(cov["over pooled"], axis=0), np.mean(cov["under pooled"], axis=0)
    assert po[1] < 0.86 and pu[1] > 0.94  # one cut for all: too small for one half, too large for the other
    got = conformal_coverage(cal, maps[t], truths[t], answers[t], signal[t])
    groups = got[0.9]["per_group"]  # each group's own coverage, which pools to the whole
    assert len(groups) == 4 and sum(g["n"] for g in groups) == len(t)
    assert sum(g["n"] * g["coverage"] for g in groups) / len(t) == pytest.approx(got[0.9]["coverage"])
    assert all(g["lo"] <= g["coverage"] <= g["hi"] for g in groups)
    assert "per_group" not in raw[0.9]
    table = coverage_table({"test, grouped": got})
    assert "90%: coverage [95% CI]" in table and "test, grouped" in table and "within each group" in table


def test_wilson_interval():
    lo, hi = wilson_interval(90, 100)
    assert 0.82 < lo < 0.84 and 0.94 < hi < 0.96
    assert wilson_interval(0, 10)[0] == 0.0 and wilson_interval(10, 10)[1] == 1.0
    assert all(np.isnan(wilson_interval(0, 0)))


def test_a_calibration_round_trips_and_refuses_bad_documents_and_inputs():
    rng = np.random.default_rng(3)
    maps, truths, answers = _world(300, 20.0, 20.0, rng)
    sig = rng.normal(size=300)
    cal, _ = fit_conformal(maps, truths, answers, {"mode_score": sig}, settings={"num_samples": 8}, min_group=50)
    doc = json.loads(json.dumps(cal.to_dict()))
    back = ConformalCalibration.from_dict(doc)
    assert back == cal
    g = cal.groups(sig[:10])
    np.testing.assert_array_equal(back.region_threshold(0.9, g), cal.region_threshold(0.9, g))
    assert cal.mismatch({"num_samples": 8, "steps": 3}) is None
    assert "num_samples = 4 (calibrated with 8)" in cal.mismatch({"num_samples": 4})
    with pytest.raises(ValueError, match=r"map_size: this map is \(10, 20\).*\(24, 48\)"):
        cal.check_map_size((10, 20))
    two = ConformalCalibration("mode_score", (0.0,), ((0.1,), (0.2, 0.3)), ((1.0,), (2.0, 3.0)), (24, 48))
    np.testing.assert_array_equal(two.groups([-1.0, 0.0, 5.0]), [0, 1, 1])
    assert two.sizes == (1, 2) and "2 groups by mode_score" in two.describe()
    with pytest.raises(ValueError, match="NaN"):
        two.groups([np.nan])
    with pytest.raises(ValueError, match="groups must lie"):
        two.region_threshold(0.5, [2])
    with pytest.raises(ValueError, match=r"group 0 \(mode_score\) holds n = 1 items.*needs n >= 3"):
        two.region_threshold(0.7, [0])
    doc = json.loads(json.dumps(two.to_dict()))
    doc["edges"] = [0.0, 1.0]
    doc["region"], doc["radius"] = doc["region"] + [[0.5]], doc["radius"] + [[5.0]]
    assert ConformalCalibration.from_dict(doc).sizes == (1, 2, 1)
    bad = [({**doc, "version": 9}, ValueError, "version 9"), ({**doc, "signal": "x"}, ValueError, "signal"),
           ({k: v for k, v in doc.items() if k != "radius"}, ValueError, "expected keys"),
           ({**doc, "region": doc["region"][:1]}, ValueError, "groups need"),
           ({**doc, "region": [[-1.0]] + doc["region"][1:]}, ValueError, "non-negative"),
           ({**doc, "edges": doc["edges"][::-1]}, ValueError, "ascending"), ([], TypeError, "JSON object"),
           ({**doc, "map_size": [0, 3]}, ValueError, "map_size"), ({**doc, "edges": "x"}, TypeError, "edges")]
    for d, exc, msg in bad:
        with pytest.raises(exc, match=msg):
            ConformalCalibration.from_dict(d)
    with pytest.raises(ValueError, match="answers must be"):
        fit_conformal(maps, truths, answers[:5])
    with pytest.raises(ValueError, match="unknown signal"):
        fit_conformal(maps, truths, answers, {"entropy": sig})
    with pytest.raises(ValueError, match="finite values"):
        fit_conformal(maps, truths, answers, {"mode_score": np.full(300, np.nan)})
    with pytest.raises(ValueError, match="NaN"):
        fit_conformal(maps, truths, answers * np.nan)
    with pytest.raises(ValueError, match="prob_maps"):
        fit_conformal(maps[:0], truths[:0], answers[:0])
    small, _ = fit_conformal(maps[:20], truths[:20], answers[:20])
    with pytest.raises(ValueError, match=r"needs n >= 99"):
        small.region_threshold(0.99, [0])


def test_a_learnt_localizability_score_makes_purer_groups_than_one_noisy_signal():
    """Over- and under-confident inputs again, now told apart only by three noisy neighbour features (each
    alone weak).  fit_conformal learns their combination on a third of the calibration items, chooses it,
    and the 90% region then holds ~90% of each kind, closer than grouping by one feature; it round-trips
    through JSON with its score model, and a prediction that lacks a feature is refused by name."""
    from locdiff_ext.evaluation.conformal import fit_localizability, localizability

    errs = {"localizability": [], "top_similarity": []}
    for seed in range(3):
        rng = np.random.default_rng(40 + seed)
        a, b = _world(600, 40.0, 8.0, rng), _world(600, 4.0, 16.0, rng)
        maps, truths, answers = (np.concatenate([x, y]) for x, y in zip(a, b))
        kind = np.r_[np.ones(600), np.zeros(600)]
        feats = {f: kind + rng.normal(0, 0.5, 1200) for f in ("top_similarity", "similarity_gap", "neighbour_agreement")}
        perm = rng.permutation(1200)
        c, t = perm[:700], perm[700:]
        cal, report = fit_conformal(maps[c], truths[c], answers[c], {k: v[c] for k, v in feats.items()},
                                    min_group=100, seed=seed)
        assert report["chosen"] == "localizability" and report["learn_items"] == 233
        assert sum(cal.sizes) == 700 - 233  # its cuts leave out the items that fitted the score
        single = fit_conformal(maps[c], truths[c], answers[c], {"top_similarity": feats["top_similarity"][c]},
                               min_group=100, seed=seed)[0]
        for name, calib in (("localizability", cal), ("top_similarity", single)):
            for k in (0, 1):
                sel = t[kind[t] == k]
                got = conformal_coverage(calib, maps[sel], truths[sel], answers[sel], {f: v[sel] for f, v in feats.items()})
                errs[name].append(abs(got[0.9]["coverage"] - 0.9))
    assert np.mean(errs["localizability"]) < np.mean(errs["top_similarity"])
    assert np.mean(errs["localizability"]) < 0.05
    back = ConformalCalibration.from_dict(json.loads(json.dumps(cal.to_dict())))
    assert back == cal and back.score_model["features"] == ["top_similarity", "similarity_gap", "neighbour_agreement"]
    sub = {k: v[t[:10]] for k, v in feats.items()}
    np.testing.assert_allclose(back.signal_values(sub, 10), localizability(cal.score_model, sub, 10))
    with pytest.raises(ValueError, match="needs 'similarity_gap', which these predictions lack"):
        cal.signal_values({"top_similarity": np.zeros(2), "neighbour_agreement": np.zeros(2)}, 2)
    # the learnt score runs the way its name says: lower for the over-confident kind (kind 1), whose truths
    # fall outside the dense part of its maps (large region scores)
    model = fit_localizability({k: v[c] for k, v in feats.items()}, region_scores(maps[c], truths[c], answers[c]))
    s = localizability(model, feats, 1200)
    assert s[kind == 1].mean() < s[kind == 0].mean()
    with pytest.raises(ValueError, match="every feature is constant"):
        fit_localizability({"top_similarity": np.ones(50)}, np.zeros(50))


def test_version_1_calibrations_still_load_and_score_models_are_checked():
    v1 = {"version": 1, "signal": "none", "edges": [], "region": [[0.1, 0.2]], "radius": [[1.0, 2.0]],
          "map_size": [24, 48], "settings": {}}
    cal = ConformalCalibration.from_dict(v1)
    assert cal.score_model is None and not cal.refines_top_cell
    assert cal.to_dict() == v1 and ConformalCalibration.from_dict(cal.to_dict()) == cal  # re-saved as it was read
    np.testing.assert_array_equal(cal.signal_values({}, 3), np.zeros(3))
    good = {"features": ["top_similarity"], "mean": [0.5], "scale": [0.1], "weights": [1.0], "bias": 0.0}
    doc = {**v1, "version": 2, "signal": "localizability", "score_model": good}
    v2 = ConformalCalibration.from_dict(doc)
    assert v2.score_model == good and v2.to_dict()["version"] == 2 and not v2.refines_top_cell
    for newer in ({**doc, "version": 4}, {**doc, "version": 4, "normalised": None}):  # unknown keys or not
        with pytest.raises(ValueError, match=r"version 4 is not supported"):
            ConformalCalibration.from_dict(newer)
    bad = [({**doc, "score_model": None}, "needs its score_model"),
           ({**v1, "version": 2, "score_model": good}, "only it has one"),
           ({**doc, "score_model": {**good, "features": ["entropy"]}}, "features must be distinct names"),
           ({**doc, "score_model": {**good, "scale": [0.0]}}, "scale must be positive"),
           ({**doc, "score_model": {**good, "weights": [1.0, 2.0]}}, "weights must hold 1"),
           ({**doc, "score_model": {**good, "bias": float("nan")}}, "bias"),
           ({k: v for k, v in doc.items() if k != "score_model"}, "expected keys")]
    for d, msg in bad:
        with pytest.raises(ValueError, match=msg):
            ConformalCalibration.from_dict(d)


def test_geolocation_regions_follow_the_calibrations_scores():
    """``Geolocation.contains`` / ``credible_area_km2`` score points as the calibration was fitted: inside the
    densest cell, by the distance to the answer (version 3), or the whole cell (saved before version 3)."""
    from locdiff_ext.inference import Geolocation

    top = (NLAT // 2 - 3) * NLON + 7
    m = np.full(NLAT * NLON, 0.2 / (NLAT * NLON - 1))
    m[top] = 0.8
    m = m.reshape(NLAT, NLON)
    lat0, lon0 = (float(v) for v in grid_points(NLAT, NLON).numpy()[top])
    near_edge = (lat0 + 0.9 * 90 / NLAT, lon0)  # in the same cell, far from the answer
    for version, whole in ((2, True), (3, False)):
        cal = ConformalCalibration("none", (), ((0.0,) * 20,), ((100.0,) * 20,), (NLAT, NLON), version=version)
        g = Geolocation(lat0, lon0, 1.0, prob_map=m, calibration=cal, uncalibrated_reason=None)
        assert g.contains(lat0, lon0, 0.5)
        assert g.contains(*near_edge, 0.5) == whole
        assert g.credible_region(0.5)[np.unravel_index(top, (NLAT, NLON))]  # the cell it touches
        np.testing.assert_allclose(g.credible_area_km2(0.5), AREA[top] if whole else 0.0, rtol=1e-6, atol=1e-6)
