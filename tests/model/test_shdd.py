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
