"""The on-disk embedding store: round trips, views, conversion, and every way a store can be damaged."""

import json

import numpy as np
import pytest
import torch

from locdiff_ext.data import EmbeddingDataset
from locdiff_ext.data.store import EmbeddingStore, StoreError, StoreWriter, build_store, write_store

from helpers import random_coords


def _rows(n, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g), random_coords(n, seed=seed, extras=False)


def _store(path, n=1000, d=8, dtype="float32", chunk=300):
    e, c = _rows(n, d)
    return write_store(path, ((e[i:i + chunk], c[i:i + chunk]) for i in range(0, n, chunk)), n, d, dtype), e, c


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_round_trip_take_in_any_order_and_chunks(tmp_path, dtype):
    store, e, c = _store(tmp_path / "s", dtype=dtype)
    assert len(store) == 1000 and store.dim == 8 and store.dtype == dtype
    assert isinstance(store.embeddings, np.memmap)
    idx = torch.tensor([999, 3, 500, 3, 0])
    part = store.take(idx)
    ref = e[idx].to(torch.float16).float() if dtype == "float16" else e[idx]
    assert part.embeddings.dtype == torch.float32 and torch.equal(part.embeddings, ref)
    assert torch.equal(part.coords, c[idx])
    got = torch.cat([p.coords for p in store.chunks(256)])
    assert torch.equal(got, c)
    store.verify()
    # views read through their rows; a view's fingerprint differs from the whole store's
    train, val = store.split(0.1, seed=0)
    assert len(train) == 900 and len(val) == 100
    assert torch.equal(val.take(slice(0, 5)).coords, c[val.rows_index[:5]])
    assert train.fingerprint() != store.fingerprint() and not train.is_whole


def test_store_and_in_memory_dataset_split_the_same_rows(tmp_path):
    store, e, c = _store(tmp_path / "s")
    _, val_mem = EmbeddingDataset(e, c).split(0.2, seed=3)
    _, val_store = store.split(0.2, seed=3)
    assert torch.equal(val_mem.coords, val_store.take(slice(None)).coords)


def test_build_from_every_source_format(tmp_path):
    e, c = _rows(500, 6)
    np.save(tmp_path / "e.npy", e.numpy())
    np.save(tmp_path / "c.npy", c.numpy())
    EmbeddingDataset(e, c).save(tmp_path / "d.npz")
    EmbeddingDataset(e, c).save(tmp_path / "d.safetensors")
    for src, crd in [("e.npy", "c.npy"), ("d.npz", None), ("d.safetensors", None)]:
        s = build_store(tmp_path / src, tmp_path / f"out-{src}", coords=crd and tmp_path / crd, dtype="float32",
                        chunk=128, progress=False)
        assert torch.equal(s.take(slice(None)).embeddings, e) and torch.equal(s.take(slice(None)).coords, c)
    with pytest.raises(FileExistsError, match="already exists"):
        build_store(tmp_path / "d.npz", tmp_path / "out-d.npz", progress=False)


def test_build_from_an_embedding_cache_drops_failed_images(tmp_path):
    from safetensors.torch import save_file

    cache = tmp_path / "cache"
    cache.mkdir()
    e, c = _rows(10, 4)
    (cache / "index.json").write_text(json.dumps({"num_images": 10, "shard_size": 6, "dim": 4}))
    valid = torch.ones(10, dtype=torch.uint8)
    valid[[2, 7]] = 0
    e[[2, 7]] = float("nan")
    save_file({"embeddings": e[:6].contiguous(), "valid": valid[:6].contiguous()}, str(cache / "shard_00000.safetensors"))
    save_file({"embeddings": e[6:].contiguous(), "valid": valid[6:].contiguous()}, str(cache / "shard_00001.safetensors"))
    np.save(tmp_path / "c.npy", c.numpy())
    s = build_store(cache, tmp_path / "s", coords=tmp_path / "c.npy", dtype="float32", progress=False)
    keep = valid.bool()
    assert len(s) == 8 and torch.equal(s.take(slice(None)).coords, c[keep])
    assert torch.equal(s.take(slice(None)).embeddings, e[keep])


