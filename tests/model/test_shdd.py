"""SHDD encoder/decoder modules: unit scale, round trip, the Gaussian taper."""

import pytest
import torch

import locdiff_ext as ld
from locdiff_ext.kernels.reference import great_circle_km
from locdiff_ext.model.shdd import SHDDDecoder, SHDDEncoder, degree_weights

from helpers import random_coords


@pytest.mark.parametrize("weighting", ["none", "gaussian"])
def test_encoder_unit_scale_and_decoder_roundtrip(weighting):
    enc = SHDDEncoder(16, weighting)
    pts = random_coords(500, seed=1, extras=False)
    x = enc(pts)
    assert x.shape == (500, 289)
    assert (x.pow(2).mean(dim=1) - 1).abs().max().item() < 1e-9  # unit mean square per coordinate
    coords, _ = SHDDDecoder(enc)(x)
    assert great_circle_km(coords[:, 0], pts).max().item() < 1.0
    with pytest.raises(ValueError, match="weighting"):
        SHDDEncoder(4, "cosine")


def test_gaussian_taper_removes_side_lobes():
    L = 32
    pt = torch.tensor([[0.0, 0.0]], dtype=torch.float64)
    plain = ld.sh_synthesis(ld.shdd_encode(pt, L), 64, 128)
    tapered = ld.sh_synthesis(ld.shdd_encode(pt, L, weights=degree_weights(L, "gaussian")), 64, 128)
    assert plain.min() < -0.05 * plain.max()       # Gibbs lobes of the truncated Dirac
    assert tapered.min() > -1e-3 * tapered.max()   # essentially gone


def test_a_mean_that_is_nowhere_positive_gives_the_uniform_map():
    """An untrained model's sample mean can be <= 0 everywhere: its map is uniform by area (it says nothing),
    not zeros or NaN, so that regions and calibration stay defined."""
    import math

    from locdiff_ext.kernels.geometry import grid_latlon
    from locdiff_ext.model.aggregate import SampleAggregator

    enc = SHDDEncoder(4)
    agg = SampleAggregator(enc, SHDDDecoder(enc), 3.0 / 4)
    samples = torch.zeros(2, 3, enc.dim, dtype=torch.float64)
    samples[0, :, 0] = -1.0  # a constant negative function
    samples[1] = enc(torch.tensor([[10.0, 20.0]], dtype=torch.float64)).expand(3, -1)
    p = agg.probability_map(samples, 18, 36)
    assert bool(torch.isfinite(p).all()) and torch.allclose(p.sum(dim=(1, 2)), torch.ones(2, dtype=p.dtype))
    lat, _ = grid_latlon(18, 36)
    w = torch.cos(torch.deg2rad(lat.double()))
    assert torch.allclose(p[0], (w / w.sum() / 36)[:, None].expand(18, 36).to(p.dtype))
    assert float(p[1].max()) > 3 * float(p[1].mean()) and not math.isnan(float(p[1].sum()))  # a bump at L = 4
