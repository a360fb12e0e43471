"""``geolocate``: the one-call API, and ``Geolocation``, the answer for one input.

``geolocate(inputs)`` loads a model directory once per process (or takes a ``LocDiff``), runs
``LocDiff.predict`` in batches and returns one ``Geolocation`` per input, in input order.  Given no
model, it uses the one ``locdiff demo`` saved (``default_model_dir``).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple, Union

import numpy as np
import torch

from .evaluation.calibration import credible_area_km2, region_contains
from .locdiff import LocDiff

PathLike = Union[str, os.PathLike]


@dataclass
class Geolocation:
    """The prediction for one input: the best mode and all top-k modes, optionally the map.

    ``prob_map`` [nlat, nlon] is the probability of each cell of ``grid_latlon(nlat, nlon)``
    (rows north to south, columns west to east from -180), summing to 1."""

    lat: float
    lon: float
    score: float
    modes: List[Tuple[float, float, float]] = field(default_factory=list)  # (lat, lon, score), best first
    prob_map: Optional[np.ndarray] = None

    def _map(self) -> np.ndarray:
        if self.prob_map is None:
            raise ValueError("this Geolocation has no probability map: call geolocate(..., return_map=True)")
        return self.prob_map

    def credible_area_km2(self, p: float = 0.9) -> float:
        """Area (km^2) of the smallest region of highest probability density that holds probability ``p``:
        how far to trust the answer (the whole Earth is 5.1e8 km^2).  Needs ``return_map=True``; its
        resolution is that of the map (``map_size``)."""
        return credible_area_km2(self._map(), p)

    def contains(self, lat: float, lon: float, p: float = 0.9) -> bool:
        """Whether (lat, lon) lies in the ``p`` credible region (see ``credible_area_km2``)."""
        return region_contains(self._map(), lat, lon, p)

    def __repr__(self) -> str:
        extra = f", +{len(self.modes) - 1} more modes" if len(self.modes) > 1 else ""
        return f"Geolocation(lat={self.lat:.4f}, lon={self.lon:.4f}, score={self.score:.3f}{extra})"


def default_model_dir() -> Path:
    """Where ``locdiff demo`` saves its model and where ``geolocate`` looks when given none:
    $LOCDIFF_HOME/demo-model, by default ~/.cache/locdiff/demo-model."""
    home = os.environ.get("LOCDIFF_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "locdiff")
    return Path(home) / "demo-model"


_MODEL_CACHE: Dict[Tuple[str, str], LocDiff] = {}


def _resolve_model(model, device) -> LocDiff:
    if isinstance(model, LocDiff):
        return model.to(device) if device is not None else model
    path = default_model_dir() if model is None else Path(model)
    if model is None and not path.exists():
        raise FileNotFoundError(f"no model given and no demo model at {path}: run `locdiff demo` once to "
                                "train it, or pass model=<directory written by save_pretrained>")
    dev = str(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    key = (str(path.resolve()), dev)
    if key not in _MODEL_CACHE:  # loading once per process: repeated calls reuse the weights
        _MODEL_CACHE[key] = LocDiff.from_pretrained(path, map_location=dev)
    return _MODEL_CACHE[key]


def geolocate(inputs, model: Union[LocDiff, PathLike, None] = None, top_k: int = 1, num_samples: Optional[int] = None,
              steps: Optional[int] = None, return_map: bool = False, batch_size: int = 64,
              device: Union[str, torch.device, None] = None, guidance_scale: Optional[float] = None,
              aggregate: Optional[str] = None, map_size: Tuple[int, int] = (180, 360), seed: int = 0,
              progress: bool = False, hybrid: Optional[bool] = None,
              prior_weight: Optional[float] = None) -> List[Geolocation]:
    """Where on Earth? One ``Geolocation`` per input, in input order.

    ``inputs``: image paths, PIL images, image tensors ([3, H, W] each or [N, 3, H, W]) through the
    model's image encoder, or precomputed embeddings [N, D].  ``model``: a LocDiff, a directory
    written by ``save_pretrained``, or None for the demo model of ``locdiff demo``.  ``num_samples``
    and ``steps`` default to the model's config; ``seed`` makes the sampling reproducible; ``progress``
    shows a bar on a terminal and periodic lines in logs.  Retrieval models (LocDiff-R): ``hybrid``
    (LocDiff-H: each answer snapped to the most similar gallery entry near it) and ``prior_weight`` (the
    share of the kNN density in the answer) default to the values saved with the model, chosen on
    validation data (``LocDiff.predict``)."""
    m = _resolve_model(model, device)
    coords, scores, maps = m.predict(inputs, top_k=top_k, num_samples=num_samples, steps=steps,
                                     guidance_scale=guidance_scale, aggregate=aggregate, return_map=return_map,
                                     map_size=map_size, batch_size=batch_size, seed=seed, progress=progress,
                                     hybrid=hybrid, prior_weight=prior_weight)
    results = []
    for i in range(coords.shape[0]):
        modes = [(float(c[0]), float(c[1]), float(s)) for c, s in zip(coords[i], scores[i]) if not math.isnan(float(c[0]))]
        best = modes[0] if modes else (float("nan"), float("nan"), float("-inf"))
        results.append(Geolocation(*best, modes=modes, prob_map=maps[i].numpy() if maps is not None else None))
    return results


__all__ = ["geolocate", "Geolocation", "default_model_dir"]
