"""CS-UNet: shapes, SIREN initialisation, conditioning."""

import math

import pytest
import torch

from locdiff_ext.model.unet import CSUNet, CSUNetConfig


def test_csunet_shapes_init_and_conditioning():
    cfg = CSUNetConfig(dim=81, cond_dim=12, widths=(64, 32, 16), time_dim=32, dropout=0.0)
    net = CSUNet(cfg)
    x, t, e = torch.randn(5, 81), torch.randint(0, 1000, (5,)), torch.randn(5, 12)
    assert net(x, t, e).shape == (5, 81) and net(x, t, None).shape == (5, 81)
    # SIREN initialisation: first layer U(-1/n, 1/n), later layers U(-sqrt(6/n)/w0, ...); FiLM starts as identity.
    assert net.inp.linear.weight.abs().max() <= 1 / 81
    assert net.inp.linear.weight.abs().max() > 0.9 / 81
    w = net.down[0].linear.weight
    bound = math.sqrt(6 / 64) / cfg.w0
    assert w.abs().max() <= bound and abs(w.std().item() - bound / math.sqrt(3)) < 0.1 * bound
    assert torch.count_nonzero(net.inp.film.weight) == 0
    # The condition changes the output once FiLM is trained; the null condition is used when dropped.
    with torch.no_grad():
        net.cond_proj.weight.normal_()
        for m in net.modules():
            if hasattr(m, "film"):
                m.film.weight.normal_(std=0.1)
    drop = torch.tensor([True, False, True, False, False])
    out = net(x, t, e, drop_mask=drop)
    torch.testing.assert_close(out[drop], net(x[drop], t[drop], None))
    assert not torch.allclose(out[~drop], net(x[~drop], t[~drop], None))
    with pytest.raises(ValueError, match="cond"):
        net(x, t, torch.randn(5, 3))
    with pytest.raises(ValueError, match="x"):
        net(torch.randn(5, 80), t, e)


@pytest.mark.parametrize("prior_dim", [0, 2 * 81])
def test_groups_of_rows_sharing_a_condition_give_the_same_output(prior_dim):
    """repeats=S (the samples of one input while sampling) computes the condition path once per group of
    S rows: same output as the row-by-row path, with and without the prior, dropped conditions or cond."""
    torch.manual_seed(0)
    net = CSUNet(CSUNetConfig(dim=81, cond_dim=32, widths=(64, 32, 16), prior_dim=prior_dim)).eval()
    for p in net.parameters():  # FiLM and the prior gate start at zero: make them matter
        torch.nn.init.normal_(p, std=0.05)
    R, S = 5, 4
    cond = torch.randn(R, 32 + prior_dim).repeat_interleave(S, 0)
    x, t = torch.randn(R * S, 81), torch.full((R * S,), 17)
    drop = (torch.arange(R) % 2 == 0).repeat_interleave(S)
    with torch.no_grad():
        for d in (None, drop):
            for c in (cond, None):
                torch.testing.assert_close(net(x, t, c, d, repeats=S), net(x, t, c, d), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="repeats"):
        net(x, t, cond, repeats=3)


@pytest.mark.parametrize("prior_dim", [0, 2 * 81])
@pytest.mark.parametrize("S", [1, 4])
def test_guided_pass_equals_the_two_branches_mixed(prior_dim, S):
    """forward_guided shares the input product and the output layer between the branches: the same
    out_u + s (out_c - out_u) as two passes (conditional; null condition, no prior) mixed by lerp."""
    torch.manual_seed(1)
    net = CSUNet(CSUNetConfig(dim=81, cond_dim=32, widths=(64, 32, 16), prior_dim=prior_dim)).eval()
    for p in net.parameters():
        torch.nn.init.normal_(p, std=0.05)
    R = 5
    cond = torch.randn(R, 32 + prior_dim).repeat_interleave(S, 0)
    x, t = torch.randn(R * S, 81), torch.randint(0, 1000, (R,)).repeat_interleave(S)
    with torch.no_grad():
        for s in (2.0, 0.5):
            expected = torch.lerp(net(x, t, None), net(x, t, cond), s)
            torch.testing.assert_close(net.forward_guided(x, t, cond, s, repeats=S), expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="repeats"):
        net.forward_guided(x, t, cond, 2.0, repeats=3)
    with pytest.raises(ValueError, match="cond"):
        net.forward_guided(x, t, cond[:, :7], 2.0, repeats=S)
    net.train()
    with pytest.raises(RuntimeError, match="eval"):
        net.forward_guided(x, t, cond, 2.0, repeats=S)
