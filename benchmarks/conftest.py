"""Shared set-up for the benchmark suites: same thread count for every implementation, fixed data."""

import os
import sys

import numpy as np
import pytest
import torch

from locdiff_ext import _C

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # shared helpers (ducc_reference); importlib mode adds none

THREADS = _C.num_threads()
torch.set_num_threads(THREADS)
os.environ.setdefault("OMP_NUM_THREADS", str(THREADS))


def uniform_points(n: int, seed: int = 0):
    """(lat, lon) degrees [n, 2] float64 and the matching unit vectors [n, 3]."""
    rng = np.random.default_rng(seed)
    xyz = rng.normal(size=(n, 3))
    xyz /= np.linalg.norm(xyz, axis=1, keepdims=True)
    lat = np.rad2deg(np.arcsin(np.clip(xyz[:, 2], -1, 1)))
    lon = np.rad2deg(np.arctan2(xyz[:, 1], xyz[:, 0]))
    return torch.tensor(np.stack([lat, lon], 1)), xyz


@pytest.fixture(scope="session")
def points_100k():
    return uniform_points(100_000)
