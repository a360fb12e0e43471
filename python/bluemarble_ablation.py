"""Ablations of LocDiff on the Blue Marble VALIDATION crops (never the test crops).

    python python/bluemarble_ablation.py --run runs/protocol/efficientnet_seed0 --out ablation.md
    python python/bluemarble_ablation.py --run ... --train L=64 weighting=gaussian retrieval_k=0

``--run`` is a finished run of the demo's pipeline (``locdiff demo --out DIR`` or one run of
python/bluemarble_protocol.py): its dataset is rebuilt from its config and its saved model is evaluated
with inference settings changed one at a time (guidance, samples, aggregation of samples, sampler
steps).  ``--train`` also trains models with one config field changed (``FIELD=VALUE``, LocDiffConfig
names; ``FIELD=VALUE,FIELD=VALUE`` changes several in one model) on the same embeddings and evaluates them the same way.  Each row gives % within 25 / 200 / 750 /
2500 km on the validation region hold-out and random crops, and the mean of the eight (what the demo's
choices maximise); paired differences from the first row are in brackets for the 750 / 2500 km cells
of the region split (a cluster bootstrap over the held-out tiles: crops of one tile succeed or fail
together).  ``--calibration`` also compares two ways of calibrating LocDiff's maps, each
fitted on one half of the validation crops and scored on the other half: one temperature for all (what
the demo does) and one per group of queries split at a threshold on their best gallery similarity (a
near-duplicate in the gallery: a seen place), the threshold chosen on the fitting half too.
"""

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from locdiff_ext import LocDiff
from locdiff_ext.datasets.bluemarble import build_dataset, tile_ids
from locdiff_ext.datasets.demo import DemoConfig, embed_all, train_locdiff, validation_sets
from locdiff_ext.evaluation import (cell_areas_km2, coverage, coverage_gap, fit_sharpness, geolocation_metrics,
                                   paired_bootstrap, sharpen)

INFERENCE = [  # (label, predict keyword arguments); the first is the saved model's default
    ("default (guidance 2, 16 samples, mean, DPM-Solver++ 10 steps)", {}),
    ("guidance 1 (no guidance)", {"guidance_scale": 1.0}),
    ("guidance 3", {"guidance_scale": 3.0}),
    ("64 samples", {"num_samples": 64}),
    ("aggregate: densest sample cluster", {"aggregate": "mode"}),
    ("20 sampler steps", {"steps": 20}),
]


def _value(text: str):
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def _gap(maps, truths) -> float:
    levels = [round(0.05 * i, 2) for i in range(1, 20)]
    cov = coverage(maps, truths, levels)
    return float(np.mean([abs(cov[p]["coverage"] - p) for p in levels]))


def fit_gated(maps, truths, gate) -> tuple:
    """(threshold, s below, s at or above): the gate threshold (a quantile of ``gate``) and per-group
    exponents whose groups' coverage gaps, weighted by group size, are smallest."""
    best = None
    for q in (0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8):
        tau = float(np.quantile(gate, q))
        lo, hi = gate < tau, gate >= tau
        s_lo, s_hi = fit_sharpness(maps[lo], truths[lo]), fit_sharpness(maps[hi], truths[hi])
        gap = (lo.sum() * _gap(sharpen(maps[lo], s_lo), truths[lo]) + hi.sum() * _gap(sharpen(maps[hi], s_hi), truths[hi]))
        if best is None or gap < best[0]:
            best = (gap, tau, s_lo, s_hi)
    return best[1:]


def apply_gated(maps, gate, rule) -> np.ndarray:
    tau, s_lo, s_hi = rule
    out = np.empty(maps.shape)
    out[gate < tau] = sharpen(maps[gate < tau], s_lo)
    out[gate >= tau] = sharpen(maps[gate >= tau], s_hi)
    return out


