"""Similarity search over a store's embeddings (cosine), and the training rows' neighbour lists.

Why two kinds of search: exact search reads the whole gallery for every batch of queries, which is right
for a small gallery (no index to build, no recall lost) but costs O(N) per query: ~1 s for 64 queries
against MP16's 4.7M x 768.  Above ``EXACT_MAX_CELLS`` (rows x dim) ``GalleryIndex.build`` makes a FAISS
index instead (``pip install faiss-cpu``, or faiss-gpu; FAISS is the gallery index of this field:
GeoCLIP-style galleries, Img2Loc): an inverted file of ~4 sqrt(N) lists with 8-bit scalar quantisation of
all dimensions (one byte a dimension: 3.8 GB at 5M x 768), whose candidates are then re-ranked with the
exact similarities of the store's own rows, so that the similarities a model sees are exact whichever
search found them.  Why no PCA before it: keeping 256 of 768 dimensions cut the index to a third but lost
the ranking (recall@8 0.92 at 5M with 512 re-ranked candidates; without PCA 0.99 at 1M with 64), and the
saved index is opened memory-mapped (file-backed pages the kernel can drop, not the process's memory).
Its recall@k against exact search is measured by ``recall_at_k`` (BENCHMARKS.md).

Why neighbour lists: a retrieval-conditioned LocDiff is trained with part of the gallery hidden around
each sample (``locdiff_ext.model.retrieval.sample_holdout``), so a training step needs each sample's top
neighbours *outside* a region.  Searching the gallery at every step would make a step's cost grow with N;
instead ``NeighbourLists.build`` searches once for every row's top ``K'`` (resumable, with progress) and
stores them beside the data, and a step reads its rows' lists and drops the hidden entries: O(batch x K')
whatever N.  Where a hold-out region hides so many of the ``K'`` that fewer than ``k`` stay visible, the
missing neighbours are given to the network as missing (similarity -1), as for a gallery smaller than k;
``NeighbourLists.build`` reports how often that happens for the caps a model is trained with.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Optional, Tuple, Union

import numpy as np
import torch
from torch import Tensor

from ..kernels.geometry import EARTH_RADIUS_KM
from .store import EmbeddingStore, StoreError

PathLike = Union[str, os.PathLike]
EXACT_MAX_CELLS = 200_000 * 768   # rows x dim up to which exact search is the default (~30 ms for 64 queries)
REFINE = 128  # candidates re-ranked exactly per query (IVF + SQ8 ranks well: 64 and 512 gave the same recall at 1M)
INDEX_FORMAT = "locdiff-index/1"
LISTS_FORMAT = "locdiff-neighbours/1"


def _rows_tensor(store: EmbeddingStore) -> Tensor:
    """The store's embeddings as a (read-only, memory-mapped) torch tensor: torch's gathers are multi-threaded
    copies, NumPy's fancy indexing of a memmap is not."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "the given NumPy array is not writable": it is only read
        return torch.from_numpy(store.embeddings)


