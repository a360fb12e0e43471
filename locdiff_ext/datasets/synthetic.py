"""Synthetic (embedding, location) rows at any size, for the scale benchmark and its CI version.

Why not random embeddings: accuracy would mean nothing.  Here an embedding is a fixed random projection
of a multi-scale feature of its location (random Fourier features of the unit vector at 2000, 500, 100
and 25 km) plus Gaussian noise, so that similar embeddings are near places, more often the nearer, and
neither retrieval nor a network can be exact.  Locations cluster like photo collections (MP16): most rows
fall around a few thousand "cities" with Zipf-distributed sizes and 5-50 km spreads, the rest anywhere
between 60 S and 75 N.  Rows are generated in chunks, each from its own seed: any chunk can be made alone,
so a 5M-row store is written without holding it in memory.
"""

from __future__ import annotations

import math
from typing import Iterator, Tuple

import numpy as np

from ..kernels.geometry import EARTH_RADIUS_KM

SCALES_KM = (2000.0, 500.0, 100.0, 25.0)
FEATURES_PER_SCALE = 64
BLOCK = 65536  # rows generated from one seed


class SyntheticGeo:
    """The generator of one synthetic world (``seed``): ``rows(start, n)`` -> (embeddings [n, dim] float32,
    coords [n, 2] float64), the same rows whatever the chunking."""

    def __init__(self, dim: int = 768, seed: int = 0, cities: int = 3000, city_share: float = 0.8,
                 noise: float = 1.0):
        rng = np.random.default_rng(seed)
        self.dim, self.seed, self.noise, self.city_share = dim, seed, noise, city_share
        self.centres = self._uniform(rng, cities)
        w = 1.0 / np.arange(1, cities + 1)
        self.city_p = w / w.sum()
        self.city_km = rng.uniform(5.0, 50.0, cities)
        f = len(SCALES_KM) * FEATURES_PER_SCALE
        self.freq = np.concatenate([rng.normal(0, EARTH_RADIUS_KM / s, (FEATURES_PER_SCALE, 3)) for s in SCALES_KM])
        self.phase = rng.uniform(0, 2 * math.pi, f)
        self.proj = (rng.normal(0, 1, (f, dim)) * math.sqrt(2.0 / (f * dim))).astype(np.float32)  # unit-norm signal

    @staticmethod
    def _uniform(rng, n: int) -> np.ndarray:
        lo, hi = math.sin(math.radians(-60)), math.sin(math.radians(75))
        lat = np.degrees(np.arcsin(rng.uniform(lo, hi, n)))
        return np.stack([lat, rng.uniform(-180, 180, n)], 1)

    def coords(self, rng, n: int) -> np.ndarray:
        out = self._uniform(rng, n)
        city = rng.random(n) < self.city_share
        k = int(city.sum())
        c = rng.choice(len(self.centres), k, p=self.city_p)
        # a Gaussian spread of city_km around the centre (small-angle offsets in km -> degrees)
        d = rng.normal(0, 1, (k, 2)) * self.city_km[c, None] / 111.2
        lat = np.clip(self.centres[c, 0] + d[:, 0], -89.9, 89.9)
        lon = self.centres[c, 1] + d[:, 1] / np.cos(np.radians(lat))
        out[city] = np.stack([lat, (lon + 180) % 360 - 180], 1)
        return out

    def embed(self, rng, coords: np.ndarray) -> np.ndarray:
        lat, lon = np.radians(coords[:, 0]), np.radians(coords[:, 1])
        xyz = np.stack([np.cos(lat) * np.cos(lon), np.cos(lat) * np.sin(lon), np.sin(lat)], 1)
        feat = np.cos(xyz @ self.freq.T + self.phase).astype(np.float32)
        noise = rng.standard_normal((len(coords), self.dim), dtype=np.float32) * np.float32(self.noise / math.sqrt(self.dim))
        return feat @ self.proj + noise

    def rows(self, start: int, n: int) -> Tuple[np.ndarray, np.ndarray]:
        embs, crds = [], []
        for e, c in self.chunks(start, n):
            embs.append(e)
            crds.append(c)
        return np.concatenate(embs), np.concatenate(crds)

    def chunks(self, start: int, n: int) -> Iterator[Tuple[np.ndarray, np.ndarray]]:
        """Rows start..start+n, a block of BLOCK rows (each from its own seed) or part of one at a time."""
        end = start + n
        i = (start // BLOCK) * BLOCK
        while i < end:
            rng = np.random.default_rng([self.seed, 1, i // BLOCK])
            c = self.coords(rng, BLOCK)
            e = self.embed(rng, c)
            lo, hi = max(start, i) - i, min(end, i + BLOCK) - i
            yield e[lo:hi], c[lo:hi]
            i += BLOCK


__all__ = ["SyntheticGeo"]