def training_prior(train_coords: torch.Tensor, L: int, shape) -> np.ndarray:
    """The training locations' density, band-limited to degree L (the mean of their SHDD vectors, synthesised
    on the maps' grid, negative lobes clipped to a small floor) and normalised: a broad map that still
    covers places no training crop comes from."""
    from locdiff_ext import sh_synthesis, shdd_encode
    f = sh_synthesis(shdd_encode(train_coords.double(), L).mean(0, keepdim=True), *shape)[0].numpy()
    f = np.maximum(f, 0.01 * f.max()) * cell_areas_km2(*shape)[:, None]
    return f / f.sum()


def fit_mixture(maps, truths, prior) -> tuple:
    """(s, alpha): the exponent of ``sharpen`` and the weight of the prior in (1 - alpha) sharpen(m, s) + alpha
    prior whose coverage gap (mean over 5%..95%, pooled) is smallest."""
    best = None
    for s in (0.5, 0.71, 1.0, 1.41, 2.0, 2.83, 4.0):
        sharp = sharpen(maps, s)
        for alpha in (0.0, 0.01, 0.03, 0.1, 0.2, 0.3, 0.5):
            gap = coverage_gap((1 - alpha) * sharp + alpha * prior[None], truths)
            if best is None or gap < best[0] - 1e-12:
                best = (gap, s, alpha)
    return best[1:]


