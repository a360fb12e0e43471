"""Image encoders behind one interface: images -> condition embeddings [B, D].

Every encoder is an ``ImageEncoder``: ``preprocess(images)`` turns paths / PIL images / tensors
into a float batch [B, 3, S, S], ``forward`` maps it to [B, dim], and ``config`` is a JSON dict
from which ``build_image_encoder`` rebuilds it (weights travel in the model's safetensors).
``load_image`` gives clear errors for missing, non-image, corrupt or tiny files.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Dict, List, Sequence, Union

import numpy as np
import torch
from torch import Tensor, nn

ImageLike = Union[str, os.PathLike, "PIL.Image.Image", Tensor, np.ndarray]  # noqa: F821

MIN_IMAGE_SIDE = 8


def load_image(image) -> "PIL.Image.Image":  # noqa: F821
    """A path or PIL image -> an RGB PIL image.  Grayscale, palette and RGBA images are converted;
    a missing file, a file that is not an image, a corrupt image or one smaller than 8 px per side
    raises FileNotFoundError / ValueError naming the file."""
    from PIL import Image, UnidentifiedImageError

    name = str(image) if isinstance(image, (str, os.PathLike)) else f"<{type(image).__name__}>"
    if isinstance(image, (str, os.PathLike)):
        path = Path(image)
        if not path.is_file():
            raise FileNotFoundError(f"image file {name!r} does not exist")
        try:
            with Image.open(path) as im:
                im.load()
                img = im.convert("RGB")
        except UnidentifiedImageError:
            raise ValueError(f"image file {name!r} is not an image (or of an unknown format)") from None
        except (OSError, SyntaxError, ValueError) as exc:
            raise ValueError(f"image file {name!r} is corrupt or truncated: {exc}") from None
    elif isinstance(image, Image.Image):
        img = image.convert("RGB")
    else:
        raise TypeError(f"images: expected a path, a PIL image or a tensor, got {type(image).__name__}")
    if min(img.size) < MIN_IMAGE_SIDE:
        raise ValueError(f"image {name!r} is {img.size[0]}x{img.size[1]} px: too small (at least "
                         f"{MIN_IMAGE_SIDE} px per side)")
    return img


def image_to_tensor(image: ImageLike, size: int) -> Tensor:
    """One image -> float32 [3, size, size] in [0, 1] (resized with bilinear filtering)."""
    if isinstance(image, np.ndarray):
        image = torch.from_numpy(image)
    if isinstance(image, Tensor):
        t = image
        if t.dim() == 2:
            t = t[None]
        if t.dim() != 3 or t.shape[0] not in (1, 3):
            raise ValueError(f"images: an image tensor must have shape [3, H, W] or [H, W], got {tuple(image.shape)}")
        if min(t.shape[-2:]) < MIN_IMAGE_SIDE:
            raise ValueError(f"images: an image tensor of {tuple(t.shape)} is too small (at least {MIN_IMAGE_SIDE} px per side)")
        t = t.float()
        if image.dtype == torch.uint8:
            t = t / 255.0
        if not bool(torch.isfinite(t).all()):
            raise ValueError("images: an image tensor contains NaN or infinite values")
        t = t.expand(3, -1, -1)
        if tuple(t.shape[-2:]) != (size, size):
            t = nn.functional.interpolate(t[None], size=(size, size), mode="bilinear", align_corners=False,
                                          antialias=True)[0]
        return t.contiguous()
    from PIL import Image

    img = load_image(image)
    if img.size != (size, size):
        img = img.resize((size, size), Image.BILINEAR)
    return torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1).contiguous()


class ImageEncoder(nn.Module):
    """Base class: subclasses set ``dim``, ``image_size`` and ``config`` and implement forward."""

    dim: int
    image_size: int

    @property
    def config(self) -> Dict:
        raise NotImplementedError

    def preprocess(self, images: Sequence[ImageLike]) -> Tensor:
        """Images (a sequence, or a [B, 3, H, W] tensor) -> [B, 3, S, S] float32 in [0, 1]."""
        return torch.stack([image_to_tensor(im, self.image_size) for im in images])


class SmallCNNEncoder(ImageEncoder):
    """A small convolutional encoder trainable from scratch on a CPU in minutes (the demo's).

    Four stride-2 3x3 conv blocks (GroupNorm + SiLU), global average pooling, a linear head.
    Input is normalised with fixed per-channel statistics (``mean``/``std``, part of the config)."""

    def __init__(self, dim: int = 128, image_size: int = 64, channels: Sequence[int] = (32, 64, 128, 256),
                 mean: Sequence[float] = (0.5, 0.5, 0.5), std: Sequence[float] = (0.25, 0.25, 0.25)):
        super().__init__()
        self.dim, self.image_size, self.channels = int(dim), int(image_size), [int(c) for c in channels]
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        layers: List[nn.Module] = []
        c_in = 3
        for c in self.channels:
            layers += [nn.Conv2d(c_in, c, 3, stride=2, padding=1), nn.GroupNorm(min(8, c), c), nn.SiLU()]
            c_in = c
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(c_in, self.dim)

    @property
    def config(self) -> Dict:
        return {"kind": "small_cnn", "dim": self.dim, "image_size": self.image_size, "channels": self.channels,
                "mean": self.mean.flatten().tolist(), "std": self.std.flatten().tolist()}

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"images must have shape [B, 3, H, W], got {tuple(x.shape)}")
        h = self.features((x - self.mean) / self.std)
        return self.head(h.mean(dim=(2, 3)))


ENCODERS = {"small_cnn": SmallCNNEncoder}


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
