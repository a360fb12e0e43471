"""The on-disk embedding store: (embedding, location) rows that training, evaluation and the CLI read
memory-mapped, so that a dataset of MP16's size (4.7M x 768) never has to fit in memory twice.

A store is a directory of plain NumPy files, readable without this package:
- ``embeddings.npy`` [N, D] float16 or float32 (raw: the model normalises rows per batch);
- ``coords.npy`` [N, 2] float64 (lat, lon degrees, lon wrapped to [-180, 180));
- ``store.json``: format, rows, dim, dtype, and two fingerprints computed while writing: the SHA-256
  of every byte (``content_sha256``; re-checked only by ``verify()``: reading 7 GB at every start would
  cost a minute) and that of an evenly strided sample of at most 4096 rows (``sample_sha256``;
  re-checked at every open: a few MB of reads);
- files that searches over it write beside the data (``locdiff_ext.data.index``: FAISS indexes and
  the training rows' neighbour lists), each naming the store content it was computed from.

Writes are atomic (a temporary sibling directory, renamed into place once complete), and every chunk is
validated as it is written (finite embeddings within the dtype's range, valid coordinates), so a store
that opens holds only valid rows.  Opening checks the files' sizes, shapes and dtypes against the
header and the sampled fingerprint, so a truncated, replaced or edited store raises ``StoreError``
naming the file instead of feeding garbage to a run.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Dict, Iterable, Iterator, Optional, Tuple, Union

import numpy as np
import torch
from torch import Tensor

from ..checks import validate_coords, validate_embeddings

PathLike = Union[str, os.PathLike]
FORMAT = "locdiff-store/1"
HEADER = "store.json"
DTYPES = {"float16": np.float16, "float32": np.float32}
SAMPLE_ROWS = 4096


class StoreError(ValueError):
    """A store directory is missing, incomplete, truncated, or does not match its header."""


def _sample_index(rows: int) -> np.ndarray:
    return np.arange(0, rows, max(1, rows // SAMPLE_ROWS))


def _sample_sha256(emb: np.ndarray, coords: np.ndarray) -> str:
    """SHA-256 of an evenly strided sample of rows: what an open re-checks cheaply."""
    i = _sample_index(emb.shape[0])
    h = hashlib.sha256()
    h.update(np.ascontiguousarray(emb[i]).tobytes())
    h.update(np.ascontiguousarray(coords[i]).tobytes())
    return h.hexdigest()


class StoreWriter:
    """Writes a store of ``rows`` x ``dim`` in chunks (``append``), then ``close()`` makes it visible.

    Used as a context manager; an exception inside leaves nothing behind at ``path``."""

    def __init__(self, path: PathLike, rows: int, dim: int, dtype: str = "float16", overwrite: bool = False):
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
        if not isinstance(rows, int) or rows < 1 or not isinstance(dim, int) or dim < 1:
            raise ValueError(f"a store needs rows >= 1 and dim >= 1, got rows={rows!r}, dim={dim!r}")
        self.path, self.rows, self.dim, self.dtype = Path(path), rows, dim, dtype
        if self.path.exists() and not overwrite:
            raise FileExistsError(f"store {str(self.path)!r} already exists (pass overwrite=True / --overwrite)")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._tmp = Path(tempfile.mkdtemp(prefix=f".{self.path.name}.tmp-", dir=self.path.parent))
        self._emb = np.lib.format.open_memmap(self._tmp / "embeddings.npy", "w+", DTYPES[dtype], (rows, dim))
        self._crd = np.lib.format.open_memmap(self._tmp / "coords.npy", "w+", np.float64, (rows, 2))
        self._h_emb, self._h_crd = hashlib.sha256(), hashlib.sha256()
        self.written = 0
        self._overwrite = overwrite

    def append(self, embeddings, coords) -> None:
        """Validates and writes the next rows (any float array / tensor [n, dim] and [n, 2])."""
        if isinstance(embeddings, np.ndarray) and not embeddings.flags.writeable:  # a memory-mapped source
            embeddings = np.array(embeddings)
        if isinstance(coords, np.ndarray) and not coords.flags.writeable:
            coords = np.array(coords)
        e = validate_embeddings(embeddings, f"embeddings (rows {self.written}..)", self.dim)
        c = validate_coords(coords, f"coords (rows {self.written}..)")
        n = e.shape[0]
        if c.shape[0] != n:
            raise ValueError(f"embeddings has {n} rows but coords has {c.shape[0]}")
        if self.written + n > self.rows:
            raise ValueError(f"the store was opened for {self.rows} rows; {self.written + n} were given")
        with np.errstate(over="ignore"):  # an overflow is reported below, naming the rows
            e = e.numpy().astype(DTYPES[self.dtype])
        if not np.isfinite(e).all():
            raise ValueError(f"embeddings (rows {self.written}..) exceed {self.dtype}'s range (|x| > "
                             f"{float(np.finfo(DTYPES[self.dtype]).max):g}): write the store with dtype='float32'")
        c = c.numpy()
        self._emb[self.written:self.written + n] = e
        self._crd[self.written:self.written + n] = c
        self._h_emb.update(np.ascontiguousarray(e).tobytes())
        self._h_crd.update(np.ascontiguousarray(c).tobytes())
        self.written += n
        self._release_written()

    def _release_written(self) -> None:
        """Writes the mapped pages written so far to the file and drops them from this process's resident set
        (they stay in the OS page cache): building a 7 GB store must not hold 7 GB of RSS."""
        import mmap

        for a in (self._emb, self._crd):
            a.flush()
            m = getattr(a, "_mmap", None)
            if m is not None and hasattr(m, "madvise") and hasattr(mmap, "MADV_DONTNEED"):
                m.madvise(mmap.MADV_DONTNEED)

    def close(self) -> "EmbeddingStore":
        if self.written != self.rows:
            self.abort()
            raise ValueError(f"the store was opened for {self.rows} rows but {self.written} were written")
        self._emb.flush()
        self._crd.flush()
        header = {"format": FORMAT, "rows": self.rows, "dim": self.dim, "dtype": self.dtype,
                  "content_sha256": hashlib.sha256((self._h_emb.hexdigest() + self._h_crd.hexdigest()).encode()).hexdigest(),
                  "sample_sha256": _sample_sha256(self._emb, self._crd)}
        del self._emb, self._crd
        (self._tmp / HEADER).write_text(json.dumps(header, indent=1))
        for p in self._tmp.iterdir():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
        os.chmod(self._tmp, 0o755)
        if self.path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{self.path.name}.old-", dir=self.path.parent))
            os.replace(self.path, old / "x")
            os.replace(self._tmp, self.path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(self._tmp, self.path)
        return EmbeddingStore(self.path)

    def abort(self) -> None:
        for name in ("_emb", "_crd"):
            if hasattr(self, name):
                delattr(self, name)
        shutil.rmtree(self._tmp, ignore_errors=True)

    def __enter__(self) -> "StoreWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()


def write_store(path: PathLike, chunks: Iterable[Tuple[Any, Any]], rows: int, dim: int, dtype: str = "float16",
                overwrite: bool = False, progress: bool = False) -> "EmbeddingStore":
    """Writes the (embeddings, coords) ``chunks`` (``rows`` in all) as a store at ``path``; returns it opened."""
    from ..progress import Progress

    with StoreWriter(path, rows, dim, dtype, overwrite) as w, Progress(rows, "store", "row", enabled=progress) as bar:
        for e, c in chunks:
            w.append(e, c)
            bar.update(len(c))
        return w.close()


class EmbeddingStore:
    """A store opened memory-mapped (module docstring).  ``embeddings`` [N, D] and ``coords`` [N, 2] are
    read-only NumPy memmaps; ``take(index)`` reads rows into an in-memory ``EmbeddingDataset`` (float32).

    ``rows_index`` (from ``split``/``subset``) makes a view of some rows of the store; searches over a
    store's data (indexes, neighbour lists) are defined for whole stores only."""

    def __init__(self, path: PathLike, rows_index: Optional[np.ndarray] = None, _header: Optional[dict] = None):
        self.path = Path(path)
        self.header = _header if _header is not None else self._read_header()
        self.embeddings, self.coords = self._map_files()
        if _header is None:
            if _sample_sha256(self.embeddings, self.coords) != self.header["sample_sha256"]:
                raise StoreError(f"store {str(self.path)!r}: its data changed after it was written (the sampled "
                                 "rows' SHA-256 differs from store.json): rebuild it (`locdiff store build`)")
        self.rows_index = None if rows_index is None else np.asarray(rows_index, dtype=np.int64)

    # ------------------------------------------------------------------ opening
    def _read_header(self) -> dict:
        hpath = self.path / HEADER
        if not self.path.is_dir():
            raise FileNotFoundError(f"store {str(self.path)!r} does not exist")
        if not hpath.is_file():
            raise StoreError(f"{str(self.path)!r} is not an embedding store: {HEADER} is missing (an unfinished "
                             "write leaves nothing at the final path; write it with `locdiff store build`)")
        try:
            h = json.loads(hpath.read_text())
            ok = (h.get("format") == FORMAT and isinstance(h.get("rows"), int) and h["rows"] >= 1
                  and isinstance(h.get("dim"), int) and h["dim"] >= 1 and h.get("dtype") in DTYPES
                  and all(isinstance(h.get(k), str) for k in ("content_sha256", "sample_sha256")))
        except (ValueError, AttributeError, RecursionError) as exc:
            raise StoreError(f"{str(hpath)!r} is not valid JSON: {exc}") from None
        if not ok:
            raise StoreError(f"{str(hpath)!r} is corrupt or of an unknown format (expected {FORMAT!r} with rows, "
                             "dim, dtype and fingerprints)")
        return h

    def _map_files(self) -> Tuple[np.ndarray, np.ndarray]:
        h = self.header
        out = []
        for name, dtype, shape in (("embeddings.npy", DTYPES[h["dtype"]], (h["rows"], h["dim"])),
                                   ("coords.npy", np.float64, (h["rows"], 2))):
            p = self.path / name
            if not p.is_file():
                raise StoreError(f"store file {str(p)!r} is missing")
            try:
                a = np.load(p, mmap_mode="r", allow_pickle=False)
            except (ValueError, OSError, EOFError) as exc:
                raise StoreError(f"store file {str(p)!r} cannot be read (truncated or not an .npy file: {exc})") from None
            if a.dtype != dtype or a.shape != shape:
                raise StoreError(f"store file {str(p)!r} holds {a.dtype} {a.shape} but {HEADER} says "
                                 f"{np.dtype(dtype)} {shape}")
            expected = a.offset + a.size * a.itemsize
            if p.stat().st_size != expected:
                raise StoreError(f"store file {str(p)!r} is {p.stat().st_size} bytes, expected {expected} "
                                 "(truncated or appended to)")
            out.append(a)
        return out[0], out[1]

    # ------------------------------------------------------------------ what it holds
    def __len__(self) -> int:
        return self.header["rows"] if self.rows_index is None else len(self.rows_index)

    @property
    def dim(self) -> int:
        return self.header["dim"]

    @property
    def dtype(self) -> str:
        return self.header["dtype"]

    @property
    def is_whole(self) -> bool:
        return self.rows_index is None

    def fingerprint(self) -> Dict[str, Any]:
        """Identifies the data a run trained on without re-reading it: the header's content hash (and the
        view's rows, hashed, for a view)."""
        fp = {"rows": len(self), "dim": self.dim, "store_sha256": self.header["content_sha256"]}
        if self.rows_index is not None:
            fp["rows_sha256"] = hashlib.sha256(self.rows_index.tobytes()).hexdigest()
        return fp

    def nbytes(self) -> int:
        """Bytes of the store's files on disk (data, header and what searches wrote beside them)."""
        return sum(p.stat().st_size for p in self.path.iterdir() if p.is_file())

    def _rows(self, index) -> np.ndarray:
        if isinstance(index, Tensor):
            index = index.cpu().numpy()
        if isinstance(index, slice):
            index = np.arange(len(self))[index]
        index = np.asarray(index, dtype=np.int64).reshape(-1)
        if index.size and (index.min() < 0 or index.max() >= len(self)):
            raise IndexError(f"row index out of range for a store of {len(self)} rows")
        return index if self.rows_index is None else self.rows_index[index]

    def take(self, index) -> "EmbeddingDataset":
        """Rows ``index`` (ints, a slice, a tensor) read into memory: an EmbeddingDataset (float32, float64),
        in the order given.  Reads only those rows (sorted reads, then reordered)."""
        from .datasets import EmbeddingDataset

        rows = self._rows(index)
        order = np.argsort(rows, kind="stable")
        emb = np.empty((rows.size, self.dim), np.float32)
        crd = np.empty((rows.size, 2), np.float64)
        emb[order] = self.embeddings[rows[order]]
        crd[order] = self.coords[rows[order]]
        return EmbeddingDataset.trusted(torch.from_numpy(emb), torch.from_numpy(crd))

    def chunks(self, size: int = 65536) -> Iterator["EmbeddingDataset"]:
        """The rows in order, ``size`` at a time, as in-memory EmbeddingDatasets."""
        for i in range(0, len(self), size):
            yield self.take(slice(i, min(i + size, len(self))))

    def subset(self, index) -> "EmbeddingStore":
        """A view of rows ``index`` (no data is read)."""
        return EmbeddingStore(self.path, self._rows(index), _header=self.header)._share(self)

    def _share(self, other: "EmbeddingStore") -> "EmbeddingStore":
        self.embeddings, self.coords = other.embeddings, other.coords
        return self

    def split(self, val_fraction: float, seed: int = 0) -> Tuple["EmbeddingStore", "EmbeddingStore"]:
        """Random (train, validation) views, as EmbeddingDataset.split draws them."""
        from .datasets import split_index

        train, val = split_index(len(self), val_fraction, seed)
        return self.subset(train), self.subset(val)

    def verify(self, chunk: int = 65536) -> None:
        """Re-reads every byte and compares with the header's content SHA-256 (StoreError if it differs)."""
        he, hc = hashlib.sha256(), hashlib.sha256()
        n = self.header["rows"]
        for i in range(0, n, chunk):
            he.update(np.ascontiguousarray(self.embeddings[i:i + chunk]).tobytes())
            hc.update(np.ascontiguousarray(self.coords[i:i + chunk]).tobytes())
        if hashlib.sha256((he.hexdigest() + hc.hexdigest()).encode()).hexdigest() != self.header["content_sha256"]:
            raise StoreError(f"store {str(self.path)!r}: its data changed after it was written (content SHA-256 "
                             "differs from store.json)")

    def __repr__(self) -> str:
        view = "" if self.rows_index is None else f", view of {len(self)} rows"
        return f"EmbeddingStore({str(self.path)!r}, rows={self.header['rows']}, dim={self.dim}, {self.dtype}{view})"


