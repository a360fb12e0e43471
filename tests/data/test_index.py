"""Gallery search over a store: exact search, the FAISS index and its recall, neighbour lists (resumable),
and the errors of an index or lists that do not match their store."""

import json

import numpy as np
import pytest
import torch

from locdiff_ext.data.index import GalleryIndex, NeighbourLists, exact_search, recall_at_k, recall_of_lists
from locdiff_ext.data.store import StoreError, write_store
from locdiff_ext.datasets.synthetic import SyntheticGeo

faiss = pytest.importorskip("faiss", reason="faiss-cpu is not installed (pip install faiss-cpu)")


def _unit(x):
    x = torch.as_tensor(x).float()
    return x / x.norm(dim=-1, keepdim=True)


@pytest.fixture(scope="module")
def world():
    return SyntheticGeo(dim=32, seed=0)


@pytest.fixture(scope="module")
def store(world, tmp_path_factory):
    n = 20000
    return write_store(tmp_path_factory.mktemp("index") / "s", world.chunks(0, n), n, 32, "float16")


def test_exact_search_is_brute_force_across_chunks(store, world):
    q = _unit(world.rows(10**7, 50)[0])
    sims, rows = exact_search(store, q, 10, chunk=3000)
    full = q @ _unit(torch.from_numpy(np.asarray(store.embeddings, np.float32))).T
    v, j = full.topk(10)
    torch.testing.assert_close(sims, v)
    assert (rows == j).float().mean() > 0.99  # ties aside
    # past the gallery's size: -inf / -1
    s, r = exact_search(store, q[:2], len(store) + 3, chunk=7000)
    assert torch.isinf(s[:, -3:]).all() and (r[:, -3:] == -1).all() and (r[:, :-3] >= 0).all()


def test_faiss_index_recall_and_exact_similarities(store, world, tmp_path):
    index = GalleryIndex.build(store, "IVF64,SQ8", nprobe=32, progress=False)
    q = _unit(world.rows(10**7, 300)[0])
    assert recall_at_k(index, q, 8) >= 0.95
    sims, rows = index.search(q, 8)
    exact = (q[:, None, :] * _unit(torch.from_numpy(np.asarray(store.embeddings[rows.numpy()], np.float32)))).sum(-1)
    torch.testing.assert_close(sims, exact, rtol=0, atol=1e-5)  # re-ranked with the store's rows: exact values
    assert (sims[:, :-1] >= sims[:, 1:]).all()
    index.save()
    again = GalleryIndex.load(store)
    assert again.kind == "IVF64,SQ8" and torch.equal(again.search(q, 8)[1], rows)


def test_default_kind_is_exact_for_small_galleries_and_faiss_above():
    class S:
        def __init__(self, n, d):
            self.n, self.dim = n, d

        def __len__(self):
            return self.n

    assert GalleryIndex.default_kind(S(200_000, 768)) == "exact"
    assert GalleryIndex.default_kind(S(5_000_000, 768)) == "IVF8192,SQ8"
    assert GalleryIndex.default_kind(S(1_000_000, 768)) == "IVF4096,SQ8"


def test_neighbour_lists_are_each_rows_top_k_and_far_candidates_and_resume(store, monkeypatch):
    from locdiff_ext.kernels.geometry import great_circle_km

    index = GalleryIndex(store, "exact")
    real, calls = torch.Tensor.topk, {"n": 0}

    def flaky(self, *a, **kw):  # an interrupted build (in its third chunk), then a second call finishes it
        calls["n"] += 1
        if calls["n"] == 2 * 2 + 1:  # (near, far) per query chunk: the third chunk
            raise KeyboardInterrupt
        return real(self, *a, **kw)

    monkeypatch.setattr(torch.Tensor, "topk", flaky)
    with pytest.raises(KeyboardInterrupt):
        NeighbourLists.build(index, 12, far=4, far_km=2000.0, chunk=5000, progress=False)
    monkeypatch.setattr(torch.Tensor, "topk", real)
    meta = json.loads((store.path / "neighbours-12.json").read_text())
    assert meta["done"] == 2 and not meta["complete"]
    with pytest.raises(StoreError, match="missing or unfinished"):
        NeighbourLists(store, 12)
    lists = NeighbourLists.build(index, 12, far=4, far_km=2000.0, chunk=5000, progress=False)
    rows = torch.tensor([0, 4999, 5000, 19999])
    q = _unit(store.take(rows).embeddings)
    s_ref, n_ref = exact_search(store, q, 12)
    torch.testing.assert_close(torch.from_numpy(np.array(lists.sims[rows.numpy()])), s_ref)
    assert (torch.from_numpy(np.array(lists.rows[rows.numpy()]))[:, 0] == rows).all()  # itself first
    far = torch.from_numpy(np.array(lists.far_rows[rows.numpy()], np.int64))
    d = great_circle_km(store.take(far.reshape(-1)).coords.reshape(4, 4, 2), store.take(rows).coords[:, None, :].expand(4, 4, 2))
    assert (d > 2000).all()
    # merged: best first, each row once, 12 + 4 candidates less the far ones already among the 12
    sims, nb = lists.take(rows)
    assert sims.shape == (4, 16) and (sims[:, :-1] >= sims[:, 1:]).all()
    for r in nb:
        ok = r[r >= 0].tolist()
        assert len(ok) == len(set(ok)) >= 12


