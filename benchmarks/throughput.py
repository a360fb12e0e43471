"""geolocate throughput vs accuracy on the demo model (issue 11, section 4): inputs/s against % within
750 / 2500 km for sampler settings, on VALIDATION crops that the demo's reported tables never use.

Validation: crops of the dataset's validation splits (their own held-out tiles and random crops, disjoint
from the test crops).

Run (after `locdiff demo`):  python benchmarks/throughput.py [--model ~/.cache/locdiff/demo-model] [--n 300]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

import locdiff_ext as ld
from locdiff_ext.datasets.bluemarble import build_dataset
from locdiff_ext.datasets.demo import DemoConfig, _eval_subset
from locdiff_ext.inference import default_model_dir
from locdiff_ext.evaluation.metrics import paired_bootstrap
from locdiff_ext.kernels.geometry import great_circle_km

SETTINGS = [  # (sampler, steps, samples); the first is the reference of the paired differences
    ("ddim", 25, 16),
    ("dpm++", 10, 16),
    ("dpm++", 8, 8),
    ("dpm++", 6, 8),
    ("dpm++", 8, 4),
    ("dpm++", 5, 4),
]


def validation_sets(cfg: DemoConfig, n: int):
    """``n`` crops of each validation split (never the test crops; the demo's choices were made on the same
    validation splits, so accuracy differences here are validation figures)."""
    data = build_dataset(cfg.num_crops, cfg.crop_px, cfg.image_px, cfg.seed)
    out = {}
    for split in ("val_region", "val_random"):
        idx = _eval_subset(data.splits[split], n, cfg.seed + 101)
        out[split] = (data.tensors(idx), torch.from_numpy(data.coords[idx]))
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="model directory (default: the demo model)")
    ap.add_argument("--n", type=int, default=300, help="validation crops per split")
    args = ap.parse_args(argv)
    model = ld.LocDiff.from_pretrained(args.model or default_model_dir())
    sets = validation_sets(DemoConfig(image_px=model.image_encoder.image_size), args.n)  # crops as the model saw them
    emb = {k: model.embed(x) for k, (x, _) in sets.items()}  # embedding is not what is being timed
    print(f"model: L={model.config.L}, retrieval_k={model.config.retrieval_k}, guidance {model.default_guidance}; "
          f"{args.n} validation crops per split; {torch.get_num_threads()} threads")
    print("\nEach split: % within 750 / 2500 km; in brackets the paired difference from the first row in points "
          "(95% paired bootstrap interval).\n")
    print("| sampler | steps | samples | inputs/s | region 750 / 2500 km | random 750 / 2500 km |")
    print("|---|---:|---:|---:|---|---|")
    first = {}
    for sampler, steps, samples in SETTINGS:
        model.config.sampler = sampler
        cells, rate = [], []
        for split, (_, truth) in sets.items():
            t0 = time.perf_counter()
            coords, _, _ = model.predict(emb[split], num_samples=samples, steps=steps, seed=0)
            rate.append(len(truth) / (time.perf_counter() - t0))
            pred = coords[:, 0]
            km = great_circle_km(pred, truth)
            cell = f"{(km < 750).double().mean() * 100:.1f} / {(km < 2500).double().mean() * 100:.1f}"
            if split in first:
                d = paired_bootstrap(pred, first[split], truth, thresholds=(750, 2500))
                cell += " (" + ", ".join(f"{v[0]:+.1f} [{v[1]:+.1f}, {v[2]:+.1f}]" for v in d.values()) + ")"
            else:
                first[split] = pred
            cells.append(cell)
        print(f"| {sampler} | {steps} | {samples} | {np.mean(rate):.1f} | {cells[0]} | {cells[1]} |", flush=True)


if __name__ == "__main__":
    main()
