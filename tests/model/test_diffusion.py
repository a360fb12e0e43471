"""Noise schedules, the forward process, samplers and losses; a small model learns clusters."""

import math

import pytest
import torch

from locdiff_ext.kernels.reference import great_circle_km
from locdiff_ext.model.diffusion import (DDIMSampler, DDPMSampler, DPMSolverSampler, NoiseSchedule, SHDDKLLoss, guided,
                                        mse_loss)
from locdiff_ext.model.shdd import SHDDDecoder, SHDDEncoder
from locdiff_ext.model.unet import CSUNet, CSUNetConfig


def test_schedules_match_closed_forms():
    lin = NoiseSchedule("linear", 1000)
    assert lin.betas[0].item() == pytest.approx(1e-4) and lin.betas[-1].item() == pytest.approx(0.02)
    assert torch.allclose(lin.alphas_cumprod, torch.cumprod(1 - lin.betas, 0))
    cos = NoiseSchedule("cosine", 1000)
    f = lambda t: math.cos((t / 1000 + 0.008) / 1.008 * math.pi / 2) ** 2
    for t in [0, 10, 500, 900]:
        assert cos.alphas_cumprod[t].item() == pytest.approx(f(t + 1) / f(0), rel=1e-9)
    assert (cos.alphas_cumprod.diff() < 0).all() and 0 < cos.alphas_cumprod[-1] < 1e-3
    with pytest.raises(ValueError, match="kind"):
        NoiseSchedule("quadratic")


def test_forward_process_statistics_and_parameterisations():
    s = NoiseSchedule("cosine", 1000)
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(20000, 4, generator=g, dtype=torch.float64)
    noise = torch.randn(20000, 4, generator=g, dtype=torch.float64)
    t = torch.full((20000,), 400)
    xt = s.q_sample(x0, t, noise)
    assert abs(xt.var().item() - 1.0) < 0.03  # variance preserving
    for pred, value in [("epsilon", noise), ("x0", x0)]:
        x0h, epsh = s.to_x0_eps(value, xt, t, pred)
        torch.testing.assert_close(x0h, x0)
        torch.testing.assert_close(epsh, noise)


def test_shdd_kl_loss_properties():
    L = 16
    enc = SHDDEncoder(L)
    loss = SHDDKLLoss(L, enc.scale)
    a = enc(torch.tensor([[10.0, 20.0]], dtype=torch.float64)).float()
    assert loss(a, a).item() == pytest.approx(0.0, abs=1e-6)
    a0 = enc(torch.tensor([[0.0, 20.0]], dtype=torch.float64)).float()
    g = torch.Generator().manual_seed(0)
    r = torch.randn(8, (L + 1) ** 2, generator=g)
    assert (loss(r, torch.randn(8, (L + 1) ** 2, generator=g)) >= 0).all()
    values = []
    for d_deg in [60.0, 30.0, 15.0, 5.0, 1.0]:
        b = enc(torch.tensor([[0.0, 20.0 + d_deg]], dtype=torch.float64)).float()
        values.append(loss(b, a0).item())
    assert all(x > y for x, y in zip(values, values[1:])), values
    # Without the smoothing the Gibbs side lobes make it non-monotone (why smoothing is the default).
    raw = SHDDKLLoss(L, enc.scale, smoothing=0.0)
    b30, b15 = (enc(torch.tensor([[0.0, 20.0 + d]], dtype=torch.float64)).float() for d in (30.0, 15.0))
    assert raw(b15, a0).item() > raw(b30, a0).item()
    p = r.clone().requires_grad_(True)
    loss(p, a.expand(8, -1)).backward()
    assert torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0
    assert mse_loss(a, a).item() == 0.0


def test_ddim_with_an_oracle_returns_the_target_and_is_deterministic():
    s = NoiseSchedule("cosine", 1000)
    target = torch.randn(3, 9)
    oracle = lambda x, t, cond: target  # a perfect x0-predictor
    for sampler in [DDIMSampler(s, steps=10), DDIMSampler(s, steps=25, eta=1.0), DDPMSampler(s, steps=50)]:
        out = sampler.sample(oracle, None, (3, 9), generator=torch.Generator().manual_seed(1))
        torch.testing.assert_close(out, target)
    eps_model = lambda x, t, cond: torch.zeros_like(x)
    a = DDIMSampler(s, 20, prediction="epsilon").sample(eps_model, None, (2, 9), generator=torch.Generator().manual_seed(3))
    b = DDIMSampler(s, 20, prediction="epsilon").sample(eps_model, None, (2, 9), generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match="steps"):
        DDIMSampler(s, steps=0)


