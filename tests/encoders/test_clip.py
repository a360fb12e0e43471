"""CLIP towers on a tiny randomly initialised CLIP built here (no downloads): transformers and open_clip
wrappers, and a LocDiff that references its tower instead of storing it."""

import sys

import numpy as np
import pytest
import torch

import locdiff_ext as ld
from locdiff_ext.encoders import HFCLIPEncoder, OpenCLIPEncoder, parse_encoder_spec

transformers = pytest.importorskip("transformers", reason="the CLIP path needs transformers (in the test extras)")


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
