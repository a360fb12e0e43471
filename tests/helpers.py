"""Shared test helpers (imported as `helpers`: tests/ is on pytest's pythonpath)."""

import torch

import locdiff_ext

CUDA_OK = torch.cuda.is_available() and locdiff_ext.has_cuda()
CUDA_REASON = (
    "needs a CUDA GPU and a CUDA build of torch"
    if not torch.cuda.is_available()
    else "locdiff_ext was built without CUDA kernels"
)


def random_coords(n, dtype=torch.float64, seed=0, extras=True):
    """Uniform points on the sphere plus both poles and the antimeridian."""
    g = torch.Generator().manual_seed(seed)
    z = torch.rand(n, generator=g, dtype=torch.float64) * 2 - 1
    lat = torch.rad2deg(torch.asin(z))
    lon = torch.rand(n, generator=g, dtype=torch.float64) * 360 - 180
    pts = torch.stack([lat, lon], 1)
    if extras:
        special = torch.tensor(
            [[90.0, 0.0], [-90.0, 0.0], [90.0, 123.0], [0.0, -180.0], [0.0, 180.0], [45.0, 179.999999], [-30.0, -180.0]],
            dtype=torch.float64,
        )
        pts = torch.cat([pts, special])
    return pts.to(dtype)
