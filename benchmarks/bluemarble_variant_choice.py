"""Issue 22: which LocDiff-R variant Blue Marble uses, chosen on validation crops only.

For each seed of a learned-map protocol run (``python python/bluemarble_protocol.py --retrieval-metric learned
--out DIR``), the saved anchored model, its own prior (the kNN density over its learned map, w = 1) and the
cosine kNN density (the k, T that run chose on validation) are scored on that seed's validation crops: the
demo's selection score, the mean % within 25 / 200 / 750 / 2500 km, per validation split.  No test crop is read.

    python benchmarks/bluemarble_variant_choice.py --runs runs/bm-learned --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from locdiff_ext.datasets.demo import build_dataset, selection_score, validation_sets
from locdiff_ext.evaluation import geolocation_metrics
from locdiff_ext.locdiff import LocDiff
from locdiff_ext.model.retrieval import KNNDensity

from conformal_recalibrate import demo_config  # this folder's script: the run's recorded DemoConfig


@torch.no_grad()
def one_seed(run: Path) -> dict:
    results = json.loads((run / "demo" / "results.json").read_text())
    cfg = demo_config(results)
    data = build_dataset(cfg.num_crops, cfg.crop_px, cfg.image_px, seed=cfg.seed)
    model = LocDiff.from_pretrained(run / "demo-model").eval()
    if model.query_map is None:
        raise SystemExit(f"{run}: not a learned-map run (--retrieval-metric learned)")
    knn = results["validation"]["knn_density_chosen"]
    cosine = KNNDensity(model.gallery.embeddings, model.gallery.coords, L=cfg.L, **knn)  # the training crops
    out = {}
    for split, idx in validation_sets(data, cfg)[0].items():
        emb = torch.cat([model.image_encoder(data.tensors(idx[i:i + 256])) for i in range(0, len(idx), 256)])
        truth = torch.from_numpy(data.coords[idx])
        preds = {"learned, anchored": model.predict(emb, seed=cfg.seed)[0][:, 0],
                 "learned-map density (w = 1)": model.predict(emb, seed=cfg.seed, prior_weight=1.0, hybrid=False)[0][:, 0],
                 f"cosine kNN density (k = {knn['k']}, T = {knn['temperature']:g})": cosine.predict(emb)}
        out[split] = {name: selection_score(geolocation_metrics(p, truth)) for name, p in preds.items()}
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", required=True, help="the learned-map protocol's --out directory")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--encoder", default="efficientnet")
    args = ap.parse_args(argv)
    res = {s: one_seed(Path(args.runs) / f"{args.encoder}_seed{s}") for s in args.seeds}
    (Path(args.runs) / "variant_choice.json").write_text(json.dumps(res, indent=1))
    for s, splits in res.items():
        for split, row in splits.items():
            print(f"seed {s} | validation {split} | " + " | ".join(f"{k}: {v:.2f}" for k, v in row.items()))


if __name__ == "__main__":
    main()
