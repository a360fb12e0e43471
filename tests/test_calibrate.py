"""A model's conformal calibration (locdiff_ext.calibrate) as users meet it: fitted on held-out rows, saved
with the model and loaded back, used by geolocate's regions and radii by default, flagged where it does not
apply (no calibration, other settings, another map size), and the `locdiff calibrate` command."""

import json
import warnings

import numpy as np
import pytest
import torch

import locdiff_ext as ld
from locdiff_ext.calibrate import MIN_ITEMS, calibrate, calibrate_and_save
from locdiff_ext.data import CheckpointError, EmbeddingDataset, update_documents
from locdiff_ext.data.checkpoint import read_checkpoint
from locdiff_ext.inference import UncalibratedWarning
from locdiff_ext.kernels.geometry import great_circle_km

from helpers import region_dataset, run_cli
from test_layout import FIXTURES

MAP = (90, 180)


@pytest.fixture(scope="module")
def calibrated(trained, tmp_path_factory):
    """The session's trained model, calibrated on 300 held-out rows at 24 x 48 maps, saved."""
    model, _ = trained
    val, _ = region_dataset(300, seed=21)
    report = calibrate(model, val.embeddings, val.coords, map_size=MAP, min_group=50)
    out = tmp_path_factory.mktemp("calibrated") / "model"
    model.save_pretrained(out)
    yield model, out, report
    model.calibration = None  # the session fixture is shared: leave it as it was


def test_calibrated_regions_and_radii_cover_new_items(calibrated):
    model, _, report = calibrated
    assert report["in_sample"][0.9]["coverage"] >= 0.9 and report["in_sample"][0.5]["coverage"] >= 0.5
    test, _ = region_dataset(400, seed=22)
    res = ld.geolocate(test.embeddings, model=model, return_map=True, map_size=MAP)
    assert all(r.calibrated and r.uncalibrated_reason is None for r in res)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # calibrated: no warning
        inside = np.array([[r.contains(float(a), float(b), p) for p in (0.5, 0.9)]
                           for r, (a, b) in zip(res, test.coords)])
        radius = np.array([[r.radius_km(p) for p in (0.5, 0.9)] for r in res])
        area = np.array([[r.credible_area_km2(p) for p in (0.5, 0.9)] for r in res])
    answers = torch.tensor([[r.lat, r.lon] for r in res], dtype=torch.float64)
    within = great_circle_km(answers[:, None], test.coords[:, None].double()).numpy() <= radius
    for share, p in zip(inside.mean(0), (0.5, 0.9)):  # 400 exchangeable items: +- ~5 points at 2 sigma
        assert p - 0.08 <= share <= p + 0.1, (share, p)
    for share, p in zip(within.mean(0), (0.5, 0.9)):
        assert p - 0.08 <= share <= p + 0.1, (share, p)
    assert (area[:, 0] <= area[:, 1]).all() and (radius[:, 0] <= radius[:, 1]).all()
    mask = res[0].credible_region(0.9)
    assert mask.shape == MAP and mask.any()
    with pytest.raises(ValueError, match="p must be in"):
        res[0].radius_km(1.0)
    with pytest.raises(TypeError, match="calibrated must be"):
        res[0].radius_km(0.9, calibrated="yes")


def test_a_calibration_is_saved_loaded_and_flagged_where_it_does_not_apply(calibrated, tmp_path):
    model, out, _ = calibrated
    loaded = ld.LocDiff.from_pretrained(out)
    assert loaded.calibration == model.calibration
    q, _ = region_dataset(3, seed=23)
    r = ld.geolocate(q.embeddings, model=loaded, return_map=True, map_size=(12, 24))[0]
    assert r.calibrated  # the radius needs no map; regions need the calibration's map size
    with pytest.raises(ValueError, match=r"map_size: this map is \(12, 24\).*map_size=\(90, 180\)"):
        r.credible_area_km2(0.9)
    assert r.radius_km(0.9) > 0
    other = ld.geolocate(q.embeddings, model=loaded, num_samples=3)[0]
    assert not other.calibrated and "num_samples = 3" in other.uncalibrated_reason
    with pytest.raises(ValueError, match="calibrated=True: this prediction is uncalibrated"):
        other.radius_km(0.9, calibrated=True)
    # a model saved before calibration existed loads uncalibrated and says so
    old = ld.LocDiff.from_pretrained(FIXTURES / "saved_model_v0.1")
    assert old.calibration is None
    r = ld.geolocate(torch.zeros(1, old.config.cond_dim), model=old, return_map=True, map_size=MAP)[0]
    assert not r.calibrated and "no conformal calibration" in r.uncalibrated_reason
    with pytest.warns(UncalibratedWarning, match="locdiff calibrate"):
        raw = r.credible_area_km2(0.9)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert r.credible_area_km2(0.9, calibrated=False) == raw
    # a calibration.json someone edited badly (manifest re-sealed) is refused, naming the file
    update_documents(out, {"calibration": {"version": 1, "signal": "none"}})
    with pytest.raises(CheckpointError, match="calibration.json is invalid"):
        ld.LocDiff.from_pretrained(out)


