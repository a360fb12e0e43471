"""Training-step cost and checkpoint size against the number of training rows (issue 20, first increment).

Synthetic N x D float32 embeddings with random locations (no accuracy is measured here), LocDiff at L = 16,
widths (64, 32), batch 256, as in the issue's report; plain LocDiff and LocDiff-R (k = 8).  Prints a Markdown
table: ms per step (median of the timed steps after a warm-up), the step checkpoint's size, the run's
shared gallery directory and final/.

    python benchmarks/scale_steps.py --rows 10000 100000 300000
"""

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

import locdiff_ext as ld
from locdiff_ext.data import EmbeddingDataset
from locdiff_ext.data.checkpoint import list_checkpoints
from locdiff_ext.train import Trainer, TrainConfig


def size_mb(d: Path) -> float:
    return sum(p.stat().st_size for p in d.rglob("*") if p.is_file()) / 1e6


def run(n: int, dim: int, k: int, steps: int, out: Path):
    g = torch.Generator().manual_seed(0)
    emb = torch.randn(n, dim, generator=g)
    coords = torch.stack([torch.rand(n, generator=g, dtype=torch.float64) * 160 - 80,
                          torch.rand(n, generator=g, dtype=torch.float64) * 360 - 180], 1)
    torch.manual_seed(0)
    model = ld.LocDiff(ld.LocDiffConfig(cond_dim=dim, L=16, widths=(64, 32), time_dim=32, retrieval_k=k))
    cfg = TrainConfig(steps=steps, batch_size=256, eval_every=0, checkpoint_every=steps, warmup_steps=5)
    trainer = Trainer(model, EmbeddingDataset(emb, coords), out, cfg, progress=False, device="cpu")
    times = []
    step = trainer.train_step
    def timed(s):
        t = time.perf_counter()
        r = step(s)
        times.append(time.perf_counter() - t)
        return r
    trainer.train_step = timed
    trainer.fit()
    ckpt = list_checkpoints(out)[-1]
    gallery = sum(size_mb(p) for p in out.glob("gallery-*"))
    return 1e3 * statistics.median(times[3:]), size_mb(ckpt), gallery, size_mb(out / "final")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, nargs="+", default=[10000, 100000, 300000])
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--steps", type=int, default=12)
    args = ap.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, D = {args.dim}, {args.steps} steps")
    print("| N | variant | ms / step | step checkpoint (MB) | run's gallery-* (MB) | final/ (MB) |")
    print("|---:|---|---:|---:|---:|---:|")
    for n in args.rows:
        for k in (0, 8):
            with tempfile.TemporaryDirectory() as tmp:
                ms, ck, gal, fin = run(n, args.dim, k, args.steps, Path(tmp))
            name = "plain LocDiff" if k == 0 else f"LocDiff-R (k = {k})"
            print(f"| {n:,} | {name} | {ms:.0f} | {ck:.2f} | {gal:.0f} | {fin:.1f} |", flush=True)


if __name__ == "__main__":
    main()
