"""CS-UNet: the conditional SIREN U-Net that denoises SHDD vectors (LocDiff's denoiser).

Layout: a SIREN input layer maps the K = (L+1)^2 noisy SHDD vector to ``widths[0]``; encoder blocks
narrow the width through ``widths``; a bottleneck block; decoder blocks widen it back, each taking
the matching encoder activation as a skip connection (concatenated); a linear output layer returns
a K-vector (the x0 or epsilon prediction).

Conditioning (the paper's exact mechanism could not be read here, see shared/paper-notes.md; our
choice): the timestep (sinusoidal embedding + MLP) and the condition embedding (image or text
embedding, linearly projected; a learned null vector when it is dropped for classifier-free
guidance) are summed into one vector c, and every block applies FiLM inside the sine,
h = sin(w0 (gamma(c) * (W x + b) + beta(c))), as in FiLM-SIREN (pi-GAN).  gamma starts at 1 and
beta at 0, so at initialisation each block is a plain SIREN layer with the SIREN initialisation
(first layer U(-1/n, 1/n) with w0_initial, later layers U(-sqrt(6/n)/w0, sqrt(6/n)/w0)).
Dropout after each block (reviewers note the paper used a high rate against overfitting).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Optional, Sequence

import torch
from torch import Tensor, nn


@dataclass
class CSUNetConfig:
    dim: int                      # K = (L+1)^2
    cond_dim: int                 # width of the condition embedding
    widths: Sequence[int] = field(default_factory=lambda: (512, 256, 128))
    time_dim: int = 256
    w0_initial: float = 30.0
    w0: float = 1.0
    dropout: float = 0.1
    prior_dim: int = 0            # extra input features (a retrieval prior) concatenated to x_t

    def to_dict(self) -> dict:
        d = asdict(self)
        d["widths"] = list(self.widths)
        return d


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embedding of integer timesteps [B] -> [B, dim]."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return nn.functional.pad(emb, (0, dim % 2))


def _groups(rows: int, S: int) -> int:
    """Number of groups of S consecutive rows (CSUNet.forward's ``repeats``)."""
    if S < 1 or rows % S:
        raise ValueError(f"repeats must divide the {rows} rows, got {S}")
    return rows // S


class FiLMSineLayer(nn.Module):
    """h = sin(w0 (gamma(c) * (W x + b) + beta(c))) with SIREN initialisation of W, b."""

    def __init__(self, in_dim: int, out_dim: int, cond_dim: int, w0: float, first: bool = False):
        super().__init__()
        self.w0, self.first = w0, first
        self.linear = nn.Linear(in_dim, out_dim)
        bound = 1.0 / in_dim if first else math.sqrt(6.0 / in_dim) / w0
        nn.init.uniform_(self.linear.weight, -bound, bound)
        nn.init.uniform_(self.linear.bias, -bound, bound)
        self.film = nn.Linear(cond_dim, 2 * out_dim)
        nn.init.zeros_(self.film.weight)
        nn.init.zeros_(self.film.bias)

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        gamma, beta = self.film(c).chunk(2, dim=-1)
        return torch.sin(self.w0 * ((1 + gamma) * self.linear(x) + beta))

    def modulate(self, y: Tensor, c: Tensor) -> Tensor:
        """sin(w0 (gamma(c) * y + beta(c))) for y = W x + b of R groups of S rows [R, S, out] that share
        their condition row c [R, cond]: FiLM evaluated once per group."""
        gamma, beta = self.film(c).unsqueeze(1).chunk(2, dim=-1)
        return torch.sin(self.w0 * ((1 + gamma) * y + beta))


class CSUNet(nn.Module):
    """Conditional SIREN U-Net over SHDD vectors: forward(x_t [B,K], t [B], cond [B,D] or None).

    With ``prior_dim`` P > 0, ``cond`` is [B, D + P]: its last P columns (a retrieval prior, see
    locdiff_ext.model.retrieval) are concatenated to x_t at the input layer, the first D go through FiLM;
    a dropped condition drops the prior too (zeros)."""

    def __init__(self, config: CSUNetConfig):
        super().__init__()
        cfg = self.config = config
        widths = list(cfg.widths)
        if not widths or any(w < 1 for w in widths):
            raise ValueError(f"widths must be a non-empty list of positive ints, got {cfg.widths!r}")
        if not 0.0 <= cfg.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {cfg.dropout!r}")
        T = cfg.time_dim
        self.time_mlp = nn.Sequential(nn.Linear(T, T), nn.SiLU(), nn.Linear(T, T))
        self.cond_proj = nn.Linear(cfg.cond_dim, T)
        self.null_cond = nn.Parameter(torch.zeros(T))
        self.act = nn.SiLU()
        self.inp = FiLMSineLayer(cfg.dim + cfg.prior_dim, widths[0], T, cfg.w0_initial, first=True)
        self.down = nn.ModuleList(FiLMSineLayer(widths[i], widths[i + 1], T, cfg.w0) for i in range(len(widths) - 1))
        self.mid = FiLMSineLayer(widths[-1], widths[-1], T, cfg.w0)
        self.up = nn.ModuleList(
            FiLMSineLayer(widths[i + 1] + widths[i + 1], widths[i], T, cfg.w0) for i in reversed(range(len(widths) - 1))
        )
        self.out_block = FiLMSineLayer(widths[0] + widths[0], widths[0], T, cfg.w0)
        self.out = nn.Linear(widths[0], cfg.dim)
        bound = math.sqrt(6.0 / widths[0]) / cfg.w0
        nn.init.uniform_(self.out.weight, -bound, bound)
        nn.init.zeros_(self.out.bias)
        self.drop = nn.Dropout(cfg.dropout)
        if cfg.prior_dim:  # output += gate(c) per dim-sized block of the prior: copying a neighbour is easy
            if cfg.prior_dim % cfg.dim:
                raise ValueError(f"prior_dim {cfg.prior_dim} must be a multiple of dim {cfg.dim}")
            self.prior_gate = nn.Linear(T, cfg.prior_dim // cfg.dim)
            nn.init.zeros_(self.prior_gate.weight)
            nn.init.zeros_(self.prior_gate.bias)

    def condition(self, t: Tensor, cond: Optional[Tensor], drop_mask: Optional[Tensor] = None) -> Tensor:
        """Timestep + condition vector c [B, time_dim]; rows where drop_mask is True (or all rows if
        cond is None) use the learned null condition (classifier-free guidance)."""
        c = self.time_mlp(timestep_embedding(t, self.config.time_dim))
        if cond is None:
            return self.act(c + self.null_cond)
        e = self.cond_proj(cond[:, :self.config.cond_dim].to(c.dtype))
        if drop_mask is not None:
            e = torch.where(drop_mask[:, None], self.null_cond.expand_as(e), e)
        return self.act(c + e)

    def forward(self, x: Tensor, t: Tensor, cond: Optional[Tensor] = None, drop_mask: Optional[Tensor] = None,
                repeats: int = 1) -> Tensor:
        """``repeats`` S > 1: the rows come in groups of S consecutive rows that share their timestep, condition
        and drop flag (the samples of one input while sampling); everything that depends only on those (the
        timestep and condition MLPs, every FiLM, the prior's share of the input layer and of the output) is
        computed once per group.  Same function as S = 1, up to float rounding."""
        self._check_inputs(x, cond)
        D, P = self.config.cond_dim, self.config.prior_dim
        if repeats != 1:
            return self._forward_groups(x, t, cond, drop_mask, repeats)
        c = self.condition(t, cond, drop_mask)
        if P:
            prior = x.new_zeros(x.shape[0], P) if cond is None else cond[:, D:].to(x.dtype)
            if drop_mask is not None:
                prior = prior.masked_fill(drop_mask[:, None], 0.0)
            x = torch.cat([x, prior], dim=-1)
        h = self.drop(self.inp(x, c))
        skips = [h]
        for layer in self.down:
            h = self.drop(layer(h, c))
            skips.append(h)
        h = self.drop(self.mid(h, c))
        for layer in self.up:
            h = self.drop(layer(torch.cat([h, skips.pop()], dim=-1), c))
        h = self.drop(self.out_block(torch.cat([h, skips.pop()], dim=-1), c))
        out = self.out(h)
        if P:
            blocks = x[:, self.config.dim:].reshape(x.shape[0], -1, self.config.dim)
            out = out + (self.prior_gate(c).unsqueeze(-1) * blocks).sum(1)
        return out

    def _forward_groups(self, x: Tensor, t: Tensor, cond: Optional[Tensor], drop_mask: Optional[Tensor],
                        S: int) -> Tensor:
        rows, K, D = x.shape[0], self.config.dim, self.config.cond_dim
        R = _groups(rows, S)
        first = slice(None, None, S)
        cond1 = None if cond is None else cond[first]
        drop1 = None if drop_mask is None else drop_mask[first]
        c = self.condition(t[first], cond1, drop1)                     # [R, T]
        W = self.inp.linear.weight
        y = nn.functional.linear(x, W[:, :K]).view(R, S, -1)
        prior = None
        if self.config.prior_dim:
            prior = x.new_zeros(R, self.config.prior_dim) if cond1 is None else cond1[:, D:].to(x.dtype)
            if drop1 is not None:
                prior = prior.masked_fill(drop1[:, None], 0.0)
            y = y + nn.functional.linear(prior, W[:, K:], self.inp.linear.bias).unsqueeze(1)
        else:
            y = y + self.inp.linear.bias
        out = self.out(self._trunk(y, c))                              # [R, S, K]
        if prior is not None:
            out = out + self._prior_output(c, prior)
        return out.reshape(rows, K)

    def forward_guided(self, x: Tensor, t: Tensor, cond: Tensor, guidance_scale: float, repeats: int = 1) -> Tensor:
        """Classifier-free guidance, out_u + s (out_c - out_u), of the conditional branch (``cond``) and the
        unconditional one (the null condition, no prior), in one pass that shares what the branches share:
        x, so the input layer's product with x is computed once, and the affine map after the last sine, so
        the branches' last hidden states are mixed first and the output layer runs once (a quarter fewer
        multiply-adds at widths (512, 256, 128), K = 1089).  Rows in groups of ``repeats`` as in forward.
        Same function as two forward passes mixed by torch.lerp, up to float rounding; evaluation only
        (dropout would differ between the branches)."""
        if self.training:
            raise RuntimeError("forward_guided is for evaluation: call model.eval() first")
        self._check_inputs(x, cond)
        rows, K, D = x.shape[0], self.config.dim, self.config.cond_dim
        R = _groups(rows, repeats)
        first = slice(None, None, repeats)
        cond1, t1 = cond[first], t[first]
        c = torch.cat([self.condition(t1, cond1), self.condition(t1, None)])   # [2R, T]: conditional, null
        W, b = self.inp.linear.weight, self.inp.linear.bias
        y = nn.functional.linear(x, W[:, :K]).view(R, repeats, -1)
        y_null = y + b
        prior = None
        if self.config.prior_dim:
            prior = cond1[:, D:].to(x.dtype)
            y_cond = y + nn.functional.linear(prior, W[:, K:], b).unsqueeze(1)
        else:
            y_cond = y_null
        h = self._trunk(torch.cat([y_cond, y_null]), c)               # [2R, S, width]
        out = self.out(torch.lerp(h[R:], h[:R], guidance_scale))      # [R, S, K]
        if prior is not None:  # the null branch's prior is zero
            out = out + guidance_scale * self._prior_output(c[:R], prior)
        return out.reshape(rows, K)

    def _check_inputs(self, x: Tensor, cond: Optional[Tensor]) -> None:
        K, width = self.config.dim, self.config.cond_dim + self.config.prior_dim
        if x.shape[-1] != K:
            raise ValueError(f"x must have shape [B, {K}], got {tuple(x.shape)}")
        if cond is not None and cond.shape[-1] != width:
            raise ValueError(f"cond must have shape [B, {width}], got {tuple(cond.shape)}")

    def _trunk(self, y: Tensor, c: Tensor) -> Tensor:
        """Every block from the input layer's sine to the last one, for R groups of S rows that share their
        condition row: y = the input layer's pre-activation [R, S, widths[0]], c [R, T]."""
        h = self.drop(self.inp.modulate(y, c))                        # [R, S, width]
        skips = [h]
        for layer in self.down:
            h = self.drop(layer.modulate(layer.linear(h), c))
            skips.append(h)
        h = self.drop(self.mid.modulate(self.mid.linear(h), c))
        for layer in self.up:
            h = self.drop(layer.modulate(layer.linear(torch.cat([h, skips.pop()], dim=-1)), c))
        return self.drop(self.out_block.modulate(self.out_block.linear(torch.cat([h, skips.pop()], dim=-1)), c))

    def _prior_output(self, c: Tensor, prior: Tensor) -> Tensor:
        """The gated copy of the prior's blocks added to the output, [R, 1, K] for c [R, T], prior [R, P]."""
        blocks = prior.reshape(prior.shape[0], -1, self.config.dim)
        return (self.prior_gate(c).unsqueeze(-1) * blocks).sum(1).unsqueeze(1)
