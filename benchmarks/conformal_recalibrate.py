"""The Blue Marble protocol's trained models, calibrated again: single signals against the learnt
localizability score (issue 25).  Same models, same validation and test crops; only the calibration differs.

For each seed's saved run (python/bluemarble_protocol.py --out DIR), the saved LocDiff-R model (at the
inference settings chosen on validation and saved with it) and the kNN density (k, T as chosen then) are run
on the validation crops (the calibration data) and the test crops; two calibrations are fitted on the
validation crops: with the single signals of the first round (none / mode_score / top_similarity) and with
every query-time signal (the learnt 'localizability' offered too).  Coverage per test split at 50 / 90% (and
the levels between, in the JSON) with Wilson intervals, the median 90% area, and coverage within each group.

    python benchmarks/conformal_recalibrate.py --runs runs/conformal --seeds 0 1 2

``--text DIR`` does the same for python/text_benchmark.py's saved models (``--out DIR``, one split a
directory or both in one): the anchored LocDiff-R of each split and seed, and the training-free kNN density
(k, T as chosen in that run), on that split's validation places (calibration) and test places.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import numpy as np
import torch

from locdiff_ext.calibrate import knn_run_with_maps, run_as_numpy, run_with_maps
from locdiff_ext.datasets.demo import MAP_SIZE, DemoConfig, _eval_subset, build_dataset, image_features, validation_sets
from locdiff_ext.evaluation.conformal import conformal_coverage, fit_conformal
from locdiff_ext.locdiff import LocDiff
from locdiff_ext.model.retrieval import KNNDensity

SINGLE = ("mode_score", "top_similarity")
LEVELS = (0.5, 0.6, 0.7, 0.8, 0.9, 0.95)  # the JSON keeps them all: a region must keep its promise at any level


def demo_config(results: dict) -> DemoConfig:
    """The DemoConfig a protocol run recorded in its results.json."""
    known = {f.name for f in dataclasses.fields(DemoConfig)}
    return DemoConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in results["config"].items() if k in known})


def one_seed(run: Path, encoder: str, seed: int) -> dict:
    results = json.loads((run / "demo" / "results.json").read_text())
    cfg = demo_config(results)
    assert cfg.seed == seed and cfg.encoder == encoder, (cfg.seed, cfg.encoder)
    data = build_dataset(cfg.num_crops, cfg.crop_px, cfg.image_px, seed=cfg.seed)
    _, emb = image_features(data, cfg, False)
    coords = torch.from_numpy(data.coords)
    tr = data.splits["train"]
    val, _ = validation_sets(data, cfg)
    val_all = np.concatenate(list(val.values()))
    model = LocDiff.from_pretrained(run / "demo-model")
    knn = KNNDensity(emb[tr], coords[tr], L=cfg.L, **results["validation"]["knn_density_chosen"])
    runs = {"LocDiff-R (saved settings)": lambda e: run_as_numpy(run_with_maps(model, e, MAP_SIZE, seed=cfg.seed)),
            "kNN density": lambda e: run_as_numpy(knn_run_with_maps(knn, e, MAP_SIZE))}
    tests = {s: _eval_subset(data.splits[s], n, cfg.seed)
             for s, n in (("test_region", cfg.eval_region), ("test_random", cfg.eval_random))}
    out = {}
    for method, go in runs.items():
        v = go(emb[val_all])
        got = {s: go(emb[idx]) for s, idx in tests.items()}
        for label, names in (("single signals", SINGLE), ("learnt localizability", None)):
            sig = v["signals"] if names is None else {k: x for k, x in v["signals"].items() if k in names}
            cal, report = fit_conformal(v["maps"], coords[val_all].numpy(), v["answers"], sig, v["settings"], seed=cfg.seed,
                                        learn=names is None)
            row = {"signal": cal.signal, "sizes": cal.sizes, "candidates": report["candidates"]}
            for s, idx in tests.items():
                cov = conformal_coverage(cal, got[s]["maps"], coords[idx].numpy(), got[s]["answers"], got[s]["signals"],
                                         LEVELS)
                row[s] = {str(p): cov[p] for p in LEVELS}
            out[f"{method}, {label}"] = row
            print(f"seed {seed} | {method}, {label} | {cal.describe()} | " + " | ".join(
                f"{s} {p:.0%}: {100 * row[s][str(p)]['coverage']:.1f} [{100 * row[s][str(p)]['lo']:.1f}, "
                f"{100 * row[s][str(p)]['hi']:.1f}]" for s in tests for p in (0.5, 0.9)), flush=True)
    return out


def text_split(run: Path, split: str, seeds) -> dict:
    """One text-benchmark split: its saved models (with the settings chosen on validation) calibrated twice."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "python"))
    from text_benchmark import SPLITS, embedded, make_split  # the recipe's own split and embedding cache

    from locdiff_ext.datasets.geonames import load_places

    args = json.loads((run / "results.json").read_text())["args"]
    rng = np.random.default_rng(args["data_seed"])
    places = load_places()
    places = [places[i] for i in rng.choice(len(places), min(args["places"], len(places)), replace=False)]
    n_val, n_test = int(round(len(places) * 0.1)), int(round(len(places) * 0.15))
    data = embedded(make_split(places, split, n_val, n_test, np.random.default_rng([args["data_seed"], SPLITS.index(split)])),
                    run / f"embeddings-{split}-{args['data_seed']}-{len(places)}.pt")
    (tr_e, tr_c, _), (va_e, va_c, _), (te_e, te_c, _) = data["train"], data["val"], data["test"]
    knn = json.loads((run / "results.json").read_text())[split]["knn_density_chosen"]
    density = KNNDensity(tr_e, tr_c, k=knn["k"], temperature=knn["temperature"], L=args["L"])

    def model_runs(seed):
        m = LocDiff.from_pretrained(run / f"model-{split}-seed{seed}")
        return run_as_numpy(run_with_maps(m, va_e, seed=seed)), run_as_numpy(run_with_maps(m, te_e, seed=seed))

    def density_runs(_):
        return run_as_numpy(knn_run_with_maps(density, va_e)), run_as_numpy(knn_run_with_maps(density, te_e))

    methods = [(f"seed {s}", model_runs, s) for s in seeds]
    methods.append((f"kNN density (k={knn['k']}, T={knn['temperature']:g}), training-free", density_runs, args["data_seed"]))
    out = {}
    for name, go, seed in methods:
        v, t = go(seed)
        for label, learn in (("single signals", False), ("learnt localizability", True)):
            cal, _ = fit_conformal(v["maps"], va_c.double().numpy(), v["answers"], v["signals"], v["settings"],
                                   seed=seed, learn=learn)
            cov = conformal_coverage(cal, t["maps"], te_c.double().numpy(), t["answers"], t["signals"])
            row = {"signal": cal.signal, "sizes": cal.sizes, **{str(p): cov[p] for p in (0.5, 0.9)}}
            out[f"{name}, {label}"] = row
            print(f"{split} | {name} | {label} | {cal.describe()} | " + " | ".join(
                f"{p:.0%}: {100 * cov[p]['coverage']:.1f} [{100 * cov[p]['lo']:.1f}, {100 * cov[p]['hi']:.1f}], "
                f"area {cov[p]['median_area_km2'] / 1e6:.3g}" for p in (0.5, 0.9)), flush=True)
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", help="the protocol's --out directory")
    ap.add_argument("--text", nargs="+", help="text_benchmark.py --out directories (their splits' saved models)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--encoder", default="efficientnet")
    ap.add_argument("--out", help="JSON of every figure (default: RUNS/recalibrated.json)")
    args = ap.parse_args(argv)
    torch.set_grad_enabled(False)
    if args.text:
        res = {}
        for d in args.text:
            for split in json.loads((Path(d) / "results.json").read_text())["args"]["splits"]:
                res[split] = text_split(Path(d), split, args.seeds)
        Path(args.out or Path(args.text[0]) / "recalibrated.json").write_text(json.dumps(res, indent=1))
        return
    if not args.runs:
        ap.error("--runs or --text is needed")
    res = {s: one_seed(Path(args.runs) / f"{args.encoder}_seed{s}", args.encoder, s) for s in args.seeds}
    path = Path(args.out or Path(args.runs) / "recalibrated.json")
    path.write_text(json.dumps(res, indent=1))
    print("\n| seed | method, calibration | groups | unseen 50% | unseen 90% | seen 50% | seen 90% | 90% median area, "
          "unseen / seen (million km^2) |\n|---|---|---|---:|---:|---:|---:|---:|")
    for s, rows in res.items():
        for name, r in rows.items():
            cells = [f"{100 * r[t][p]['coverage']:.1f} [{100 * r[t][p]['lo']:.1f}, {100 * r[t][p]['hi']:.1f}]"
                     for t in ("test_region", "test_random") for p in ("0.5", "0.9")]
            area = " / ".join(f"{r[t]['0.9']['median_area_km2'] / 1e6:.2f}" for t in ("test_region", "test_random"))
            print(f"| {s} | {name} | {r['signal']} {list(r['sizes'])} | " + " | ".join(cells) + f" | {area} |")
    print("\nWithin each group (90%, lowest signal first; n test items):")
    for s, rows in res.items():
        for name, r in rows.items():
            print(f"- seed {s}, {name}: " + "; ".join(f"{t}: " + ", ".join(
                f"{100 * g['coverage']:.1f}% (n={g['n']})" if g["n"] else "- (n=0)" for g in r[t]["0.9"]["per_group"])
                for t in ("test_region", "test_random")))


if __name__ == "__main__":
    main()
