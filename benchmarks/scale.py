"""The scale benchmark (issue 20): the out-of-core store, the gallery index, LocDiff-R's step cost and
geolocate against galleries of 100k to 5M rows, on synthetic rows that carry location information
(locdiff_ext.datasets.synthetic: a random projection of multi-scale features of the location, plus noise).

Each phase runs in its own process, so that its peak RSS (ru_maxrss: resident pages, the store's mapped
pages that were touched included) is its own:
  store     write the N x D float16 store (build time, peak RSS, bytes on disk)
  index     the gallery index (exact up to 200k x 768 cells, else IVF + SQ8 FAISS) and every row's
            top-64 neighbour list (time, peak RSS, recall@8 of the index against exact search)
  plain     plain LocDiff trained on the store: ms/step, step checkpoint size, peak RSS
  retrieval LocDiff-R (k = 8) trained on the store: the same, and final/'s size
  geolocate the LocDiff-R model loaded back: inputs/s of geolocate at the demo's sampling settings
            (16 samples, DPM-Solver++ 10 steps), peak RSS
  gallery   (not run by default) the saved index opened as a model opens it (memory-mapped): its resident
            memory, search time and recall@8 at nprobe 16 and 32, and geolocate against it with the LocDiff-R
            model of --model (e.g. one trained at 10k: the network's cost does not depend on the gallery)
The model is the demo's network (L = 32, widths 512/256/128), batch 256.  Prints one JSON line per phase
and a Markdown row per N.

    python benchmarks/scale.py --rows 100000 1000000 5000000 --dir /tmp/scale
    python benchmarks/scale.py --rows 200000 --dim 64 --steps 6 --dir /tmp/scale-ci   # the CI-sized run
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

PHASES = ("store", "index", "plain", "retrieval", "geolocate", "gallery")


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def rss_parts_gb() -> dict:
    """The resident set now, split: anonymous (the process's own memory) and file-backed (the store's mapped
    pages, which the kernel maps a large folio at a time and can drop at any time)."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            for key, name in (("RssAnon:", "rss_anon_gb"), ("RssFile:", "rss_file_gb")):
                if line.startswith(key):
                    out[name] = int(line.split()[1]) / 2**20
    return out


def dir_mb(d: Path) -> float:
    return sum(p.stat().st_size for p in Path(d).rglob("*") if p.is_file()) / 1e6


def model_config(dim: int, k: int, small: bool):
    import locdiff_ext as ld

    arch = dict(L=16, widths=(64, 32), time_dim=32) if small else dict(L=32, widths=(512, 256, 128))
    return ld.LocDiffConfig(cond_dim=dim, retrieval_k=k, **arch)


