"""The small convolutional image encoder of the demo, trained from scratch on a CPU in minutes.

Its weights travel inside the LocDiff model's safetensors (``stores_weights``)."""

from __future__ import annotations

from typing import Dict, List, Sequence

import torch
from torch import Tensor, nn

from .images import ImageEncoder


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


__all__ = ["SmallCNNEncoder"]
