"""geolocate / LocDiff API, save/load, the CLI (through subprocess), data readers and bad inputs."""

import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch

import locdiff_ext as ld
from locdiff_ext.checkpoint import CheckpointError
from locdiff_ext.data import EmbeddingDataset, load_dataset
from locdiff_ext.encoders import SmallCNNEncoder
from locdiff_ext.evaluate import geolocation_metrics, great_circle_km, markdown_table, paired_bootstrap, paired_table
from locdiff_ext.train import Trainer, TrainConfig

from helpers import REGION_CENTRES, region_dataset, tiny_model


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A small conditional model trained on the 8-region task, saved with save_pretrained."""
    out = tmp_path_factory.mktemp("trained")
    data, _ = region_dataset(2000, seed=5)
    model = tiny_model(L=8, widths=(96, 48), time_dim=32, sample_steps=10, num_samples=8)
    cfg = TrainConfig(steps=400, batch_size=64, lr=2e-3, warmup_steps=20, eval_every=0, checkpoint_every=0)
    trainer = Trainer(model, data, out, cfg, progress=False)
    trainer.fit()
    return trainer.ema, out / "final"


def test_geolocate_returns_modes_scores_and_maps(trained):
    model, _ = trained
    val, cls = region_dataset(40, seed=6)
    res = ld.geolocate(val.embeddings, model=model, top_k=3, return_map=True, map_size=(45, 90))
    assert len(res) == 40 and isinstance(res[0], ld.Geolocation)
    hits = [great_circle_km(torch.tensor([r.lat, r.lon]), REGION_CENTRES[c]).item() < 750 for r, c in zip(res, cls)]
    assert np.mean(hits) >= 0.9
    for r in res:
        assert 1 <= len(r.modes) <= 3 and r.modes[0] == (r.lat, r.lon, r.score)
        assert all(a[2] >= b[2] for a, b in zip(r.modes, r.modes[1:]))  # best first
        assert r.prob_map.shape == (45, 90) and abs(r.prob_map.sum() - 1) < 1e-9 and r.prob_map.min() >= 0
    # the map's most probable cell lies near the top mode
    lat, lon = ld.grid_latlon(45, 90)
    j, k = np.unravel_index(np.argmax(res[0].prob_map), (45, 90))
    assert great_circle_km(torch.tensor([lat[j], lon[k]]), torch.tensor([res[0].lat, res[0].lon])).item() < 800
    # same seed -> same answer; 'mode' aggregation agrees with 'mean' on this easy task
    again = ld.geolocate(val.embeddings, model=model, top_k=3, return_map=True, map_size=(45, 90))
    assert [r.modes for r in again] == [r.modes for r in res]
    subset = ld.geolocate(val.embeddings[:5], model=model)  # same noise per row; BLAS rounding differs by batch size
    for a, b in zip(subset, res):
        assert great_circle_km(torch.tensor([a.lat, a.lon]), torch.tensor([b.lat, b.lon])).item() < 25  # << lobe (2200 km)
    by_mode = ld.geolocate(val.embeddings[:10], model=model, aggregate="mode")
    for a, b in zip(by_mode, res[:10]):
        assert great_circle_km(torch.tensor([a.lat, a.lon]), torch.tensor([b.lat, b.lon])).item() < 750


def test_save_load_roundtrip_predicts_identically(trained, tmp_path):
    model, final = trained
    loaded = ld.LocDiff.from_pretrained(final)
    emb = region_dataset(8, seed=7)[0].embeddings
    a = model.predict(emb, top_k=2)
    b = loaded.predict(emb, top_k=2)
    torch.testing.assert_close(a[0], b[0], equal_nan=True)
    torch.testing.assert_close(a[1], b[1], equal_nan=True)
    loaded.save_pretrained(tmp_path / "again")
    c = ld.geolocate(emb, model=str(tmp_path / "again"), top_k=2)
    assert [r.lat for r in c] == a[0][:, 0, 0].tolist()


def test_truncated_or_tampered_checkpoints_raise(trained, tmp_path):
    import shutil

    _, final = trained
    for name, damage in [("truncated", lambda b: b[: len(b) // 2]), ("tampered", lambda b: b[:-8] + b"\x00" * 8)]:
        d = tmp_path / name
        shutil.copytree(final, d)
        blob = (d / "model.safetensors").read_bytes()
        (d / "model.safetensors").write_bytes(damage(blob))
        with pytest.raises(CheckpointError, match="model.safetensors"):
            ld.LocDiff.from_pretrained(d)
    with pytest.raises(CheckpointError, match="does not exist"):
        ld.LocDiff.from_pretrained(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="manifest"):
        ld.LocDiff.from_pretrained(tmp_path / "empty")


def test_bad_inputs_raise_clear_errors(trained):
    model, _ = trained
    with pytest.raises(ValueError, match="width 5"):
        ld.geolocate(torch.randn(3, 5), model=model)
    bad = torch.randn(3, 16)
    bad[1, 2] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        ld.geolocate(bad, model=model)
    with pytest.raises(ValueError, match="empty"):
        ld.geolocate([], model=model)
    with pytest.raises(ValueError, match="empty"):
        ld.geolocate(torch.zeros(0, 16), model=model)
    with pytest.raises(TypeError, match="float"):
        ld.geolocate(torch.zeros(3, 16, dtype=torch.int64), model=model)
    with pytest.raises(ValueError, match="no image encoder"):
        ld.geolocate(torch.rand(2, 3, 32, 32), model=model)
    with pytest.raises(ValueError, match="top_k"):
        ld.geolocate(torch.randn(2, 16), model=model, top_k=0)
    with pytest.raises(ValueError, match="num_samples"):
        ld.geolocate(torch.randn(2, 16), model=model, num_samples=0)
    with pytest.raises(ValueError, match="guidance"):
        tiny_model(cond_drop_prob=0.0).predict(torch.randn(2, 16), guidance_scale=2.0)
    with pytest.raises(ValueError, match="LocDiffConfig: L"):
        ld.LocDiffConfig(cond_dim=4, L=0)


def test_geolocate_without_a_model_says_how_to_get_one(tmp_path, monkeypatch):
    monkeypatch.setenv("LOCDIFF_HOME", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="locdiff demo"):
        ld.geolocate(torch.randn(1, 16))


def test_images_through_the_models_image_encoder(tmp_path):
    from PIL import Image

    torch.manual_seed(0)
    model = ld.LocDiff(ld.LocDiffConfig(cond_dim=32, L=4, widths=(32, 16), time_dim=16, sample_steps=3, num_samples=2),
                       image_encoder=SmallCNNEncoder(dim=32, image_size=32, channels=(8, 16)))
    rgb = tmp_path / "rgb.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 50, 3), dtype=np.uint8)).save(rgb)
    gray = tmp_path / "gray.jpg"
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (32, 32), dtype=np.uint8)).save(gray)
    res = ld.geolocate([rgb, str(gray), Image.open(rgb), torch.rand(3, 32, 32)], model=model, top_k=2)
    assert len(res) == 4 and all(math.isfinite(r.lat) for r in res)
    # the image path and the tensor path give the same embedding for the same pixels
    assert torch.allclose(model.embed([rgb]), model.embed(model.image_encoder.preprocess([rgb])))
    model.save_pretrained(tmp_path / "m")
    loaded = ld.LocDiff.from_pretrained(tmp_path / "m")
    assert loaded.image_encoder is not None and torch.allclose(loaded.embed([rgb]), model.embed([rgb]))

    (tmp_path / "notes.txt").write_text("not an image")
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(rgb.read_bytes()[:60])
    tiny = tmp_path / "tiny.png"
    Image.new("RGB", (4, 4)).save(tiny)
    with pytest.raises(FileNotFoundError, match="missing.jpg"):
        ld.geolocate([tmp_path / "missing.jpg"], model=model)
    with pytest.raises(ValueError, match="not an image"):
        ld.geolocate([tmp_path / "notes.txt"], model=model)
    with pytest.raises(ValueError, match="corrupt"):
        ld.geolocate([corrupt], model=model)
    with pytest.raises(ValueError, match="too small"):
        ld.geolocate([tiny], model=model)


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


def test_data_formats_roundtrip(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    data, _ = region_dataset(20, seed=8)
    for suffix in (".npz", ".safetensors"):
        back = load_dataset(data.save(tmp_path / f"d{suffix}"))
        assert torch.equal(back.embeddings, data.embeddings) and torch.equal(back.coords, data.coords)
    np.save(tmp_path / "e.npy", data.embeddings.numpy())
    np.save(tmp_path / "c.npy", data.coords.numpy())
    assert torch.equal(load_dataset(tmp_path / "e.npy", tmp_path / "c.npy").coords, data.coords)
    table = pa.table({"lat": data.coords[:, 0].numpy(), "lon": data.coords[:, 1].numpy(),
                      "embedding": data.embeddings.numpy().tolist()})
    pq.write_table(table, tmp_path / "d.parquet")
    assert torch.allclose(load_dataset(tmp_path / "d.parquet").embeddings, data.embeddings)
    # bad data
    with pytest.raises(ValueError, match="latitude"):
        EmbeddingDataset(torch.randn(2, 3), torch.tensor([[91.0, 0.0], [0.0, 0.0]]))
    with pytest.raises(ValueError, match="rows"):
        EmbeddingDataset(torch.randn(3, 3), torch.zeros(2, 2))
    (tmp_path / "junk.npz").write_bytes(b"PK\x03\x04 junk")
    with pytest.raises(ValueError, match="cannot be read"):
        load_dataset(tmp_path / "junk.npz")
    with pytest.raises(FileNotFoundError):
        load_dataset(tmp_path / "none.npz")
    assert EmbeddingDataset(torch.randn(1, 2), torch.tensor([[0.0, 190.0]])).coords[0, 1] == -170.0


def _cli(*args, check=True):
    proc = subprocess.run([sys.executable, "-m", "locdiff_ext", *map(str, args)], capture_output=True, text=True,
                          timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"locdiff {' '.join(map(str, args))} failed:\n{proc.stdout}\n{proc.stderr}")
    return proc


def test_cli_train_eval_predict(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # not the repository root, whose source folder would shadow the installed package
    train, _ = region_dataset(1500, seed=9)
    val, cls = region_dataset(50, seed=10)
    train.save(tmp_path / "train.npz")
    val.save(tmp_path / "val.safetensors")
    cfg = {"model": {"L": 6, "widths": [64, 32], "time_dim": 32, "dropout": 0.0, "sample_steps": 8, "num_samples": 4},
           "train": {"batch_size": 64, "lr": 0.002, "warmup_steps": 20, "eval_every": 150, "eval_size": 32}}
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    _cli("train", tmp_path / "train.npz", "--out", tmp_path / "run", "--config", tmp_path / "cfg.json",
         "--steps", 300, "--val", tmp_path / "val.safetensors", "--no-progress")
    assert (tmp_path / "run" / "final" / "config.json").is_file()
    out = _cli("eval", tmp_path / "val.safetensors", "--model", tmp_path / "run", "--json", tmp_path / "eval.json")
    assert "| LocDiff |" in out.stdout
    report = json.loads((tmp_path / "eval.json").read_text())
    assert report["results"]["LocDiff"]["acc_2500km"] >= 90
    np.save(tmp_path / "q.npy", val.embeddings[:3].numpy())
    out = _cli("predict", tmp_path / "q.npy", "--model", tmp_path / "run", "--top-k", 2, "--json")
    records = json.loads(out.stdout)
    assert len(records) == 3 and all(1 <= len(r["modes"]) <= 2 for r in records)
    for r, c in zip(records, cls[:3]):
        m = r["modes"][0]
        assert great_circle_km(torch.tensor([m["lat"], m["lon"]]), REGION_CENTRES[c]).item() < 2500
    bad = _cli("predict", tmp_path / "missing.png", "--model", tmp_path / "run", check=False)
    assert bad.returncode == 2 and "missing.png" in bad.stderr
    bad = _cli("train", tmp_path / "nothing.npz", "--out", tmp_path / "x", check=False)
    assert bad.returncode == 2 and "does not exist" in bad.stderr
    for cmd in ("train", "eval", "predict", "bench"):
        assert _cli(cmd, "--help").stdout.startswith("usage: locdiff " + cmd)
