"""geolocate(): modes, scores and maps, reproducibility, defaults and bad inputs."""

import numpy as np
import pytest
import torch

import locdiff_ext as ld
from locdiff_ext.kernels.geometry import great_circle_km

from helpers import REGION_CENTRES, region_dataset, tiny_model


def test_geolocate_returns_modes_scores_and_maps(trained):
    model, _ = trained
    val, cls = region_dataset(40, seed=6)
    res = ld.geolocate(val.embeddings, model=model, top_k=3, return_map=True, map_size=(45, 90))
    assert len(res) == 40 and isinstance(res[0], ld.Geolocation)
    hits = [great_circle_km(torch.tensor([r.lat, r.lon]), REGION_CENTRES[c]).item() < 750 for r, c in zip(res, cls)]
    assert np.mean(hits) >= 0.9
    for r in res:
        assert 1 <= len(r.modes) <= 3 and r.modes[0] == (r.lat, r.lon, r.score)
        assert all(a[2] >= b[2] for a, b in zip(r.modes, r.modes[1:]))  # best first
        assert r.prob_map.shape == (45, 90) and abs(r.prob_map.sum() - 1) < 1e-9 and r.prob_map.min() >= 0
    # the map's most probable cell lies near the top mode
    lat, lon = ld.grid_latlon(45, 90)
    j, k = np.unravel_index(np.argmax(res[0].prob_map), (45, 90))
    assert great_circle_km(torch.tensor([lat[j], lon[k]]), torch.tensor([res[0].lat, res[0].lon])).item() < 800
    # same seed -> same answer; 'mode' aggregation agrees with 'mean' on this easy task
    again = ld.geolocate(val.embeddings, model=model, top_k=3, return_map=True, map_size=(45, 90))
    assert [r.modes for r in again] == [r.modes for r in res]
    subset = ld.geolocate(val.embeddings[:5], model=model)  # same noise per row; BLAS rounding differs by batch size
    for a, b in zip(subset, res):
        assert great_circle_km(torch.tensor([a.lat, a.lon]), torch.tensor([b.lat, b.lon])).item() < 25  # << lobe (2200 km)
    by_mode = ld.geolocate(val.embeddings[:10], model=model, aggregate="mode")
    for a, b in zip(by_mode, res[:10]):
        assert great_circle_km(torch.tensor([a.lat, a.lon]), torch.tensor([b.lat, b.lon])).item() < 750


def test_bad_inputs_raise_clear_errors(trained):
    model, _ = trained
    with pytest.raises(ValueError, match="width 5"):
        ld.geolocate(torch.randn(3, 5), model=model)
    bad = torch.randn(3, 16)
    bad[1, 2] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        ld.geolocate(bad, model=model)
    with pytest.raises(ValueError, match="empty"):
        ld.geolocate([], model=model)
    with pytest.raises(ValueError, match="empty"):
        ld.geolocate(torch.zeros(0, 16), model=model)
    with pytest.raises(TypeError, match="float"):
        ld.geolocate(torch.zeros(3, 16, dtype=torch.int64), model=model)
    with pytest.raises(ValueError, match="no image encoder"):
        ld.geolocate(torch.rand(2, 3, 32, 32), model=model)
    with pytest.raises(ValueError, match="top_k"):
        ld.geolocate(torch.randn(2, 16), model=model, top_k=0)
    with pytest.raises(ValueError, match="num_samples"):
        ld.geolocate(torch.randn(2, 16), model=model, num_samples=0)
    with pytest.raises(ValueError, match="guidance"):
        tiny_model(cond_drop_prob=0.0).predict(torch.randn(2, 16), guidance_scale=2.0)
    with pytest.raises(ValueError, match="LocDiffConfig: L"):
        ld.LocDiffConfig(cond_dim=4, L=0)


def test_geolocate_without_a_model_says_how_to_get_one(tmp_path, monkeypatch):
    monkeypatch.setenv("LOCDIFF_HOME", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="locdiff demo"):
        ld.geolocate(torch.randn(1, 16))