def calibration_experiment(model, q, truth, seed: int, prior: np.ndarray) -> list:
    """Markdown rows: coverage at 50% / 90% on the held-back half of each validation split, for the raw maps,
    one temperature, the similarity-gated temperatures and a temperature with a mixture weight on the
    training prior, each fitted on the other half."""
    maps, gate, halves = {}, {}, {}
    model.config.map_sharpness = 1.0  # the raw maps (a saved demo model carries the demo's calibration)
    for split in q:
        maps[split] = model.predict(q[split], seed=seed, return_map=True, map_size=(90, 180))[2].numpy()
        gate[split] = model.search_neighbours(q[split], 1)[0][:, 0].numpy()
        perm = np.random.default_rng(seed).permutation(len(maps[split]))
        halves[split] = (perm[: len(perm) // 2], perm[len(perm) // 2:])
    fit = {k: np.concatenate([v[halves[s][0]] for s, v in d.items()]) for k, d in
           (("maps", maps), ("truth", {s: truth[s].numpy() for s in q}), ("gate", gate))}
    s_one = fit_sharpness(fit["maps"], fit["truth"])
    rule = fit_gated(fit["maps"], fit["truth"], fit["gate"])
    s_mix, alpha = fit_mixture(fit["maps"], fit["truth"], prior)
    uniform = cell_areas_km2(*prior.shape)[:, None] * np.ones(prior.shape)
    uniform /= uniform.sum()
    s_uni, a_uni = fit_mixture(fit["maps"], fit["truth"], uniform)
    rows = [f"Calibration rules fitted on half of the validation crops: one temperature s={s_one:g}; gated: "
            f"best-neighbour similarity < {rule[0]:.3f}: s={rule[1]:g}, else s={rule[2]:g}; mixture: s={s_mix:g}, "
            f"prior weight {alpha:g}; uniform mixture: s={s_uni:g}, weight {a_uni:g}.  Coverage of the 50% / "
            "90% regions on the other half (median 90% area, million km^2):", "",
            "| rule | region hold-out | random split |", "|---|---|---|"]
    for label, f in [("raw", lambda m, g: m), ("one temperature", lambda m, g: sharpen(m, s_one)),
                     ("gated by similarity", lambda m, g: apply_gated(m, g, rule)),
                     ("temperature + training prior", lambda m, g: (1 - alpha) * sharpen(m, s_mix) + alpha * prior[None]),
                     ("temperature + uniform", lambda m, g: (1 - a_uni) * sharpen(m, s_uni) + a_uni * uniform[None])]:
        cells = []
        for split in q:
            held = halves[split][1]
            cov = coverage(f(maps[split][held], gate[split][held]), truth[split].numpy()[held], (0.5, 0.9))
            cells.append(f"{100 * cov[0.5]['coverage']:.1f}% / {100 * cov[0.9]['coverage']:.1f}% "
                         f"({cov[0.9]['median_area_km2'] / 1e6:.1f})")
        rows.append(f"| {label} | {cells[0]} | {cells[1]} |")
    return rows


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", required=True, help="a finished demo/protocol run directory (holds demo/results.json)")
    ap.add_argument("--train", nargs="*", default=[],
                    help="LocDiffConfig changes to train and evaluate, one model each: FIELD=VALUE[,FIELD=VALUE...]")
    ap.add_argument("--calibration", action="store_true", help="also compare calibration rules (see above)")
    ap.add_argument("--no-inference", action="store_true", help="skip the inference-setting rows")
    ap.add_argument("--out", default=None, help="also write the table to this Markdown file")
    args = ap.parse_args(argv)
    run = Path(args.run)
    report = json.loads((run / "demo" / "results.json").read_text())
    cfg = DemoConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in report["config"].items()})
    model = LocDiff.from_pretrained(run / "demo-model")
    data = build_dataset(cfg.num_crops, cfg.crop_px, cfg.image_px, seed=cfg.seed)
    coords = torch.from_numpy(data.coords)
    val, monitor = validation_sets(data, cfg)
    every = np.concatenate(list(val.values()))
    with torch.no_grad():
        emb_val = torch.cat([model.image_encoder(data.tensors(every[i:i + 512])) for i in range(0, len(every), 512)])
    cut = len(val["region"])
    q = {"region": emb_val[:cut], "random": emb_val[cut:]}

    rows, first = [], None

    def evaluate(label, m, **kw):
        nonlocal first
        t = time.perf_counter()
        cells, accs = [], []
        for split, idx in val.items():
            pred = m.predict(q[split], seed=cfg.seed, **kw)[0][:, 0]
            res = geolocation_metrics(pred, coords[idx])
            a = [res[f"acc_{d}km"] for d in (25, 200, 750, 2500)]
            accs += a
            cell = " / ".join(f"{v:.1f}" for v in a)
            if split == "region":
                if first is None:
                    first = pred
                else:
                    # crops of one held-out tile succeed or fail together: resample tiles, not crops
                    d = paired_bootstrap(pred, first, coords[idx], thresholds=(750, 2500), seed=cfg.seed,
                                         groups=tile_ids(data.coords[idx, 0], data.coords[idx, 1]))
                    cell += " (" + ", ".join(f"{v[0]:+.1f} [{v[1]:+.1f}, {v[2]:+.1f}]" for v in d.values()) + ")"
            cells.append(cell)
        rows.append(f"| {label} | {cells[0]} | {cells[1]} | {np.mean(accs):.1f} |")
        print(rows[-1], f"({time.perf_counter() - t:.0f} s)", flush=True)

    head = [f"Validation crops of {run} (seed {cfg.seed}, {cfg.encoder} features): {len(val['region'])} region hold-out "
            f"and {len(val['random'])} random; % within 25 / 200 / 750 / 2500 km.", "",
            "| variant | region hold-out | random split | mean |", "|---|---|---|---:|"]
    print("\n".join(head), flush=True)
    for label, kw in ([] if args.no_inference else INFERENCE):
        evaluate(label, model, **kw)
    if args.train:
        emb = embed_all(model.image_encoder, data)
        base = {"retrieval_temperature": model.config.retrieval_temperature}
        for change in args.train:
            fields = dict(item.partition("=")[::2] for item in change.split(","))
            t = time.perf_counter()
            trained = train_locdiff(emb, coords, data.splits["train"], monitor, cfg, model.image_encoder,
                                    run / "ablation" / change.replace("=", "_").replace(",", "+"), progress=False,
                                    **{**base, **{f: _value(v) for f, v in fields.items()}})
            print(f"    trained {change} in {time.perf_counter() - t:.0f} s", flush=True)
            evaluate(f"trained with {change}", trained)
    if args.calibration:
        prior = training_prior(coords[data.splits["train"]], model.config.L, (90, 180))
        cal = calibration_experiment(model, q, {s: coords[idx] for s, idx in val.items()}, cfg.seed, prior)
        print("\n".join(cal), flush=True)
        rows += [""] + cal
    text = "\n".join(head + rows)
    if args.out:
        Path(args.out).write_text(text + "\n")
    print("\n" + text)


if __name__ == "__main__":
    main()