def test_update_documents_keeps_everything_else_and_is_atomic(trained, tmp_path):
    model, _ = trained
    d = tmp_path / "m"
    model.save_pretrained(d)
    (d / "gallery").mkdir()
    (d / "gallery" / "x.npy").write_bytes(b"123")
    before = (d / "model.safetensors").read_bytes()
    update_documents(d, {"calibration": {"a": 1}, "notes": [1, 2]})
    tensors, docs = read_checkpoint(d)
    assert docs["calibration"] == {"a": 1} and docs["notes"] == [1, 2] and "config" in docs
    assert (d / "model.safetensors").read_bytes() == before and (d / "gallery" / "x.npy").read_bytes() == b"123"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporaries left
    with pytest.raises(CheckpointError, match="does not exist"):
        update_documents(tmp_path / "nothing", {"a": 1})


def test_calibrate_refuses_too_few_or_bad_rows(trained):
    model, _ = trained
    val, _ = region_dataset(MIN_ITEMS - 1, seed=24)
    with pytest.raises(ValueError, match=f"{MIN_ITEMS - 1} calibration items are too few"):
        calibrate(model, val.embeddings, val.coords, map_size=MAP)
    with pytest.raises(ValueError, match="coords"):
        calibrate(model, val.embeddings, val.coords[:3], map_size=MAP)
    bad = val.embeddings.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match="embeddings"):
        calibrate(model, bad, val.coords, map_size=MAP)
    assert calibrate_and_save(model, EmbeddingDataset(val.embeddings, val.coords), "/nonexistent", log=lambda s: None) is None


def test_cli_calibrate_then_predict_shows_the_radius(trained, tmp_path):
    model, _ = trained
    saved = model.calibration
    model.calibration = None
    model.save_pretrained(tmp_path / "m")
    model.calibration = saved
    val, _ = region_dataset(200, seed=25)
    val.save(tmp_path / "val.npz")
    np.save(tmp_path / "q.npy", val.embeddings[:2].numpy())
    out = run_cli("predict", tmp_path / "q.npy", "--model", tmp_path / "m", "--json", cwd=tmp_path)
    assert all(not r["calibrated"] and "radius_km" not in r for r in json.loads(out.stdout))
    assert "no radius shown" in out.stderr
    out = run_cli("calibrate", tmp_path / "val.npz", "--model", tmp_path / "m", "--map-size", 24, 48, "--rows", 150,
                  "--no-progress", cwd=tmp_path)
    assert "calibrated (in sample" in out.stdout and "calibration.json" in out.stdout
    assert ld.LocDiff.from_pretrained(tmp_path / "m").calibration.map_size == (24, 48)
    out = run_cli("predict", tmp_path / "q.npy", "--model", tmp_path / "m", "--top-k", 1, cwd=tmp_path)
    assert "within" in out.stdout and "90%]" in out.stdout
    bad = run_cli("calibrate", tmp_path / "val.npz", "--model", tmp_path / "m", "--rows", 10, "--no-progress",
                  cwd=tmp_path, check=False)
    assert bad.returncode == 2 and "too few" in bad.stderr and "Traceback" not in bad.stderr


def test_the_knn_density_is_run_as_a_model_is():
    """knn_run_with_maps: the density's own answers and maps, and the same candidate signals as a model's
    (its answer's score and its neighbours' query_signals), so that both are calibrated alike."""
    from locdiff_ext.calibrate import knn_run_with_maps
    from locdiff_ext.model.retrieval import KNNDensity

    g = torch.Generator().manual_seed(0)
    emb = torch.randn(300, 16, generator=g)
    coords = torch.stack([torch.rand(300, generator=g) * 160 - 80, torch.rand(300, generator=g) * 360 - 180], 1)
    knn = KNNDensity(emb, coords.double(), k=8, temperature=0.05, L=8)
    run = knn_run_with_maps(knn, emb[:20], (45, 90))
    assert torch.allclose(run["answers"].double(), knn.predict(emb[:20]).double())
    assert torch.allclose(run["maps"].double(), knn.prob_map(emb[:20], 45, 90).double(), atol=1e-6)
    assert set(run["signals"]) == {"mode_score", "top_similarity", "similarity_gap", "neighbour_agreement",
                                   "neighbour_spread"}
    assert torch.allclose(run["signals"]["top_similarity"], torch.ones(20, dtype=torch.float64), atol=1e-5)  # itself
    assert bool(((run["signals"]["mode_score"] >= 0) & (run["signals"]["mode_score"] <= 1 + 1e-9)).all())
