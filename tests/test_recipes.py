"""Real-benchmark path for users with data and weights, on a tiny randomly initialised CLIP built
here (no downloads): CLIP encoders, the resumable embedding cache, the CSV readers (folder and
tar), LocDiff with a referenced CLIP tower, and the python/ recipes end to end (dry run)."""

import csv
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

import locdiff_ext as ld
from locdiff_ext.data import load_dataset, read_image_csv
from locdiff_ext.embedding_cache import embed_images, failures, load_embeddings
from locdiff_ext.encoders import HFCLIPEncoder, OpenCLIPEncoder, parse_encoder_spec

transformers = pytest.importorskip("transformers", reason="the CLIP path needs transformers (in the test extras)")

RECIPES = Path(__file__).resolve().parent.parent / "python"


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    """A randomly initialised CLIP vision tower (2 layers, 32 px) saved like a hub checkpoint."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    d = tmp_path_factory.mktemp("tiny-clip")
    torch.manual_seed(0)
    cfg = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=32, patch_size=8, projection_dim=24)
    CLIPVisionModelWithProjection(cfg).save_pretrained(d)
    (d / "preprocessor_config.json").write_text(json.dumps(
        {"crop_size": {"height": 32, "width": 32}, "size": {"shortest_edge": 32},
         "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711]}))
    return d


@pytest.fixture(scope="module")
def image_set(tmp_path_factory):
    """40 generated photos whose colour encodes the latitude band, an MP16-style CSV, a tar of them."""
    from PIL import Image

    d = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    rows = []
    (d / "imgs" / "sub").mkdir(parents=True)
    for i in range(40):
        lat, lon = float(rng.uniform(-60, 60)), float(rng.uniform(-180, 180))
        base = np.array([128 + lat * 2, 100, 128 - lat * 2])
        px = np.clip(base + rng.normal(0, 20, (48, 64, 3)), 0, 255).astype(np.uint8)
        name = f"sub/img_{i:03d}.jpg"
        Image.fromarray(px).save(d / "imgs" / name)
        rows.append({"IMG_ID": name, "AUTHOR": "x", "LAT": lat, "LON": lon})
    rows.append({"IMG_ID": "sub/missing.jpg", "AUTHOR": "x", "LAT": 0.0, "LON": 0.0})
    with open(d / "mp16.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["IMG_ID", "AUTHOR", "LAT", "LON"])
        w.writeheader()
        w.writerows(rows)
    with tarfile.open(d / "imgs.tar", "w") as tar:
        tar.add(d / "imgs" / "sub", arcname="sub")
    return d


def test_hf_clip_encoder_preprocesses_like_clip(tiny_clip, image_set):
    from transformers import CLIPVisionModelWithProjection

    enc = HFCLIPEncoder(str(tiny_clip))
    assert enc.dim == 24 and enc.image_size == 32 and not enc.stores_weights
    img = image_set / "imgs" / "sub" / "img_000.jpg"
    x = enc.preprocess([img])
    assert x.shape == (1, 3, 32, 32) and 0 <= x.min() and x.max() <= 1
    ref = CLIPVisionModelWithProjection.from_pretrained(tiny_clip)
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
    with torch.no_grad():
        torch.testing.assert_close(enc(x), ref(pixel_values=(x - mean) / std).image_embeds)
    with pytest.raises(FileNotFoundError, match="no CLIP model"):
        HFCLIPEncoder(str(image_set / "nowhere"))
    with pytest.raises(ValueError, match="encoder"):
        parse_encoder_spec("clip:/x")


def test_open_clip_wrapper_with_a_stand_in_module(monkeypatch):
    """open_clip itself needs torchvision, which this environment must not install: a stand-in module
    with open_clip's create_model / encode_image / preprocess_cfg interface checks our wrapper."""
    import types

    class Visual(torch.nn.Module):
        preprocess_cfg = {"size": (16, 16), "mean": (0.5, 0.5, 0.5), "std": (0.25, 0.25, 0.25)}
        image_size = 16

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.visual = Visual()
            self.proj = torch.nn.Linear(3, 7)

        def encode_image(self, x):
            return self.proj(x.mean(dim=(2, 3)))

    fake = types.SimpleNamespace(create_model=lambda name, pretrained: Model())
    monkeypatch.setitem(sys.modules, "open_clip", fake)
    enc = OpenCLIPEncoder("ViT-Tiny", "/weights.bin")
    assert enc.dim == 7 and enc.image_size == 16 and enc.config["kind"] == "open_clip"
    x = torch.rand(2, 3, 16, 16)
    torch.testing.assert_close(enc(x), enc.model.encode_image((x - 0.5) / 0.25))


