"""(embedding, location) datasets: splits and the on-disk formats the CLI reads.

Formats (``load_dataset``):
- ``.npz`` with arrays ``embeddings`` [N, D] and ``coords`` [N, 2] (or ``lat`` and ``lon``);
- ``.safetensors`` with the same keys (tensors only: nothing is unpickled);
- ``.parquet`` with columns ``lat``, ``lon`` and either ``embedding`` (a list column) or
  ``emb_0 .. emb_{D-1}`` (needs pyarrow);
- ``.npy``: an embeddings file, with ``coords=`` another ``.npy`` of [N, 2] coordinates.
Image datasets (``read_image_csv``): the CSV layouts of MP16, Im2GPS3k, YFCC4k and GeoCLIP, with the
images in a folder or a .tar archive; embed them with ``locdiff_ext.encoders.embed_images``.
Coordinates are (lat, lon) degrees as everywhere in the package (design.md section 2).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Tuple, Union

import numpy as np
import torch
from torch import Tensor

from ..checks import validate_coords, validate_embeddings

PathLike = Union[str, os.PathLike]
TAR_SEPARATOR = "::"  # "archive.tar::member/path.jpg" names an image inside a tar archive


@dataclass
class EmbeddingDataset:
    """In-memory pairs: ``embeddings`` float32 [N, D], ``coords`` float64 [N, 2] (lat, lon)."""

    embeddings: Tensor
    coords: Tensor

    def __post_init__(self):
        self.embeddings = validate_embeddings(self.embeddings)
        self.coords = validate_coords(self.coords)
        if self.embeddings.shape[0] != self.coords.shape[0]:
            raise ValueError(f"embeddings has {self.embeddings.shape[0]} rows but coords has {self.coords.shape[0]}")

    def __len__(self) -> int:
        return self.coords.shape[0]

    @property
    def dim(self) -> int:
        return self.embeddings.shape[1]

    @classmethod
    def trusted(cls, embeddings: Tensor, coords: Tensor) -> "EmbeddingDataset":
        """Wraps float32 / float64 tensors that are already valid (rows read from a store, which validated
        them when it was written) without checking them again."""
        self = cls.__new__(cls)
        self.embeddings, self.coords = embeddings, coords
        return self

    def subset(self, index) -> "EmbeddingDataset":
        return EmbeddingDataset.trusted(self.embeddings[index], self.coords[index])

    def take(self, index) -> "EmbeddingDataset":
        """Rows ``index`` (as ``EmbeddingStore.take``: the one way the Trainer reads rows of either)."""
        if isinstance(index, Tensor):
            index = index.cpu()
        return self.subset(index)

    def chunks(self, size: int = 65536):
        """The rows in order, ``size`` at a time."""
        for i in range(0, len(self), size):
            yield self.subset(slice(i, i + size))

    def fingerprint(self) -> dict:
        """Rows, width and a SHA-256 of an evenly strided sample of at most ~4096 rows: cheap even for
        millions of rows, and enough to tell that a resumed run would train on other data."""
        stride = max(1, len(self) // 4096)
        h = hashlib.sha256()
        h.update(self.embeddings[::stride].contiguous().numpy().tobytes())
        h.update(self.coords[::stride].contiguous().numpy().tobytes())
        return {"rows": len(self), "dim": self.dim, "sample_sha256": h.hexdigest()}

    def split(self, val_fraction: float, seed: int = 0) -> Tuple["EmbeddingDataset", "EmbeddingDataset"]:
        """Random (train, validation) split; the validation part has round(N * val_fraction) rows."""
        train, val = split_index(len(self), val_fraction, seed)
        return self.subset(train), self.subset(val)

    def save(self, path: PathLike) -> Path:
        """Writes ``.npz`` or ``.safetensors`` (by suffix) with keys embeddings / coords."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.suffix == ".npz":
            np.savez(path, embeddings=self.embeddings.numpy(), coords=self.coords.numpy())
        elif path.suffix == ".safetensors":
            from safetensors.torch import save_file

            save_file({"embeddings": self.embeddings.contiguous(), "coords": self.coords.contiguous()}, str(path))
        else:
            raise ValueError(f"path: unsupported suffix {path.suffix!r} (use .npz or .safetensors)")
        return path


