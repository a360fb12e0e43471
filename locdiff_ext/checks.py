"""Argument checks shared by every layer of the package (it imports nothing of ours).

One place for the rules the README's "Errors" section promises: each check raises ``TypeError``
(wrong kind of value) or ``ValueError`` (wrong shape or value) with a message that names the
argument, before any work is done.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch
from torch import Tensor


def check_int(v, name: str, lo: int, hi: Optional[int] = None) -> int:
    """``v`` if it is an int (not a bool) in [lo, hi]; TypeError / ValueError naming ``name`` otherwise."""
    if isinstance(v, bool) or not isinstance(v, int):
        raise TypeError(f"{name} must be an int, got {type(v).__name__}")
    if v < lo or (hi is not None and v > hi):
        rng = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
        raise ValueError(f"{name} must be {rng}, got {v}")
    return v


def validate_coords(coords, name: str = "coords") -> Tensor:
    """(lat, lon) degrees -> float64 [N, 2] with lon wrapped to [-180, 180); raises ValueError
    naming ``name`` for a wrong shape, NaN/inf values or |lat| > 90."""
    c = torch.as_tensor(np.asarray(coords) if not isinstance(coords, Tensor) else coords)
    if c.dim() != 2 or c.shape[1] != 2:
        raise ValueError(f"{name} must have shape [N, 2] (lat, lon in degrees), got {tuple(c.shape)}")
    if not (c.dtype.is_floating_point or c.dtype in (torch.int32, torch.int64)):
        raise TypeError(f"{name} must hold numbers, got {c.dtype}")
    c = c.to(torch.float64)
    if not bool(torch.isfinite(c).all()):
        raise ValueError(f"{name} contains NaN or infinite values")
    if bool((c[:, 0].abs() > 90).any()):
        raise ValueError(f"{name}: latitude (column 0) must lie in [-90, 90] degrees")
    lon = torch.remainder(c[:, 1] + 180.0, 360.0) - 180.0
    return torch.stack([c[:, 0], lon], 1)


def validate_embeddings(emb, name: str = "embeddings", dim: Optional[int] = None) -> Tensor:
    """Embeddings -> float32 [N, D]; raises ValueError naming ``name`` for a wrong shape or width,
    NaN/inf values, or TypeError for a non-float dtype."""
    e = emb if isinstance(emb, Tensor) else torch.as_tensor(np.asarray(emb))
    if not e.dtype.is_floating_point:
        raise TypeError(f"{name} must be a float array, got {e.dtype}")
    if e.dim() != 2:
        raise ValueError(f"{name} must have shape [N, D], got {tuple(e.shape)}")
    if dim is not None and e.shape[1] != dim:
        raise ValueError(f"{name} has width {e.shape[1]} but the model expects {dim}")
    if not bool(torch.isfinite(e).all()):
        raise ValueError(f"{name} contains NaN or infinite values")
    return e.to(torch.float32)


__all__ = ["check_int", "validate_coords", "validate_embeddings"]