def _unit(x: Tensor) -> Tensor:
    x = x.float()
    return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def exact_search(store: EmbeddingStore, queries: Tensor, k: int, chunk: int = 65536,
                 rows: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """The ``k`` most cosine-similar rows of the whole store for unit ``queries`` [B, D]: (similarities
    [B, k] float32, row indices [B, k] int64), best first; -inf / -1 past the store's size.  Reads the
    store ``chunk`` rows at a time (float32 copies of one chunk at most), or searches ``rows``, the store's
    rows already unit float32 (``GalleryIndex`` keeps them for a small gallery)."""
    E = _rows_tensor(store) if rows is None else rows
    q = queries.float()
    n = E.shape[0]
    best_s = torch.full((q.shape[0], 0), -math.inf)
    best_i = torch.zeros((q.shape[0], 0), dtype=torch.int64)
    for i in range(0, n, chunk):
        s = q @ (_unit(E[i:i + chunk]) if rows is None else E[i:i + chunk]).T
        v, j = s.topk(min(k, s.shape[1]), dim=-1)
        best_s, order = torch.cat([best_s, v], 1).topk(min(k, best_s.shape[1] + v.shape[1]), dim=-1)
        best_i = torch.cat([best_i, j + i], 1).gather(1, order)
    return _pad(best_s, best_i, k)


def inverse_norms(store: EmbeddingStore, chunk: int = 65536) -> Tensor:
    """1 / |row| of every row of a whole store [N] float32, computed once and kept beside the data
    (``norms.npy``; a rebuilt store is a new directory, without it): re-ranking then scales dot products
    instead of normalising every gathered row."""
    path = store.path / "norms.npy"
    if path.is_file():
        try:
            a = np.load(path, mmap_mode="r")
            if a.shape == (len(store),) and a.dtype == np.float32:
                return torch.from_numpy(np.array(a))
        except (ValueError, OSError):
            pass
    E = _rows_tensor(store)
    inv = torch.cat([1.0 / E[i:i + chunk].float().norm(dim=-1).clamp_min(1e-12) for i in range(0, len(store), chunk)])
    tmp = path.with_name(".norms.npy.tmp")
    with open(tmp, "wb") as f:
        np.save(f, inv.numpy())
    os.replace(tmp, path)
    return inv


def rerank(store: EmbeddingStore, queries: Tensor, candidates: Tensor, k: int,
           inv_norms: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """Exact cosine similarities of each query to its ``candidates`` [B, R] (row indices, -1 = none), then the
    best ``k``: (similarities [B, k], rows [B, k]), -inf / -1 where fewer than k candidates.  ``inv_norms``:
    the rows' ``inverse_norms`` (else the gathered rows are normalised)."""
    E = _rows_tensor(store)
    ok = candidates >= 0
    flat = candidates.clamp_min(0).reshape(-1)
    rows = E[flat].reshape(*candidates.shape, -1).float()
    if inv_norms is None:
        s = torch.einsum("bd,brd->br", queries.float(), _unit(rows))
    else:
        s = torch.bmm(rows, queries.float()[:, :, None])[..., 0] * inv_norms[flat].reshape(candidates.shape)
    s = s.masked_fill(~ok, -math.inf)
    v, j = s.topk(min(k, s.shape[1]), dim=-1)
    return _pad(v, candidates.gather(1, j), k)


def _faiss():
    try:
        import faiss
    except ImportError:
        raise ImportError("a gallery this large needs FAISS for its index: pip install faiss-cpu (or faiss-gpu); "
                          "or pass kind='exact' (O(N) per query)") from None
    return faiss


class GalleryIndex:
    """Cosine search over a whole store: ``search(queries, k)`` -> (similarities, rows).  ``kind`` is
    'exact' or a FAISS factory string; build with ``build``, keep with ``save`` (beside the store, naming
    the store content it indexes) and reopen with ``load``, which refuses an index of other data."""

    def __init__(self, store: EmbeddingStore, kind: str = "exact", faiss_index=None, nprobe: int = 16,
                 refine: int = REFINE):
        if not store.is_whole:
            raise ValueError("a gallery index covers a whole store, not a view (subset/split) of one")
        self.store, self.kind, self.faiss_index = store, kind, faiss_index
        self.nprobe, self.refine = int(nprobe), int(refine)
        self._unit_rows: Optional[Tensor] = None  # an exact index's rows, unit float32, once searched
        self._inv_norms: Optional[Tensor] = None  # a FAISS index's re-ranking scales, once searched
        if faiss_index is not None:
            _faiss().extract_index_ivf(faiss_index).nprobe = self.nprobe

    def __len__(self) -> int:
        return len(self.store)

    def __deepcopy__(self, memo) -> "GalleryIndex":
        return self  # read-only and memory-mapped: a copied model (the Trainer's EMA) shares it

    @staticmethod
    def default_kind(store: EmbeddingStore) -> str:
        """'exact' for galleries up to EXACT_MAX_CELLS rows x dim, else IVF + SQ8 (module docstring)."""
        n, d = len(store), store.dim
        if n * d <= EXACT_MAX_CELLS:
            return "exact"
        nlist = int(2 ** round(math.log2(max(64.0, min(16384.0, 4 * math.sqrt(n))))))
        return f"IVF{nlist},SQ8"

    @classmethod
    def build(cls, store: EmbeddingStore, kind: Optional[str] = None, nprobe: int = 16, refine: int = REFINE,
              chunk: int = 65536, progress: bool = True, seed: int = 0) -> "GalleryIndex":
        """An index of ``store`` (``kind``: None = ``default_kind``, 'exact', or a FAISS factory string with
        an IVF stage, inner-product metric); FAISS indexes are trained on a random sample of rows."""
        from ..progress import Progress

        kind = kind or cls.default_kind(store)
        if kind == "exact":
            return cls(store, "exact", None, nprobe, refine)
        faiss = _faiss()
        index = faiss.index_factory(store.dim, kind, faiss.METRIC_INNER_PRODUCT)
        nlist = faiss.extract_index_ivf(index).nlist
        n = len(store)
        if n < 39 * nlist:
            raise ValueError(f"index kind {kind!r}: {n} rows are too few to train {nlist} lists (needs "
                             f">= {39 * nlist}); use kind='exact' or fewer lists")
        m = min(n, max(40 * nlist, 100_000))
        sample = np.sort(np.random.default_rng(seed).choice(n, m, replace=False))
        E = _rows_tensor(store)
        train = _unit(E[torch.from_numpy(sample)]).numpy()
        with Progress(n, f"index {kind}", "row", enabled=progress) as bar:
            index.train(train)
            del train
            for i in range(0, n, chunk):
                index.add(_unit(E[i:i + chunk]).numpy())
                bar.update(min(chunk, n - i))
        return cls(store, kind, index, nprobe, refine)

    # ------------------------------------------------------------------ search
    def search(self, queries: Tensor, k: int, refine: Optional[int] = None,
               nprobe: Optional[int] = None) -> Tuple[Tensor, Tensor]:
        """The ``k`` most similar rows of unit ``queries`` [B, D] (float32): (similarities [B, k] float32,
        rows [B, k] int64), best first, -inf / -1 past the gallery's size.  FAISS indexes return
        max(k, refine) candidates from ``nprobe`` inverted lists (default: the index's), re-ranked exactly
        (``rerank``)."""
        q = queries.detach().float().cpu().contiguous()
        if q.dim() != 2 or q.shape[1] != self.store.dim:
            raise ValueError(f"queries must be [B, {self.store.dim}], got {tuple(q.shape)}")
        if q.shape[0] == 0:
            return torch.zeros(0, k), torch.zeros(0, k, dtype=torch.int64)
        if self.faiss_index is None:
            if self._unit_rows is None and len(self.store) * self.store.dim <= EXACT_MAX_CELLS:
                # at most ~600 MB: converting and normalising the float16 rows at every call cost more than the search
                self._unit_rows = torch.cat([_unit(c) for c in _rows_tensor(self.store).split(65536)])
            return exact_search(self.store, q, k, rows=self._unit_rows)
        r = max(k, self.refine if refine is None else refine)
        params = _faiss().SearchParametersIVF(nprobe=nprobe or self.nprobe)
        _, cand = self.faiss_index.search(q.numpy(), r, params=params)
        if self._inv_norms is None:
            self._inv_norms = inverse_norms(self.store)
        return rerank(self.store, q, torch.from_numpy(cand), k, self._inv_norms)

    # ------------------------------------------------------------------ files
    def paths(self) -> Tuple[Path, Path]:
        return self.store.path / "index.json", self.store.path / "index.faiss"

    def save(self) -> Path:
        """Writes index.json (and index.faiss) beside the store's data; returns index.json's path."""
        meta_path, data_path = self.paths()
        meta = {"format": INDEX_FORMAT, "kind": self.kind, "rows": len(self.store), "dim": self.store.dim,
                "store_sha256": self.store.header["content_sha256"], "nprobe": self.nprobe, "refine": self.refine}
        if self.faiss_index is not None:
            tmp = data_path.with_name(f".{data_path.name}.tmp")
            _faiss().write_index(self.faiss_index, str(tmp))
            os.replace(tmp, data_path)
        tmp = meta_path.with_name(f".{meta_path.name}.tmp")
        tmp.write_text(json.dumps(meta, indent=1))
        os.replace(tmp, meta_path)
        return meta_path

    @classmethod
    def load(cls, store: EmbeddingStore) -> "GalleryIndex":
        """The index saved beside ``store``; StoreError if it indexes other data or is damaged."""
        meta_path, data_path = cls.paths(cls.__new__(cls)._with(store))
        if not meta_path.is_file():
            raise FileNotFoundError(f"no gallery index beside store {str(store.path)!r}: build one "
                                    "(`locdiff store index`)")
        try:
            meta = json.loads(meta_path.read_text())
            kind = meta["kind"]
        except (ValueError, KeyError, TypeError) as exc:
            raise StoreError(f"{str(meta_path)!r} is corrupt: {exc!r}") from None
        if (meta.get("format") != INDEX_FORMAT or meta.get("store_sha256") != store.header["content_sha256"]
                or meta.get("rows") != len(store) or meta.get("dim") != store.dim):
            raise StoreError(f"the gallery index {str(meta_path)!r} was built for other data ({meta.get('rows')} rows "
                             f"of width {meta.get('dim')}) than store {str(store.path)!r} now holds ({len(store)} x "
                             f"{store.dim}): rebuild it (`locdiff store index`)")
        if kind == "exact":
            return cls(store, "exact", None, meta.get("nprobe", 16), meta.get("refine", 512))
        faiss = _faiss()
        if not data_path.is_file():
            raise StoreError(f"gallery index file {str(data_path)!r} is missing: rebuild it (`locdiff store index`)")
        try:  # memory-mapped where this FAISS can (>= 1.11): the lists stay file-backed pages
            index = faiss.read_index(str(data_path), getattr(faiss, "IO_FLAG_MMAP_IFC", 0))
        except RuntimeError as exc:
            raise StoreError(f"gallery index file {str(data_path)!r} cannot be read: {str(exc).splitlines()[0]}") from None
        if index.ntotal != len(store) or index.d != store.dim:
            raise StoreError(f"gallery index file {str(data_path)!r} holds {index.ntotal} rows of width {index.d}, "
                             f"the store {len(store)} x {store.dim}: rebuild it (`locdiff store index`)")
        return cls(store, kind, index, meta.get("nprobe", 16), meta.get("refine", 512))

    def _with(self, store):
        self.store = store
        return self

    @classmethod
    def open_or_build(cls, store: EmbeddingStore, progress: bool = True) -> "GalleryIndex":
        """The saved index of ``store`` if there is one, else a new default one (saved)."""
        if not (store.path / "index.json").is_file():
            cls.build(store, progress=progress).save()
        return cls.load(store)  # opened from the file, memory-mapped, rather than the built one kept in memory


def recall_at_k(index: GalleryIndex, queries: Tensor, k: int, **search) -> float:
    """Mean share of the exact top-``k`` rows that ``index`` returns in its top ``k`` (1.0 for 'exact');
    ``search``: refine / nprobe other than the index's."""
    _, got = index.search(queries, k, **search)
    _, truth = exact_search(index.store, queries.float(), k)
    hits = [len(set(g.tolist()) & set(t.tolist()) - {-1}) / max(1, int((t >= 0).sum())) for g, t in zip(got, truth)]
    return float(np.mean(hits))


def _cells(index: GalleryIndex, cells: int) -> Tuple[list, Tensor, Tensor]:
    """The rows of each inverted list of a FAISS IVF index (sorted), per list the ``cells`` lists whose
    centroids are nearest its own (itself first), and the centroids."""
    faiss = _faiss()
    ivf = faiss.extract_index_ivf(index.faiss_index)
    inv = ivf.invlists
    members = []
    for i in range(ivf.nlist):
        size = inv.list_size(i)
        ids = faiss.rev_swig_ptr(inv.get_ids(i), size).copy() if size else np.zeros(0, np.int64)
        members.append(torch.from_numpy(np.sort(ids.astype(np.int64))))
    centroids = torch.from_numpy(ivf.quantizer.reconstruct_n(0, ivf.nlist))
    near = (centroids @ centroids.T).topk(min(cells, ivf.nlist), dim=-1).indices
    return members, near, centroids


def _far_cells(members: list, coords: np.ndarray, centroids: Tensor, near: Tensor, cos_far: float, count: int,
               sample: int = 8) -> Tensor:
    """Per cell, ``count`` further cells (none of its ``near`` ones) to draw far-list candidates from: the
    cells nearest in embedding space (cosine of the centroids) whose rows lie mostly (>= half of a
    ``sample`` x ``sample`` sample of row pairs) farther apart on Earth than acos(cos_far); where fewer
    qualify, those with the largest such share.  Why: where embedding follows location, the joined cells
    hold rows of one region only, and the far list (NeighbourLists) must still find the lookalikes
    elsewhere.  Every pair of cells is scored (nlist^2 x sample^2 dot products: seconds at 8192 cells)."""
    nlist = len(members)
    count = min(count, nlist - near.shape[1])
    if count <= 0:
        return torch.zeros(nlist, 0, dtype=torch.int64)
    pick = torch.zeros(nlist, sample, 3)
    valid = torch.zeros(nlist, sample)
    for c, ids in enumerate(members):
        if len(ids):
            take = ids[torch.linspace(0, len(ids) - 1, min(sample, len(ids))).long()]
            pick[c, :len(take)] = _xyz(coords[take.numpy()]).float()
            valid[c, :len(take)] = 1
    unit = torch.nn.functional.normalize(centroids.float(), dim=-1)
    flat, per = pick.reshape(-1, 3), valid.sum(1)
    out = []
    for lo in range(0, nlist, 64):
        c = torch.arange(lo, min(nlist, lo + 64))
        far = (torch.einsum("bix,nx->bin", pick[c], flat) < cos_far).float().reshape(len(c), sample, nlist, sample)
        pairs = per[c, None] * per[None, :]
        share = torch.einsum("bi,binj,nj->bn", valid[c], far, valid) / pairs.clamp_min(1)
        score = torch.where(share >= 0.5, 3 + unit[c] @ unit.T, share - 2)  # qualifying first, nearest first
        score[(pairs == 0) | torch.zeros_like(score, dtype=torch.bool).scatter_(1, near[c], True)] = -math.inf
        out.append(score.topk(count, dim=-1).indices)
    return torch.cat(out)


def recall_of_lists(lists: "NeighbourLists", rows: Tensor) -> float:
    """Mean share of each of ``rows``' exact top k rows (k = the lists' K') that its list holds."""
    q = _unit(_rows_tensor(lists.store)[rows])
    _, truth = exact_search(lists.store, q, lists.k)
    _, got = lists.take(rows)
    return float(np.mean([len(set(g.tolist()) & set(t.tolist())) / lists.k for g, t in zip(got, truth)]))


def _xyz(coords: np.ndarray) -> Tensor:
    """Unit vectors [n, 3] float64 of (lat, lon) degrees."""
    c = torch.from_numpy(np.asarray(coords, np.float64))
    lat, lon = torch.deg2rad(c[:, 0]), torch.deg2rad(c[:, 1])
    return torch.stack([lat.cos() * lon.cos(), lat.cos() * lon.sin(), lat.sin()], 1)


def _merge_topk(best: Tuple[Tensor, Tensor], s: Tensor, idx: Tensor, k: int) -> Tuple[Tensor, Tensor]:
    """The best ``k`` of a running (similarities, rows) and new candidates ``s`` with rows ``idx`` [B, m]."""
    v, j = torch.cat([best[0], s], 1), torch.cat([best[1], idx], 1)
    v, o = v.topk(min(k, v.shape[1]), dim=-1)
    return v, j.gather(1, o)


def _pad(v: Tensor, j: Tensor, k: int) -> Tuple[Tensor, Tensor]:
    if v.shape[1] < k:
        v = torch.nn.functional.pad(v, (0, k - v.shape[1]), value=-math.inf)
        j = torch.nn.functional.pad(j, (0, k - j.shape[1]), value=-1)
    return v, j.masked_fill(~torch.isfinite(v), -1)


class NeighbourLists:
    """Every row's gallery candidates among the rows of the same store, computed once (``build``) and
    memory-mapped: its top ``k`` rows (itself included: a hold-out hides it) and its top ``far`` rows
    farther than ``far_km`` from it.  ``take(rows)`` -> (similarities [B, k + far] float32, rows [B, k + far]
    int64): both lists merged, best first, a row in both counted once.

    Why the far list: the training hold-out hides a cap of radius up to R around each sample (R =
    retrieval_holdout_km), which in a dense collection (a city's photos) can hide every one of the top k; the
    rows beyond far_km = 2R lie outside any such cap, so with them every sample keeps at least ``far``
    visible candidates, the lookalikes elsewhere that an exhaustive masked search would find."""

    def __init__(self, store: EmbeddingStore, k: int):
        self.store, self.k = store, k
        meta = self._read_meta(store, k)
        if meta is None or not meta.get("complete"):
            raise StoreError(f"the neighbour lists of store {str(store.path)!r} for k = {k} are missing or "
                             "unfinished: build them (NeighbourLists.build, or let the Trainer do it)")
        self.meta, self.far, self.far_km = meta, int(meta["far"]), float(meta["far_km"])
        try:
            self.rows, self.sims, self.far_rows, self.far_sims = (np.load(p, mmap_mode="r") for p in self.paths(store, k))
        except (ValueError, OSError) as exc:
            raise StoreError(f"the neighbour lists beside {str(store.path)!r} cannot be read: {exc}") from None
        if not (self.rows.shape == self.sims.shape == (len(store), k)
                and self.far_rows.shape == self.far_sims.shape == (len(store), self.far)):
            raise StoreError(f"the neighbour lists beside {str(store.path)!r} do not match the store's {len(store)} rows")

    @staticmethod
    def paths(store: EmbeddingStore, k: int) -> Tuple[Path, Path, Path, Path]:
        stem = store.path / f"neighbours-{k}"
        return tuple(Path(f"{stem}.{name}.npy") for name in ("rows", "sims", "far_rows", "far_sims"))

    @staticmethod
    def _meta_path(store: EmbeddingStore, k: int) -> Path:
        return store.path / f"neighbours-{k}.json"

    @classmethod
    def _read_meta(cls, store: EmbeddingStore, k: int) -> Optional[dict]:
        p = cls._meta_path(store, k)
        if not p.is_file():
            return None
        try:
            meta = json.loads(p.read_text())
        except ValueError:
            return None
        if meta.get("format") != LISTS_FORMAT or "far" not in meta:  # (lists without a far list: a development version)
            raise StoreError(f"the neighbour lists {str(p)!r} are of another format ({meta.get('format')!r}, this "
                             f"version reads {LISTS_FORMAT!r}): delete neighbours-{k}.* there and build them again")
        if meta.get("store_sha256") != store.header["content_sha256"]:
            raise StoreError(f"the neighbour lists {str(p)!r} were computed for other data than store "
                             f"{str(store.path)!r} now holds: delete neighbours-{k}.* there and build them again")
        return meta

    @classmethod
    def build(cls, index: GalleryIndex, k: int = 64, far: int = 16, far_km: float = 2000.0, chunk: int = 4096,
              progress: bool = True, cells: int = 8, far_cells: int = 4) -> "NeighbourLists":
        """Every row's candidates (class docstring; exact similarities), written beside the store.
        Interrupted, a second call with the same store and k continues where the first stopped.

        With an exact index: every row against the whole store, ``chunk`` rows at a time.  With a FAISS (IVF)
        index, a self-join of its cells instead of one search per row: the rows of each inverted list are
        compared exactly with the rows of the ``cells`` lists nearest to it (itself included), so a row's
        candidates are the most similar rows of the cells around its own.  Why: per-row search and
        re-ranking of a 5M gallery gathers 5M x K' rows at random (hours on two cores); a cell's join reads
        each neighbouring cell once for all its rows (minutes).  ``recall_of_lists`` measures how many of
        the exact top k it finds.  The far list also draws on ``far_cells`` further cells per cell, those
        nearest in embedding space whose rows lie mostly beyond far_km (``_far_cells``)."""
        from ..progress import Progress

        store = index.store
        n = len(store)
        meta = cls._read_meta(store, k)
        if meta is not None and meta.get("complete"):
            return cls(store, k)
        by_cells = index.faiss_index is not None
        if meta is None:
            meta = {"format": LISTS_FORMAT, "k": k, "far": far, "far_km": far_km, "rows": n,
                    "store_sha256": store.header["content_sha256"], "index": index.kind,
                    "cells": cells if by_cells else None, "far_cells": far_cells if by_cells else None,
                    "done": 0, "complete": False}
            for path, width in zip(cls.paths(store, k), (k, k, far, far)):
                dtype = np.float32 if "sims" in path.name else (np.int32 if n < 2**31 else np.int64)
                np.lib.format.open_memmap(path, "w+", dtype, (n, width))
            cls._write_meta(store, k, meta)
        far, far_km = int(meta["far"]), float(meta["far_km"])
        out = [np.load(p, mmap_mode="r+") for p in cls.paths(store, k)]
        E, cos_far = _rows_tensor(store), math.cos(min(math.pi, far_km / EARTH_RADIUS_KM))
        if by_cells:
            members, near, centroids = _cells(index, cells)
            further = _far_cells(members, store.coords, centroids, near, cos_far, int(meta.get("far_cells") or 0))
            inv = inverse_norms(store)
            todo, unit = len(members), "cell"
        else:
            todo, unit = (n + chunk - 1) // chunk, "chunk"
        done = int(meta["done"])

        def write(mine: np.ndarray, s: Tensor, j: Tensor, fs: Tensor, fj: Tensor) -> None:
            for a, v in zip(out, (j, s, fj, fs)):
                a[mine] = v.numpy()

        with Progress(todo, f"neighbour lists (k = {k} + {far} beyond {far_km:g} km, {index.kind})", unit,
                      enabled=progress, initial=done) as bar:
            for c in range(done, todo):
                if by_cells:
                    mine = members[c]
                    if len(mine):
                        cand = torch.cat([members[j] for j in near[c]])
                        q = E[mine].float() * inv[mine, None]
                        sim = q @ (E[cand].float() * inv[cand, None]).T
                        best = _pad(*_merge_topk(_EMPTY(len(mine)), sim, cand.expand_as(sim), k), k)
                        extra = torch.cat([members[j] for j in further[c]] + [cand[:0]])
                        if len(extra):
                            sim = torch.cat([sim, q @ (E[extra].float() * inv[extra, None]).T], 1)
                            cand = torch.cat([cand, extra])
                        write(mine.numpy(), *best, *_pad(*_far_topk(sim, cand, store, mine, cos_far, far), far))
                else:
                    lo, hi = c * chunk, min(n, (c + 1) * chunk)
                    q, qx = _unit(E[lo:hi]), _xyz(store.coords[lo:hi])
                    best, best_far = _EMPTY(hi - lo), _EMPTY(hi - lo)
                    for i in range(0, n, 65536):
                        x = E[i:i + 65536]
                        sim = q @ _unit(x).T
                        idx = torch.arange(i, i + x.shape[0]).expand_as(sim)
                        best = _merge_topk(best, sim, idx, k)
                        close = qx @ _xyz(store.coords[i:i + x.shape[0]]).T >= cos_far
                        best_far = _merge_topk(best_far, sim.masked_fill(close, -math.inf), idx, far)
                    write(np.arange(lo, hi), *_pad(*best, k), *_pad(*best_far, far))
                if not by_cells or c % 16 == 15 or c == todo - 1:  # the progress that a restart keeps
                    for a in out:
                        a.flush()
                    meta["done"] = c + 1
                    cls._write_meta(store, k, meta)
                bar.update(1)
        meta["complete"] = True
        cls._write_meta(store, k, meta)
        del out
        return cls(store, k)

    @classmethod
    def _write_meta(cls, store: EmbeddingStore, k: int, meta: dict) -> None:
        p = cls._meta_path(store, k)
        tmp = p.with_name(f".{p.name}.tmp")
        tmp.write_text(json.dumps(meta, indent=1))
        os.replace(tmp, p)

    def take(self, index: Tensor) -> Tuple[Tensor, Tensor]:
        """The candidates of rows ``index`` [B]: both lists merged, best first (class docstring)."""
        i = index.cpu().numpy()
        s = torch.from_numpy(np.asarray(self.sims[i], np.float32))
        j = torch.from_numpy(np.asarray(self.rows[i], np.int64))
        fs = torch.from_numpy(np.asarray(self.far_sims[i], np.float32))
        fj = torch.from_numpy(np.asarray(self.far_rows[i], np.int64))
        fs = fs.masked_fill((fj[:, :, None] == j[:, None, :]).any(-1) | (fj < 0), -math.inf)  # counted once
        v, o = torch.cat([s, fs], 1).sort(dim=1, descending=True, stable=True)
        return v, torch.cat([j, fj], 1).gather(1, o).masked_fill(~torch.isfinite(v), -1)


def _EMPTY(b: int) -> Tuple[Tensor, Tensor]:
    return torch.zeros(b, 0), torch.zeros(b, 0, dtype=torch.int64)


def _far_topk(sim: Tensor, cand: Tensor, store: EmbeddingStore, mine: Tensor, cos_far: float,
              far: int) -> Tuple[Tensor, Tensor]:
    """The best ``far`` candidates of each row of ``mine`` that lie farther than the angle acos(cos_far)."""
    close = _xyz(store.coords[mine.numpy()]) @ _xyz(store.coords[cand.numpy()]).T >= cos_far
    v, j = sim.masked_fill(close, -math.inf).topk(min(far, sim.shape[1]), dim=-1)
    return v, cand[j]


__all__ = ["GalleryIndex", "NeighbourLists", "exact_search", "rerank", "inverse_norms", "recall_at_k", "recall_of_lists",
           "EXACT_MAX_CELLS"]