def test_bad_rows_are_refused_chunk_by_chunk_and_leave_nothing(tmp_path):
    e, c = _rows(100, 4)
    bad = e.clone()
    bad[77, 1] = float("nan")
    with pytest.raises(ValueError, match=r"embeddings \(rows 50\.\.\) contains NaN"):
        write_store(tmp_path / "s", [(bad[:50], c[:50]), (bad[50:], c[50:])], 100, 4)
    assert not (tmp_path / "s").exists() and not list(tmp_path.iterdir())
    c2 = c.clone()
    c2[3, 0] = 91.0
    with pytest.raises(ValueError, match=r"coords \(rows 0\.\.\).*latitude"):
        write_store(tmp_path / "s", [(e, c2)], 100, 4)
    with pytest.raises(ValueError, match="float16's range.*float32"):
        write_store(tmp_path / "s", [(e * 1e6, c)], 100, 4, "float16")
    with pytest.raises(ValueError, match="opened for 100 rows but 50 were written"):
        write_store(tmp_path / "s", [(e[:50], c[:50])], 100, 4)
    with pytest.raises(ValueError, match="width 5"):
        write_store(tmp_path / "s", [(torch.randn(100, 5), c)], 100, 4)
    with pytest.raises(ValueError, match="dtype must be one of"):
        StoreWriter(tmp_path / "s", 100, 4, "int8")
    assert not list(tmp_path.iterdir())


def test_damaged_stores_raise_named_errors(tmp_path):
    store, e, c = _store(tmp_path / "s", n=10000)
    p = store.path
    del store
    emb = p / "embeddings.npy"
    raw = emb.read_bytes()

    emb.write_bytes(raw[:-100])  # truncated
    with pytest.raises(StoreError, match="embeddings.npy.*(truncated|cannot be read)"):
        EmbeddingStore(p)
    emb.write_bytes(raw + b"\0" * 32)  # appended to
    with pytest.raises(StoreError, match="bytes, expected .* appended"):
        EmbeddingStore(p)
    emb.write_bytes(raw)

    header = json.loads((p / "store.json").read_text())
    for change, pattern in [({"rows": 9999}, "says"), ({"dtype": "float16"}, "says"), ({"format": "x"}, "unknown format")]:
        (p / "store.json").write_text(json.dumps(dict(header, **change)))
        with pytest.raises(StoreError, match=pattern):
            EmbeddingStore(p)
    (p / "store.json").write_text("{not json")
    with pytest.raises(StoreError, match="not valid JSON"):
        EmbeddingStore(p)
    (p / "store.json").write_text(json.dumps(header))

    a = np.load(emb, mmap_mode="r+")  # a sampled row changed: found at open
    a[0, 0] += 1
    a.flush()
    del a
    with pytest.raises(StoreError, match="changed after it was written"):
        EmbeddingStore(p)
    emb.write_bytes(raw)
    a = np.load(emb, mmap_mode="r+")  # a row outside the sample: found by verify()
    a[1, 0] += 1
    a.flush()
    del a
    s = EmbeddingStore(p)
    with pytest.raises(StoreError, match="content SHA-256"):
        s.verify()
    (p / "store.json").unlink()
    with pytest.raises(StoreError, match="store.json is missing"):
        EmbeddingStore(p)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        EmbeddingStore(tmp_path / "nowhere")


def test_take_refuses_rows_out_of_range(tmp_path):
    store, _, _ = _store(tmp_path / "s", n=10)
    with pytest.raises(IndexError, match="out of range"):
        store.take([10])
    with pytest.raises(IndexError, match="out of range"):
        store.take(torch.tensor([-1]))
