"""Recipe 3/3: evaluate a trained model on Im2GPS3k (or any dataset file), with LocDiff-H and the
kNN baselines (top-1 retrieval and the kNN density) over the training gallery, next to the paper's numbers.
A retrieval model (LocDiff-R) answers with its saved prior weight and hybrid radius (chosen on validation
by `locdiff train --val` / python/train.py), and its row as trained is shown beside.

    python python/evaluate.py --model runs/mp16/final --data data/im2gps3k.safetensors \
        --gallery data/mp16.safetensors --json results/im2gps3k.json
"""

import argparse

import torch

from locdiff_ext import LocDiff
from locdiff_ext.data import EmbeddingStore, load_dataset, open_dataset
from locdiff_ext.evaluation import KNNRetrieval, geolocation_metrics, locdiff_h, markdown_table, write_report
from locdiff_ext.model import KNNDensity

# % within 1 / 25 / 200 / 750 / 2500 km on Im2GPS3k as published (shared/paper-notes.md)
PAPER_IM2GPS3K = {
    "LocDiff (paper)": (10.9, 34.0, 53.3, 72.5, 85.2),
    "LocDiff-H (paper)": (15.3, 36.5, 56.4, 75.2, 87.4),
    "GeoCLIP (paper)": (14.11, 34.47, 50.65, 69.67, 83.82),
}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--gallery", default=None, help="training dataset file: enables LocDiff-H and kNN")
    p.add_argument("--num-samples", type=int, default=None)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--device", default=None)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = LocDiff.from_pretrained(args.model, map_location=device)
    data = open_dataset(args.data)
    if isinstance(data, EmbeddingStore):  # a test set (Im2GPS3k: 3k rows) is read into memory
        data = data.take(slice(None))
    modes, _, _ = model.predict(data.embeddings, num_samples=args.num_samples, steps=args.steps,
                                batch_size=args.batch_size)
    rows = {"LocDiff (ours)": geolocation_metrics(modes[:, 0], data.coords)}
    c = model.config
    if c.retrieval_k and (c.prior_weight > 0 or c.hybrid):
        raw, _, _ = model.predict(data.embeddings, num_samples=args.num_samples, steps=args.steps,
                                  batch_size=args.batch_size, prior_weight=0.0, hybrid=False)
        rows["LocDiff (ours), as trained"] = geolocation_metrics(raw[:, 0], data.coords)
    if args.gallery:
        g = load_dataset(args.gallery)
        rows["LocDiff-H (ours)"] = geolocation_metrics(
            locdiff_h(modes[:, 0], data.embeddings, g.embeddings, g.coords, model.lobe_km), data.coords)
        rows["kNN retrieval (ours)"] = geolocation_metrics(KNNRetrieval(g.embeddings, g.coords).predict(data.embeddings),
                                                           data.coords)
        density = KNNDensity(g.embeddings, g.coords, k=c.prior_k, temperature=c.prior_temperature, L=c.L)
        rows[f"kNN density (k={c.prior_k}, T={c.prior_temperature:g})"] = geolocation_metrics(
            density.predict(data.embeddings), data.coords)
    print(markdown_table(rows))
    print("\nPublished on Im2GPS3k (% within 1 / 25 / 200 / 750 / 2500 km):")
    for name, accs in PAPER_IM2GPS3K.items():
        print(f"  {name}: " + " / ".join(f"{a:g}" for a in accs))
    if args.json:
        write_report(args.json, rows, {"model": args.model, "data": args.data, "paper_im2gps3k": PAPER_IM2GPS3K})


if __name__ == "__main__":
    main()
