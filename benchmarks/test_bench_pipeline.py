"""Training throughput and sampling latency of the default-size LocDiff model.

Training: one optimisation step (SHDD encode, forward, SHDD-KL + MSE, backward, AdamW, EMA) on a
global batch of 256; extra_info['samples_per_s'].  Sampling: geolocate latency per input for 16
samples per input and 1 to 50 DDIM steps, 64 inputs at a time; extra_info['ms_per_input'].
Run:  pytest benchmarks/test_bench_pipeline.py --benchmark-json=bench_pipeline.json
(and python benchmarks/profile_pipeline.py for the share of time in the ops vs the network).
"""

import pytest
import torch

import locdiff_ext as ld
from locdiff_ext.data import EmbeddingDataset
from locdiff_ext.train import Trainer, TrainConfig

DEVICE = "cuda" if torch.cuda.is_available() and ld.has_cuda() else "cpu"


def _data(n=4096, dim=512):
    g = torch.Generator().manual_seed(0)
    z = torch.rand(n, generator=g, dtype=torch.float64) * 2 - 1
    coords = torch.stack([torch.rad2deg(torch.asin(z)), torch.rand(n, generator=g, dtype=torch.float64) * 360 - 180], 1)
    return EmbeddingDataset(torch.randn(n, dim, generator=g), coords)


def _sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


@pytest.mark.parametrize("L", [16, 32, 64, 128])
def test_train_step(benchmark, tmp_path, L):
    torch.manual_seed(0)
    model = ld.LocDiff(ld.LocDiffConfig(cond_dim=512, L=L))
    cfg = TrainConfig(steps=10**6, batch_size=256, eval_every=0)
    trainer = Trainer(model, _data(), tmp_path, cfg, progress=False)
    state = {"step": 0}

    def step():
        trainer.train_step(state["step"])
        state["step"] += 1
        _sync()

    benchmark.group = f"train step L={L} batch=256 {DEVICE}"
    benchmark.pedantic(step, rounds=10 if DEVICE == "cpu" else 50, iterations=1, warmup_rounds=2)
    if benchmark.stats is not None:  # None under --benchmark-disable (a smoke run)
        benchmark.extra_info["samples_per_s"] = 256 / benchmark.stats["median"]


@pytest.mark.parametrize("steps", [1, 10, 25, 50])
def test_sampling_latency(benchmark, steps):
    torch.manual_seed(0)
    model = ld.LocDiff(ld.LocDiffConfig(cond_dim=512, L=32)).to(DEVICE).eval()
    emb = torch.randn(64, 512)

    def run():
        model.predict(emb, num_samples=16, steps=steps)
        _sync()

    benchmark.group = f"geolocate L=32, 64 inputs x 16 samples {DEVICE}"
    benchmark.pedantic(run, rounds=3, iterations=1, warmup_rounds=1)
    if benchmark.stats is not None:
        benchmark.extra_info["ms_per_input"] = benchmark.stats["median"] / 64 * 1e3
