"""Training and inference over an on-disk store (issue 20): the same model as the in-memory path, the
gallery referenced (never copied), named errors for a store that moved or changed, DDP ranks reading
their own rows, and a CI-sized run of the scale benchmark."""

import json
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import locdiff_ext as ld
from locdiff_ext.data import EmbeddingDataset
from locdiff_ext.data.checkpoint import CheckpointError, latest_checkpoint, read_checkpoint
from locdiff_ext.data.index import GalleryIndex
from locdiff_ext.data.store import EmbeddingStore, write_store
from locdiff_ext.model.retrieval import Gallery, visible_neighbours
from locdiff_ext.train import Trainer, TrainConfig

from helpers import ddp_train_worker, random_coords, region_dataset, tiny_model

REPO = Path(__file__).resolve().parents[1]


def _as_store(data: EmbeddingDataset, path) -> EmbeddingStore:
    return write_store(path, [(data.embeddings, data.coords)], len(data), data.dim, "float32")


def test_visible_neighbours_equal_a_gallery_search_with_the_same_hold_out():
    g = torch.Generator().manual_seed(0)
    emb, coords = torch.randn(400, 8, generator=g), random_coords(400, seed=1, extras=False)
    gal = Gallery(8).set(emb, coords)
    q = F.normalize(emb[:50], dim=-1)
    centre, radius = coords[:50], torch.rand(50, generator=g, dtype=torch.float64) * 4000
    radius[:10] = 1e-3
    want_s, want_c = gal.search(q, 5, centre, radius)
    cand_s, cand_c = gal.search(q, 400)  # every entry a candidate: the same answer as the masked search
    got_s, got_c = visible_neighbours(cand_s, cand_c, 5, centre, radius)
    torch.testing.assert_close(got_s, want_s)
    torch.testing.assert_close(got_c, want_c, equal_nan=True)
    # too few candidates visible: the rest is missing (-inf, NaN), as for a gallery smaller than k
    few_s, few_c = visible_neighbours(cand_s[:, :6], cand_c[:, :6], 5, centre, torch.full((50,), 2e4))
    assert torch.isinf(few_s).all() and torch.isnan(few_c).all()


@pytest.mark.parametrize("k", [0, 3])
def test_a_store_trains_the_model_the_in_memory_path_trains(tmp_path, k):
    """Plain LocDiff: the same weights bit for bit (the same rows, normalised per batch either way).
    LocDiff-R: neighbour lists of every row (K' = N) give the neighbours the in-memory masked search gives,
    so the runs agree up to float rounding of the similarities."""
    data, _ = region_dataset(600, seed=5)
    store = _as_store(data, tmp_path / "store")
    cfg = TrainConfig(steps=12, batch_size=32, lr=1e-3, warmup_steps=2, eval_every=0, checkpoint_every=6)
    mem = Trainer(tiny_model(retrieval_k=k), data, tmp_path / "mem", cfg, progress=False)
    mem.fit()
    disk = Trainer(tiny_model(retrieval_k=k), store, tmp_path / "disk", cfg, progress=False,
                   neighbour_candidates=len(store))
    disk.fit()
    for key, v in mem.model.net.state_dict().items():
        w = disk.model.net.state_dict()[key]
        if k == 0:
            assert torch.equal(v, w), key
        else:
            torch.testing.assert_close(w, v, rtol=1e-4, atol=1e-5, msg=key)
    if k:
        assert disk.ema.gallery.store is not None and not list((tmp_path / "disk").glob("gallery-*"))
        assert (store.path / f"neighbours-{len(store)}.json").is_file()


def test_store_backed_models_reference_their_gallery_and_refuse_a_moved_or_changed_one(tmp_path):
    data, _ = region_dataset(800, seed=6)
    store = _as_store(data, tmp_path / "store")
    val = _as_store(region_dataset(100, seed=7)[0], tmp_path / "val")
    cfg = TrainConfig(steps=8, batch_size=32, eval_every=4, eval_size=50, eval_samples=2, eval_steps=2,
                      checkpoint_every=4)
    run = tmp_path / "run"
    Trainer(tiny_model(retrieval_k=3), store, run, cfg, val, progress=False).fit()
    plain = tmp_path / "plain"
    Trainer(tiny_model(), store, plain, cfg, val, progress=False).fit()
    size = lambda d: sum(p.stat().st_size for p in d.iterdir() if p.is_file())  # noqa: E731
    # step checkpoints: weights + optimizer (the retrieval net is a little wider), no gallery anywhere in the run
    assert size(latest_checkpoint(run)) < 1.5 * size(latest_checkpoint(plain))
    assert not list(run.glob("gallery-*"))
    ref = json.loads((run / "final" / "gallery.json").read_text())
    assert ref["store_sha256"] == store.header["content_sha256"] and ref["index"] == "exact"
    model = ld.LocDiff.from_pretrained(run / "final")
    step = ld.LocDiff.from_pretrained(latest_checkpoint(run))
    q = val.take(slice(0, 4)).embeddings
    torch.testing.assert_close(model.predict(q, seed=1)[0], step.predict(q, seed=1)[0])
    # a self-contained copy for sharing loads without the original store
    model.save_pretrained(tmp_path / "share", copy_gallery=True)
    shutil.move(str(store.path), str(tmp_path / "moved"))
    with pytest.raises(CheckpointError, match="references its retrieval gallery.*cannot be opened.*copy_gallery"):
        ld.LocDiff.from_pretrained(run / "final")
    shared = ld.LocDiff.from_pretrained(tmp_path / "share")
    torch.testing.assert_close(shared.predict(q, seed=1)[0], step.predict(q, seed=1)[0])
    # another store at the old path: refused by content hash
    _as_store(region_dataset(800, seed=8)[0], tmp_path / "store")
    with pytest.raises(CheckpointError, match="holds other data"):
        ld.LocDiff.from_pretrained(run / "final")
    # and resuming the run over it: refused as other training data
    cfg2 = TrainConfig(**{**cfg.__dict__, "steps": 12})
    with pytest.raises(CheckpointError, match="training data"):
        Trainer(tiny_model(retrieval_k=3), EmbeddingStore(tmp_path / "store"), run, cfg2, val, progress=False).fit()