def is_store(path: PathLike) -> bool:
    return (Path(path) / HEADER).is_file()


def open_dataset(path: PathLike, coords: Optional[PathLike] = None):
    """An embedding store directory, opened memory-mapped (EmbeddingStore), or a data file of a format
    ``load_dataset`` reads, read into memory (EmbeddingDataset): what train, eval and the recipes accept."""
    from .datasets import load_dataset

    if is_store(path):
        if coords is not None:
            raise ValueError(f"{path} is a store, which holds its own coords: pass no coords")
        return EmbeddingStore(path)
    return load_dataset(path, coords)


def build_store(source: PathLike, out: PathLike, coords: Optional[PathLike] = None, dtype: str = "float16",
                chunk: int = 65536, overwrite: bool = False, progress: bool = True) -> EmbeddingStore:
    """A store from any file ``load_dataset`` reads (an ``.npy`` of embeddings with ``coords`` is read
    memory-mapped, chunk by chunk; the other formats are in-memory formats and are read whole once), or
    from an embedding cache directory (``encoders.embed_images``, read shard by shard, with ``coords`` the
    images' coordinates, an .npy file or an array: rows whose image failed are dropped)."""
    from .datasets import load_dataset

    source = Path(source)
    if source.is_dir():
        return _store_from_cache(source, out, coords, dtype, chunk, overwrite, progress)
    if source.suffix.lower() == ".npy":
        if coords is None:
            raise ValueError(f"{source}: an .npy file holds only embeddings; pass coords=<file.npy> too")
        try:
            emb = np.load(source, mmap_mode="r", allow_pickle=False)
            crd = np.load(Path(coords), mmap_mode="r", allow_pickle=False)
        except (ValueError, OSError, EOFError) as exc:
            raise ValueError(f"{source} or {coords} cannot be read: {exc}") from None
        if emb.ndim != 2 or crd.ndim != 2 or crd.shape[0] != emb.shape[0]:
            raise ValueError(f"embeddings {emb.shape} and coords {crd.shape} must be [N, D] and [N, 2]")
    else:
        data = load_dataset(source, coords)
        emb, crd = data.embeddings, data.coords
    n = emb.shape[0]
    return write_store(out, ((emb[i:i + chunk], crd[i:i + chunk]) for i in range(0, n, chunk)), n, int(emb.shape[1]),
                       dtype, overwrite, progress)


