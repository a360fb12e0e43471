"""Which crop size and input size for a frozen ImageNet network on Blue Marble crops (chosen on VALIDATION).

    python python/bluemarble_encoder_probe.py --crops 12000 --out probe.md

An ImageNet EfficientNet-Lite expects photos of 224-260 px; a Blue Marble crop of 64 image pixels covers
~470 km at ~7.4 km per pixel.  Two things can be chosen: how much ground a crop shows (``crop_px``) and
how many pixels the network sees (``input_px``: the crop area-averaged down, kept at native resolution,
or upsampled bilinearly).  Each setting is scored by two cheap probes on the frozen features, kNN top-1
retrieval and a grid classifier, on the validation splits (unseen tiles and seen places), together
with its embedding cost; the test splits are never touched here.  Crop sizes are not compared on equal
terms: a larger crop's footprint touches a held-out tile more often, which leaves fewer training crops.
"""

import argparse
import time

import numpy as np
import torch
import torch.nn.functional as F

from locdiff_ext.datasets.bluemarble import build_dataset
from locdiff_ext.encoders.efficientnet import EfficientNetLiteEncoder
from locdiff_ext.evaluation import GridClassifier, KNNRetrieval, geolocation_metrics
from locdiff_ext.kernels.geometry import unit_rows

# (crop_px in Blue Marble pixels, stored px after area-averaging, network input px)
SETTINGS = [(64, 64, 64), (64, 64, 128), (32, 32, 64), (128, 64, 64), (128, 128, 128)]


@torch.no_grad()
def embed(enc: EfficientNetLiteEncoder, images: np.ndarray, size: int, batch: int = 256) -> torch.Tensor:
    out = []
    for i in range(0, len(images), batch):
        x = torch.from_numpy(images[i:i + batch]).permute(0, 3, 1, 2).float().div_(255.0)
        if x.shape[-1] != size:
            x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        out.append(enc(x))
    return torch.cat(out)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--crops", type=int, default=12000)
    ap.add_argument("--variant", default="lite0")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--grid-steps", type=int, default=1500)
    ap.add_argument("--settings", type=int, nargs="+", default=list(range(len(SETTINGS))),
                    help="which rows of SETTINGS to run (default: all)")
    ap.add_argument("--out", default=None, help="also write the table to this Markdown file")
    args = ap.parse_args(argv)
    torch.manual_seed(args.seed)
    enc = EfficientNetLiteEncoder(args.variant)
    rows = ["| crop (km) | stored px | input px | ms / crop | kNN unseen 750 / 2500 km | kNN seen 25 / 200 km "
            "| grid unseen 750 / 2500 km | grid seen 200 / 750 km |", "|" + "---|" * 8]
    sizes = []
    for crop_px, stored, size in [SETTINGS[i] for i in args.settings]:
        data = build_dataset(args.crops, crop_px, stored, seed=args.seed)
        sizes.append(f"{crop_px} px: " + ", ".join(f"{k} {len(v)}" for k, v in data.splits.items()))
        t = time.perf_counter()
        emb = embed(enc, data.images, size)
        ms = (time.perf_counter() - t) / len(emb) * 1e3
        coords = torch.from_numpy(data.coords)
        tr = data.splits["train"]
        knn = KNNRetrieval(emb[tr], coords[tr])
        grid = GridClassifier(steps=args.grid_steps, seed=args.seed).fit(unit_rows(emb[tr]), coords[tr])
        cells = []
        for probe in ("knn", "grid"):
            for split, ks in [("val_region", ("750", "2500")), ("val_random", ("25", "200") if probe == "knn" else ("200", "750"))]:
                idx = data.splits[split]
                pred = knn.predict(emb[idx]) if probe == "knn" else grid.predict(unit_rows(emb[idx]))
                m = geolocation_metrics(pred, coords[idx])
                cells.append(" / ".join(f"{m[f'acc_{k}km']:.1f}" for k in ks))
        km = crop_px * 40075.0 / 5400
        rows.append(f"| {km:.0f} | {stored} | {size} | {ms:.1f} | " + " | ".join(cells) + " |")
        print(rows[-1], flush=True)
    text = "\n".join([f"EfficientNet-{args.variant}, {args.crops} crops (seed {args.seed}), {torch.get_num_threads()} "
                      "threads; split sizes per crop size (a larger footprint touches held-out tiles more often, so "
                      "fewer crops are left to train on):", ""] + [f"- {s}" for s in sizes] + [""] + rows)
    print("\n" + text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
