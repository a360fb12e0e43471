"""The Blue Marble benchmark over several seeds and both encoder settings: means and 95% intervals.

    python python/bluemarble_protocol.py --seeds 0 1 2 --encoders efficientnet cnn --out runs/protocol

Each (encoder, seed) run is the demo's pipeline (locdiff_ext.datasets.demo.run_demo) with that seed: the
seed draws the crops, the held-out tiles and the random splits, and seeds every training; choices are
made on that run's validation crops, and its test crops are evaluated once.  Runs already finished
(their results.json exists) are not run again, so an interrupted protocol resumes.  The summary gives,
per encoder setting, split and method, the mean over seeds and a 95% Student-t interval over seeds,
and for each LocDiff row minus each baseline the mean paired difference with its interval over seeds
(an interval that contains 0 is a tie), and the calibration of the credible regions.
"""

import argparse
import json
import math
import re
import time
from pathlib import Path
from typing import Dict, List

import numpy as np

T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}
METRICS = ["acc_25km", "acc_200km", "acc_750km", "acc_2500km", "median_km"]
SPLITS = {"test_region": "Region hold-out (unseen places)", "test_random": "Random split (seen places)"}
ENCODERS = {"efficientnet": "frozen ImageNet EfficientNet-Lite0", "cnn": "small CNN trained on geography"}


def mean_interval(values) -> tuple:
    """(mean, low, high): the 95% Student-t interval of the mean over seeds (no interval for one seed)."""
    v = np.asarray(values, dtype=np.float64)
    m = float(v.mean())
    if len(v) < 2:
        return m, float("nan"), float("nan")
    half = T_975.get(len(v) - 1, 1.96) * float(v.std(ddof=1)) / math.sqrt(len(v))
    return m, m - half, m + half


def _cell(values, digits: int = 1, sign: bool = False, percent: bool = False) -> str:
    """'mean (low .. high)'; the interval of a quantity that cannot be negative (all but differences) is
    clipped at 0, a percentage's at 100 too."""
    m, lo, hi = mean_interval(values)
    if not math.isnan(lo):
        lo = lo if sign else max(lo, 0.0)
        hi = min(hi, 100.0) if percent else hi
    f = f"{{:{'+' if sign else ''}.{digits}f}}"
    return f.format(m) if math.isnan(lo) else f"{f.format(m)} ({f.format(lo)} .. {f.format(hi)})"


def _generic(name: str) -> str:
    """A method's name without its run-specific parts (the kNN density's k and a calibration's exponent s are
    chosen per seed)."""
    name = re.sub(r"anchored \(w=[^)]*\)", "anchored (chosen on validation)", name)
    return re.sub(r" \(s=[0-9.e+-]+\)", "", re.sub(r"kNN density \(k=\d+\)", "kNN density", name))


def summarise(runs: Dict[str, List[dict]]) -> str:
    """Markdown tables from {encoder: [results.json of each seed]}."""
    out = []
    for enc, reports in runs.items():
        seeds = [r["config"]["seed"] for r in reports]
        out += [f"## {ENCODERS.get(enc, enc)} features, seeds {seeds}", ""]
        for split, title in SPLITS.items():
            rows: Dict[str, Dict[str, list]] = {}
            for r in reports:
                for name, m in r["results"][split].items():
                    for k in METRICS:
                        rows.setdefault(_generic(name), {}).setdefault(k, []).append(m[k])
            n = reports[0]["results"][split][next(iter(reports[0]["results"][split]))]["n"]
            out += [f"### {title}, {n} test crops per seed", "",
                    "| method | 25 km | 200 km | 750 km | 2500 km | median km |", "|---|---:|---:|---:|---:|---:|"]
            out += [f"| {name} | " + " | ".join(_cell(v[k], 0 if k == "median_km" else 1, percent=k != "median_km")
                                                for k in METRICS) + " |" for name, v in rows.items()]
            diffs: Dict[str, Dict[str, list]] = {}
            for r in reports:
                for name, d in r["paired_differences"][split].items():
                    a, b = name.split(" - ", 1)
                    for k, (mean, _, _) in d.items():
                        diffs.setdefault(f"{_generic(a)} - {_generic(b)}", {}).setdefault(k, []).append(mean)
            keys = [k for k in ("acc_25km", "acc_200km", "acc_750km", "acc_2500km")
                    if all(k in d for d in diffs.values())]  # reports before 2026-12-06 have 200 km and up
            out += ["", "Paired differences in points (LocDiff row minus baseline on the same crops), mean over seeds "
                    "and its 95% interval over seeds:", "",
                    "| comparison | " + " | ".join(k[4:].replace("km", " km") for k in keys) + " |",
                    "|---|" + "---:|" * len(keys)]
            out += [f"| {name} | " + " | ".join(_cell(v[k], 1, sign=True) for k in keys) + " |" for name, v in diffs.items()]
            cal: Dict[str, Dict[str, list]] = {}
            for r in reports:
                for name, levels in r["calibration"][split].items():
                    for p in ("0.5", "0.9"):
                        cal.setdefault(_generic(name), {}).setdefault(f"cov{p}", []).append(100 * levels[p]["coverage"])
                        cal[_generic(name)].setdefault(f"area{p}", []).append(levels[p]["median_area_km2"] / 1e6)
            out += ["", "Calibration: % of true locations inside the 50% / 90% credible regions and their median "
                    "area (million km^2), mean over seeds (95% interval):", "",
                    "| method | 50%: coverage | 50%: area | 90%: coverage | 90%: area |", "|---|---:|---:|---:|---:|"]
            out += [f"| {name} | " + " | ".join(_cell(v[k], 1 if k.startswith("cov") else 2, percent=k.startswith("cov"))
                                                for k in ("cov0.5", "area0.5", "cov0.9", "area0.9")) + " |"
                    for name, v in cal.items()]
            out += _per_seed_coverage(reports, split)
            out.append("")
        chosen = [r["validation"]["knn_density_chosen"] for r in reports]
        out += ["Chosen on validation, per seed: kNN density " + "; ".join(f"k={c['k']}, T={c['temperature']:g}" for c in chosen)]
        if all("map_sharpness" in r["validation"] for r in reports):  # reports before 2026-12-06
            out[-1] += "; map temperatures s " + "; ".join(
                ", ".join(f"{_generic(m).split(' (')[0]} {v:g}" for m, v in r["validation"]["map_sharpness"].items())
                for r in reports)
        if all("calibration" in r["validation"] for r in reports):  # conformal regions: the groups' signal
            out[-1] += "; conformal groups by " + "; ".join(
                ", ".join(f"{_generic(m).split(' (')[0]} {c['signal']} {tuple(c['sizes'])}"
                          for m, c in r["validation"]["calibration"].items()) for r in reports)
        out.append("")
    return "\n".join(out)


