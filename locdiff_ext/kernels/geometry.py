"""Geometry on the sphere shared by every layer: the kernels' grids, great-circle distances and
(lat, lon) <-> unit-vector conversions, in the conventions of design.md section 2 (degrees,
lat in [-90, 90], mean Earth radius).  Pure torch, float64 where precision matters (1 km is 2.5e-8
in the cosine of an angle)."""

from __future__ import annotations

import math
from typing import Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ..checks import check_fits, check_int

EARTH_RADIUS_KM = 6371.0088


def grid_latlon(nlat: int, nlon: int, dtype=torch.float64, device=None) -> Tuple[Tensor, Tensor]:
    """Cell-centre latitudes (north to south) and longitudes (west to east) of the grids that
    ``sh_synthesis`` returns: lat_j = 90 - (j + 1/2) 180/nlat, lon_k = -180 + (k + 1/2) 360/nlon."""
    check_int(nlat, "nlat", 1)
    check_int(nlon, "nlon", 1)
    check_fits((nlat + nlon) * 8, torch.device(device or "cpu"), "nlat/nlon")
    j = torch.arange(nlat, dtype=dtype, device=device)
    k = torch.arange(nlon, dtype=dtype, device=device)
    return 90.0 - (j + 0.5) * 180.0 / nlat, -180.0 + (k + 0.5) * 360.0 / nlon


def grid_points(nlat: int, nlon: int, dtype=torch.float64, device=None) -> Tensor:
    """The cells of ``grid_latlon(nlat, nlon)`` as (lat, lon) points [nlat * nlon, 2], row-major
    (the flattening of ``sh_synthesis``'s [nlat, nlon] maps)."""
    lat, lon = grid_latlon(nlat, nlon, dtype=dtype, device=device)
    check_fits(nlat * nlon * 2 * 8 * 2, torch.device(device or "cpu"), "nlat/nlon")
    return torch.stack(torch.meshgrid(lat, lon, indexing="ij"), -1).reshape(-1, 2)


def great_circle_km(a: Tensor, b: Tensor) -> Tensor:
    """Haversine distance in km between (lat, lon) degree tensors [..., 2] (float64)."""
    a = torch.deg2rad(torch.as_tensor(a).to(torch.float64))
    b = torch.deg2rad(torch.as_tensor(b).to(torch.float64))
    dlat = b[..., 0] - a[..., 0]
    dlon = b[..., 1] - a[..., 1]
    h = torch.sin(dlat / 2) ** 2 + torch.cos(a[..., 0]) * torch.cos(b[..., 0]) * torch.sin(dlon / 2) ** 2
    return 2.0 * EARTH_RADIUS_KM * torch.asin(torch.sqrt(torch.clamp(h, 0.0, 1.0)))


def latlon_to_xyz(c: Tensor) -> Tensor:
    """(lat, lon) degrees [..., 2] -> unit vectors [..., 3] (x towards (0, 0), z towards the north pole)."""
    lat, lon = torch.deg2rad(c[..., 0]), torch.deg2rad(c[..., 1])
    return torch.stack([torch.cos(lat) * torch.cos(lon), torch.cos(lat) * torch.sin(lon), torch.sin(lat)], -1)


def xyz_to_latlon(v: Tensor) -> Tensor:
    """Vectors [..., 3] (any length) -> (lat, lon) degrees [..., 2] float64 of their direction."""
    v = F.normalize(v.double(), dim=-1)
    return torch.stack([torch.rad2deg(torch.asin(v[..., 2].clamp(-1, 1))), torch.rad2deg(torch.atan2(v[..., 1], v[..., 0]))], -1)


def unit_rows(x: Tensor, eps: float = 1e-12) -> Tensor:
    """Rows of ``x`` scaled to unit L2 norm: ``F.normalize(x, dim=-1)`` bit for bit, except on rows whose
    sum of squares overflows (float32 entries from ~1e19: F.normalize returns zeros) or underflows (it
    returns a row far shorter than 1); those are first divided by their largest entry.  Zero rows stay 0."""
    n = torch.linalg.vector_norm(x, dim=-1, keepdim=True)
    out = x / n.clamp(min=eps)
    bad = ~torch.isfinite(n) | (n < eps)
    if bool(bad.any()):
        m = x.abs().amax(dim=-1, keepdim=True)
        y = x / torch.where(m > 0, m, torch.ones_like(m))
        out = torch.where(bad, y / torch.linalg.vector_norm(y, dim=-1, keepdim=True).clamp(min=eps), out)
    return out


def fibonacci_cells(n: int) -> Tensor:
    """``n`` near-uniform points on the sphere (Fibonacci lattice) as (lat, lon) degrees [n, 2]."""
    i = torch.arange(n, dtype=torch.float64)
    z = 1 - (2 * i + 1) / n
    lon = torch.remainder(i * math.pi * (3 - math.sqrt(5)), 2 * math.pi) - math.pi
    return torch.stack([torch.rad2deg(torch.asin(z)), torch.rad2deg(lon)], 1)


__all__ = ["EARTH_RADIUS_KM", "grid_latlon", "grid_points", "great_circle_km", "latlon_to_xyz", "xyz_to_latlon",
           "fibonacci_cells", "unit_rows"]
