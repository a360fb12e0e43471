"""The embedded default: `locdiff demo --quick` end to end on real Blue Marble crops, then
`locdiff predict` and geolocate() on the model it saved; the dataset builder's splits."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

import locdiff_ext as ld
from locdiff_ext import bluemarble as bm
from locdiff_ext.evaluate import great_circle_km


def test_crops_are_centred_on_their_labels_and_splits_do_not_leak():
    centres = bm.sample_land_centres(3000, seed=1)
    assert bm.is_land(centres[:, 0], centres[:, 1]).all() and np.abs(centres[:, 0]).max() <= 75
    crops = bm.extract_crops(centres[:5], crop_px=64, out_px=64)
    img = bm.load_blue_marble()
    for c, crop in zip(centres[:5], crops):  # the crop's centre pixels are the image at the label
        r = int(round((90 - c[0]) / 180 * bm.IMAGE_HEIGHT))
        k = int(round((c[1] + 180) / 360 * bm.IMAGE_WIDTH)) % bm.IMAGE_WIDTH
        assert np.array_equal(crop[32, 32], img[r, k])
    # across the antimeridian: 179.4 E and 179.6 W are 1 degree = 15 px apart
    wrap = bm.extract_crops(np.array([[10.0, 179.4], [10.0, -179.6]]), 64, 64)
    assert np.array_equal(wrap[0][:, 15:], wrap[1][:, :-15])
    s = bm.split_by_region(centres, crop_px=64)
    assert set(s["train"]).isdisjoint(s["test_region"]) and set(s["train"]).isdisjoint(s["test_random"])
    held = bm.held_out_tiles(10.0, 5, 0)
    half = 32 * bm.DEG_PER_PX
    for dlat in (-half, 0, half):  # no pixel of a held-out tile in any training crop
        for dlon in (-half, 0, half):
            tiles = bm._tile(centres[s["train"], 0] + dlat, centres[s["train"], 1] + dlon, 10.0)
            assert not np.isin(tiles, held).any()
    assert np.isin(bm._tile(centres[s["test_region"], 0], centres[s["test_region"], 1], 10.0), held).all()


def _cli(*args, env=None):
    import os

    full_env = dict(os.environ, **(env or {}))
    # run outside the repository root, where the source folder would shadow the installed package
    proc = subprocess.run([sys.executable, "-m", "locdiff_ext", *map(str, args)], capture_output=True, text=True,
                          timeout=900, env=full_env, cwd=full_env.get("LOCDIFF_HOME"))
    assert proc.returncode == 0, f"locdiff {args} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def test_demo_quick_end_to_end(tmp_path):
    from PIL import Image

    out = _cli("demo", "--quick", "--no-progress", env={"LOCDIFF_HOME": str(tmp_path)})
    assert "Region hold-out" in out.stdout and "| LocDiff-R (k=8) |" in out.stdout and "| kNN retrieval" in out.stdout
    report = json.loads((tmp_path / "demo" / "results.json").read_text())
    for split in ("test_region", "test_random"):
        assert set(report["results"][split]) >= {"LocDiff-R (k=8)", "LocDiff-R + H", "kNN retrieval (top-1)",
                                                 "unit-vector regression"}
        assert all(m["n"] == 200 for m in report["results"][split].values())
        diffs = report["paired_differences"][split]  # each LocDiff row minus each of the 3 baselines
        assert len(diffs) == 6 and "LocDiff-R + H - kNN retrieval (top-1)" in diffs
        assert all(lo <= d <= hi for row in diffs.values() for d, lo, hi in row.values())
    assert "95% paired bootstrap" in out.stdout and "| LocDiff-R (k=8) - kNN retrieval (top-1) |" in out.stdout
    with Image.open(tmp_path / "demo" / "map.png") as im:
        assert im.format == "PNG" and im.size == (1080, 3 * (270 + 22))
        px = np.asarray(im.convert("RGB"))
        assert px.std() > 20  # a picture, not a blank canvas
    examples = sorted((tmp_path / "demo" / "examples").glob("*.png"))
    assert len(examples) == 6

    # the saved model is the default of geolocate() and `locdiff predict`
    pred = _cli("predict", *examples[:2], "--json", env={"LOCDIFF_HOME": str(tmp_path)})
    records = json.loads(pred.stdout)
    assert len(records) == 2 and all(r["modes"] for r in records)
    model = ld.LocDiff.from_pretrained(tmp_path / "demo-model")
    res = ld.geolocate([str(p) for p in examples[:2]], model=model, top_k=3)
    assert [round(r.lat, 6) for r in res] == [round(r["modes"][0]["lat"], 6) for r in records]
    # a grayscale version of a crop still works; the label is in the file name
    gray = tmp_path / "gray.png"
    Image.open(examples[0]).convert("L").save(gray)
    assert np.isfinite(ld.geolocate([gray], model=model)[0].lat)
    assert model.image_encoder is not None and model.config.image_encoder["kind"] == "small_cnn"
    truth = torch.tensor([float(v) for v in examples[0].stem.replace("crop_lat", "").split("_lon")])
    assert great_circle_km(torch.tensor([res[0].lat, res[0].lon]), truth).item() <= 20016  # a finite answer


@pytest.mark.parametrize("bad", ["missing", "text", "corrupt"])
def test_predict_reports_bad_image_files(tmp_path, bad):
    model = ld.LocDiff(ld.LocDiffConfig(cond_dim=16, L=4, widths=(16,), time_dim=8),
                       image_encoder=ld.encoders.SmallCNNEncoder(dim=16, image_size=16, channels=(8,)))
    path = tmp_path / "x.png"
    if bad == "text":
        path.write_text("hello")
    elif bad == "corrupt":
        from PIL import Image

        Image.new("RGB", (32, 32), (10, 200, 30)).save(path)
        path.write_bytes(path.read_bytes()[:40])
    with pytest.raises((FileNotFoundError, ValueError), match="x.png"):
        ld.geolocate([path], model=model)