def _store_from_cache(cache: Path, out: PathLike, coords: Optional[PathLike], dtype: str, chunk: int,
                      overwrite: bool, progress: bool) -> EmbeddingStore:
    from safetensors import safe_open

    index = cache / "index.json"
    if not index.is_file():
        raise ValueError(f"{str(cache)!r} is neither a data file nor an embedding cache (no index.json)")
    if coords is None:
        raise ValueError("an embedding cache holds no coordinates: pass coords=<file.npy> of [N, 2] (lat, lon), "
                         "one row per image in the order the cache was built")
    meta = json.loads(index.read_text())
    if isinstance(coords, (str, os.PathLike)):
        crd = np.load(Path(coords), mmap_mode="r", allow_pickle=False)
    else:
        crd = np.asarray(coords.numpy() if isinstance(coords, Tensor) else coords)
    if crd.shape != (meta["num_images"], 2):
        raise ValueError(f"coords has shape {crd.shape} but the cache holds {meta['num_images']} images")
    shards = [cache / f"shard_{k:05d}.safetensors"
              for k in range((meta["num_images"] + meta["shard_size"] - 1) // meta["shard_size"])]
    missing = [s.name for s in shards if not s.is_file()]
    if missing:
        raise ValueError(f"embedding cache {str(cache)!r} is incomplete ({len(missing)} shards missing): finish it "
                         "with embed_images first")
    valid = []
    for s in shards:
        with safe_open(str(s), "np") as f:
            valid.append(f.get_tensor("valid").astype(bool))
    rows = int(sum(v.sum() for v in valid))

    def gen():
        start = 0
        for s, ok in zip(shards, valid):
            with safe_open(str(s), "np") as f:
                e = f.get_tensor("embeddings")
            yield e[ok], np.asarray(crd[start:start + len(ok)])[ok]
            start += len(ok)

    return write_store(out, gen(), rows, int(meta["dim"]), dtype, overwrite, progress)


__all__ = ["EmbeddingStore", "StoreWriter", "StoreError", "write_store", "build_store", "open_dataset", "is_store"]
