"""The embedded default: `locdiff demo --quick` end to end on real Blue Marble crops, then
`locdiff predict` and geolocate() on the model it saved."""

import json

import numpy as np
import torch

import locdiff_ext as ld
from locdiff_ext.kernels.geometry import great_circle_km

from helpers import run_cli


def test_demo_quick_end_to_end(tmp_path):
    from PIL import Image

    out = run_cli("demo", "--quick", "--no-progress", cwd=tmp_path, env={"LOCDIFF_HOME": str(tmp_path)})
    assert "Region hold-out" in out.stdout and "| LocDiff-R (k=8) |" in out.stdout and "| kNN retrieval" in out.stdout
    assert "frozen ImageNet EfficientNet-Lite0 features" in out.stdout and "chosen on validation" in out.stdout
    report = json.loads((tmp_path / "demo" / "results.json").read_text())
    chosen = report["validation"]["knn_density_chosen"]  # chosen on validation among the quick config's 2 x 2
    assert chosen["k"] in (4, 16) and chosen["temperature"] in (0.03, 0.1)
    assert len(report["validation"]["knn_density_scores"]) == 4
    knn_density = f"kNN density (k={chosen['k']})"
    anchored = report["validation"]["anchored"]  # LocDiff-R's prior weight and hybrid radius, chosen on validation
    assert 0 <= anchored["prior_weight"] <= 1 and len(anchored["validation_scores"]) == 9 * 7
    for split in ("test_region", "test_random"):
        assert set(report["results"][split]) >= {"LocDiff-R (k=8)", "LocDiff-R + H", anchored["name"],
                                                 "kNN retrieval (top-1)", knn_density, "unit-vector regression"}
        assert all(m["n"] == 200 for m in report["results"][split].values())
        diffs = report["paired_differences"][split]  # each of the 3 LocDiff rows minus each of the 4 baselines
        assert len(diffs) == 12 and f"{anchored['name']} - {knn_density}" in diffs and "LocDiff-R + H - kNN retrieval (top-1)" in diffs
        assert all(lo <= d <= hi for row in diffs.values() for d, lo, hi in row.values())
    assert "95% paired bootstrap" in out.stdout and "| LocDiff-R (k=8) - kNN retrieval (top-1) |" in out.stdout
    fitted = report["validation"]["calibration"]  # conformal regions per method, fitted on the validation crops
    assert set(fitted) == {anchored["name"], knn_density}
    assert all(sum(c["sizes"]) == 300 and "none" in c["candidates"] for c in fitted.values())
    for split in ("test_region", "test_random"):  # credible regions of the methods with a density, per test split
        cal = report["calibration"][split]
        assert set(cal) == {f"{m}, {kind}" for m in fitted for kind in ("raw", "conformal")}
        for name, levels in cal.items():
            assert set(levels) == {"0.5", "0.9"} and 0 <= levels["0.5"]["coverage"] <= levels["0.9"]["coverage"] <= 1
            assert all(levels[p]["lo"] <= levels[p]["coverage"] <= levels[p]["hi"] for p in levels)
            assert 0 < levels["0.5"]["median_area_km2"] <= levels["0.9"]["median_area_km2"]
            assert ("median_radius_km" in levels["0.9"]) == name.endswith("conformal")
    assert "90%: coverage [95% CI]" in out.stdout and "reliability plot:" in out.stdout
    with Image.open(tmp_path / "demo" / "reliability.png") as im:
        assert im.format == "PNG" and np.asarray(im.convert("RGB")).std() > 20
    with Image.open(tmp_path / "demo" / "map.png") as im:
        assert im.format == "PNG" and im.size == (1080, 3 * (270 + 22) + 40)  # 3 rows of 2 panels, the legend
        px = np.asarray(im.convert("RGB"))
        assert px.std() > 20  # a picture, not a blank canvas
    training = tmp_path / "demo" / "training"  # its scratch checkpoints are gone, its history stays
    assert (training / "history.json").is_file() and not [p for p in training.iterdir() if p.is_dir()]
    examples = sorted((tmp_path / "demo" / "examples").glob("*.png"))
    assert len(examples) == 6

    # the saved model is the default of geolocate() and `locdiff predict`
    pred = run_cli("predict", *examples[:2], "--json", cwd=tmp_path, env={"LOCDIFF_HOME": str(tmp_path)})
    records = json.loads(pred.stdout)
    assert len(records) == 2 and all(r["modes"] for r in records)
    model = ld.LocDiff.from_pretrained(tmp_path / "demo-model")
    res = ld.geolocate([str(p) for p in examples[:2]], model=model, top_k=3)
    assert [round(r.lat, 6) for r in res] == [round(r["modes"][0]["lat"], 6) for r in records]
    # a grayscale version of a crop still works; the label is in the file name
    gray = tmp_path / "gray.png"
    Image.open(examples[0]).convert("L").save(gray)
    assert np.isfinite(ld.geolocate([gray], model=model)[0].lat)
    assert model.calibration is not None and model.calibration.map_size == (180, 360)  # geolocate's default maps
    assert model.calibration.signal == fitted[anchored["name"]]["signal"]
    assert res[0].calibrated and 0 < res[0].radius_km(0.5) <= res[0].radius_km(0.9)
    assert all(r["calibrated"] and r["radius_km"]["0.9"] > 0 for r in records)
    assert (model.config.prior_weight, model.config.hybrid_km) == (anchored["prior_weight"], anchored["hybrid_km"])
    assert model.image_encoder is not None and model.config.image_encoder == {
        "kind": "efficientnet_lite", "variant": "lite0", "image_size": 64, "center_crop": False}
    truth = torch.tensor([float(v) for v in examples[0].stem.replace("crop_lat", "").split("_lon")])
    assert great_circle_km(torch.tensor([res[0].lat, res[0].lon]), truth).item() <= 20016  # a finite answer
