"""``geolocate``: the one-call API, and ``Geolocation``, the answer for one input.

``geolocate(inputs)`` loads a model directory once per process (or takes a ``LocDiff``), runs
``LocDiff.predict`` in batches and returns one ``Geolocation`` per input, in input order.  Given no
model, it uses the one ``locdiff demo`` saved (``default_model_dir``).
"""

from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple, Union

import numpy as np
import torch

from .checks import check_float
from .evaluation.calibration import cell_of
from .evaluation.conformal import ConformalCalibration, grid_xyz, region_areas_km2, region_masks, region_scores
from .kernels.geometry import EARTH_RADIUS_KM, latlon_to_xyz
from .locdiff import LocDiff

PathLike = Union[str, os.PathLike]


class UncalibratedWarning(UserWarning):
    """A credible region or radius was asked of a prediction that no conformal calibration covers: the
    number is the raw map's, whose coverage is not promised (``Geolocation.uncalibrated_reason`` says why)."""


@dataclass
class Geolocation:
    """The prediction for one input: the best mode and all top-k modes, optionally the map.

    ``prob_map`` [nlat, nlon] is the probability of each cell of ``grid_latlon(nlat, nlon)``
    (rows north to south, columns west to east from -180), summing to 1.  ``signals`` say how
    localizable the input is (``LocDiff.predict_details``); ``calibration`` is the model's conformal
    calibration when it covers this prediction, else None and ``uncalibrated_reason`` says why.

    Regions and radii (``calibrated``: None uses the calibration when there is one, else the raw map with an
    ``UncalibratedWarning``; True requires it (ValueError otherwise); False asks for the raw map's own)."""

    lat: float
    lon: float
    score: float
    modes: List[Tuple[float, float, float]] = field(default_factory=list)  # (lat, lon, score), best first
    prob_map: Optional[np.ndarray] = None
    signals: Dict[str, float] = field(default_factory=dict)
    calibration: Optional[ConformalCalibration] = field(default=None, repr=False)
    uncalibrated_reason: Optional[str] = "no calibration"

    @property
    def calibrated(self) -> bool:
        """Whether regions and radii carry the conformal promise (a p region holds the truth with probability p)."""
        return self.calibration is not None

    def _map(self) -> np.ndarray:
        if self.prob_map is None:
            raise ValueError("this Geolocation has no probability map: call geolocate(..., return_map=True)")
        return self.prob_map

    def _use_calibration(self, calibrated: Optional[bool]) -> bool:
        if calibrated not in (None, True, False):
            raise TypeError(f"calibrated must be None, True or False, got {calibrated!r}")
        if calibrated is False:
            return False
        if self.calibration is None:
            why = self.uncalibrated_reason or "no calibration"
            if calibrated:
                raise ValueError(f"calibrated=True: this prediction is uncalibrated ({why})")
            warnings.warn(f"uncalibrated region/radius, from the raw map ({why}): its coverage is not promised; "
                          "pass calibrated=False to ask for the raw map's on purpose", UncalibratedWarning,
                          stacklevel=4)
            return False
        return True

    def _group(self) -> int:
        cal = self.calibration
        return int(cal.groups(cal.signal_values({k: [v] for k, v in self.signals.items()}, 1))[0])

    def _threshold(self, p: float, calibrated: Optional[bool]) -> Tuple[float, bool]:
        """The region's cut: the calibrated threshold, or p (the raw map's own region); and whether its
        scores refine the densest cell (``conformal._scan``: all but calibrations saved before version 3)."""
        m = self._map()
        p = check_float(p, "p", 0.0, 1.0, lo_open=True, hi_open=True)
        if self._use_calibration(calibrated):
            self.calibration.check_map_size(m.shape)
            return (float(self.calibration.region_threshold(p, [self._group()])[0]),
                    self.calibration.refines_top_cell)
        return p - 2e-12, True

    def credible_region(self, p: float = 0.9, calibrated: Optional[bool] = None) -> np.ndarray:
        """Boolean mask [nlat, nlon] of the region of highest probability density that holds the truth with
        probability ``p`` (conformally calibrated; see the class docstring).  Needs ``return_map=True``.  The
        cells it touches: where the region is a disc inside the densest cell, that whole cell."""
        t, _ = self._threshold(p, calibrated)
        return region_masks(self._map()[None], [t], [[self.lat, self.lon]])[0]

    def credible_area_km2(self, p: float = 0.9, calibrated: Optional[bool] = None) -> float:
        """Area (km^2) of the p region: how far to trust the answer (the Earth is 5.1e8 km^2); that of
        ``credible_region(p)``'s cells, but a region that is a disc inside the densest cell counts its share
        of that cell only.  Its resolution is otherwise that of the map (``map_size``)."""
        t, refine = self._threshold(p, calibrated)
        return float(region_areas_km2(self._map()[None], [t], [[self.lat, self.lon]], refine)[0])

    def contains(self, lat: float, lon: float, p: float = 0.9, calibrated: Optional[bool] = None) -> bool:
        """Whether (lat, lon) lies in the p region (that of ``credible_region(p)``, but inside the densest
        cell only the part the region holds: the disc around the answer, where the region is one)."""
        cell_of(lat, lon, *self._map().shape)  # the arguments first: a bad one fails before any warning
        t, refine = self._threshold(p, calibrated)
        score = region_scores(self._map()[None], [[lat, lon]], [[self.lat, self.lon]], refine)[0]
        return bool(score <= t + 1e-12)

    def radius_km(self, p: float = 0.9, calibrated: Optional[bool] = None) -> float:
        """The great-circle radius (km) around the answer (lat, lon) that holds the truth with probability
        ``p``: "within 180 km, 90%".  Calibrated: needs no map; raw: the radius holding p of the map."""
        p = check_float(p, "p", 0.0, 1.0, lo_open=True, hi_open=True)
        if self._use_calibration(calibrated):
            return float(self.calibration.radius_km(p, [self._group()])[0])
        m = self._map()
        cells = grid_xyz(*m.shape)
        a = latlon_to_xyz(torch.tensor([self.lat, self.lon], dtype=torch.float64)).numpy()
        d = EARTH_RADIUS_KM * np.arctan2(np.linalg.norm(np.cross(cells, a), axis=1), cells @ a)  # accurate at 0 too
        order = np.argsort(d, kind="stable")
        cum = np.cumsum((m / m.sum()).ravel()[order])
        return float(d[order][min(int(np.searchsorted(cum, p - 1e-12)), d.size - 1)])

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
    out = m.predict_details(inputs, top_k=top_k, num_samples=num_samples, steps=steps, guidance_scale=guidance_scale,
                            aggregate=aggregate, return_map=return_map, map_size=map_size, batch_size=batch_size,
                            seed=seed, progress=progress, hybrid=hybrid, prior_weight=prior_weight)
    cal = m.calibration
    why = ("the model has no conformal calibration (`locdiff calibrate`)" if cal is None
           else cal.mismatch(out.settings))
    cal = cal if why is None else None
    results = []
    for i in range(out.coords.shape[0]):
        modes = [(float(c[0]), float(c[1]), float(s)) for c, s in zip(out.coords[i], out.scores[i])
                 if not math.isnan(float(c[0]))]
        best = modes[0] if modes else (float("nan"), float("nan"), float("-inf"))
        signals = {k: float(v[i]) for k, v in out.signals.items()}
        results.append(Geolocation(*best, modes=modes, prob_map=out.maps[i].numpy() if out.maps is not None else None,
                                   signals=signals, calibration=cal if modes else None,
                                   uncalibrated_reason=why if modes else "no mode found"))
    return results


__all__ = ["geolocate", "Geolocation", "UncalibratedWarning", "default_model_dir"]