def test_neighbour_lists_of_a_faiss_index_join_neighbouring_cells(store, monkeypatch):
    """With an IVF index the lists come from a join of each cell with its nearest cells: exact similarities,
    most of each row's exact top k, and an interrupted build resumes to the same lists."""
    index = GalleryIndex.build(store, "IVF64,SQ8", progress=False)
    rows = torch.randperm(len(store), generator=torch.Generator().manual_seed(1))[:200]
    lists = NeighbourLists.build(index, 8, progress=False, cells=64)  # every cell: the exact lists
    assert recall_of_lists(lists, rows) >= 0.99
    for p in store.path.glob("neighbours-8.*"):
        p.unlink()
    few = NeighbourLists.build(index, 8, progress=False, cells=24)  # these noisy 32-d rows: ~0.8 (0.92 at 768-d)
    assert recall_of_lists(few, rows) >= 0.75
    sims, nb = few.take(rows)
    assert (nb[:, 0] == rows).all() and (sims[:, :-1] >= sims[:, 1:]).all()
    q = _unit(store.take(rows).embeddings)
    exact = (q[:, None, :] * _unit(torch.from_numpy(np.asarray(store.embeddings[nb.numpy()], np.float32)))).sum(-1)
    ok = nb >= 0
    torch.testing.assert_close(sims[ok], exact[ok], rtol=0, atol=1e-5)
    first = [a.copy() for a in (few.rows, few.sims, few.far_rows, few.far_sims)]
    real, calls = torch.Tensor.topk, {"n": 0}

    def flaky(self, *a, **kw):
        calls["n"] += 1
        if calls["n"] == 40:
            raise KeyboardInterrupt
        return real(self, *a, **kw)

    for p in store.path.glob("neighbours-8.*"):
        p.unlink()
    monkeypatch.setattr(torch.Tensor, "topk", flaky)
    with pytest.raises(KeyboardInterrupt):
        NeighbourLists.build(index, 8, progress=False, cells=24)
    monkeypatch.setattr(torch.Tensor, "topk", real)
    assert json.loads((store.path / "neighbours-8.json").read_text())["done"] == 16  # saved every 16 cells
    again = NeighbourLists.build(index, 8, progress=False, cells=24)
    assert all(np.array_equal(a, b) for a, b in zip((again.rows, again.sims, again.far_rows, again.far_sims), first))


def test_an_index_or_lists_of_other_data_are_refused(store, world, tmp_path):
    other = write_store(tmp_path / "other", world.chunks(0, 20000), 20000, 32, "float32")
    GalleryIndex.build(store, "IVF64,SQ8", progress=False).save()
    for name in ("index.json", "index.faiss"):
        (other.path / name).write_bytes((store.path / name).read_bytes())
    with pytest.raises(StoreError, match="built for other data"):
        GalleryIndex.load(other)
    NeighbourLists.build(GalleryIndex(store, "exact"), 4, progress=False)
    for p in store.path.glob("neighbours-4.*"):
        (other.path / p.name).write_bytes(p.read_bytes())
    with pytest.raises(StoreError, match="computed for other data"):
        NeighbourLists(other, 4)
    (other.path / "index.faiss").write_bytes(b"garbage")
    meta = json.loads((other.path / "index.json").read_text())
    (other.path / "index.json").write_text(json.dumps(dict(meta, store_sha256=other.header["content_sha256"])))
    with pytest.raises(StoreError, match="cannot be read"):
        GalleryIndex.load(other)
    with pytest.raises(ValueError, match="whole store"):
        GalleryIndex(store.subset([1, 2, 3]))
    with pytest.raises(ValueError, match="too few to train"):
        GalleryIndex.build(store, "IVF4096,SQ8", progress=False)


def test_far_lists_of_a_faiss_index_reach_beyond_the_joined_cells(tmp_path):
    """Where embedding follows location closely, the few joined cells hold rows of one region only: the far
    list then comes from further cells whose rows lie far on Earth (NeighbourLists.build's far_cells), so
    every row keeps its ``far`` candidates beyond far_km (at 5M rows the joined cells alone left all empty)."""
    from locdiff_ext.kernels.geometry import great_circle_km

    world, n = SyntheticGeo(dim=32, seed=0, noise=0.3), 20000
    store = write_store(tmp_path / "s", world.chunks(0, n), n, 32, "float16")
    exact = NeighbourLists.build(GalleryIndex(store, "exact"), 8, progress=False)
    exact_far = np.array(exact.far_rows)
    index = GalleryIndex.build(store, "IVF256,SQ8", progress=False)
    found = {}
    for far_cells in (0, 4):
        for p in store.path.glob("neighbours-8.*"):
            p.unlink()
        lists = NeighbourLists.build(index, 8, progress=False, cells=4, far_cells=far_cells)
        rows = np.array(lists.far_rows, np.int64)
        found[far_cells] = ((rows >= 0).mean(), np.mean([len(set(a) & set(b)) / 16 for a, b in zip(rows, exact_far)]))
    assert found[0][0] < 0.99 and found[4][0] == 1.0  # every row's 16 far candidates, only with the further cells
    assert found[4][1] > found[0][1] + 0.1  # and more of the exact far list
    assert lists.meta["far_cells"] == 4
    sample = torch.arange(0, n, 97)
    far = torch.from_numpy(rows[sample.numpy()])
    d = great_circle_km(store.take(far.reshape(-1)).coords.reshape(-1, 16, 2),
                        store.take(sample).coords[:, None, :].expand(-1, 16, 2))
    assert (d > 2000).all()