def test_csv_reader_folder_and_tar(image_set):
    refs, coords, missing = read_image_csv(image_set / "mp16.csv", image_set / "imgs")
    assert len(refs) == 40 and coords.shape == (40, 2) and missing == [str(image_set / "imgs" / "sub/missing.jpg")]
    trefs, tcoords, tmissing = read_image_csv(image_set / "mp16.csv", image_set / "imgs.tar")
    assert len(trefs) == 40 and torch.equal(tcoords, coords) and len(tmissing) == 1
    a = ld.encoders.image_to_tensor(refs[3], 32)
    b = ld.encoders.image_to_tensor(trefs[3], 32)
    assert torch.equal(a, b)  # same pixels from the folder and from the archive
    (image_set / "bad.csv").write_text("name,where\nx,1\n")
    with pytest.raises(ValueError, match="image column"):
        read_image_csv(image_set / "bad.csv", image_set / "imgs")


def test_tar_members_read_concurrently_are_intact(tmp_path):
    """Worker threads share one open archive: reads must not interleave (a CI run once lost an image)."""
    import io
    from concurrent.futures import ThreadPoolExecutor

    from PIL import Image

    from locdiff_ext.encoders import load_image

    rng = np.random.default_rng(0)
    arrays = [rng.integers(0, 255, (48, 48, 3), dtype=np.uint8) for _ in range(48)]
    tar_path = tmp_path / "many.tar"
    with tarfile.open(tar_path, "w") as tar:
        for i, a in enumerate(arrays):
            buf = io.BytesIO()
            Image.fromarray(a).save(buf, format="PNG")  # incompressible noise: ~7 kB per member
            info = tarfile.TarInfo(f"img_{i:03d}.png")
            info.size = buf.tell()
            buf.seek(0)
            tar.addfile(info, buf)
    refs = [f"{tar_path}::img_{i:03d}.png" for i in range(len(arrays))] * 4
    with ThreadPoolExecutor(max_workers=8) as pool:
        images = list(pool.map(load_image, refs))
    for i, im in enumerate(images):
        assert np.array_equal(np.asarray(im), arrays[i % len(arrays)])


def test_embedding_cache_resumes_and_skips_bad_images(tiny_clip, image_set, tmp_path):
    enc = HFCLIPEncoder(str(tiny_clip))
    refs, _, _ = read_image_csv(image_set / "mp16.csv", image_set / "imgs")
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    refs = refs[:20] + [str(tmp_path / "broken.jpg")] + refs[20:]
    out = embed_images(enc, refs, tmp_path / "cache", batch_size=8, shard_size=16, progress=False, workers=2)
    full, valid = load_embeddings(out)
    assert full.shape == (41, 24) and int(valid.sum()) == 40 and not valid[20]
    assert list(failures(out)) == [str(tmp_path / "broken.jpg")]
    # kill-and-resume: delete the last shard and run again; only it is recomputed, identically
    (out / "shard_00002.safetensors").unlink()
    mtime = (out / "shard_00000.safetensors").stat().st_mtime_ns
    embed_images(enc, refs, out, batch_size=8, shard_size=16, progress=False)
    again, _ = load_embeddings(out)
    assert (out / "shard_00000.safetensors").stat().st_mtime_ns == mtime
    torch.testing.assert_close(again, full, equal_nan=True)
    with pytest.raises(ValueError, match="other images"):
        embed_images(enc, refs[:5], out, progress=False)
    (out / "shard_00001.safetensors").unlink()
    with pytest.raises(ValueError, match="incomplete"):
        load_embeddings(out)


def test_locdiff_with_a_referenced_clip_tower(tiny_clip, image_set, tmp_path):
    enc = HFCLIPEncoder(str(tiny_clip))
    torch.manual_seed(0)
    model = ld.LocDiff(ld.LocDiffConfig(cond_dim=24, L=4, widths=(16,), time_dim=8, sample_steps=3, num_samples=2),
                       image_encoder=enc)
    model.save_pretrained(tmp_path / "m")
    from safetensors.torch import load_file

    assert not any(k.startswith("image_encoder.") for k in load_file(str(tmp_path / "m" / "model.safetensors")))
    loaded = ld.LocDiff.from_pretrained(tmp_path / "m")
    img = image_set / "imgs" / "sub" / "img_001.jpg"
    torch.testing.assert_close(loaded.embed([img]), model.embed([img]))
    r = ld.geolocate([img], model=loaded, top_k=2)
    assert np.isfinite(r[0].lat)


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
