"""Retrieval-conditioned LocDiff (retrieval_k > 0): the gallery, its hold-out, features, training,
persistence and errors."""

import math

import pytest
import torch
import torch.nn.functional as F
from helpers import random_coords, tiny_model

import locdiff_ext as ld
from locdiff_ext.data import EmbeddingDataset
from locdiff_ext.kernels.geometry import great_circle_km
from locdiff_ext.model.retrieval import Gallery, KNNDensity, holdout_draws, neighbour_features, sample_holdout
from locdiff_ext.model.shdd import SHDDEncoder
from locdiff_ext.train import TrainConfig, Trainer


def _gallery(n=300, dim=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    emb = torch.randn(n, dim, generator=g)
    coords = random_coords(n, seed=seed, extras=False)
    return Gallery(dim).set(emb, coords), emb, coords


def test_search_returns_the_most_similar_entries_best_first():
    gal, emb, coords = _gallery()
    q = F.normalize(emb[:5] + 0.01 * torch.randn(5, 8), dim=-1)
    sims, nb = gal.search(q, 4)
    assert sims.shape == (5, 4) and nb.shape == (5, 4, 2) and nb.dtype == torch.float64
    assert bool((sims[:, :-1] >= sims[:, 1:]).all())
    ref = (q @ F.normalize(emb, dim=-1).T).topk(4, dim=-1)
    torch.testing.assert_close(sims, ref.values)
    torch.testing.assert_close(nb, coords[ref.indices].float().double())


def test_holdout_hides_everything_within_the_radius_and_pads_when_too_few_remain():
    gal, emb, coords = _gallery()
    q = F.normalize(emb[:20], dim=-1)
    radius = torch.full((20,), 3000.0)
    sims, nb = gal.search(q, 6, coords[:20], radius)
    d = great_circle_km(nb, coords[:20, None, :].expand(-1, 6, -1))
    assert bool((d > 3000.0).all())
    # the sample itself (similarity 1) is hidden even with the smallest radius
    sims1, _ = gal.search(q, 1, coords[:20], torch.full((20,), 1e-3))
    assert bool((sims1[:, 0] < 0.999).all())
    # a radius covering the sphere leaves nothing: -inf similarities, NaN coords
    sims, nb = gal.search(q[:2], 3, coords[:2], torch.full((2,), 25000.0))
    assert bool(torch.isinf(sims).all()) and bool(torch.isnan(nb).all())
    # k larger than the gallery pads
    small = Gallery(8).set(emb[:3], coords[:3])
    sims, nb = small.search(q[:2], 5)
    assert bool(torch.isfinite(sims[:, :3]).all()) and bool(torch.isinf(sims[:, 3:]).all())


def test_holdout_regions_mix_both_regimes_and_always_contain_the_sample():
    torch.manual_seed(0)
    n = 4000
    coords = torch.stack([torch.rand(n) * 170 - 85, torch.rand(n) * 360 - 180], -1).double()
    coords[:5] = torch.tensor([[90.0, 0.0], [-90.0, 10.0], [0.0, 180.0], [0.0, -180.0], [89.99, 45.0]])  # poles, dateline
    centre, r = sample_holdout(coords, 1000.0)
    assert centre.shape == (n, 2) and r.shape == (n,) and bool(torch.isfinite(centre).all())
    local = r == 1e-3
    assert 0.4 < float(local.float().mean()) < 0.6
    assert torch.equal(centre[local], coords[local])  # seen-place rows: only the sample itself is hidden
    far = ~local
    assert float(r[far].min()) >= 100.0 and float(r[far].max()) <= 1000.0
    assert float(r[far].mean()) == pytest.approx(550, rel=0.1)
    d = great_circle_km(centre[far], coords[far])
    assert bool((d <= r[far] + 1e-6).all())  # the sample lies inside its hidden cap ...
    assert float(((d / r[far]) ** 2).mean()) == pytest.approx(0.5, abs=0.05)  # ... uniformly over its area
    assert float((d / r[far]).max()) > 0.95 and float((d / r[far]).min()) < 0.05  # at its edge, or deep inside
    # given draws (a trainer's, for the global batch): the same regions from the same numbers, row by row
    draws = holdout_draws(n, torch.Generator().manual_seed(1))
    whole = sample_holdout(coords, 1000.0, draws)
    half = sample_holdout(coords[1::2], 1000.0, draws[1::2])
    assert torch.equal(whole[0][1::2], half[0]) and torch.equal(whole[1][1::2], half[1])
    with pytest.raises(ValueError, match="draws"):
        sample_holdout(coords, 1000.0, draws[:3])


def test_neighbour_features_prior_is_the_best_neighbour_and_a_weighted_density():
    enc = SHDDEncoder(6)
    coords = torch.tensor([[[10.0, 20.0], [-30.0, 40.0], [float("nan"), float("nan")]]], dtype=torch.float64)
    sims = torch.tensor([[0.9, 0.8, float("-inf")]])
    feats, prior = neighbour_features(sims, coords, enc, temperature=0.1)
    K = enc.dim
    assert prior.shape == (1, 2 * K)
    torch.testing.assert_close(feats, torch.tensor([[0.9, 0.8, -1.0]]))
    x = enc(coords[0, :2]).float()
    torch.testing.assert_close(prior[0, :K], x[0])
    w = torch.softmax(torch.tensor([0.9, 0.8]) / 0.1, 0)
    torch.testing.assert_close(prior[0, K:], w[0] * x[0] + w[1] * x[1])


def test_retrieval_model_locates_seen_places_a_plain_model_cannot_memorise(tmp_path):
    """300 places with unrelated random embeddings, two shots each (a few km apart): a plain tiny
    model cannot memorise them in 400 steps, the retrieval-conditioned one learns to use the
    gallery; queries are third shots of 100 of the places."""
    g = torch.Generator().manual_seed(0)
    n, dim = 300, 16
    place = torch.randn(n, dim, generator=g)
    where = random_coords(n, seed=3, extras=False)
    where[:, 0] = where[:, 0].clamp(-80, 80)
    shots = lambda m: place[:m] + 0.2 * torch.randn(m, dim, generator=g)  # noqa: E731
    emb = torch.cat([shots(n), shots(n)])
    coords = torch.cat([where, where + 0.05 * torch.randn(n, 2, generator=g, dtype=torch.float64)])
    queries = shots(100)
    cfg = TrainConfig(steps=400, batch_size=64, lr=3e-3, warmup_steps=20, eval_every=0, checkpoint_every=0, seed=0)
    errs = {}
    for k in (0, 4):
        model = tiny_model(cond_dim=dim, L=8, widths=(128, 64), time_dim=32, retrieval_k=k, cond_drop_prob=0.0)
        trainer = Trainer(model, EmbeddingDataset(emb, coords), tmp_path / f"k{k}", cfg, progress=False, device="cpu")
        trainer.fit()
        pred, _, _ = trainer.ema.predict(queries, num_samples=4, steps=5)
        errs[k] = float(great_circle_km(pred[:, 0], where[:100]).median())
    lobe = math.pi / 9 * ld.EARTH_RADIUS_KM
    assert errs[4] < lobe / 2, errs
    assert errs[0] > 3 * errs[4], errs


def test_gallery_is_saved_with_the_model_and_errors_are_clear(tmp_path):
    model = tiny_model(cond_dim=8, retrieval_k=3)
    with pytest.raises(ValueError, match="gallery is empty"):
        model.predict(torch.randn(2, 8))
    with pytest.raises(ValueError, match="gallery coords"):
        model.set_gallery(torch.randn(4, 8), torch.tensor([[0.0, 0.0]] * 3 + [[95.0, 0.0]]))
    with pytest.raises(ValueError, match="gallery embeddings"):
        model.set_gallery(torch.randn(4, 7), torch.zeros(4, 2))
    with pytest.raises(ValueError, match="retrieval_k=0"):
        tiny_model(cond_dim=8).set_gallery(torch.randn(4, 8), torch.zeros(4, 2))
    with pytest.raises(ValueError, match="retrieval_k"):
        ld.LocDiffConfig(cond_dim=8, retrieval_k=-1)
    _, emb, coords = _gallery(50, dim=8)
    model.set_gallery(emb, coords)
    a = model.predict(emb[:4], seed=1)[0]
    path = model.save_pretrained(tmp_path / "m")
    loaded = ld.LocDiff.from_pretrained(path)
    assert len(loaded.gallery) == 50
    torch.testing.assert_close(loaded.predict(emb[:4], seed=1)[0], a)


def test_knn_density_finds_where_the_lookalikes_concentrate_and_gives_a_map():
    from locdiff_ext.evaluation import credible_region
    from locdiff_ext.kernels.geometry import great_circle_km

    g = torch.Generator().manual_seed(0)
    query = F.normalize(torch.randn(1, 16, generator=g), dim=-1)
    # 6 lookalikes near Paris, one more similar entry alone in Sydney, dissimilar ones elsewhere
    near = F.normalize(query + 0.05 * torch.randn(6, 16, generator=g), dim=-1)
    far = F.normalize(torch.randn(30, 16, generator=g), dim=-1)
    emb = torch.cat([query * 1.0, near, far])
    paris = torch.tensor([48.85, 2.35], dtype=torch.float64)
    coords = torch.cat([torch.tensor([[-33.87, 151.21]], dtype=torch.float64),
                        paris + 0.5 * torch.randn(6, 2, generator=g, dtype=torch.float64),
                        torch.stack([torch.rand(30, generator=g, dtype=torch.float64) * 120 - 60,
                                     torch.rand(30, generator=g, dtype=torch.float64) * 360 - 180], 1)])
    top1 = KNNDensity(emb, coords, k=1, L=32)
    assert great_circle_km(top1.predict(query)[0], coords[0]).item() < 50  # k=1: the single best entry
    dens = KNNDensity(emb, coords, k=8, temperature=0.1, L=32)
    assert great_circle_km(dens.predict(query)[0], paris).item() < 150  # the cluster outweighs the single best
    p = dens.prob_map(query, 90, 180)
    assert p.shape == (1, 90, 180) and torch.allclose(p.sum(), torch.tensor(1.0, dtype=p.dtype)) and (p >= 0).all()
    region = credible_region(p[0], 0.9)
    assert region.shape == (90, 180) and 0 < region.mean() < 0.2
    with pytest.raises(ValueError, match="k"):
        KNNDensity(emb, coords, k=0)
    with pytest.raises(ValueError, match="temperature"):
        KNNDensity(emb, coords, temperature=float("nan"))
    with pytest.raises(ValueError, match="emb"):
        dens.predict(torch.randn(2, 5))


def test_step_checkpoints_reference_one_gallery_per_run(tmp_path):
    """The trainer stores the gallery once per run (gallery-<content hash>/), never in a step checkpoint:
    step checkpoints stay weights + optimizer at any gallery size, load as models and resume with the
    gallery, and a missing or other gallery is a named error.  final/ stays self-contained."""
    import json
    import shutil

    from locdiff_ext.data import EmbeddingDataset
    from locdiff_ext.data.checkpoint import CheckpointError, latest_checkpoint, list_checkpoints
    from locdiff_ext.train import Trainer, TrainConfig

    _, emb, coords = _gallery(3000, dim=8)
    data = EmbeddingDataset(emb, coords)
    cfg = TrainConfig(steps=6, batch_size=32, eval_every=0, checkpoint_every=2, keep_last=2)
    Trainer(tiny_model(cond_dim=8, retrieval_k=3), data, tmp_path / "run", cfg, progress=False).fit()
    run = tmp_path / "run"
    shared = sorted(run.glob("gallery-*"))
    assert len(shared) == 1 and (shared[0] / "gallery.safetensors").stat().st_size > 3000 * 10 * 4
    steps = list_checkpoints(run)
    assert len(steps) == 2
    plain = tmp_path / "plain"  # the same run without retrieval: its checkpoints' size
    Trainer(tiny_model(cond_dim=8), data, plain, cfg, progress=False).fit()
    size = lambda d: sum(p.stat().st_size for p in d.iterdir())  # noqa: E731
    assert size(steps[-1]) < 1.5 * size(latest_checkpoint(plain))  # weights + optimizer only
    for p in steps:
        assert json.loads((p / "gallery_ref.json").read_text())["directory"] == shared[0].name
    m = ld.LocDiff.from_pretrained(steps[-1])
    final = ld.LocDiff.from_pretrained(run / "final")
    assert len(m.gallery) == len(final.gallery) == 3000
    torch.testing.assert_close(m.gallery.embeddings, final.gallery.embeddings)
    torch.testing.assert_close(m.predict(emb[:3], seed=0)[0], final.predict(emb[:3], seed=0)[0])
    # a run killed after step 4 resumes from its checkpoint, gallery included, to the same final model
    shutil.rmtree(run / "final")
    shutil.rmtree(steps[-1])
    Trainer(tiny_model(cond_dim=8, retrieval_k=3), data, run, cfg, progress=False).fit()
    assert sorted(run.glob("gallery-*")) == shared
    again = ld.LocDiff.from_pretrained(run / "final")
    for k, v in final.state_dict().items():
        torch.testing.assert_close(again.state_dict()[k], v, rtol=0, atol=0)
    # a step checkpoint copied without its run's gallery, and one beside another gallery: named errors
    lone = tmp_path / "lone" / steps[-1].name
    shutil.copytree(list_checkpoints(run)[-1], lone)
    with pytest.raises(CheckpointError, match="stores its gallery once for the whole run.*missing"):
        ld.LocDiff.from_pretrained(lone)
    shutil.copytree(shared[0], lone.parent / shared[0].name)
    ld.LocDiff.from_pretrained(lone)
    g = lone.parent / shared[0].name
    other = Trainer(tiny_model(cond_dim=8, retrieval_k=3), EmbeddingDataset(emb[:500], coords[:500]),
                    tmp_path / "other", TrainConfig(steps=2, batch_size=32, eval_every=0), progress=False)
    other.fit()
    shutil.rmtree(g)
    shutil.copytree(next((tmp_path / "other").glob("gallery-*")), g)
    with pytest.raises(CheckpointError, match="holds another gallery"):
        ld.LocDiff.from_pretrained(lone)
    # overwrite removes the run's gallery with its checkpoints
    Trainer(tiny_model(cond_dim=8), data, run, cfg, progress=False).fit(overwrite=True)
    assert not list(run.glob("gallery-*"))