def phase(name: str, args) -> dict:
    import torch

    from locdiff_ext.data.store import EmbeddingStore, write_store
    from locdiff_ext.datasets.synthetic import SyntheticGeo

    root = Path(args.dir) / f"n{args.n}-d{args.dim}"
    store_dir = root / "store"
    world = SyntheticGeo(args.dim, seed=0)
    out = {"phase": name, "rows": args.n, "dim": args.dim}
    t0 = time.perf_counter()
    if name == "store":
        if store_dir.exists():
            shutil.rmtree(store_dir)
        write_store(store_dir, world.chunks(0, args.n), args.n, args.dim, "float16", progress=False)
        out.update(seconds=time.perf_counter() - t0, store_mb=dir_mb(store_dir))
    elif name == "index":
        from locdiff_ext.data.index import GalleryIndex, NeighbourLists, recall_at_k, recall_of_lists
        from locdiff_ext.model.retrieval import holdout_shortfall

        store = EmbeddingStore(store_dir)
        if args.reuse_index and (store_dir / "index.json").is_file():  # built by an earlier, interrupted run
            index = GalleryIndex.load(store)
            out["index_seconds"] = None
        else:
            index = GalleryIndex.build(store, args.index, progress=False)
            index.save()
            out["index_seconds"] = time.perf_counter() - t0
        q = torch.from_numpy(world.rows(10**9, 1000)[0])  # queries from rows beyond the store
        q = q / q.norm(dim=1, keepdim=True)
        t1 = time.perf_counter()
        index.search(q, 8)
        out.update(kind=index.kind, nprobe=index.nprobe, refine=index.refine,
                   search_ms_per_query=1e3 * (time.perf_counter() - t1) / len(q), recall_at_8=recall_at_k(index, q, 8))
        if index.faiss_index is not None:
            out["recall_at_8_nprobe32"] = recall_at_k(index, q, 8, nprobe=32)
        t1 = time.perf_counter()
        lists = NeighbourLists.build(index, args.lists_k, progress=False)
        out.update(lists_seconds=time.perf_counter() - t1, store_mb_with_index=dir_mb(store_dir))
        rows = torch.randperm(len(store), generator=torch.Generator().manual_seed(0))[:10_000]
        sims, idx = lists.take(rows)
        nb = torch.from_numpy(store.coords[idx.clamp_min(0).numpy()])
        out["short_of_8_visible"] = holdout_shortfall(sims, nb, store.take(rows).coords, 8, 1000.0)
        out["lists_recall"] = recall_of_lists(lists, rows[:300])
    elif name in ("plain", "retrieval"):
        import locdiff_ext as ld
        from locdiff_ext.data.checkpoint import list_checkpoints
        from locdiff_ext.train import Trainer, TrainConfig

        store = EmbeddingStore(store_dir)
        run = root / f"run-{name}"
        torch.manual_seed(0)
        model = ld.LocDiff(model_config(args.dim, 8 if name == "retrieval" else 0, args.small))
        cfg = TrainConfig(steps=args.steps, batch_size=256, eval_every=0, checkpoint_every=args.steps, warmup_steps=5)
        trainer = Trainer(model, store, run, cfg, progress=False, device="cpu", neighbour_candidates=args.lists_k)
        times = []
        step = trainer.train_step

        def timed(s):
            t = time.perf_counter()
            r = step(s)
            times.append(time.perf_counter() - t)
            return r

        trainer.train_step = timed
        trainer.fit(overwrite=True)
        out.update(ms_per_step=1e3 * statistics.median(times[3:]), step_checkpoint_mb=dir_mb(list_checkpoints(run)[-1]),
                   final_mb=dir_mb(run / "final"), run_dir_mb=dir_mb(run))
    elif name == "geolocate":
        import locdiff_ext as ld

        model = ld.LocDiff.from_pretrained(root / "run-retrieval" / "final")
        out["load_seconds"] = time.perf_counter() - t0
        q = torch.from_numpy(world.rows(2 * 10**9, args.queries)[0])
        ld.geolocate(q[:64], model=model)  # warm-up
        t1 = time.perf_counter()
        ld.geolocate(q, model=model, batch_size=64)
        out.update(inputs_per_s=len(q) / (time.perf_counter() - t1), index=model.gallery.index.kind)
    elif name == "gallery":
        import locdiff_ext as ld
        from locdiff_ext.data.index import GalleryIndex, exact_search

        store = EmbeddingStore(store_dir)
        index = GalleryIndex.load(store)
        out.update(load_seconds=time.perf_counter() - t0, kind=index.kind, refine=index.refine,
                   **{f"after_load_{k}": v for k, v in rss_parts_gb().items()})
        q = torch.from_numpy(world.rows(10**9, 1000)[0])  # the index phase's queries
        q = q / q.norm(dim=1, keepdim=True)
        _, truth = exact_search(store, q, 8)
        for nprobe in (16, 32):
            t1 = time.perf_counter()
            _, got = index.search(q, 8, nprobe=nprobe)
            out[f"search_ms_per_query_nprobe{nprobe}"] = 1e3 * (time.perf_counter() - t1) / len(q)
            out[f"recall_at_8_nprobe{nprobe}"] = sum(len(set(g.tolist()) & set(t.tolist())) for g, t in zip(got, truth)) / truth.numel()
        if args.model:
            model = ld.LocDiff.from_pretrained(args.model)
            model.set_gallery(index)
            q = torch.from_numpy(world.rows(2 * 10**9, args.queries)[0])
            ld.geolocate(q[:64], model=model)  # warm-up
            t1 = time.perf_counter()
            ld.geolocate(q, model=model, batch_size=64)
            out.update(inputs_per_s=len(q) / (time.perf_counter() - t1), model=str(args.model))
    out["peak_rss_gb"] = peak_rss_gb()
    out.update(rss_parts_gb())
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, nargs="+", default=[100_000, 1_000_000, 5_000_000])
    ap.add_argument("--dim", type=int, default=768)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--queries", type=int, default=512)
    ap.add_argument("--small", action="store_true", help="the issue's small network (L = 16, widths 64/32)")
    ap.add_argument("--index", help="the gallery index's kind (default: by size, GalleryIndex.default_kind)")
    ap.add_argument("--lists-k", type=int, default=64, help="neighbour candidates K' per training row")
    ap.add_argument("--reuse-index", action="store_true", help="load an index an earlier run saved instead of building")
    ap.add_argument("--dir", required=True, help="where stores and runs are written (N x D x 2 bytes each)")
    ap.add_argument("--phases", nargs="+", default=list(PHASES[:-1]), choices=PHASES)
    ap.add_argument("--model", help="gallery phase: a LocDiff-R model directory to geolocate with against the gallery")
    ap.add_argument("--keep", action="store_true", help="keep the stores and runs")
    ap.add_argument("--phase", help=argparse.SUPPRESS)
    ap.add_argument("--n", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.phase:
        print(json.dumps(phase(args.phase, args)), flush=True)
        return
    import torch

    print(f"# {time.strftime('%Y-%m-%d')}, {os.cpu_count()} CPUs, torch {torch.__version__}, D = {args.dim} float16, "
          f"{args.steps} steps", flush=True)
    for n in args.rows:
        results = {}
        for ph in args.phases:
            cmd = [sys.executable, __file__, "--phase", ph, "--n", str(n), "--dim", str(args.dim), "--steps",
                   str(args.steps), "--queries", str(args.queries), "--dir", args.dir, "--lists-k", str(args.lists_k)]
            cmd += (["--small"] if args.small else []) + (["--index", args.index] if args.index else [])
            cmd += ["--reuse-index"] if args.reuse_index else []
            cmd += ["--model", args.model] if args.model else []
            res = subprocess.run(cmd, capture_output=True, text=True)
            if res.returncode != 0:
                print(res.stderr[-3000:], file=sys.stderr)
                raise SystemExit(f"phase {ph} failed for N = {n}")
            results[ph] = json.loads(res.stdout.strip().splitlines()[-1])
            print(json.dumps(results[ph]), flush=True)
        if not args.keep:
            shutil.rmtree(Path(args.dir) / f"n{n}-d{args.dim}", ignore_errors=True)


if __name__ == "__main__":
    main()