def _per_seed_coverage(reports: List[dict], split: str) -> List[str]:
    """Conformal rows, seed by seed: coverage with its 95% binomial (Wilson) interval, and the conformal
    radius's own coverage, so that each seed can be read against the goal band (reports before the
    conformal regions have no such rows: nothing)."""
    rows: Dict[str, List[str]] = {}
    for r in reports:
        for name, levels in r["calibration"][split].items():
            if "lo" not in levels["0.5"]:
                continue
            cells = []
            for p in ("0.5", "0.9"):
                c = levels[p]
                cell = f"{100 * c['coverage']:.1f} [{100 * c['lo']:.1f}, {100 * c['hi']:.1f}]"
                if "median_radius_km" in c:
                    cell += f"; radius {c['median_radius_km']:.0f} km: {100 * c['radius_coverage']:.1f}"
                cells.append(cell)
            rows.setdefault(_generic(name), []).append(f"seed {r['config']['seed']}: " + " / ".join(cells))
    if not rows:
        return []
    return ["", "Per seed: % of truths inside the 50% / 90% regions [95% Wilson interval] (conformal rows: "
            "the median conformal radius and the % of truths within it):", ""] + \
        [f"- {name}: " + "; ".join(v) for name, v in rows.items()]


def main(argv=None) -> None:
    from locdiff_ext.datasets.demo import DemoConfig, run_demo

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--encoders", nargs="+", default=["efficientnet", "cnn"], choices=sorted(ENCODERS))
    ap.add_argument("--out", required=True, help="directory of the runs and the summary")
    ap.add_argument("--quick", action="store_true", help="the demo's quick configuration (a smoke run)")
    ap.add_argument("--crops", type=int, default=None, help="crops per run (default: the demo's)")
    ap.add_argument("--steps", type=int, default=None, help="LocDiff training steps (default: the demo's)")
    ap.add_argument("--weighting", default=None, choices=["none", "gaussian"],
                    help="LocDiff's per-degree taper (default: the demo's, none)")
    ap.add_argument("--retrieval-metric", default=None, choices=["cosine", "learned"],
                    help="LocDiff-R's search (default: the demo's, cosine; 'learned': a query map fitted on the "
                         "training crops)")
    args = ap.parse_args(argv)
    out = Path(args.out)
    runs: Dict[str, List[dict]] = {}
    for enc in args.encoders:
        for seed in args.seeds:
            run = out / f"{enc}_seed{seed}"
            report = run / "demo" / "results.json"
            if not report.is_file():
                cfg = (DemoConfig.quick if args.quick else DemoConfig)(encoder=enc, seed=seed)
                if args.crops:
                    cfg.num_crops = args.crops
                if args.steps:
                    cfg.diffusion_steps = args.steps
                if args.weighting:
                    cfg.weighting = args.weighting
                if args.retrieval_metric:
                    cfg.retrieval_metric = args.retrieval_metric
                t = time.perf_counter()
                print(f"run {enc}, seed {seed} -> {run}", flush=True)
                run_demo(cfg, out=run, progress=False, log=lambda *a: None)
                print(f"    done in {time.perf_counter() - t:.0f} s", flush=True)
            runs.setdefault(enc, []).append(json.loads(report.read_text()))
    text = summarise(runs)
    (out / "summary.md").write_text(text + "\n")
    print(text)
    print(f"summary: {out / 'summary.md'}")


if __name__ == "__main__":
    main()
