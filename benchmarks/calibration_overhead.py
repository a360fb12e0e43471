"""What conformal calibration adds to ``geolocate`` (issue 25 goal: under 5%).

The same model and inputs, timed side by side and interleaved (these machines are noisy), once with the
model's conformal calibration and once with it removed: ``geolocate`` without and with maps (calibration
only checks the settings and attaches itself to each result), then what a user reads of each answer, the 90%
region's area (conformal cut against the raw map's own) and the 90% radius (a table look-up against a
search of the map).  The model: a directory written by ``save_pretrained`` that holds a calibration
(e.g. the demo's), the inputs its own validation-like random rows of the gallery.

    python benchmarks/calibration_overhead.py --model ~/.cache/locdiff/demo-model --n 64 --repeats 5
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import torch

import locdiff_ext as ld


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def interleaved_medians(fn, repeats: int):
    """(median time of fn(False), median time of fn(True)) over ``repeats`` interleaved pairs, False first:
    side by side, so that a noisy machine slows both alike."""
    off, on = [], []
    for _ in range(repeats):
        off.append(timed(lambda: fn(False)))
        on.append(timed(lambda: fn(True)))
    return statistics.median(off), statistics.median(on)


def query_like_inputs(model: "ld.LocDiff", n: int, seed: int = 0) -> torch.Tensor:
    """``n`` inputs [n, D] like real queries: random gallery rows plus noise (random vectors without a gallery)."""
    g = torch.Generator().manual_seed(seed)
    if model.gallery is not None and model.gallery.embeddings.shape[0]:
        emb = model.gallery.embeddings[torch.randint(0, model.gallery.embeddings.shape[0], (n,), generator=g)].float()
        return emb + 0.3 * emb.std() * torch.randn(emb.shape, generator=g)
    return torch.randn(n, model.config.cond_dim, generator=g)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True, help="a saved, calibrated model directory")
    ap.add_argument("--n", type=int, default=64, help="inputs per geolocate call")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args(argv)
    model = ld.LocDiff.from_pretrained(args.model)
    if model.calibration is None:
        raise SystemExit(f"{args.model} holds no calibration: run `locdiff calibrate` on it first")
    cal = model.calibration
    emb = query_like_inputs(model, args.n)
    size = tuple(cal.map_size)

    def geolocate(calibrated: bool, return_map: bool):
        model.calibration = cal if calibrated else None
        return ld.geolocate(emb, model=model, return_map=return_map, map_size=size)

    results = geolocate(True, True)

    def areas(calibrated: bool):
        for r in results:
            r.credible_area_km2(0.9, calibrated=calibrated)

    def radii(calibrated: bool):
        for r in results:
            r.radius_km(0.9, calibrated=calibrated)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        geolocate(False, False)  # warm-up
        rows = {}
        for name, fn in [("geolocate (no map)", lambda c: geolocate(c, False)),
                         ("geolocate(return_map=True)", lambda c: geolocate(c, True)),
                         ("credible_area_km2(0.9) of every result", areas),
                         ("radius_km(0.9) of every result", radii)]:
            rows[name] = interleaved_medians(fn, args.repeats)
    model.calibration = cal
    print(f"model {args.model}: {cal.describe()}; {args.n} inputs, map {size[0]} x {size[1]}, "
          f"median of {args.repeats} interleaved repeats, {torch.get_num_threads()} threads")
    print("| call | uncalibrated (s) | calibrated (s) | calibrated / uncalibrated |")
    print("|---|---:|---:|---:|")
    for name, (off, on) in rows.items():
        print(f"| {name} | {off:.3f} | {on:.3f} | {on / off:.3f} |")


if __name__ == "__main__":
    main()
