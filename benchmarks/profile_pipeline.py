"""Share of time in the locdiff kernels vs the network, for a training step and for geolocate.

Run:  python benchmarks/profile_pipeline.py [--device cuda] [--L 32]
Prints a Markdown table: per phase, the total time and the share spent in each locdiff op
(sh_basis / shdd_encode, shdd_decode, sh_synthesis), in the SHDD-KL loss, in the CS-UNet
(forward and, for training, its share of backward is in 'rest') and in the rest.  Uses
torch.profiler (total CPU time of the labelled regions; device time on a GPU).
"""

import argparse
import time

import torch

import locdiff_ext as ld
from locdiff_ext.data import EmbeddingDataset
from locdiff_ext.train import Trainer, TrainConfig

OPS = ("locdiff::sh_basis", "locdiff::shdd_encode", "locdiff::shdd_decode", "locdiff::sh_synthesis",
       "locdiff.shdd_kl", "locdiff.network")


def _short(key: str) -> str:
    return key.replace("locdiff::", "").replace("locdiff.", "")


def _profile(fn, device, reps):
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    fn()
    with profile(activities=acts) as prof:
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        if device == "cuda":
            torch.cuda.synchronize()
        wall = (time.perf_counter() - t0) / reps
    shares = {}
    for evt in prof.key_averages():
        if evt.key in OPS:
            t = evt.device_time_total if device == "cuda" else evt.cpu_time_total
            shares[_short(evt.key)] = t / 1e6 / reps / wall
    return wall, shares


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--device", default="cpu")
    p.add_argument("--L", type=int, default=32)
    args = p.parse_args()
    torch.manual_seed(0)
    n = 4096
    z = torch.rand(n, dtype=torch.float64) * 2 - 1
    coords = torch.stack([torch.rad2deg(torch.asin(z)), torch.rand(n, dtype=torch.float64) * 360 - 180], 1)
    data = EmbeddingDataset(torch.randn(n, 512), coords)
    model = ld.LocDiff(ld.LocDiffConfig(cond_dim=512, L=args.L))
    trainer = Trainer(model, data, "/tmp/locdiff-profile", TrainConfig(steps=10**6, batch_size=256, eval_every=0),
                      progress=False)
    state = {"s": 0}

    def step():
        trainer.train_step(state["s"])
        state["s"] += 1

    emb = torch.randn(64, 512)
    ema = trainer.ema
    rows = [("train step (batch 256)", *_profile(step, args.device, 5)),
            ("geolocate (64 inputs x 16 samples x 25 steps)", *_profile(lambda: ema.predict(emb, num_samples=16),
                                                                       args.device, 2))]
    print(f"L={args.L}, device {args.device}, CPU threads {torch.get_num_threads()}\n")
    print("| phase | time | " + " | ".join(_short(o) for o in OPS) + " | rest (backward pass, optimizer, EMA, glue) |")
    print("|---|---:|" + "---:|" * (len(OPS) + 1))
    for name, wall, shares in rows:
        cells = [f"{100 * shares.get(_short(o), 0.0):.1f}%" for o in OPS]
        rest = 100 * (1 - sum(shares.values()))
        print(f"| {name} | {wall * 1e3:.1f} ms | " + " | ".join(cells) + f" | {rest:.1f}% |")


if __name__ == "__main__":
    main()
