"""Fixtures shared across test files: a small trained model, a tiny random CLIP tower and a set of
generated photos (built once per session: training and saving them is the slow part)."""

import csv
import json
import tarfile

import numpy as np
import pytest
import torch

from locdiff_ext.train import Trainer, TrainConfig

from helpers import region_dataset, tiny_model


@pytest.fixture(scope="session")
def trained(tmp_path_factory):
    """A small conditional model trained on the 8-region task, saved with save_pretrained."""
    out = tmp_path_factory.mktemp("trained")
    data, _ = region_dataset(2000, seed=5)
    model = tiny_model(L=8, widths=(96, 48), time_dim=32, sample_steps=10, num_samples=8)
    cfg = TrainConfig(steps=400, batch_size=64, lr=2e-3, warmup_steps=20, eval_every=0, checkpoint_every=0)
    trainer = Trainer(model, data, out, cfg, progress=False)
    trainer.fit()
    return trainer.ema, out / "final"


@pytest.fixture(scope="session")
def tiny_clip(tmp_path_factory):
    """A randomly initialised CLIP vision tower (2 layers, 32 px) saved like a hub checkpoint."""
    transformers = pytest.importorskip("transformers", reason="the CLIP path needs transformers (in the test extras)")
    CLIPVisionConfig, CLIPVisionModelWithProjection = transformers.CLIPVisionConfig, transformers.CLIPVisionModelWithProjection

    d = tmp_path_factory.mktemp("tiny-clip")
    torch.manual_seed(0)
    cfg = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=32, patch_size=8, projection_dim=24)
    CLIPVisionModelWithProjection(cfg).save_pretrained(d)
    (d / "preprocessor_config.json").write_text(json.dumps(
        {"crop_size": {"height": 32, "width": 32}, "size": {"shortest_edge": 32},
         "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711]}))
    return d


@pytest.fixture(scope="session")
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
