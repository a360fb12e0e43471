"""Accuracy of LocDiff-R trained from a store equals the in-memory path's (issue 20), at 100k rows.

The same synthetic rows (locdiff_ext.datasets.synthetic, D = 768), the same model, seed and steps, trained
two ways: in memory (float32 embeddings, the gallery searched exactly at every step with the hold-out
masked) and from a float16 store (the gallery's neighbour lists, K' = 64, computed once).  Both are tested
on the same 1000 rows from outside the training data, with the kNN density and top-1 retrieval beside
them; differences come with paired bootstrap intervals.

    python benchmarks/scale_accuracy.py --rows 100000 --steps 1500 --dir /tmp/scale-acc
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import torch

import locdiff_ext as ld
from locdiff_ext.data import EmbeddingDataset
from locdiff_ext.data.store import write_store
from locdiff_ext.datasets.synthetic import SyntheticGeo
from locdiff_ext.evaluation import geolocation_metrics, markdown_table
from locdiff_ext.evaluation.metrics import paired_bootstrap
from locdiff_ext.model.retrieval import KNNDensity
from locdiff_ext.train import Trainer, TrainConfig


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--test", type=int, default=1000)
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dir", required=True)
    args = ap.parse_args()
    root = Path(args.dir)
    shutil.rmtree(root, ignore_errors=True)
    world = SyntheticGeo(768, seed=0)
    emb, coords = world.rows(0, args.rows)
    test_e, test_c = (torch.from_numpy(a) for a in world.rows(10**9, args.test))
    store = write_store(root / "store", [(emb, coords)], args.rows, 768, "float16")
    data = EmbeddingDataset(torch.from_numpy(emb), torch.from_numpy(coords))
    cfg = TrainConfig(steps=args.steps, batch_size=256, eval_every=0, checkpoint_every=args.steps, seed=args.seed,
                      warmup_steps=100)
    preds, timing = {}, {}
    for name, train in [("in memory", data), ("store", store)]:
        torch.manual_seed(args.seed)
        model = ld.LocDiff(ld.LocDiffConfig(cond_dim=768, L=32, widths=(256, 128), retrieval_k=8))
        t = time.perf_counter()
        trainer = Trainer(model, train, root / name.replace(" ", "-"), cfg, progress=False)
        trainer.fit()
        timing[name] = time.perf_counter() - t
        preds[f"LocDiff-R (k=8), {name}"] = trainer.ema.predict(test_e, seed=args.seed)[0][:, 0]
    knn = KNNDensity(data.embeddings, data.coords, k=16, temperature=0.03, L=32)
    preds["kNN density (k=16, T=0.03)"] = knn.predict(test_e)
    preds["kNN top-1"] = KNNDensity(data.embeddings, data.coords, k=1, L=32).predict(test_e)
    rows = {name: geolocation_metrics(p, test_c) for name, p in preds.items()}
    print(f"{args.rows} training rows, {args.test} test rows, {args.steps} steps, seed {args.seed}; training "
          + ", ".join(f"{k} {v:.0f} s" for k, v in timing.items()))
    print(markdown_table(rows))
    a, b = preds["LocDiff-R (k=8), store"], preds["LocDiff-R (k=8), in memory"]
    diff = paired_bootstrap(a, b, test_c, thresholds=(25, 200, 750, 2500))
    print("store - in memory, points (95% paired bootstrap interval): "
          + "; ".join(f"{k[4:]} {d:+.1f} [{lo:+.1f}, {hi:+.1f}]" for k, (d, lo, hi) in diff.items()))
    (root / "results.json").write_text(json.dumps({"rows": rows, "store_minus_memory": diff, "timing_s": timing}, indent=1))


if __name__ == "__main__":
    main()
