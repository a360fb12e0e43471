"""locdiff_ext: LocDiff geolocalization (Wang et al., NeurIPS 2025) with fast CPU/CUDA kernels.

``geolocate`` and ``LocDiff`` are the entry points (locdiff_ext.api); training lives in
locdiff_ext.train, metrics in locdiff_ext.evaluate.  The kernel ops (real orthonormal spherical
harmonics, SHDD encode, separable synthesis and the mode-seeking decoder) are torch custom ops in
the ``locdiff`` namespace; see ``locdiff_ext.ops``.
"""

from ._ext import MAX_DEGREE, has_cuda
from .ops import (
    EARTH_RADIUS_KM,
    degree_from_num_coeffs,
    grid_latlon,
    num_coeffs,
    sh_basis,
    sh_synthesis,
    shdd_decode,
    shdd_encode,
)

from .api import Geolocation, LocDiff, LocDiffConfig, geolocate  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "geolocate",
    "LocDiff",
    "LocDiffConfig",
    "Geolocation",
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
