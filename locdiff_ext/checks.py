"""Argument checks shared by every layer of the package (it imports nothing of ours).

One place for the rules the README's "Errors" section promises: each check raises ``TypeError``
(wrong kind of value) or ``ValueError`` (wrong shape or value) with a message that names the
argument, before any work is done.
"""

from __future__ import annotations

import math
import os
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


def check_float(v, name: str, lo: Optional[float] = None, hi: Optional[float] = None, lo_open: bool = False,
                hi_open: bool = False) -> float:
    """``v`` as a float if it is a real number (int or float, not a bool) that is finite and within
    [lo, hi] (open ends with ``lo_open``/``hi_open``); TypeError / ValueError naming ``name`` otherwise."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(v).__name__}")
    v = float(v)
    if not math.isfinite(v):
        raise ValueError(f"{name} must be finite, got {v}")
    low_bad = lo is not None and (v <= lo if lo_open else v < lo)
    high_bad = hi is not None and (v >= hi if hi_open else v > hi)
    if low_bad or high_bad:
        lo_s = "(-inf" if lo is None else ("(" if lo_open else "[") + f"{lo:g}"
        hi_s = "inf)" if hi is None else f"{hi:g}" + (")" if hi_open else "]")
        raise ValueError(f"{name} must be in {lo_s}, {hi_s}, got {v:g}")
    return v


def available_bytes(device: torch.device) -> int:
    """Memory that can be allocated now on ``device``: free GPU memory; on the CPU the kernel's
    MemAvailable (free RAM plus reclaimable caches, not the machine's total), lowered to what a
    cgroup memory limit (containers) or an address-space ulimit still leaves this process."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    limits = [_meminfo_bytes("/proc/meminfo", "MemAvailable:")]
    try:
        import resource

        soft, _hard = resource.getrlimit(resource.RLIMIT_AS)
        if soft != resource.RLIM_INFINITY:
            used = _meminfo_bytes("/proc/self/status", "VmSize:")
            limits.append(soft - used if used is not None else None)
    except (ImportError, ValueError, OSError):  # pragma: no cover - not POSIX
        pass
    try:
        with open("/sys/fs/cgroup/memory.max") as f:
            cap = f.read().strip()
        if cap != "max":
            with open("/sys/fs/cgroup/memory.current") as f:
                limits.append(int(cap) - int(f.read().strip()))
    except (OSError, ValueError):
        pass
    known = [v for v in limits if v is not None]
    if known:
        return max(0, min(known))
    try:  # pragma: no cover - not Linux
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # pragma: no cover - non-POSIX
        return 1 << 50


def _meminfo_bytes(path: str, key: str) -> Optional[int]:
    """A 'Key:   N kB' line of a /proc file in bytes, or None."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(key):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def check_fits(nbytes: int, device: torch.device, what: str) -> None:
    """Refuses work whose memory (outputs and working buffers, ``nbytes``) exceeds what is available
    on ``device``, with a ValueError naming the arguments ``what`` that set the size, before anything
    is allocated (the allocator's own failure would come late, obscurely, or not at all)."""
    limit = available_bytes(device)
    if nbytes > limit:
        raise ValueError(f"{what}: this call would need {nbytes / 2**30:.1f} GiB but only {limit / 2**30:.1f} GiB "
                         f"is available on {device}; lower them or split the batch")


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
    # fmod first (exact): lon + 180 would round 1e20 to 1e20 and lose the angle (1e20 is -80 degrees)
    lon = torch.remainder(torch.fmod(c[:, 1], 360.0) + 180.0, 360.0) - 180.0
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
    e32 = e.to(torch.float32)
    if e.dtype != torch.float32 and not bool(torch.isfinite(e32).all()):
        raise ValueError(f"{name} has values beyond float32's range (|x| > 3.4e38)")
    return e32


__all__ = ["check_int", "check_float", "check_fits", "available_bytes", "validate_coords", "validate_embeddings"]
