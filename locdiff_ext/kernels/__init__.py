"""Layer 1, the kernels: real spherical harmonics on the sphere as torch custom ops.

``ops`` wraps the compiled C++/CUDA kernels (``locdiff_ext._C``, loaded by ``_loader``):
``sh_basis``, ``shdd_encode``, ``sh_synthesis`` and the mode-seeking ``shdd_decode``;
``geometry`` holds their grids and great-circle geometry; ``reference`` slow float64 versions
that the tests compare against.  Imports nothing of the package but ``checks``.
"""

from ._loader import MAX_DEGREE, has_cuda
from .geometry import EARTH_RADIUS_KM, great_circle_km, grid_latlon, grid_points, latlon_to_xyz, xyz_to_latlon
from .ops import degree_from_num_coeffs, num_coeffs, sh_basis, sh_synthesis, shdd_decode, shdd_encode

__all__ = ["MAX_DEGREE", "has_cuda", "EARTH_RADIUS_KM", "great_circle_km", "grid_latlon", "grid_points",
           "latlon_to_xyz", "xyz_to_latlon", "num_coeffs", "degree_from_num_coeffs", "sh_basis", "shdd_encode",
           "sh_synthesis", "shdd_decode"]
