"""``locdiff demo``: geolocate real satellite images end to end, offline, on a CPU.

1. Build the Blue Marble crop dataset (locdiff_ext.datasets.bluemarble): one training set, a region
   hold-out test set (unseen places) and a random test set (seen places).
2. Pre-train the small CNN image encoder on the training crops with an auxiliary objective:
   geo-smoothed classification over Fibonacci cells (soft labels exp(-d / tau), a cosine
   classifier on the L2-normalised embedding).  Why first and not jointly with the denoiser:
   LocDiff then conditions on frozen embeddings, as the paper does with CLIP, every baseline gets
   exactly the same features (the comparison isolates the location head), and the denoiser trains
   on cached embeddings at thousands of samples per second on a CPU.
3. Train LocDiff on (embedding, location) pairs, by default retrieval-conditioned (LocDiff-R: the
   denoiser also sees its input's most similar training crops, locdiff_ext.model.retrieval; it beat plain
   LocDiff on both splits, BENCHMARKS.md; ``retrieval_k=0`` / ``--retrieval-k 0`` trains the paper's
   plain model); fit the baselines (kNN retrieval, grid classification, unit-vector regression) on
   the same embeddings; LocDiff-H on top.
4. Evaluate everything on both test sets, print the table (with paired bootstrap intervals of
   the LocDiff rows' differences to each baseline), write results.json / results.md, a
   PNG world map of a few held-out crops with their top-3 modes and probability maps, example
   crops to try ``locdiff predict`` on, and the model (``save_pretrained``, image encoder
   included) where ``geolocate`` finds it when given no model.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, Optional

import numpy as np
import torch
import torch.nn.functional as F

from ..data import EmbeddingDataset
from ..encoders import SmallCNNEncoder
from ..evaluation import (calibration_table, compare_methods, coverage, fit_baselines, markdown_table, paired_table,
                          reliability_levels)
from ..inference import default_model_dir
from ..kernels.geometry import fibonacci_cells, latlon_to_xyz, unit_rows
from ..locdiff import LocDiff, LocDiffConfig
from ..train import Trainer, TrainConfig, run_files
from ..progress import Progress
from .bluemarble import BlueMarbleCrops, build_dataset


@dataclass
class DemoConfig:
    num_crops: int = 30000
    crop_px: int = 64              # crop side in Blue Marble pixels (~7.4 km each)
    image_px: int = 32             # the encoder's input side (crops are area-averaged to it)
    embed_dim: int = 128
    encoder_epochs: int = 12
    aux_cells: int = 512
    aux_tau_km: float = 400.0
    L: int = 32
    widths: tuple = (512, 256, 128)
    diffusion_steps: int = 2500
    eval_region: int = 1500        # test crops evaluated per split (sampling is the slow part)
    eval_random: int = 1000
    num_samples: int = 16
    baseline_steps: int = 3000
    retrieval_k: int = 8           # LocDiff-R: condition on the 8 most similar training crops; 0: plain LocDiff
    seed: int = 0

    @classmethod
    def quick(cls) -> "DemoConfig":
        """The half-minute version (used by the tests)."""
        return cls(num_crops=4000, encoder_epochs=3, diffusion_steps=300, eval_region=200, eval_random=200,
                   num_samples=8, baseline_steps=300, L=16, widths=(256, 128))


def demo_home(out: Optional[os.PathLike] = None) -> Path:
    """Where the demo writes: ``out`` or the parent of default_model_dir() ($LOCDIFF_HOME)."""
    return Path(out) if out is not None else default_model_dir().parent


def pretrain_encoder(data: BlueMarbleCrops, cfg: DemoConfig, progress: bool = True) -> SmallCNNEncoder:
    """The auxiliary objective of the module docstring; returns the trained encoder (eval mode)."""
    torch.manual_seed(cfg.seed)
    enc = SmallCNNEncoder(dim=cfg.embed_dim, image_size=cfg.image_px)
    cells = latlon_to_xyz(fibonacci_cells(cfg.aux_cells)).float()
    train = data.splits["train"]
    images = data.tensors(train)
    xyz = latlon_to_xyz(torch.from_numpy(data.coords[train])).float()
    angle = torch.acos((xyz @ cells.T).clamp(-1, 1))  # [N, cells] radians
    target = torch.softmax(-angle * 6371.0 / cfg.aux_tau_km, dim=-1)
    proto = torch.nn.Parameter(torch.randn(cfg.aux_cells, cfg.embed_dim) * 0.1)
    log_scale = torch.nn.Parameter(torch.tensor(math.log(10.0)))
    params = list(enc.parameters()) + [proto, log_scale]
    batch = 128
    steps = cfg.encoder_epochs * (len(train) // batch)
    opt = torch.optim.AdamW(params, lr=2e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps, pct_start=0.1)
    g = torch.Generator().manual_seed(cfg.seed)
    bar = Progress(steps, "encoder", "step", enabled=progress)
    enc.train()
    for _ in range(cfg.encoder_epochs):
        perm = torch.randperm(len(train), generator=g)
        for i in range(len(train) // batch):
            idx = perm[i * batch:(i + 1) * batch]
            e = F.normalize(enc(images[idx]), dim=-1)
            logits = log_scale.exp() * e @ F.normalize(proto, dim=-1).T
            loss = -(target[idx] * F.log_softmax(logits, -1)).sum(-1).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            bar.update(1)
            if bar.n % 50 == 0:
                bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()
    return enc.eval().requires_grad_(False)


@torch.no_grad()
def embed_all(enc: SmallCNNEncoder, data: BlueMarbleCrops, batch: int = 1024) -> torch.Tensor:
    """Embeddings of every crop, [N, D] float32 (not normalised)."""
    return torch.cat([enc(data.tensors(slice(i, i + batch))) for i in range(0, len(data.coords), batch)])


def _eval_subset(idx: np.ndarray, n: int, seed: int) -> np.ndarray:
    if len(idx) <= n:
        return idx
    return np.sort(np.random.default_rng(seed + 3).choice(idx, n, replace=False))


def _textured_examples(images: np.ndarray, idx: np.ndarray, n: int, min_std: float = 12.0) -> np.ndarray:
    """``n`` crops spread evenly over ``idx`` among those with visible texture (pixel standard deviation of
    at least ``min_std`` of 255, not mostly white): a plain ice or cloud crop makes a poor example."""
    px = images[idx].reshape(len(idx), -1).astype(np.float32)
    ok = idx[(px.std(axis=1) >= min_std) & (px.mean(axis=1) < 220)]
    pool = ok if len(ok) >= n else idx
    return pool[:: max(1, len(pool) // n)][:n]


def run_demo(cfg: Optional[DemoConfig] = None, out: Optional[os.PathLike] = None, progress: bool = True,
             log=print) -> Dict[str, Dict[str, Dict[str, float]]]:
    """Runs the whole demo (module docstring) and returns {split: {method: metrics}}."""
    cfg = cfg or DemoConfig()
    home = demo_home(out)
    run_dir = home / "demo"
    run_dir.mkdir(parents=True, exist_ok=True)
    timings = {}
    t0 = time.perf_counter()

    log(f"[1/4] building the Blue Marble dataset ({cfg.num_crops} land crops of {cfg.crop_px} px)")
    data = build_dataset(cfg.num_crops, cfg.crop_px, cfg.image_px, seed=cfg.seed)
    sizes = {k: len(v) for k, v in data.splits.items()}
    log(f"      train {sizes['train']}, region hold-out test {sizes['test_region']}, random test {sizes['test_random']}")
    timings["dataset_s"] = time.perf_counter() - t0

    t = time.perf_counter()
    log(f"[2/4] pre-training the image encoder ({cfg.encoder_epochs} epochs)")
    enc = pretrain_encoder(data, cfg, progress)
    emb = embed_all(enc, data)
    timings["encoder_s"] = time.perf_counter() - t

    t = time.perf_counter()
    log(f"[3/4] training LocDiff (L={cfg.L}, {cfg.diffusion_steps} steps) and the baselines")
    tr = data.splits["train"]
    coords = torch.from_numpy(data.coords)
    train_set = EmbeddingDataset(emb[tr], coords[tr])
    torch.manual_seed(cfg.seed)
    model = LocDiff(LocDiffConfig(cond_dim=cfg.embed_dim, L=cfg.L, widths=cfg.widths, time_dim=128, dropout=0.1,
                                  num_samples=cfg.num_samples, retrieval_k=cfg.retrieval_k),
                    image_encoder=enc)
    val_idx = _eval_subset(data.splits["test_random"], 256, cfg.seed)
    tcfg = TrainConfig(steps=cfg.diffusion_steps, batch_size=256, lr=1e-3, warmup_steps=min(200, cfg.diffusion_steps // 10),
                       eval_every=max(cfg.diffusion_steps // 2, 1), eval_size=256, eval_samples=4, eval_steps=10,
                       checkpoint_every=0, keep_last=1, seed=cfg.seed)
    trainer = Trainer(model, train_set, run_dir / "training", tcfg, val_data=EmbeddingDataset(emb[val_idx], coords[val_idx]),
                      progress=progress, device="cpu" if not torch.cuda.is_available() else None)
    trainer.fit(resume=False, overwrite=True)  # the demo's own scratch run: a rerun replaces it
    for p in run_files(run_dir / "training"):  # its checkpoints (~100 MB) are scratch: the model is saved below
        if p.is_dir():
            shutil.rmtree(p)
    locdiff = trainer.ema.cpu().eval()
    baselines = fit_baselines(emb[tr], coords[tr], cfg.baseline_steps, cfg.seed)
    timings["training_s"] = time.perf_counter() - t

    t = time.perf_counter()
    log("[4/4] evaluating on the region hold-out and random test sets")
    results: Dict[str, Dict[str, Dict[str, float]]] = {}
    paired: Dict[str, dict] = {}
    examples = {}
    for split, n in [("test_region", cfg.eval_region), ("test_random", cfg.eval_random)]:
        idx = _eval_subset(data.splits[split], n, cfg.seed)
        log(f"      {split}: {len(idx)} crops")
        results[split], paired[split] = compare_methods(locdiff, baselines, emb[tr], coords[tr], emb[idx], coords[idx],
                                                        cfg.seed, paired=True, progress=progress)
        examples[split] = idx
    # How far to trust an answer: coverage of the 50% / 90% credible regions of LocDiff's probability maps and
    # of the grid classifier's softmax (the methods here with a density), and a reliability plot.
    levels, calibration, curves = reliability_levels(), {}, {}
    loc_name = next(iter(results["test_region"]))
    for split, short in [("test_region", "unseen"), ("test_random", "seen")]:
        idx = examples[split]
        _, _, maps = locdiff.predict(emb[idx], seed=cfg.seed, return_map=True, map_size=(90, 180))
        grid_maps = baselines["grid"].prob_map(unit_rows(emb[idx].float()), 90, 180)
        for method, m in [(loc_name, maps), ("grid classification (1024 cells)", grid_maps)]:
            cov = coverage(m, coords[idx], levels)
            calibration.setdefault(split, {})[method] = {p: cov[p] for p in (0.5, 0.9)}
            curves[f"{method.split(' (')[0]}, {short}"] = (levels, [cov[p]["coverage"] for p in levels])
    from .mapplot import write_reliability_plot

    reliability_path = write_reliability_plot(run_dir / "reliability.png", curves)
    timings["evaluation_s"] = time.perf_counter() - t

    model_dir = locdiff.save_pretrained(home / "demo-model")
    from .mapplot import write_prediction_map

    show = _textured_examples(data.images, examples["test_region"], 6)
    map_path = write_prediction_map(run_dir / "map.png", locdiff, data.images[show], data.coords[show], seed=cfg.seed)
    ex_dir = run_dir / "examples"
    ex_dir.mkdir(exist_ok=True)
    from PIL import Image

    for i in show:
        lat, lon = data.coords[i]
        Image.fromarray(data.images[i]).save(ex_dir / f"crop_lat{lat:+.2f}_lon{lon:+.2f}.png")
    timings["total_s"] = time.perf_counter() - t0

    titles = {"test_region": "Region hold-out (unseen 10x10 degree tiles)", "test_random": "Random split (seen places)"}
    md = []
    for split, rows in results.items():
        md += [f"### {titles[split]}, {next(iter(rows.values()))['n']} crops", "", markdown_table(rows), "",
               "Differences in % within 200 / 750 / 2500 km, LocDiff rows minus each baseline on the same crops "
               "(95% paired bootstrap interval; an interval that contains 0 is a tie):", "",
               paired_table(paired[split]), "",
               "Calibration: share of true locations inside each method's 50% / 90% highest-density credible "
               "region, and the regions' median area:", "", calibration_table(calibration[split]), ""]
    (run_dir / "results.md").write_text("\n".join(md))
    (run_dir / "results.json").write_text(json.dumps({"results": results, "paired_differences": paired,
                                                       "calibration": {k: {m: {str(p): c for p, c in v.items()}
                                                                           for m, v in rows.items()}
                                                                       for k, rows in calibration.items()},
                                                       "config": asdict(cfg), "sizes": sizes, "timings": timings}, indent=1))
    log("")
    log("\n".join(md))
    log(f"model: {model_dir}\nmap:   {map_path}\nreliability plot: {reliability_path}\n"
        f"try:   locdiff predict {ex_dir}/*.png\n"
        f"took {timings['total_s']:.0f} s (dataset {timings['dataset_s']:.0f}, encoder {timings['encoder_s']:.0f}, "
        f"training {timings['training_s']:.0f}, evaluation {timings['evaluation_s']:.0f})")
    return results
