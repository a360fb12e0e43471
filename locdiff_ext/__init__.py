"""locdiff_ext: LocDiff geolocalization (Wang et al., NeurIPS 2025) with fast CPU/CUDA kernels.

``geolocate`` (locdiff_ext.inference) and ``LocDiff`` (locdiff_ext.locdiff) are the entry points;
training lives in locdiff_ext.train, metrics and baselines in locdiff_ext.evaluation.  The kernel
ops (real orthonormal spherical harmonics, SHDD encode, separable synthesis and the mode-seeking
decoder) are torch custom ops in the ``locdiff`` namespace: see ``locdiff_ext.kernels``.  The
README's Layout section shows the folders and which may import which.
"""

from .data.checkpoint import CheckpointError
from .inference import Geolocation, UncalibratedWarning, geolocate
from .kernels import (
    EARTH_RADIUS_KM,
    MAX_DEGREE,
    degree_from_num_coeffs,
    grid_latlon,
    has_cuda,
    num_coeffs,
    sh_basis,
    sh_synthesis,
    shdd_decode,
    shdd_encode,
)
from .locdiff import LocDiff, LocDiffConfig

__version__ = "0.1.0"

__all__ = [
    "geolocate",
    "LocDiff",
    "LocDiffConfig",
    "Geolocation",
    "UncalibratedWarning",
    "CheckpointError",
    "MAX_DEGREE",
    "EARTH_RADIUS_KM",
    "has_cuda",
    "sh_basis",
    "shdd_encode",
    "sh_synthesis",
    "shdd_decode",
    "grid_latlon",
    "num_coeffs",
    "degree_from_num_coeffs",
]
