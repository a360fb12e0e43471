"""Diffusion in SHDD space: noise schedules, the forward process, samplers and losses.

Kept apart from the model (diffusers style): a ``NoiseSchedule`` holds the betas, the samplers
take any ``model(x_t, t, cond) -> prediction`` callable, and the losses compare vectors.
Prediction targets: 'epsilon' (the noise) or 'x0' (the clean SHDD vector, what SHDD-KL needs).
"""

from __future__ import annotations

import inspect
import math
from typing import Callable, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..kernels.geometry import grid_latlon
from ..kernels.ops import sh_synthesis
from .shdd import gaussian_taper, per_coefficient

PREDICTIONS = ("epsilon", "x0")


class NoiseSchedule(nn.Module):
    """Discrete variance schedule over ``num_steps`` steps.

    'linear': betas from 1e-4 to 0.02 (Ho et al. 2020); 'cosine': alpha_bar(t) = f(t)/f(0) with
    f(t) = cos^2(((t/T + s)/(1 + s)) pi/2), s = 0.008, betas clipped at 0.999 (Nichol & Dhariwal 2021)."""

    def __init__(self, kind: str = "cosine", num_steps: int = 1000):
        super().__init__()
        if kind not in ("linear", "cosine"):
            raise ValueError(f"kind must be 'linear' or 'cosine', got {kind!r}")
        if not isinstance(num_steps, int) or num_steps < 1:
            raise ValueError(f"num_steps must be a positive int, got {num_steps!r}")
        self.kind, self.num_steps = kind, num_steps
        if kind == "linear":
            betas = torch.linspace(1e-4, 0.02, num_steps, dtype=torch.float64)
        else:
            s = 0.008
            t = torch.arange(num_steps + 1, dtype=torch.float64) / num_steps
            f = torch.cos((t + s) / (1 + s) * math.pi / 2) ** 2
            abar = f / f[0]
            betas = (1 - abar[1:] / abar[:-1]).clamp(max=0.999)
        alphas_cumprod = torch.cumprod(1 - betas, 0)
        self.register_buffer("betas", betas, persistent=False)
        self.register_buffer("alphas_cumprod", alphas_cumprod, persistent=False)

    def _gather(self, v: Tensor, t: Tensor, x: Tensor) -> Tensor:
        return v.to(x.device)[t].to(x.dtype).reshape(-1, *([1] * (x.dim() - 1)))

    def q_sample(self, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise."""
        abar = self._gather(self.alphas_cumprod, t, x0)
        return abar.sqrt() * x0 + (1 - abar).sqrt() * noise

    def to_x0_eps(self, pred: Tensor, x_t: Tensor, t: Tensor, prediction: str):
        """Both (x0, epsilon) from a model prediction of either kind."""
        abar = self._gather(self.alphas_cumprod, t, x_t)
        if prediction == "epsilon":
            eps = pred
            x0 = (x_t - (1 - abar).sqrt() * eps) / abar.sqrt()
        elif prediction == "x0":
            x0 = pred
            eps = (x_t - abar.sqrt() * x0) / (1 - abar).sqrt().clamp(min=1e-12)
        else:
            raise ValueError(f"prediction must be one of {PREDICTIONS}, got {prediction!r}")
        return x0, eps


def guided(model: Callable, guidance_scale: float) -> Callable:
    """Classifier-free guidance: eps_u + s (eps_c - eps_u), the unconditional branch being the model
    called with cond=None (the model's learned null condition).  A model in evaluation mode with a
    ``forward_guided(x, t, cond, s)`` (the CS-UNet) computes the mixture itself, sharing what the branches
    share; one that takes ``drop_mask`` runs both branches as one batch of 2B rows."""
    if guidance_scale == 1.0:
        return model
    pair = getattr(model, "forward_guided", None)
    if pair is not None and not getattr(model, "training", False):
        return lambda x, t, cond: model(x, t, None) if cond is None else pair(x, t, cond, guidance_scale)
    try:
        batched = "drop_mask" in inspect.signature(getattr(model, "forward", model)).parameters
    except (TypeError, ValueError):
        batched = False

    def fn(x, t, cond):
        if cond is None or not batched:
            return torch.lerp(model(x, t, None), model(x, t, cond), guidance_scale)
        B = x.shape[0]
        drop = torch.arange(2 * B, device=x.device) >= B
        both = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([cond, cond]), drop_mask=drop)
        return torch.lerp(both[B:], both[:B], guidance_scale)

    return fn


def randn(shape, generator, dtype=torch.float32) -> Tensor:
    """N(0, I) noise of ``shape`` on the CPU from one generator, or from a list of generators each drawing
    an equal block of consecutive rows (one per input: its samples then do not depend on its batch)."""
    if isinstance(generator, (list, tuple)):
        if not generator or shape[0] % len(generator):
            raise ValueError(f"generator: {len(generator)} generators cannot split {shape[0]} rows evenly")
        rows = shape[0] // len(generator)
        return torch.cat([torch.randn((rows, *shape[1:]), generator=g, dtype=dtype) for g in generator])
    return torch.randn(shape, generator=generator, dtype=dtype)


class DDIMSampler:
    """DDIM (Song et al. 2021) over ``steps`` evenly spaced timesteps; eta = 0 is deterministic,
    eta = 1 matches DDPM's variance.  ``DDPMSampler`` is DDIM with eta = 1 over every step."""

    def __init__(self, schedule: NoiseSchedule, steps: int = 50, eta: float = 0.0, prediction: str = "x0",
                 clip_x0: Optional[float] = None):
        if not isinstance(steps, int) or not 1 <= steps <= schedule.num_steps:
            raise ValueError(f"steps must be an int in [1, {schedule.num_steps}], got {steps!r}")
        if prediction not in PREDICTIONS:
            raise ValueError(f"prediction must be one of {PREDICTIONS}, got {prediction!r}")
        self.schedule, self.steps, self.eta, self.prediction, self.clip_x0 = schedule, steps, float(eta), prediction, clip_x0

    def timesteps(self) -> list:
        T = self.schedule.num_steps
        return sorted({int(round(v)) for v in torch.linspace(T - 1, 0, self.steps).tolist()}, reverse=True)

    def _denoise(self, fn: Callable, x: Tensor, t: int, cond: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
        """(x0, eps) estimates at timestep t from one (guided) network evaluation; x0 clipped if asked."""
        tt = torch.full((x.shape[0],), t, dtype=torch.long, device=x.device)
        with torch.profiler.record_function("locdiff.network"):
            pred = fn(x, tt, cond)
        x0, eps = self.schedule.to_x0_eps(pred, x, tt, self.prediction)
        if self.clip_x0 is not None:
            abar = self.schedule.alphas_cumprod[t]
            x0 = x0.clamp(-self.clip_x0, self.clip_x0)
            eps = (x - abar.sqrt() * x0) / (1 - abar).sqrt()
        return x0, eps

    @torch.no_grad()
    def sample(self, model: Callable, cond: Optional[Tensor], shape, generator: Optional[torch.Generator] = None,
               device=None, dtype=torch.float32, guidance_scale: float = 1.0) -> Tensor:
        """Runs the reverse process from x_T ~ N(0, I) of ``shape`` and returns x0.  ``generator``: one
        torch.Generator, or a list of them that each draw an equal block of rows (see ``randn``)."""
        fn = guided(model, guidance_scale)
        abar_all = self.schedule.alphas_cumprod
        x = randn(shape, generator, dtype).to(device or "cpu")
        ts = self.timesteps()
        for i, t in enumerate(ts):
            x0, eps = self._denoise(fn, x, t, cond)
            if i == len(ts) - 1:
                return x0
            a_t, a_prev = float(abar_all[t]), float(abar_all[ts[i + 1]])
            sigma = self.eta * math.sqrt((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev))
            x = math.sqrt(a_prev) * x0 + math.sqrt(max(1 - a_prev - sigma**2, 0.0)) * eps
            if sigma > 0:  # DDIM's eta = 0 draws no noise after x_T
                x = x + sigma * randn(shape, generator, dtype).to(x.device)
        return x


class DPMSolverSampler(DDIMSampler):
    """DPM-Solver++(2M) (Lu et al. 2022): a second-order multistep solver of the probability-flow ODE in
    the data (x0) parametrisation, deterministic like DDIM with eta = 0 and with the same timesteps and the
    same number of network evaluations, but accurate with fewer of them (the first and last steps are first
    order).  In log-SNR lambda = log(alpha / sigma), with D the x0 estimate extrapolated from the last two:
    x_{i+1} = (sigma_{i+1} / sigma_i) x_i - alpha_{i+1} (e^{-h} - 1) D,  h = lambda_{i+1} - lambda_i.
    Its timesteps are evenly spaced in lambda, not in t (on a Gaussian test, 10 steps: 2.6x closer to the
    exact flow than DDIM's evenly spaced ones; tests/model/test_diffusion.py)."""

    def __init__(self, schedule: NoiseSchedule, steps: int = 10, prediction: str = "x0", clip_x0: Optional[float] = None):
        super().__init__(schedule, steps, eta=0.0, prediction=prediction, clip_x0=clip_x0)

    def timesteps(self) -> list:
        abar = self.schedule.alphas_cumprod
        lam = 0.5 * torch.log(abar / (1 - abar))
        T = self.schedule.num_steps
        targets = torch.linspace(float(lam[T - 1]), float(lam[0]), self.steps, dtype=torch.float64)
        return sorted({int(torch.argmin((lam - v).abs())) for v in targets}, reverse=True)

    @torch.no_grad()
    def sample(self, model: Callable, cond: Optional[Tensor], shape, generator=None, device=None,
               dtype=torch.float32, guidance_scale: float = 1.0) -> Tensor:
        fn = guided(model, guidance_scale)
        abar_all = self.schedule.alphas_cumprod
        x = randn(shape, generator, dtype).to(device or "cpu")
        ts = self.timesteps()
        alpha = [math.sqrt(float(abar_all[t])) for t in ts]
        sigma = [math.sqrt(1.0 - float(abar_all[t])) for t in ts]
        lam = [math.log(a / max(s, 1e-12)) for a, s in zip(alpha, sigma)]
        prev_x0, prev_h = None, None
        for i, t in enumerate(ts):
            x0, _ = self._denoise(fn, x, t, cond)
            if i == len(ts) - 1:
                return x0
            h = lam[i + 1] - lam[i]
            if prev_x0 is None or i == len(ts) - 2:  # first order at the ends (lower_order_final)
                d = x0
            else:
                r = prev_h / h
                d = (1 + 0.5 / r) * x0 - (0.5 / r) * prev_x0
            x = (sigma[i + 1] / sigma[i]) * x - alpha[i + 1] * math.expm1(-h) * d
            prev_x0, prev_h = x0, h
        return x


class DDPMSampler(DDIMSampler):
    """Ancestral DDPM sampling: DDIM with eta = 1 over every step of the schedule (or ``steps``)."""

    def __init__(self, schedule: NoiseSchedule, steps: Optional[int] = None, prediction: str = "x0",
                 clip_x0: Optional[float] = None):
        super().__init__(schedule, steps or schedule.num_steps, eta=1.0, prediction=prediction, clip_x0=clip_x0)


class SHDDKLLoss(nn.Module):
    """SHDD-KL: KL(p_target || p_pred) between the spherical distributions two SHDD vectors describe.

    Each (unscaled) coefficient vector c gives f = sum w_l c_lm Y_lm on a quadrature grid, with
    w_l = exp(-l(l+1) s^2 / 2) a Gaussian smoothing of width ``smoothing`` (radians, default 3/L;
    0 turns it off).  The distribution is softmax(f / (tau f_peak) + log a) over the grid, with a
    the cell areas and f_peak = sum_l (2l+1) w_l v_l / (4 pi) the peak of an encoded Dirac (v_l the
    encoder's own taper), so the temperature ``tau`` is dimensionless (a Dirac's peak logit is 1/tau).

    Why the smoothing: a truncated Dirac has Gibbs side lobes, and without smoothing the KL between
    two Diracs is not monotone in their distance (at L=16 it rises from 30 to 15 degrees apart);
    with s = 3/L the side lobes fall below 0.1% of the peak and the loss decreases monotonically as
    two Diracs approach.  The logits are ``sh_synthesis`` of the scaled coefficients (smoothing and
    temperature folded into per-degree factors), differentiable w.r.t. the prediction through the
    adjoint transform."""

    def __init__(self, L: int, scale: float, weights: Optional[Tensor] = None, temperature: float = 0.05,
                 smoothing: Optional[float] = None, nlat: Optional[int] = None, nlon: Optional[int] = None):
        super().__init__()
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature!r}")
        s = 3.0 / max(L, 1) if smoothing is None else float(smoothing)
        if not (s >= 0 and math.isfinite(s)):
            raise ValueError(f"smoothing must be a finite number of radians >= 0, got {smoothing!r}")
        self.L, self.scale, self.temperature, self.smoothing = L, float(scale), float(temperature), s
        self.nlat = nlat or (L + 2)  # the smoothed maps are band-limited to L: L+2 rings resolve them
        self.nlon = nlon or 2 * self.nlat
        self.weights = None if weights is None else weights.detach().double().cpu()
        self._tables: dict = {}

    def tables(self, device) -> Tuple[Tensor, Tensor]:
        """(per-coefficient factors [K] with smoothing, temperature and scale folded in, log cell areas
        [G]) on ``device``, built on first use."""
        key = str(device)
        if key not in self._tables:
            L = self.L
            l = torch.arange(L + 1, dtype=torch.float64)
            smooth = gaussian_taper(L, self.smoothing)
            v = torch.ones(L + 1, dtype=torch.float64) if self.weights is None else self.weights
            f_peak = float(((2 * l + 1) * smooth * v).sum()) / (4 * math.pi)
            factors = per_coefficient(smooth) / (self.scale * self.temperature * f_peak)
            lat, _ = grid_latlon(self.nlat, self.nlon)
            area = torch.cos(torch.deg2rad(lat)).clamp(min=1e-12).repeat_interleave(self.nlon)
            self._tables[key] = (factors.float().to(device), torch.log(area / area.sum()).float().to(device))
        return self._tables[key]

    def log_probs(self, x: Tensor) -> Tensor:
        """Scaled SHDD vectors [B, K] -> log-probabilities over the grid [B, G].  The logits are the
        differentiable separable synthesis (O(L^3) per row, its backward the adjoint transform), not a
        product with a dense [G, K] basis (O(L^4): 44% of an L = 64 training step before)."""
        factors, log_area = self.tables(x.device)
        logits = sh_synthesis(x.float() * factors, self.nlat, self.nlon).reshape(x.shape[0], -1)
        return F.log_softmax(logits + log_area, dim=-1)

    def forward(self, pred: Tensor, target: Tensor) -> Tensor:
        """Mean over the batch of KL(target || pred)."""
        with torch.profiler.record_function("locdiff.shdd_kl"):
            lt, lp = self.log_probs(target), self.log_probs(pred)
            return (lt.exp() * (lt - lp)).sum(-1).mean()


def mse_loss(pred: Tensor, target: Tensor) -> Tensor:
    """Plain MSE in SHDD space, for ablation against SHDD-KL."""
    return F.mse_loss(pred.float(), target.float())
