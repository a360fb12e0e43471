"""Issue 22: LocDiff-R's learned query map (locdiff_ext.model.metric): it finds neighbours that the raw cosine
similarity misses, is fitted by the Trainer on the gallery alone, saved and loaded with the model, and refuses
what it cannot serve (a store's cosine neighbour lists, a model without a gallery, a bad config)."""

import pytest
import torch
from helpers import tiny_model

import locdiff_ext as ld
from locdiff_ext.data import EmbeddingDataset
from locdiff_ext.data.checkpoint import CheckpointError
from locdiff_ext.data.store import write_store
from locdiff_ext.kernels.geometry import latlon_to_xyz
from locdiff_ext.model import metric
from locdiff_ext.model.metric import QueryMap, fit_query_map
from locdiff_ext.selection import choose_knn_density
from locdiff_ext.train import TrainConfig, Trainer


def _noisy_rows(n, seed, dim=16):
    """Embeddings whose first 3 coordinates say where (the location's unit vector, scaled down) and whose
    other coordinates are loud noise: the raw cosine similarity ranks mostly by the noise."""
    g = torch.Generator().manual_seed(seed)
    lat = torch.rad2deg(torch.asin(torch.rand(n, generator=g, dtype=torch.float64) * 2 - 1))
    lon = torch.rand(n, generator=g, dtype=torch.float64) * 360 - 180
    coords = torch.stack([lat, lon], 1)
    emb = torch.cat([0.6 * latlon_to_xyz(coords).float(), torch.randn(n, dim - 3, generator=g)], 1)
    return emb, coords


def test_the_learned_map_finds_neighbours_the_cosine_misses():
    emb, coords = _noisy_rows(1500, seed=0)
    val_e, val_c = _noisy_rows(300, seed=1)
    W = fit_query_map(emb, coords, steps=300, candidates=64, batch_size=256, lr=1e-2, seed=0)
    assert W.shape == (16, 16) and torch.isfinite(W).all()
    assert torch.equal(W, fit_query_map(emb, coords, steps=300, candidates=64, batch_size=256, lr=1e-2, seed=0))
    qm = QueryMap(16)
    qm.weight.copy_(W)
    raw = choose_knn_density(emb, coords, val_e, val_c, L=8, ks=(4, 16), temperatures=(0.03, 0.1))
    learned = choose_knn_density(emb, coords, val_e, val_c, L=8, ks=(4, 16), temperatures=(0.03, 0.1), query_map=qm)
    assert learned["score"] > raw["score"] + 5  # mean % within 1 / 25 / 200 / 750 / 2500 km


def test_bad_inputs_are_named():
    emb, coords = _noisy_rows(50, seed=0)
    with pytest.raises(ValueError, match="coords"):
        fit_query_map(emb, coords[:40])
    with pytest.raises(ValueError, match="steps"):
        fit_query_map(emb, coords, steps=0)
    with pytest.raises(ValueError, match="at least 2"):
        fit_query_map(emb[:1], coords[:1])
    with pytest.raises(ValueError, match="retrieval_metric must be one of"):
        ld.LocDiffConfig(cond_dim=16, retrieval_k=4, retrieval_metric="euclid")
    with pytest.raises(ValueError, match="needs a gallery"):
        ld.LocDiffConfig(cond_dim=16, retrieval_metric="learned")


def test_the_trainer_fits_it_and_it_is_saved_with_the_model(tmp_path, monkeypatch):
    emb, coords = _noisy_rows(600, seed=0)
    model = tiny_model(cond_dim=16, L=6, widths=(32, 16), time_dim=16, retrieval_k=4, num_samples=2, sample_steps=2,
                       retrieval_metric="learned")
    assert not model.query_map.is_fitted
    cfg = TrainConfig(steps=3, batch_size=64, eval_every=0, checkpoint_every=0, seed=0, metric_steps=100)
    trainer = Trainer(model, EmbeddingDataset(emb, coords), tmp_path / "run", cfg, progress=False)
    trainer.fit()
    m = trainer.ema
    assert m.query_map.is_fitted and not torch.equal(m.query_map.weight, torch.eye(16))
    q = emb[:5]
    # the search goes through the map: its neighbours are not the raw cosine ones in general
    mapped = m.search_neighbours(q, 4)
    assert torch.equal(mapped[1], m.gallery.search(m.query_map(torch.nn.functional.normalize(q)), 4)[1])
    m.save_pretrained(tmp_path / "saved")
    back = ld.LocDiff.from_pretrained(tmp_path / "saved")
    assert back.config.retrieval_metric == "learned" and back.query_map.is_fitted
    torch.testing.assert_close(back.query_map.weight, m.query_map.weight)
    torch.testing.assert_close(back.predict(q, seed=1)[0], m.predict(q, seed=1)[0])
    # resuming from the step checkpoint keeps the fitted map, and does not fit it again
    def no_refit(*args, **kwargs):
        raise AssertionError("a resumed run fitted its query map again")

    monkeypatch.setattr(metric, "fit_query_map", no_refit)
    again = Trainer(tiny_model(cond_dim=16, L=6, widths=(32, 16), time_dim=16, retrieval_k=4, num_samples=2,
                               sample_steps=2, retrieval_metric="learned"), EmbeddingDataset(emb, coords),
                    tmp_path / "run", cfg, progress=False)
    again.fit()
    torch.testing.assert_close(again.ema.query_map.weight, m.query_map.weight)
    torch.testing.assert_close(again.model.query_map.weight, m.query_map.weight)


def test_weights_without_the_map_are_refused():
    """A config that says 'learned' over a cosine model's weights (the map missing) fails before loading."""
    model = tiny_model(cond_dim=16, L=6, widths=(32, 16), time_dim=16, retrieval_k=4)
    emb, coords = _noisy_rows(50, seed=0)
    model.set_gallery(emb, coords)
    cfg = ld.LocDiffConfig.from_dict(dict(model.config.to_dict(), retrieval_metric="learned"))
    with pytest.raises(CheckpointError, match="query_map"):
        ld.LocDiff.check_weights_match(cfg, model.persistent_state_dict(), "weights")


def test_a_store_gallery_refuses_the_learned_map(tmp_path):
    emb, coords = _noisy_rows(300, seed=0)
    store = write_store(tmp_path / "store", [(emb, coords)], len(emb), 16, "float32")
    model = tiny_model(cond_dim=16, L=6, widths=(32, 16), time_dim=16, retrieval_k=4, retrieval_metric="learned")
    cfg = TrainConfig(steps=2, batch_size=64, eval_every=0, checkpoint_every=0)
    with pytest.raises(ValueError, match="in-memory gallery"):
        Trainer(model, store, tmp_path / "run", cfg, progress=False)
