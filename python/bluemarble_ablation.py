"""Ablations of LocDiff on the Blue Marble VALIDATION crops (never the test crops).

    python python/bluemarble_ablation.py --run runs/protocol/efficientnet_seed0 --out ablation.md
    python python/bluemarble_ablation.py --run ... --train L=64 weighting=gaussian retrieval_k=0

``--run`` is a finished run of the demo's pipeline (``locdiff demo --out DIR`` or one run of
python/bluemarble_protocol.py): its dataset is rebuilt from its config and its saved model is evaluated
with inference settings changed one at a time (guidance, samples, aggregation of samples, sampler
steps).  ``--train`` also trains models with one config field changed (``FIELD=VALUE``, LocDiffConfig
names) on the same embeddings and evaluates them the same way.  Each row gives % within 25 / 200 / 750 /
2500 km on the validation region hold-out and random crops, and the mean of the eight (what the demo's
choices maximise); paired differences from the first row are in brackets for the 750 / 2500 km cells
of the region split.
"""

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from locdiff_ext import LocDiff
from locdiff_ext.datasets.bluemarble import build_dataset
from locdiff_ext.datasets.demo import DemoConfig, _eval_subset, embed_all, train_locdiff
from locdiff_ext.evaluation import geolocation_metrics, paired_bootstrap

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


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", required=True, help="a finished demo/protocol run directory (holds demo/results.json)")
    ap.add_argument("--train", nargs="*", default=[], help="FIELD=VALUE LocDiffConfig changes to train and evaluate")
    ap.add_argument("--out", default=None, help="also write the table to this Markdown file")
    args = ap.parse_args(argv)
    run = Path(args.run)
    report = json.loads((run / "demo" / "results.json").read_text())
    cfg = DemoConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in report["config"].items()})
    model = LocDiff.from_pretrained(run / "demo-model")
    data = build_dataset(cfg.num_crops, cfg.crop_px, cfg.image_px, seed=cfg.seed)
    coords = torch.from_numpy(data.coords)
    val = {s: _eval_subset(data.splits[f"val_{s}"], cfg.val_size, cfg.seed) for s in ("region", "random")}
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
                    d = paired_bootstrap(pred, first, coords[idx], thresholds=(750, 2500), seed=cfg.seed)
                    cell += " (" + ", ".join(f"{v[0]:+.1f} [{v[1]:+.1f}, {v[2]:+.1f}]" for v in d.values()) + ")"
            cells.append(cell)
        rows.append(f"| {label} | {cells[0]} | {cells[1]} | {np.mean(accs):.1f} |")
        print(rows[-1], f"({time.perf_counter() - t:.0f} s)", flush=True)

    head = [f"Validation crops of {run} (seed {cfg.seed}, {cfg.encoder} features): {len(val['region'])} region hold-out "
            f"and {len(val['random'])} random; % within 25 / 200 / 750 / 2500 km.", "",
            "| variant | region hold-out | random split | mean |", "|---|---|---|---:|"]
    print("\n".join(head), flush=True)
    for label, kw in INFERENCE:
        evaluate(label, model, **kw)
    if args.train:
        emb = embed_all(model.image_encoder, data)
        monitor = np.concatenate([v[:128] for v in val.values()])
        base = {"retrieval_temperature": model.config.retrieval_temperature}
        for change in args.train:
            field, _, value = change.partition("=")
            t = time.perf_counter()
            trained = train_locdiff(emb, coords, data.splits["train"], monitor, cfg, model.image_encoder,
                                    run / "ablation" / change.replace("=", "_"), progress=False,
                                    **{**base, field: _value(value)})
            print(f"    trained {change} in {time.perf_counter() - t:.0f} s", flush=True)
            evaluate(f"trained with {change}", trained)
    text = "\n".join(head + rows)
    if args.out:
        Path(args.out).write_text(text + "\n")
    print("\n" + text)


if __name__ == "__main__":
    main()