def split_index(n: int, val_fraction: float, seed: int = 0) -> Tuple[Tensor, Tensor]:
    """(train rows, validation rows) of a random split of ``n`` rows; round(n * val_fraction) validation rows."""
    if isinstance(val_fraction, bool) or not isinstance(val_fraction, (int, float)) or not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction!r}")
    n_val = max(1, int(round(n * val_fraction)))
    if n_val >= n:
        raise ValueError(f"the dataset has {n} rows: too few to split off a validation set")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return perm[n_val:], perm[:n_val]


def _from_arrays(arrays, path: Path) -> EmbeddingDataset:
    keys = set(arrays.keys())
    if "embeddings" not in keys:
        raise ValueError(f"{path}: no 'embeddings' array (found {sorted(keys)})")
    if "coords" in keys:
        coords = arrays["coords"]
    elif {"lat", "lon"} <= keys:
        coords = np.stack([np.asarray(arrays["lat"]), np.asarray(arrays["lon"])], 1)
    else:
        raise ValueError(f"{path}: needs a 'coords' array [N, 2] or 'lat' and 'lon' arrays (found {sorted(keys)})")
    return EmbeddingDataset(torch.as_tensor(np.asarray(arrays["embeddings"])), torch.as_tensor(np.asarray(coords)))


def _read_parquet(path: Path) -> EmbeddingDataset:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ImportError("reading .parquet needs pyarrow: pip install pyarrow") from None
    table = pq.read_table(path)
    cols = table.column_names
    if "lat" not in cols or "lon" not in cols:
        raise ValueError(f"{path}: needs 'lat' and 'lon' columns (found {cols[:10]})")
    if "embedding" in cols:
        emb = np.asarray(table.column("embedding").to_pylist(), dtype=np.float32)
    else:
        ecols = sorted((c for c in cols if c.startswith("emb_")), key=lambda c: int(c[4:]))
        if not ecols:
            raise ValueError(f"{path}: needs an 'embedding' list column or emb_0..emb_D columns")
        emb = np.stack([table.column(c).to_numpy() for c in ecols], 1).astype(np.float32)
    coords = np.stack([table.column("lat").to_numpy(), table.column("lon").to_numpy()], 1)
    return EmbeddingDataset(torch.as_tensor(emb), torch.as_tensor(coords))


def load_dataset(path: PathLike, coords: Optional[PathLike] = None) -> EmbeddingDataset:
    """Reads an (embeddings, coords) dataset from one of the formats of this module's docstring."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file {str(path)!r} does not exist")
    suffix = path.suffix.lower()
    try:
        if suffix == ".npy":
            if coords is None:
                raise ValueError(f"{path}: an .npy file holds only embeddings; pass coords=<file.npy> too")
            emb = np.load(path, allow_pickle=False)
            crd = np.load(Path(coords), allow_pickle=False)
            return EmbeddingDataset(torch.as_tensor(emb), torch.as_tensor(crd))
        if suffix == ".npz":
            with np.load(path, allow_pickle=False) as z:
                return _from_arrays({k: z[k] for k in z.files}, path)
        if suffix == ".safetensors":
            from safetensors.torch import load_file

            return _from_arrays(load_file(str(path)), path)
        if suffix == ".parquet":
            return _read_parquet(path)
    except (OSError, EOFError) as exc:
        raise ValueError(f"data file {str(path)!r} cannot be read: {exc}") from None
    except Exception as exc:  # safetensors and zip errors have no common base class
        if isinstance(exc, (ValueError, TypeError, ImportError)):
            raise
        raise ValueError(f"data file {str(path)!r} cannot be read: {exc}") from None
    raise ValueError(f"data file {str(path)!r}: unsupported format {suffix!r} (.npz, .npy, .safetensors, .parquet)")


def read_embeddings(path: PathLike) -> Tensor:
    """Query embeddings [N, D] float32 from an ``.npy`` file or the ``embeddings`` array of an ``.npz``
    (nothing is unpickled); missing, truncated or malformed files raise FileNotFoundError / ValueError
    naming the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"embeddings file {str(path)!r} does not exist")
    try:
        with open(path, "rb") as f:
            a = np.load(f, allow_pickle=False)
            if isinstance(a, np.lib.npyio.NpzFile):
                with a:
                    if "embeddings" not in a.files:
                        raise ValueError(f"{str(path)!r} has no 'embeddings' array (found {sorted(a.files)[:10]})")
                    a = a["embeddings"]
    except ValueError:
        raise
    except Exception as exc:  # zipfile.BadZipFile, EOFError, OSError, pickle refusals: no common base class
        raise ValueError(f"embeddings file {str(path)!r} cannot be read: {type(exc).__name__}: {exc}") from None
    return validate_embeddings(a, f"embeddings in {path}")


