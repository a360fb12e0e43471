"""The text benchmark's kNN density calibrated with the same candidate signals as LocDiff-R (its answer's score
too), recomputed from the cached embeddings of a finished run (the density is training-free; issue 25).

    python benchmarks/text_knn_regions.py unseen results/text      # SPLIT and a finished text_benchmark --out
"""

import json
import sys
from pathlib import Path

import numpy as np

from locdiff_ext.calibrate import knn_run_with_maps
from locdiff_ext.datasets.geonames import load_places
from locdiff_ext.model.retrieval import KNNDensity

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "python"))
from text_benchmark import SPLITS, embedded, make_split, regions  # noqa: E402


def main(split: str, out: Path, places_n: int = 12000, data_seed: int = 0) -> None:
    res = json.loads((out / "results.json").read_text())
    chosen = res[split]["knn_density_chosen"]
    rng = np.random.default_rng(data_seed)  # the benchmark's own draw of places and split
    places = load_places()
    places = [places[i] for i in rng.choice(len(places), min(places_n, len(places)), replace=False)]
    n_val, n_test = int(round(len(places) * 0.1)), int(round(len(places) * 0.15))
    data = embedded(make_split(places, split, n_val, n_test, np.random.default_rng([data_seed, SPLITS.index(split)])),
                    out / f"embeddings-{split}-{data_seed}-{len(places)}.pt")
    (tr_e, tr_c, _), (va_e, va_c, _), (te_e, te_c, _) = data["train"], data["val"], data["test"]
    knn = KNNDensity(tr_e, tr_c, k=chosen["k"], temperature=chosen["temperature"], L=res["args"]["L"])
    r = regions(knn_run_with_maps(knn, va_e), va_c, knn_run_with_maps(knn, te_e), te_c, data_seed)
    for label in ("raw", "conformal"):
        print(split, label, r["fit"] if label == "conformal" else "",
              {p: {k: round(v, 4) if isinstance(v, float) else v for k, v in r[label][p].items()}
               for p in ("0.5", "0.9")}, flush=True)


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]))
