"""The small convolutional image encoder of the demo, trained from scratch on a CPU in minutes.

Its weights travel inside the LocDiff model's safetensors (``stores_weights``)."""

from __future__ import annotations

from typing import Dict, List, Sequence

import torch
from torch import Tensor, nn

from ..checks import check_float, check_int
from .images import ImageEncoder


class SmallCNNEncoder(ImageEncoder):
    """A small convolutional encoder trainable from scratch on a CPU in minutes (the demo's).

    Four stride-2 3x3 conv blocks (GroupNorm + SiLU), global average pooling, a linear head.
    Input is normalised with fixed per-channel statistics (``mean``/``std``, part of the config)."""

    def __init__(self, dim: int = 128, image_size: int = 64, channels: Sequence[int] = (32, 64, 128, 256),
                 mean: Sequence[float] = (0.5, 0.5, 0.5), std: Sequence[float] = (0.25, 0.25, 0.25)):
        super().__init__()
        check_int(dim, "dim", 1, 1 << 16)
        check_int(image_size, "image_size", 8, 4096)
        if not isinstance(channels, (list, tuple)) or not 1 <= len(channels) <= 8:
            raise ValueError(f"channels must be a list of 1 to 8 ints, got {channels!r}")
        for name, v in (("mean", mean), ("std", std)):
            if not isinstance(v, (list, tuple)) or len(v) != 3:
                raise ValueError(f"{name} must be 3 numbers (one per RGB channel), got {v!r}")
            for x in v:
                check_float(x, name, 0.0 if name == "std" else None, lo_open=True)
        self.dim, self.image_size = dim, image_size
        self.channels = [check_int(c, "channels[i]", 1, 4096) for c in channels]
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


__all__ = ["SmallCNNEncoder"]
