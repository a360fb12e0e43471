"""Which query-time signal could make the conformal regions hold per split (issue 25)?  Validation crops only.

For a demo run (its seed's crops, features and saved model), on the validation crops of held-out tiles and of
seen places: how well each neighbour signal tells the two apart (ROC AUC), and what per-split coverage Mondrian
groups by the best similarity (2-10 groups) and by a learnt "how localizable" score reach, the conformal fit
made on one random half and tested on the other (repeated).  The learnt score: a logistic regression on eight
neighbour features predicting "answer within 200 km" (``--target split`` predicts the split itself instead),
fitted with and without a ninth, the *relative* similarity (the best similarity minus the mean of the best 8
neighbours' own best similarity to the rest of the gallery: a local-outlier-factor idea, since lookalikes in a
uniform landscape are similar to anything there).  Beside the groups, one normalised score as in adaptive
geodesic conformal prediction (arXiv 2602.16015): the region score divided by a ridge prediction of it from the
same features, one cut for all; and a per-level mix of the two (``normalised_coverage``).  The last row is the
ceiling: groups by the split itself, which no query knows.

    python benchmarks/conformal_signals.py --model runs/conformal/efficientnet_seed0/demo-model --seed 0
    python benchmarks/conformal_signals.py --model runs/bm-learned/efficientnet_seed0/demo-model --seed 0 --top8 --target split

(the second: the learned-map protocol runs of BENCHMARKS.md 4c; what BENCHMARKS.md 6 "How far query-time groups
can go" reports).
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from locdiff_ext.calibrate import run_with_maps
from locdiff_ext.datasets.demo import MAP_SIZE, DemoConfig, build_dataset, image_features, validation_sets
from locdiff_ext.evaluation.conformal import conformal_quantile, radius_scores, region_scores
from locdiff_ext.kernels.geometry import great_circle_km
from locdiff_ext.locdiff import LocDiff
from locdiff_ext.model.metric import map_queries
from locdiff_ext.model.retrieval import query_signals

RELATIVE = "relative similarity (best minus its top 8's own best)"


def auc(y: np.ndarray, x: np.ndarray) -> float:
    """ROC AUC of score x for labels y (Mann-Whitney, ties averaged)."""
    r = np.empty(len(x))
    order = np.argsort(x, kind="stable")
    r[order] = np.arange(1, len(x) + 1)
    for v in np.unique(x):  # average ranks of ties
        m = x == v
        r[m] = r[m].mean()
    pos = y.astype(bool)
    return float((r[pos].sum() - pos.sum() * (pos.sum() + 1) / 2) / (pos.sum() * (~pos).sum()))


def features(model: LocDiff, emb: torch.Tensor) -> dict:
    sims, nc = model.search_neighbours(emb, 64)
    q = query_signals(sims, nc)  # the top-8 signals every prediction carries
    out = {"top similarity": q["top_similarity"], "gap to 8th": q["similarity_gap"],
           "gap to 64th": sims[:, 0] - sims[:, 63], "mean of top 8": sims[:, :8].mean(1),
           "share of top 8 within 600 km of the 1st": q["neighbour_agreement"],
           "log median distance of top 8 to the 1st": -q["neighbour_spread"]}
    d = great_circle_km(nc.reshape(-1, 2).double(), nc[:, 0].repeat_interleave(64, 0).double()).reshape(-1, 64)
    out["share of top 64 within 600 km of the 1st"] = (d < 600).double().mean(1)
    out["log median distance of top 64 to the 1st"] = -torch.log1p(d.median(1).values)
    g = model.gallery.embeddings
    own = gallery_best_similarity(g, map_queries(g, model.query_map))
    ids = gallery_ids(model, emb, 8)
    out[RELATIVE] = sims[:, 0].double() - own[ids].mean(1)
    return {k: v.double().numpy() for k, v in out.items()}


def gallery_best_similarity(gallery: torch.Tensor, queries: torch.Tensor, chunk: int = 2048) -> torch.Tensor:
    """Each gallery row's best similarity [G] (float64) to another row, its search query ``queries`` [G, D]."""
    out = []
    for i in range(0, len(gallery), chunk):
        s = queries[i:i + chunk] @ gallery.T
        s[torch.arange(s.shape[0]), torch.arange(i, i + s.shape[0])] = -2.0
        out.append(s.max(1).values)
    return torch.cat(out).double()


