"""Credible regions of probability maps: exact on known densities, calibrated on a calibrated case."""

import math

import numpy as np
import pytest
import torch

import locdiff_ext as ld
from locdiff_ext.evaluation.calibration import (cell_areas_km2, cell_of, coverage, credible_area_km2,
                                                credible_region, fit_sharpness, region_contains, sharpen, truth_mass)
from locdiff_ext.kernels.geometry import EARTH_RADIUS_KM, grid_points, great_circle_km

EARTH_KM2 = 4 * math.pi * EARTH_RADIUS_KM ** 2
NLAT, NLON = 90, 180


def cap_density(centre, kappa):
    """A von Mises-Fisher density exp(kappa cos d) on the grid's cells, as a probability map."""
    pts = grid_points(NLAT, NLON)
    d = great_circle_km(pts, torch.tensor(centre, dtype=torch.float64).expand_as(pts)) / EARTH_RADIUS_KM
    dens = torch.exp(kappa * (torch.cos(d) - 1)).reshape(NLAT, NLON).numpy()
    return dens * cell_areas_km2(NLAT, NLON)[:, None]


def test_cell_areas_sum_to_the_earth():
    assert abs(cell_areas_km2(NLAT, NLON).sum() * NLON - EARTH_KM2) < 1e-6 * EARTH_KM2


def test_uniform_density_regions_have_the_area_of_their_level():
    uniform = cell_areas_km2(NLAT, NLON)[:, None] * np.ones((NLAT, NLON))
    for p in (0.1, 0.5, 0.9, 1.0):
        assert abs(credible_area_km2(uniform, p) - p * EARTH_KM2) < 0.01 * EARTH_KM2


def test_a_cap_density_gives_the_cap_of_its_level():
    """For exp(kappa cos d) the p region is the cap of 1 - cos r = -log(1 - p (1 - e^-2k)) / kappa."""
    kappa = 200.0
    m = cap_density((35.0, 20.0), kappa)
    for p in (0.5, 0.9):
        one_minus_cos = -math.log(1 - p * (1 - math.exp(-2 * kappa))) / kappa
        expected = 2 * math.pi * EARTH_RADIUS_KM ** 2 * one_minus_cos
        assert abs(credible_area_km2(m, p) - expected) < 0.1 * expected
    assert region_contains(m, 35.0, 20.0, 0.1) and not region_contains(m, -35.0, -160.0, 0.9)
    inner, outer = credible_region(m, 0.5), credible_region(m, 0.9)
    assert (outer | inner).sum() == outer.sum()  # nested


def calibrated_case(n=300, seed=0, map_kappa_factor=1.0):
    """Maps of von Mises-Fisher densities and truths drawn from them; the maps' concentration is
    ``map_kappa_factor`` times the truths' (1: calibrated, < 1: too broad)."""
    rng = np.random.default_rng(seed)
    maps, truths = [], []
    pts = grid_points(NLAT, NLON).numpy()
    for _ in range(n):
        centre = (rng.uniform(-60, 60), rng.uniform(-180, 180))
        kappa = rng.uniform(5, 80)
        m = cap_density(centre, kappa)
        m /= m.sum()
        cell = rng.choice(m.size, p=m.ravel())
        lat, lon = pts[cell]
        # a uniform point inside the drawn cell, not its centre
        lat += rng.uniform(-1, 1) * 90 / NLAT
        lon += rng.uniform(-1, 1) * 180 / NLON
        maps.append(m if map_kappa_factor == 1.0 else cap_density(centre, kappa * map_kappa_factor))
        truths.append((lat, lon))
    return np.stack(maps), np.array(truths)


def test_coverage_of_a_calibrated_case():
    """Truths drawn from the same densities as the maps: the p regions cover a share p of them."""
    maps, truths = calibrated_case()
    cov = coverage(maps, truths)
    for p in (0.5, 0.9):
        se = math.sqrt(p * (1 - p) / 300)
        assert abs(cov[p]["coverage"] - p) < 3 * se + 0.01, cov
        assert cov[p]["median_area_km2"] > 0