def read_image_csv(csv_path: PathLike, image_root: PathLike, check_files: bool = True) -> Tuple[List[str], Tensor, List[str]]:
    """The usual geolocation CSV layouts (MP16, Im2GPS3k, YFCC4k/26k, GeoCLIP's): an image column
    (IMG_FILE, IMG_ID, image, image_path, path, file or filename) and latitude / longitude columns
    (LAT/LON, lat/lon/lng, latitude/longitude), case-insensitive.  ``image_root`` is a folder or a
    .tar archive.  Returns (image references, coords [N, 2] float64, references of rows whose
    image is missing, which are dropped)."""
    import csv

    csv_path, root = Path(csv_path), Path(image_root)
    if not csv_path.is_file():
        raise FileNotFoundError(f"csv {str(csv_path)!r} does not exist")
    with open(csv_path, newline="") as f:
        reader = csv.DictReader(f)
        fields = {c.lower(): c for c in (reader.fieldnames or [])}

        def pick(names, what):
            for n in names:
                if n in fields:
                    return fields[n]
            raise ValueError(f"csv {str(csv_path)!r}: no {what} column (looked for {names}; found {list(fields.values())})")

        icol = pick(["img_file", "img_id", "image", "image_path", "path", "file", "filename"], "image")
        latc = pick(["lat", "latitude"], "latitude")
        lonc = pick(["lon", "lng", "long", "longitude"], "longitude")
        rows = [(r[icol], r[latc], r[lonc]) for r in reader]
    if not rows:
        raise ValueError(f"csv {str(csv_path)!r} has no rows")
    try:
        coords = validate_coords(torch.tensor([[float(a), float(b)] for _, a, b in rows], dtype=torch.float64),
                                 f"coordinates in {csv_path.name}")
    except ValueError as exc:
        raise ValueError(f"csv {str(csv_path)!r}: {exc}") from None
    if root.suffix == ".tar" or str(root).endswith((".tar.gz", ".tgz")):
        import tarfile

        if not root.is_file():
            raise FileNotFoundError(f"image archive {str(root)!r} does not exist")
        with tarfile.open(root) as tar:
            members = set(tar.getnames()) if check_files else None
        refs = [f"{root}{TAR_SEPARATOR}{name}" for name, _, _ in rows]
        present = [members is None or name in members for name, _, _ in rows]
    else:
        if not root.is_dir():
            raise FileNotFoundError(f"image folder {str(root)!r} does not exist")
        refs = [str(root / name) for name, _, _ in rows]
        present = [not check_files or os.path.isfile(r) for r in refs]
    keep = torch.tensor(present)
    missing = [r for r, ok in zip(refs, present) if not ok]
    return [r for r, ok in zip(refs, present) if ok], coords[keep], missing