def gallery_ids(model: LocDiff, emb: torch.Tensor, k: int) -> torch.Tensor:
    """The row numbers [B, k] of the best ``k`` gallery rows of each query (the search returns coordinates)."""
    q = map_queries(emb, model.query_map)
    return torch.cat([(q[i:i + 1024] @ model.gallery.embeddings.T).topk(k, dim=1).indices for i in range(0, len(q), 1024)])


def logistic(X: np.ndarray, y: np.ndarray, l2: float = 1e-2) -> np.ndarray:
    """Weights [D + 1] of an L2-regularised logistic regression (torch LBFGS)."""
    Xt = torch.from_numpy(np.c_[X, np.ones(len(X))])
    yt = torch.from_numpy(y.astype(np.float64))
    w = torch.zeros(Xt.shape[1], dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w], max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(Xt @ w, yt) + l2 * (w[:-1] ** 2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach().numpy()


def ridge(X: np.ndarray, y: np.ndarray, l2: float = 1e-2) -> np.ndarray:
    """Weights [D + 1] of a ridge regression (the sign flipped: a higher score means easier, as for logistic)."""
    A = np.c_[X, np.ones(len(X))]
    w = np.linalg.solve(A.T @ A + l2 * len(X) * np.diag(np.r_[np.ones(X.shape[1]), 0.0]), A.T @ y)
    return -w


def grouped_coverage(score, signal_a, signal_b, a, b, split, groups: int, edges=None) -> dict:
    """Conformal thresholds per quantile group of ``signal_a`` on items ``a`` (or per group of the given
    ``edges``), coverage of items ``b`` per split."""
    edges = np.quantile(signal_a, np.arange(1, groups) / groups) if edges is None else edges
    ga, gb = np.searchsorted(edges, signal_a), np.searchsorted(edges, signal_b)
    out = {}
    for p in (0.5, 0.9):
        th = np.array([conformal_quantile(score[a][ga == g], p) for g in range(groups)])
        hit = score[b] <= th[gb] + 1e-12
        for s, name in ((0, "unseen"), (1, "seen")):
            out[(name, p)] = hit[split[b] == s].mean()
    return out


def normalised_coverage(score, X, a, b, split, p_star=None) -> dict:
    """AGCP-style: the score over a difficulty ``sigma`` (a ridge prediction of the score from ``X``, fitted
    on items ``a``, floored at 1e-3), one conformal cut of the ratio; coverage of items ``b`` per split.
    With ``p_star``, the per-level mix: up to p_star the cuts of 4 quantile groups of that prediction (the
    library's groups), above it the larger of the normalised cut and the grouped cut at p_star (so that the
    regions stay nested)."""
    w = -ridge(X[a], score[a])
    pred = X @ w[:-1] + w[-1]
    sigma = np.maximum(pred, 1e-3)
    edges = np.quantile(pred[a], [0.25, 0.5, 0.75])
    ga, gb = np.searchsorted(edges, pred[a]), np.searchsorted(edges, pred[b])

    def grouped(p):
        return np.array([conformal_quantile(score[a][ga == g], p) for g in range(4)])[gb]

    out = {}
    for p in (0.5, 0.9):
        cut = conformal_quantile(score[a] / sigma[a], p) * sigma[b]
        if p_star is not None:
            cut = grouped(p) if p <= p_star else np.maximum(cut, grouped(p_star))
        hit = score[b] <= cut + 1e-12
        for s, name in ((0, "unseen"), (1, "seen")):
            out[(name, p)] = hit[split[b] == s].mean()
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True, help="the demo-model directory of that run")
    ap.add_argument("--seed", type=int, default=0, help="the run's seed (which crops)")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--target", choices=["200km", "split", "score"], default="200km",
                    help="what the learnt score predicts: answer within 200 km, the split, or the region score (ridge)")
    ap.add_argument("--top8", action="store_true", help="features of the 8 best neighbours and the mode's score only")
    args = ap.parse_args(argv)
    cfg = DemoConfig(seed=args.seed)
    model = LocDiff.from_pretrained(args.model)  # first: a wrong path fails before the crops are embedded
    data = build_dataset(cfg.num_crops, cfg.crop_px, cfg.image_px, seed=args.seed)
    _, emb = image_features(data, cfg, False)
    val, _ = validation_sets(data, cfg)
    idx = np.concatenate([val["region"], val["random"]])
    split = np.r_[np.zeros(len(val["region"])), np.ones(len(val["random"]))]
    run = run_with_maps(model, emb[idx], MAP_SIZE, seed=args.seed)
    truth = data.coords[idx]
    score = region_scores(run["maps"].numpy(), truth, run["answers"].numpy())
    dist = radius_scores(run["answers"].numpy(), truth)
    feats = features(model, emb[idx])
    print(f"{len(idx)} validation crops ({len(val['region'])} of held-out tiles, {len(val['random'])} of seen places)")
    print("\n| signal | ROC AUC, seen vs unseen |\n|---|---:|")
    for k, v in feats.items():
        print(f"| {k} | {auc(split, v):.3f} |")
    rng = np.random.default_rng(0)
    X = np.stack(list(feats.values()), 1)
    X = (X - X.mean(0)) / X.std(0)
    target = split if args.target == "split" else (dist < 200).astype(float)
    if args.top8:  # only what a prediction has at hand: its 8 neighbours and its mode's score
        feats = {k: v for k, v in feats.items() if "64" not in k}
        feats["mode score"] = run["signals"]["mode_score"].numpy()
        X = np.stack(list(feats.values()), 1)
        X = (X - X.mean(0)) / X.std(0)
    plain = [k for k in feats if k != RELATIVE]  # the features without the relative similarity
    rows, aucs = {}, {}
    for _ in range(args.repeats):
        perm = rng.permutation(len(idx))
        a, b = perm[: len(idx) // 2], perm[len(idx) // 2:]
        for G in (1, 2, 4, 6, 8, 10):
            cov = grouped_coverage(score, feats["top similarity"][a], feats["top similarity"][b], a, b, split, G)
            rows.setdefault(f"top similarity, {G} group{'s' if G > 1 else ''}", []).append(cov)
        for label, cols in (("", [list(feats).index(k) for k in plain]), (", with the relative similarity", slice(None))):
            Xs = X[:, cols]
            w = ridge(Xs[a], score[a]) if args.target == "score" else logistic(Xs[a], target[a])
            la, lb = Xs[a] @ w[:-1], Xs[b] @ w[:-1]
            aucs.setdefault(label, []).append(auc(split[b], lb))
            for G in (4, 8):
                rows.setdefault(f"learnt score ({args.target}){label}, {G} groups", []).append(
                    grouped_coverage(score, la, lb, a, b, split, G))
        rows.setdefault("normalised score (AGCP-style, every feature), one cut", []).append(
            normalised_coverage(score, X, a, b, split))
        for p_star in (0.5, 0.75):
            rows.setdefault(f"per-level mix: grouped up to {p_star:g}, then normalised (nested)", []).append(
                normalised_coverage(score, X, a, b, split, p_star))
        rows.setdefault("the split itself (the ceiling: no query knows it), 2 groups", []).append(
            grouped_coverage(score, split[a], split[b], a, b, split, 2, edges=np.array([0.5])))
    for label, v in aucs.items():
        print(f"\nlearnt score{label}: ROC AUC seen vs unseen {np.mean(v):.3f} on the held-out halves")
    print(f"\nCoverage per split, mean over {args.repeats} random halves (fit on one, tested on the other):\n")
    print("| groups by | unseen 50% | unseen 90% | seen 50% | seen 90% |\n|---|---:|---:|---:|---:|")
    for name, covs in rows.items():
        cells = [100 * np.mean([c[(s, p)] for c in covs]) for s in ("unseen", "seen") for p in (0.5, 0.9)]
        print(f"| {name} | " + " | ".join(f"{c:.1f}" for c in cells) + " |")


if __name__ == "__main__":
    main()