def test_temperature_scaling_recovers_a_known_miscalibration():
    """Maps twice too broad (vMF concentration kappa / 2): density^2 is the true density, so the exponent
    fitted on one sample is ~2 and calibrates another sample; truth_mass agrees with coverage."""
    maps, truths = calibrated_case(400, seed=1, map_kappa_factor=0.5)
    q = truth_mass(maps, truths)
    cov = coverage(maps, truths)
    for p in (0.5, 0.9):
        assert abs((q < p).mean() - cov[p]["coverage"]) < 1e-9
        assert cov[p]["coverage"] > p + 0.04  # too broad: over-covers
    s = fit_sharpness(maps, truths)
    assert 1.6 <= s <= 2.5, s
    test_maps, test_truths = calibrated_case(300, seed=2, map_kappa_factor=0.5)
    cov = coverage(sharpen(test_maps, s), test_truths)
    for p in (0.5, 0.9):
        assert abs(cov[p]["coverage"] - p) < 3 * math.sqrt(p * (1 - p) / 300) + 0.01, cov
    # sharpen: s = 1 only normalises, the density order (region shapes) never changes
    m = maps[:3] * 7.0
    assert np.allclose(sharpen(m, 1.0), maps[:3] / maps[:3].sum(axis=(1, 2), keepdims=True))
    area = cell_areas_km2(NLAT, NLON)[:, None]
    assert np.array_equal(np.argsort(-(m[0] / area), axis=None, kind="stable"),
                          np.argsort(-(sharpen(m, 3.0)[0] / area), axis=None, kind="stable"))
    with pytest.raises(ValueError, match="s must"):
        sharpen(m, 0.0)
    with pytest.raises(ValueError, match="prob_maps"):
        truth_mass(m, truths[:2])


def test_geolocation_methods_and_bad_arguments(trained):
    model, _ = trained
    from helpers import region_dataset

    val, _ = region_dataset(4, seed=3)
    res = ld.geolocate(val.embeddings, model=model, return_map=True, map_size=(45, 90))
    r = res[0]  # an uncalibrated model: the raw map's own regions, asked for on purpose (else a warning)
    assert 0 < r.credible_area_km2(0.5, calibrated=False) <= r.credible_area_km2(0.9, calibrated=False) <= EARTH_KM2 * 1.0001
    assert r.contains(r.lat, r.lon, 0.9, calibrated=False)
    with pytest.warns(ld.UncalibratedWarning, match="no conformal calibration"):
        assert r.contains(r.lat, r.lon, 0.9)
    no_map = ld.geolocate(val.embeddings[:1], model=model)[0]
    with pytest.raises(ValueError, match="return_map=True"):
        no_map.credible_area_km2()
    with pytest.raises(ValueError, match="p must be in"):
        r.credible_area_km2(0.0)
    with pytest.raises(ValueError, match="lat"):
        r.contains(91.0, 0.0)
    with pytest.raises(ValueError, match="prob_map"):
        credible_area_km2(np.full((3, 4), np.nan))
    assert cell_of(90.0, 180.0, 4, 8) == (0, 0) and cell_of(-90.0, -180.0, 4, 8) == (3, 0)


def test_a_models_map_sharpness_is_the_same_temperature_scaling(trained):
    """A saved model's calibration (config.map_sharpness, set by the demo from validation data) gives
    the maps calibration.sharpen gives, and smaller regions when > 1."""
    import copy

    from helpers import region_dataset

    model, _ = trained
    val, _ = region_dataset(3, seed=4)
    _, _, raw = model.predict(val.embeddings, return_map=True, map_size=(45, 90))
    sharp = copy.deepcopy(model)
    sharp.config.map_sharpness = 2.5
    _, _, maps = sharp.predict(val.embeddings, return_map=True, map_size=(45, 90))
    assert np.allclose(maps.numpy(), sharpen(raw, 2.5), atol=1e-12)
    assert all(credible_area_km2(a, 0.9) <= credible_area_km2(b, 0.9) for a, b in zip(maps, raw))
    with pytest.raises(ValueError, match="map_sharpness"):
        ld.LocDiffConfig(cond_dim=4, map_sharpness=0.0)
