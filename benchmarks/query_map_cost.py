"""What the learned query map (``retrieval_metric='learned'``, issue 22) adds to ``geolocate``.

One saved learned-map model, timed side by side and interleaved (these machines are noisy) against its cosine
twin: the same weights and gallery with the map removed (``query_map = None``; its answers differ, its cost is
what a cosine model of the same size pays).  Calibration is removed from both, so only the search differs: the
map is one [B, D] x [D, D] product before the gallery search.  Inputs: random gallery rows plus noise, as in
calibration_overhead.py.

    python benchmarks/query_map_cost.py --model runs/bm-learned/efficientnet_seed0/demo-model --n 64 --repeats 7
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

import locdiff_ext as ld

sys.path.insert(0, str(Path(__file__).resolve().parent))
from calibration_overhead import interleaved_medians, query_like_inputs  # noqa: E402  (a sibling script)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True, help="a saved model with retrieval_metric='learned'")
    ap.add_argument("--n", type=int, default=64, help="inputs per geolocate call")
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args(argv)
    model = ld.LocDiff.from_pretrained(args.model)
    learned = model.query_map
    if learned is None:
        raise SystemExit(f"{args.model} searches by cosine similarity: there is no map to time")
    model.calibration = None
    emb = query_like_inputs(model, args.n)

    for return_map in (False, True):
        def call(with_map: bool) -> None:
            model.query_map = learned if with_map else None
            ld.geolocate(emb, model=model, return_map=return_map)

        call(True), call(False)  # warm-up
        b, a = interleaved_medians(call, args.repeats)
        print(f"geolocate(return_map={return_map}), {args.n} inputs: learned map {a:.3f} s, cosine twin {b:.3f} s, "
              f"learned / cosine {a / b:.3f} (medians of {args.repeats}, {torch.get_num_threads()} threads)", flush=True)


if __name__ == "__main__":
    main()
