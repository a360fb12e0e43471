"""Issue 22: LocDiff-R anchored on its prior (prior_weight), the public hybrid (LocDiff-H), and both chosen on
validation data (locdiff_ext.selection), saved with the model and used by predict / geolocate / the CLI."""

import math

import pytest
import torch
from helpers import tiny_model

import locdiff_ext as ld
from locdiff_ext.cli import main as cli
from locdiff_ext.data import EmbeddingDataset
from locdiff_ext.datasets.synthetic import SyntheticGeo
from locdiff_ext.kernels.geometry import great_circle_km
from locdiff_ext.model.retrieval import KNNDensity, snap_to_neighbours
from locdiff_ext.selection import choose_knn_density, tune_inference, validation_score
from locdiff_ext.train import TrainConfig, Trainer


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A small LocDiff-R on synthetic rows whose embedding carries the location; validation rows apart."""
    world = SyntheticGeo(32, seed=0)
    emb, coords = (torch.from_numpy(a) for a in world.rows(0, 3000))
    val = tuple(torch.from_numpy(a) for a in world.rows(10**6, 200))
    model = tiny_model(cond_dim=32, L=8, widths=(64, 32), time_dim=16, retrieval_k=4, num_samples=4, sample_steps=4)
    cfg = TrainConfig(steps=60, batch_size=64, eval_every=0, checkpoint_every=0, seed=0)
    trainer = Trainer(model, EmbeddingDataset(emb, coords), tmp_path_factory.mktemp("sel") / "run", cfg, progress=False)
    trainer.fit()
    return trainer.ema, emb, coords, val


def test_snap_moves_each_mode_to_the_best_neighbour_within_the_radius():
    modes = torch.tensor([[[0.0, 0.0], [10.0, 10.0]], [[float("nan"), float("nan")], [50.0, 0.0]]], dtype=torch.float64)
    sims = torch.tensor([[0.9, 0.8, 0.7], [0.9, 0.5, -math.inf]])
    nb = torch.tensor([[[5.0, 0.0], [0.5, 0.0], [10.2, 10.0]], [[0.0, 0.0], [50.5, 0.0], [float("nan")] * 2]],
                      dtype=torch.float64)
    out = snap_to_neighbours(modes, sims, nb, radius_km=100.0)
    assert out[0, 0].tolist() == [0.5, 0.0]  # (5, 0) is more similar but 556 km away: the best within 100 km
    assert out[0, 1].tolist() == [10.2, 10.0]
    assert torch.isnan(out[1, 0]).all()  # no mode stays no mode
    assert out[1, 1].tolist() == [50.5, 0.0]
    assert torch.equal(snap_to_neighbours(modes, sims, nb, radius_km=1.0)[0], modes[0])  # none that close: unchanged


def test_prior_weight_one_is_the_knn_density_and_zero_is_the_model(trained):
    model, emb, coords, (ve, vc) = trained
    model.config.prior_k, model.config.prior_temperature = 8, 0.05
    dens = KNNDensity(emb, coords, k=8, temperature=0.05, L=model.config.L).predict(ve)
    at_one = model.predict(ve, prior_weight=1.0)[0][:, 0]
    # the same density, read as the sample mean is (modes ordered by lobe mass): the same answer almost always
    assert (great_circle_km(at_one, dens) < 1.0).double().mean() > 0.95
    torch.testing.assert_close(model.predict(ve[:20], prior_weight=0.0)[0], model.predict(ve[:20])[0])
    half = model.predict(ve[:20], prior_weight=0.5, return_map=True)
    assert half[2].shape[0] == 20 and torch.allclose(half[2].sum((1, 2)), torch.ones(20, dtype=half[2].dtype))


def test_hybrid_answers_are_neighbours_locations(trained):
    model, emb, coords, (ve, _) = trained
    out = model.predict(ve[:30], hybrid=True, top_k=2)[0]
    plain = model.predict(ve[:30], top_k=2)[0]
    d_gallery = great_circle_km(out[:, 0, None, :].expand(-1, len(coords), -1), coords[None].expand(30, -1, -1))
    moved = great_circle_km(out[:, 0], plain[:, 0]) > 1e-6
    assert moved.any() and (d_gallery.min(1).values[moved] < 1e-3).all()  # snapped answers are gallery locations
    assert (great_circle_km(out[:, 0], plain[:, 0]) <= model.hybrid_km + 1e-6).all()


def test_choices_on_validation_are_saved_and_used_by_default(trained, tmp_path):
    model, emb, coords, (ve, vc) = trained
    knn = choose_knn_density(emb, coords, ve, vc, L=model.config.L, ks=(1, 8), temperatures=(0.03, 0.1))
    assert set(knn["table"]) == {(1, 0.03), (8, 0.03), (8, 0.1)} and knn["score"] == max(knn["table"].values())
    got = tune_inference(model, ve, vc, knn=knn, weights=(0.0, 0.5, 1.0), lobes=(None, 0.5))
    assert len(got["table"]) == 6 and set(got["references"]) == {"kNN density", "kNN retrieval (top-1)"}
    ok = [key for key, v in got["shortfalls"].items() if v == 0]  # not below either baseline at any distance
    if ok:
        assert got["non_inferior"] and got["score"] == max(got["table"][key] for key in ok)
    else:
        assert not got["non_inferior"] and got["shortfall"] == min(got["shortfalls"].values())
    free = tune_inference(model, ve, vc, knn=knn, weights=(0.0, 0.5, 1.0), lobes=(None, 0.5), margin=100.0,
                          apply=False)  # any shortfall tolerated: the best mean score
    assert free["score"] == max(free["table"].values()) >= got["score"]
    best = tune_inference(model, ve, vc, knn=knn, weights=(got["prior_weight"],),
                          lobes=(None if not got["hybrid"] else got["hybrid_km"] / model.lobe_km,), apply=False)
    assert best["score"] == pytest.approx(got["score"])  # the scores are those predict gives
    c = model.config
    assert (c.prior_weight, c.prior_k, c.prior_temperature, c.hybrid) == (got["prior_weight"], knn["k"],
                                                                          knn["temperature"], got["hybrid"])
    pred = model.predict(ve)[0][:, 0]
    assert validation_score(pred, vc) == pytest.approx(got["score"])
    path = model.save_pretrained(tmp_path / "m")
    loaded = ld.LocDiff.from_pretrained(path)
    assert loaded.config.prior_weight == c.prior_weight and loaded.config.hybrid == c.hybrid
    torch.testing.assert_close(loaded.predict(ve[:10])[0], model.predict(ve[:10])[0])
    torch.testing.assert_close(torch.tensor([[g.lat, g.lon] for g in ld.geolocate(ve[:10], model=loaded)],
                                            dtype=torch.float64), pred[:10])
    # the CLI's flags override the saved choice
    f = tmp_path / "q.npy"
    import numpy as np

    np.save(f, ve[:3].numpy())
    for flags in ([], ["--hybrid", "--prior-weight", "1"], ["--no-hybrid", "--prior-weight", "0"]):
        assert cli(["predict", str(f), "--model", str(path), "--json", "--no-progress", "--top-k", "1"] + flags) == 0


def test_bad_settings_are_named(trained, capsys):
    model, _, _, (ve, vc) = trained
    with pytest.raises(ValueError, match="prior_weight"):
        model.predict(ve[:2], prior_weight=1.5)
    with pytest.raises(TypeError, match="hybrid"):
        model.predict(ve[:2], hybrid="yes")
    with pytest.raises(ValueError, match="need a gallery"):
        ld.LocDiffConfig(cond_dim=8, prior_weight=0.5)
    with pytest.raises(ValueError, match="need a gallery"):
        tiny_model(cond_dim=8).predict(torch.randn(2, 8), hybrid=True)
    with pytest.raises(ValueError, match="hybrid_km"):
        ld.LocDiffConfig(cond_dim=8, retrieval_k=2, hybrid_km=-1.0)
    with pytest.raises(ValueError, match="no gallery"):
        tune_inference(tiny_model(cond_dim=32), ve, vc)
    with pytest.raises(ValueError, match="val_coords"):
        tune_inference(model, ve, vc[:5], apply=False)


def test_the_lower_bound_is_that_of_a_paired_difference():
    from locdiff_ext.selection import _lower_bound

    assert _lower_bound(torch.zeros(100, 5, dtype=torch.float64)) == 0.0  # identical answers: no doubt
    d = torch.zeros(400, 5, dtype=torch.float64)
    d[:20, 0] = 1.0  # +5 points at 1 km, with its sampling noise ...
    d[20:40, 0] = -1.0  # ... and as many losses: a tie whose lower bound is negative
    se = float(d[:, 0].std()) / 20
    assert _lower_bound(d) == pytest.approx(-100 * 1.96 * se)
