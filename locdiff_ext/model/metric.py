"""A learned query map for LocDiff-R's neighbour search (issue 22).

Why: the kNN density decodes where the inputs most similar to a query were taken, by the raw cosine
similarity of generic embeddings (CLIP, MiniLM), which ranks lookalikes by everything they share, not
only by what says where.  A linear map W applied to the query before the search (similarity
<unit(W q), g>, the gallery untouched, so a FAISS index over the raw gallery still serves) is fitted on
the training rows alone, neighbourhood-components style: each training row's 128 most similar other
rows (by the raw similarity) are re-weighted by softmax(<unit(W q), g> / T) and the loss is minus the log of
the weight that falls near the row's own location (Gaussian kernels of 25, 200 and 750 km, averaged).
W starts at the identity and is pulled towards it (a ridge penalty), so an uninformative fit stays the
raw search.  The denoiser is then trained on, and the prior read from, the neighbours this map finds.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..checks import check_float, check_int, validate_coords, validate_embeddings
from ..kernels.geometry import great_circle_km, unit_rows

METRIC_SCALES_KM = (25.0, 200.0, 750.0)  # "near its own location": the accuracy scales that count


class QueryMap(nn.Module):
    """The query-side map W [D, D] (buffer ``weight``, identity until fitted; ``fitted`` 1.0 once ``fit``
    has run): ``forward`` maps normalised queries [B, D] to normalised queries."""

    def __init__(self, dim: int):
        super().__init__()
        self.register_buffer("weight", torch.eye(dim))
        self.register_buffer("fitted", torch.zeros(()))

    @property
    def is_fitted(self) -> bool:
        return bool(self.fitted > 0)

    def forward(self, query: Tensor) -> Tensor:
        return unit_rows(query.float() @ self.weight.to(query.device).T)

    @torch.no_grad()
    def fit(self, embeddings: Tensor, coords: Tensor, **kwargs) -> "QueryMap":
        """Fits W on (``embeddings``, ``coords``), the gallery's own rows (``fit_query_map``)."""
        self.weight.copy_(fit_query_map(embeddings, coords, **kwargs).to(self.weight))
        self.fitted.fill_(1.0)
        return self


def map_queries(cond: Tensor, query_map: "QueryMap | None" = None) -> Tensor:
    """Search queries from conditioned embeddings [B, D]: unit rows, then the learned map where there is one."""
    q = unit_rows(cond.float())
    return q if query_map is None else query_map(q)


def fit_query_map(embeddings: Tensor, coords: Tensor, steps: int = 1000, candidates: int = 128, batch_size: int = 512,
                  lr: float = 1e-3, temperature: float = 0.03, ridge: float = 1e-2, max_queries: int = 20_000,
                  seed: int = 0) -> Tensor:
    """W [D, D] float32 fitted on gallery rows (``embeddings`` [G, D], ``coords`` [G, 2]) as the module
    docstring says.  Up to ``max_queries`` rows (a random subset) serve as queries, each against its
    ``candidates`` most similar other rows of the whole gallery; ``steps`` Adam steps of ``batch_size``
    queries.  Deterministic for a given ``seed``."""
    e = unit_rows(validate_embeddings(embeddings, "embeddings").float())
    c = validate_coords(coords, "coords")
    if e.shape[0] != c.shape[0]:
        raise ValueError(f"embeddings has {e.shape[0]} rows but coords has {c.shape[0]}")
    check_int(steps, "steps", 1, 1_000_000)
    check_int(candidates, "candidates", 1, 4096)
    check_int(batch_size, "batch_size", 1, 1 << 20)
    check_int(max_queries, "max_queries", 1, 1 << 30)
    check_float(temperature, "temperature", 0.0, lo_open=True)
    check_float(ridge, "ridge", 0.0)
    n = e.shape[0]
    if n < 2:
        raise ValueError(f"embeddings: fitting a query map needs at least 2 gallery rows, got {n}")
    gen = torch.Generator().manual_seed(int(seed))
    queries = torch.randperm(n, generator=gen)[:max_queries] if n > max_queries else torch.arange(n)
    C = min(candidates, n - 1)
    tops = []
    with torch.no_grad():
        rows = max(1, min(1024, (1 << 26) // n))  # a [rows, n] similarity block of at most 256 MB
        for i in range(0, len(queries), rows):  # each query's C most similar other rows, by the raw similarity
            q = queries[i:i + rows]
            s = e[q] @ e.T
            s[torch.arange(len(q)), q] = float("-inf")  # not itself
            tops.append(s.topk(C, dim=1).indices)
        top = torch.cat(tops)
        d = great_circle_km(c[top].reshape(-1, 2), c[queries][:, None, :].expand(-1, C, -1).reshape(-1, 2))
        d = d.reshape(-1, C).float()
        near = sum(torch.exp(-0.5 * (d / s) ** 2) for s in METRIC_SCALES_KM) / len(METRIC_SCALES_KM)
    eye = torch.eye(e.shape[1])
    W = eye.clone().requires_grad_(True)
    opt = torch.optim.Adam([W], lr=lr)
    with torch.enable_grad():
        for _ in range(steps):
            b = torch.randint(len(queries), (min(batch_size, len(queries)),), generator=gen)
            q = unit_rows(e[queries[b]] @ W.T)
            s = torch.bmm(e[top[b]], q[:, :, None])[..., 0] / temperature  # [B, C]: no [B, C, D] product
            loss = -torch.log((torch.softmax(s, 1) * near[b]).sum(1) + 1e-6).mean() + ridge * ((W - eye) ** 2).sum()
            opt.zero_grad()
            loss.backward()
            opt.step()
    W = W.detach()
    if not bool(torch.isfinite(W).all()):
        raise RuntimeError("fit_query_map: the fit diverged (non-finite weights); lower lr")
    return W


__all__ = ["QueryMap", "fit_query_map", "map_queries", "METRIC_SCALES_KM"]