def test_dpm_solver_follows_the_probability_flow_with_fewer_steps():
    """Gaussian data N(mu, s^2): the exact x0-predictor is known, and the probability-flow ODE maps noise to
    the data distribution.  DPM-Solver++(2M) with an oracle returns the target; with the Gaussian denoiser its
    10-step sample is far closer to the 500-step DDIM solution of the same ODE than DDIM's own 10-step one."""
    s = NoiseSchedule("cosine", 1000)
    target = torch.randn(3, 9)
    out = DPMSolverSampler(s, 10).sample(lambda x, t, c: target, None, (3, 9), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(out, target)
    mu, sd = 0.7, 0.2
    abar = s.alphas_cumprod

    def denoiser(x, t, cond):
        a = abar[t].to(x.dtype)[:, None]
        return mu + a.sqrt() * sd**2 / (a * sd**2 + 1 - a) * (x - a.sqrt() * mu)

    def run(sampler):
        return sampler.sample(denoiser, None, (4000, 2), generator=torch.Generator().manual_seed(5), dtype=torch.float64)

    exact = run(DDIMSampler(s, 500))
    assert abs(exact.mean().item() - mu) < 0.02 and abs(exact.std().item() - sd) < 0.02
    err_dpm = (run(DPMSolverSampler(s, 10)) - exact).abs().mean().item()
    err_ddim = (run(DDIMSampler(s, 10)) - exact).abs().mean().item()
    assert err_dpm < 0.5 * err_ddim, (err_dpm, err_ddim)


def test_guidance_runs_both_branches_in_one_pass():
    """A CS-UNet in evaluation mode mixes the branches itself (forward_guided: no forward call); in training
    mode it gets one forward of 2B rows (drop_mask); both equal two separate calls."""
    net = CSUNet(CSUNetConfig(dim=16, cond_dim=6, widths=(32, 16), time_dim=16, dropout=0.0)).eval()
    calls = []
    net.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    x, t, c = torch.randn(5, 16), torch.full((5,), 300), torch.randn(5, 6)
    with torch.no_grad():
        one = guided(net, 2.5)(x, t, c)
        assert calls == []
        net.train()
        batched = guided(net, 2.5)(x, t, c)
        assert calls == [10]
        net.eval()
        two = guided(lambda a, b, cond: net(a, b, cond), 2.5)(x, t, c)
    torch.testing.assert_close(one, two, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(batched, two, rtol=1e-5, atol=1e-5)


def test_unconditional_model_learns_clusters():
    """Points from three clusters: decoded samples land within 200 km of a cluster >= 90% of the time."""
    torch.manual_seed(0)
    L = 10
    centres = torch.tensor([[48.0, 2.0], [-23.0, -46.0], [35.0, 139.0]], dtype=torch.float64)
    enc = SHDDEncoder(L)
    schedule = NoiseSchedule("cosine", 1000)
    net = CSUNet(CSUNetConfig(dim=enc.dim, cond_dim=1, widths=(128, 64), time_dim=64, dropout=0.0))
    kl = SHDDKLLoss(L, enc.scale, temperature=0.05)
    opt = torch.optim.AdamW(net.parameters(), lr=2e-3)
    for step in range(400):
        idx = torch.randint(0, 3, (128,))
        pts = centres[idx] + torch.randn(128, 2, dtype=torch.float64) * 0.3
        x0 = enc(pts).float()
        t = torch.randint(0, 1000, (128,))
        xt = schedule.q_sample(x0, t, torch.randn_like(x0))
        pred = net(xt, t, None)
        loss = kl(pred, x0) + 0.1 * mse_loss(pred, x0)
        opt.zero_grad()
        loss.backward()
        opt.step()
    net.eval()
    x = DDIMSampler(schedule, steps=25).sample(lambda x, t, c: net(x, t, c), None, (100, enc.dim),
                                                generator=torch.Generator().manual_seed(0))
    coords, _ = SHDDDecoder(enc)(x)
    d = great_circle_km(coords[:, 0, None, :].expand(-1, 3, -1), centres[None].expand(100, -1, -1)).min(dim=1).values
    assert (d < 200).float().mean().item() >= 0.9, d