def test_a_retrieval_model_needs_a_whole_store_and_a_faiss_index_is_used_when_saved(tmp_path):
    pytest.importorskip("faiss", reason="faiss-cpu is not installed (pip install faiss-cpu)")
    data, _ = region_dataset(3000, seed=9)
    store = _as_store(data, tmp_path / "store")
    with pytest.raises(ValueError, match="whole store"):
        Trainer(tiny_model(retrieval_k=3), store, tmp_path / "run", TrainConfig(steps=2, batch_size=32), progress=False)
    attached = tiny_model(retrieval_k=3).set_gallery(GalleryIndex(store, "exact"))
    with pytest.raises(ValueError, match="must be that same"):
        Trainer(attached, data, tmp_path / "run", TrainConfig(steps=2, batch_size=32, eval_every=0), progress=False)
    GalleryIndex.build(store, "IVF16,SQ8", nprobe=8, progress=False).save()
    cfg = TrainConfig(steps=4, batch_size=32, eval_every=0)
    trainer = Trainer(tiny_model(retrieval_k=3), store, tmp_path / "run", cfg, progress=False, neighbour_candidates=16)
    trainer.fit()
    assert json.loads((store.path / "neighbours-16.json").read_text())["index"] == "IVF16,SQ8"
    model = ld.LocDiff.from_pretrained(tmp_path / "run" / "final")
    assert model.gallery.index.kind == "IVF16,SQ8"
    # an index rebuilt with other settings after the model was saved: named
    GalleryIndex.build(store, "IVF32,SQ8", progress=False).save()
    with pytest.raises(CheckpointError, match="the model was saved with 'IVF16,SQ8'"):
        ld.LocDiff.from_pretrained(tmp_path / "run" / "final")


def test_ddp_ranks_read_their_own_rows_of_one_store(tmp_path, monkeypatch):
    """2 gloo processes over one store, LocDiff-R (rank 0 builds the neighbour lists, rank 1 opens them):
    each rank read only its half of every global batch, and the weights equal the 1-process run's up to
    float summation order (the hold-out regions are drawn for the global batch, each rank taking its rows)."""
    import torch.multiprocessing as mp

    monkeypatch.chdir(tmp_path)
    data, _ = region_dataset(512, seed=4)
    store = _as_store(data, tmp_path / "store")
    steps = 10
    cfg = TrainConfig(steps=steps, batch_size=32, lr=1e-3, warmup_steps=5, eval_every=0, checkpoint_every=10)
    single = Trainer(tiny_model(retrieval_k=2), store, tmp_path / "single", cfg, progress=False)
    single.fit()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(ddp_train_worker, args=(2, port, str(tmp_path), steps, str(store.path)), nprocs=2,
                       join=True, start_method="spawn")
    ddp = read_checkpoint(tmp_path / "rank0" / f"step_{steps:08d}")[0]["train_model"]
    assert ddp.keys() == {k for k in single.model.state_dict() if not k.startswith("gallery.")}
    for k, v in ddp.items():
        torch.testing.assert_close(v, single.model.state_dict()[k], rtol=1e-4, atol=1e-5, msg=k)
    assert not (tmp_path / "rank1").exists() or not any((tmp_path / "rank1").iterdir())
    reads = [json.loads((tmp_path / f"rows{r}.json").read_text()) for r in range(2)]
    for s in range(steps):
        batch = single.global_batch(s).tolist()
        assert reads[0][s] == batch[0::2] and reads[1][s] == batch[1::2]


@pytest.mark.slow
def test_the_scale_benchmark_runs_at_ci_size(tmp_path):
    """The scale benchmark's pipeline at CI size (200k rows, a FAISS index, both variants, geolocate): runs
    end to end; figures are printed, never asserted (BENCHMARKS.md holds the measured ones)."""
    pytest.importorskip("faiss", reason="faiss-cpu is not installed (pip install faiss-cpu)")
    res = subprocess.run([sys.executable, str(REPO / "benchmarks" / "scale.py"), "--rows", "200000", "--dim", "32",
                          "--small", "--steps", "6", "--queries", "64", "--index", "IVF256,SQ8", "--lists-k", "16",
                          "--dir", str(tmp_path)], capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    phases = {json.loads(line)["phase"]: json.loads(line) for line in res.stdout.splitlines() if line.startswith("{")}
    assert set(phases) == {"store", "index", "plain", "retrieval", "geolocate"}
    assert phases["index"]["kind"] == "IVF256,SQ8" and phases["geolocate"]["index"] == "IVF256,SQ8"
    # no step checkpoint carries the gallery (12.8 MB here): EMA + raw weights + AdamW's two moments, ~4x the model
    for variant in ("plain", "retrieval"):
        assert phases[variant]["step_checkpoint_mb"] < 4.5 * phases[variant]["final_mb"]
    print(res.stdout)
