"""``locdiff demo``: geolocate real satellite images end to end, offline, on a CPU.

1. Build the Blue Marble crop dataset (locdiff_ext.datasets.bluemarble): training crops, and for
   validation and for test each a region hold-out set (unseen places) and a random set (seen places).
2. Image features, one of two settings (``DemoConfig.encoder``):
   - ``"efficientnet"`` (default, the paper's setting): a FROZEN ImageNet EfficientNet-Lite0, generic
     features never trained on geography, as the paper conditions on frozen CLIP features.  Crops are
     fed at native resolution, 64 px (chosen on validation: python/bluemarble_encoder_probe.py,
     BENCHMARKS.md);
   - ``"cnn"``: the small CNN pre-trained on the training crops to classify geographic cells
     (geo-smoothed soft labels exp(-d / tau), a cosine classifier on the L2-normalised embedding).  Its
     embedding neighbours are geographic neighbours by construction, which favours retrieval.
   Either way LocDiff and every baseline condition on exactly the same frozen features, so the
   comparison isolates the location head.
3. Choose on the VALIDATION crops what is chosen: the kNN density baseline's k and temperature (the
   temperature also becomes LocDiff-R's neighbour-prior temperature); training is monitored on
   validation crops too.  Train LocDiff on (embedding, location) pairs, by default retrieval-conditioned
   (LocDiff-R: the denoiser also sees its input's most similar training crops,
   locdiff_ext.model.retrieval; ``retrieval_k=0`` / ``--retrieval-k 0`` trains the paper's plain model);
   fit the baselines (kNN top-1 retrieval, kNN density, grid classification, unit-vector regression) on
   the same embeddings; LocDiff-H on top.  LocDiff-R's prior weight and hybrid radius are chosen on the
   validation crops too (locdiff_ext.selection): the saved model answers with them, its row "anchored".
4. Evaluate everything once on both test sets, print the table (with paired bootstrap intervals of
   the LocDiff rows' differences to each baseline) and the calibration of the credible regions, write
   results.json / results.md, a reliability plot, a PNG world map of a few held-out crops with their
   top-3 modes and probability maps, example crops to try ``locdiff predict`` on, and the model
   (``save_pretrained``, image encoder included) where ``geolocate`` finds it when given no model.
The multi-seed protocol over both encoder settings is python/bluemarble_protocol.py.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from ..data import EmbeddingDataset
from ..encoders import ImageEncoder, SmallCNNEncoder
from ..calibrate import knn_run_with_maps, run_as_numpy, run_with_maps
from ..evaluation.conformal import conformal_coverage, coverage_table, fit_conformal
from ..evaluation import (compare_methods, fit_baselines, geolocation_metrics, markdown_table, paired_table,
                          reliability_levels)
from ..inference import default_model_dir
from ..selection import own_prior_knn, tune_inference
from ..kernels.geometry import fibonacci_cells, latlon_to_xyz
from ..locdiff import LocDiff, LocDiffConfig
from ..model import KNNDensity
from ..train import Trainer, TrainConfig, run_files
from ..progress import Progress
from .bluemarble import BlueMarbleCrops, build_dataset

ENCODER_SETTINGS = ("efficientnet", "cnn")


@dataclass
class DemoConfig:
    num_crops: int = 30000
    encoder: str = "efficientnet"  # frozen ImageNet EfficientNet-Lite0, or "cnn": the small CNN trained on geography
    crop_px: int = 64              # crop side in Blue Marble pixels (~7.4 km each)
    image_px: Optional[int] = None  # the encoder's input side (crops area-averaged to it); default 64 / 32 (cnn)
    embed_dim: int = 128           # cnn only: its width, epochs and auxiliary classification
    encoder_epochs: int = 12
    aux_cells: int = 512
    aux_tau_km: float = 400.0
    L: int = 32
    widths: tuple = (512, 256, 128)
    diffusion_steps: int = 1250    # on validation, 2500 steps gained nothing over 1250 (BENCHMARKS.md 3b)
    eval_region: int = 1500        # test crops evaluated per split (sampling is the slow part)
    eval_random: int = 1000
    val_size: int = 500            # validation crops per split for the choices
    knn_ks: tuple = (4, 16, 64)    # the kNN density's candidates, chosen on validation
    knn_temperatures: tuple = (0.01, 0.03, 0.1)
    num_samples: int = 16
    baseline_steps: int = 3000
    retrieval_k: int = 8           # LocDiff-R: condition on the 8 most similar training crops; 0: plain LocDiff
    weighting: str = "none"        # LocDiff's per-degree taper of the SHDD vectors ('gaussian': smoother targets)
    retrieval_metric: str = "cosine"  # LocDiff-R's search; 'learned': a query map fitted on the training crops
    seed: int = 0

    def __post_init__(self):
        if self.encoder not in ENCODER_SETTINGS:
            raise ValueError(f"encoder must be one of {ENCODER_SETTINGS}, got {self.encoder!r}")
        if self.image_px is None:
            self.image_px = 64 if self.encoder == "efficientnet" else 32

    @classmethod
    def quick(cls, **overrides) -> "DemoConfig":
        """The one-minute version (used by the tests)."""
        kw = dict(num_crops=4000, encoder_epochs=3, diffusion_steps=300, eval_region=200, eval_random=200,
                  val_size=150, knn_ks=(4, 16), knn_temperatures=(0.03, 0.1), num_samples=8, baseline_steps=300,
                  L=16, widths=(256, 128))
        kw.update(overrides)
        return cls(**kw)


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
def embed_all(enc: ImageEncoder, data: BlueMarbleCrops, batch: int = 512, progress: bool = False) -> torch.Tensor:
    """Embeddings of every crop, [N, D] float32 (not normalised)."""
    n = len(data.coords)
    with Progress(n, "embed", "crop", enabled=progress) as bar:
        out = []
        for i in range(0, n, batch):
            out.append(enc(data.tensors(slice(i, i + batch))))
            bar.update(out[-1].shape[0])
    return torch.cat(out)


def image_features(data: BlueMarbleCrops, cfg: DemoConfig, progress: bool = True) -> Tuple[ImageEncoder, torch.Tensor]:
    """The frozen image encoder of the chosen setting and the embeddings of every crop."""
    if cfg.encoder == "efficientnet":
        from ..encoders import EfficientNetLiteEncoder

        enc = EfficientNetLiteEncoder("lite0", image_size=cfg.image_px, center_crop=False)
    else:
        enc = pretrain_encoder(data, cfg, progress)
    return enc, embed_all(enc, data, progress=progress)


def _eval_subset(idx: np.ndarray, n: int, seed: int) -> np.ndarray:
    if len(idx) <= n:
        return idx
    return np.sort(np.random.default_rng(seed + 3).choice(idx, n, replace=False))


def validation_sets(data: BlueMarbleCrops, cfg: DemoConfig) -> Tuple[Dict[str, np.ndarray], np.ndarray]:
    """({'region', 'random'}: the validation crops the choices are made on, cfg.val_size of each), and the
    crops that monitor training (the first 128 of each)."""
    val = {s: _eval_subset(data.splits[f"val_{s}"], cfg.val_size, cfg.seed) for s in ("region", "random")}
    return val, np.concatenate([v[:128] for v in val.values()])


def selection_score(metrics: Dict[str, float]) -> float:
    """What a choice on validation maximises: the mean % within 25, 200, 750 and 2500 km (fine and
    coarse scales count alike)."""
    return float(np.mean([metrics[f"acc_{t}km"] for t in (25, 200, 750, 2500)]))


def choose_knn_density(emb: torch.Tensor, coords: torch.Tensor, train: np.ndarray, val: Dict[str, np.ndarray],
                       cfg: DemoConfig) -> Tuple[dict, dict]:
    """The kNN density's (k, temperature) with the best mean selection_score over the validation
    splits: (chosen {'k', 'temperature'}, {'k=..,T=..': {split: score}})."""
    scores, best = {}, None
    for k in cfg.knn_ks:
        for temp in cfg.knn_temperatures:
            dens = KNNDensity(emb[train], coords[train], k=k, temperature=temp, L=cfg.L)
            row = {split: selection_score(geolocation_metrics(dens.predict(emb[idx]), coords[idx]))
                   for split, idx in val.items()}
            scores[f"k={k}, T={temp:g}"] = row
            mean = float(np.mean(list(row.values())))
            if best is None or mean > best[0]:
                best = (mean, {"k": k, "temperature": temp})
    return best[1], scores


def train_locdiff(emb: torch.Tensor, coords: torch.Tensor, train: np.ndarray, monitor: np.ndarray, cfg: DemoConfig,
                  enc: ImageEncoder, run_dir: Path, progress: bool = True, **config) -> LocDiff:
    """LocDiff trained on the ``train`` crops' embeddings and watched on the ``monitor`` (validation) crops;
    returns the EMA weights in evaluation mode.  ``config``: LocDiffConfig fields over the demo's.  The run's
    checkpoints (~100 MB) are scratch and deleted; its history.json stays in ``run_dir``."""
    torch.manual_seed(cfg.seed)
    fields = dict(cond_dim=enc.dim, L=cfg.L, widths=cfg.widths, time_dim=128, dropout=0.1, num_samples=cfg.num_samples,
                  retrieval_k=cfg.retrieval_k, weighting=cfg.weighting, retrieval_metric=cfg.retrieval_metric)
    model = LocDiff(LocDiffConfig(**{**fields, **config}), image_encoder=enc)
    tcfg = TrainConfig(steps=cfg.diffusion_steps, batch_size=256, lr=1e-3, warmup_steps=min(200, cfg.diffusion_steps // 10),
                       eval_every=max(cfg.diffusion_steps // 2, 1), eval_size=256, eval_samples=4, eval_steps=10,
                       checkpoint_every=0, keep_last=1, seed=cfg.seed)
    trainer = Trainer(model, EmbeddingDataset(emb[train], coords[train]), run_dir, tcfg,
                      val_data=EmbeddingDataset(emb[monitor], coords[monitor]), progress=progress,
                      device="cpu" if not torch.cuda.is_available() else None)
    trainer.fit(resume=False, overwrite=True)  # a scratch run: a rerun replaces it
    for p in run_files(run_dir):
        if p.is_dir():
            shutil.rmtree(p)
    return trainer.ema.cpu().eval()


def _textured_examples(images: np.ndarray, idx: np.ndarray, n: int, min_std: float = 12.0) -> np.ndarray:
    """``n`` crops spread evenly over ``idx`` among those with visible texture (pixel standard deviation of
    at least ``min_std`` of 255, not mostly white): a plain ice or cloud crop makes a poor example."""
    px = images[idx].reshape(len(idx), -1).astype(np.float32)
    ok = idx[(px.std(axis=1) >= min_std) & (px.mean(axis=1) < 220)]
    pool = ok if len(ok) >= n else idx
    return pool[:: max(1, len(pool) // n)][:n]


MAP_SIZE = (180, 360)  # geolocate's default: the saved model's regions are calibrated at the size users get


def names_of(results: Dict[str, Dict[str, dict]]) -> list:
    """The method names of a split's table (the same in every split)."""
    return list(next(iter(results.values())))


def _locdiff_run(locdiff: LocDiff, emb: Optional[torch.Tensor], seed: int, details=None) -> dict:
    """LocDiff's answers, maps, signals and settings for ``emb`` (or of a ``predict_details`` result)."""
    if details is None:
        return run_as_numpy(run_with_maps(locdiff, emb, MAP_SIZE, seed=seed))
    return run_as_numpy({"answers": details.coords[:, 0], "maps": details.maps, "signals": details.signals,
                      "settings": details.settings})


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
    log(f"      train {sizes['train']}; validation: region hold-out {sizes['val_region']}, random "
        f"{sizes['val_random']}; test: region hold-out {sizes['test_region']}, random {sizes['test_random']}")
    timings["dataset_s"] = time.perf_counter() - t0

    t = time.perf_counter()
    log("[2/4] image features: " + ("frozen ImageNet EfficientNet-Lite0" if cfg.encoder == "efficientnet" else
                                    f"pre-training the small CNN on geography ({cfg.encoder_epochs} epochs)"))
    enc, emb = image_features(data, cfg, progress)
    timings["encoder_s"] = time.perf_counter() - t

    t = time.perf_counter()
    tr = data.splits["train"]
    coords = torch.from_numpy(data.coords)
    val, monitor = validation_sets(data, cfg)  # training is watched on validation crops only
    knn_choice, knn_scores = choose_knn_density(emb, coords, tr, val, cfg)
    log(f"[3/4] chosen on validation: kNN density k={knn_choice['k']}, T={knn_choice['temperature']:g}; "
        f"training LocDiff (L={cfg.L}, {cfg.diffusion_steps} steps) and the baselines")
    locdiff = train_locdiff(emb, coords, tr, monitor, cfg, enc, run_dir / "training", progress,
                            retrieval_temperature=knn_choice["temperature"])
    baselines = fit_baselines(emb[tr], coords[tr], cfg.baseline_steps, cfg.seed)
    baselines["knn_density"] = KNNDensity(emb[tr], coords[tr], L=cfg.L, **knn_choice)
    val_all = np.concatenate(list(val.values()))
    anchored, choice = None, None
    if locdiff.gallery is not None:  # LocDiff-R: its prior weight and hybrid radius, chosen on validation too
        tuned = tune_inference(locdiff, emb[val_all], coords[val_all], seed=cfg.seed,
                               knn=own_prior_knn(locdiff, knn_choice))
        radius = "off" if tuned["hybrid_km"] is None else f"{tuned['hybrid_km']:.0f} km"
        anchored = f"LocDiff-R, anchored (w={tuned['prior_weight']:g}, hybrid {radius})"
        choice = {"name": anchored, "prior_weight": tuned["prior_weight"], "hybrid_km": tuned["hybrid_km"],
                  "validation_scores": {f"w={w:g}, r={'off' if r is None else round(r)}": v
                                        for (w, r), v in tuned["table"].items()}}
        log(f"      chosen on validation: LocDiff-R prior weight {tuned['prior_weight']:g}, hybrid {radius}")
    timings["training_s"] = time.perf_counter() - t

    t = time.perf_counter()
    log("[4/4] evaluating on the region hold-out and random test sets (once)")
    results: Dict[str, Dict[str, Dict[str, float]]] = {}
    paired: Dict[str, dict] = {}
    examples = {}
    test_runs = {}
    for split, n in [("test_region", cfg.eval_region), ("test_random", cfg.eval_random)]:
        idx = _eval_subset(data.splits[split], n, cfg.seed)
        log(f"      {split}: {len(idx)} crops")
        test_runs[split] = locdiff.predict_details(emb[idx], seed=cfg.seed, return_map=True, map_size=MAP_SIZE,
                                                   progress=progress)  # one pass: answers, maps and signals
        modes = test_runs[split].coords
        variants = {}
        if anchored is not None:  # the maps are the anchored model's (what geolocate returns); the first row as trained
            variants[anchored] = modes[:, 0]
            modes = locdiff.predict(emb[idx], seed=cfg.seed, prior_weight=0.0, hybrid=False)[0]
        results[split], paired[split] = compare_methods(locdiff, baselines, emb[tr], coords[tr], emb[idx], coords[idx],
                                                        cfg.seed, paired=True, modes=modes, variants=variants)
        examples[split] = idx
    # How far to trust an answer (issue 25): conformal credible regions and radii, fitted on the validation
    # crops (never the test crops) per group of a signal known at query time, for LocDiff and for the kNN
    # density alike; coverage with binomial intervals per test split, raw and calibrated, and a reliability plot.
    locdiff_name = anchored or names_of(results)[0]
    knn_name = next(n for n in names_of(results) if n.startswith("kNN density"))
    runs = {locdiff_name: lambda e: _locdiff_run(locdiff, e, cfg.seed),
            knn_name: lambda e: run_as_numpy(knn_run_with_maps(baselines["knn_density"], e, MAP_SIZE))}
    fitted, calibration, curves, levels = {}, {}, {}, reliability_levels()
    for method, run in runs.items():
        v = run(emb[val_all])
        fitted[method] = fit_conformal(v["maps"], coords[val_all].numpy(), v["answers"], v["signals"], v["settings"],
                                       seed=cfg.seed)
        log(f"      {method.split(' (')[0]}: {fitted[method][0].describe()}, fitted on the validation crops")
    locdiff.calibration = fitted[locdiff_name][0]  # the saved model's regions and radii are these
    for split, short in [("test_region", "unseen"), ("test_random", "seen")]:
        idx = examples[split]
        truth = coords[idx].numpy()
        for method, run in runs.items():
            got = _locdiff_run(locdiff, None, cfg.seed, test_runs[split]) if method == locdiff_name else run(emb[idx])
            cal = fitted[method][0]
            for label, c in [("raw", None), ("conformal", cal)]:
                cov = conformal_coverage(c, got["maps"], truth, got["answers"], got["signals"], levels)
                calibration.setdefault(split, {})[f"{method}, {label}"] = {p: cov[p] for p in (0.5, 0.9)}
                curves[f"{method.split(' (')[0]}, {label}, {short}"] = (
                    levels, [cov[p]["coverage"] for p in levels], [(cov[p]["lo"], cov[p]["hi"]) for p in levels])
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
    features = ("frozen ImageNet EfficientNet-Lite0 features" if cfg.encoder == "efficientnet"
                else "features of the small CNN trained on geography")
    md = [f"Test sets, on {features} (seed {cfg.seed}); kNN density k={knn_choice['k']}, "
          f"T={knn_choice['temperature']:g}, chosen on validation.", ""]
    for split, rows in results.items():
        md += [f"### {titles[split]}, {next(iter(rows.values()))['n']} crops", "", markdown_table(rows), "",
               "Differences in % within 1 / 25 / 200 / 750 / 2500 km, LocDiff rows minus each baseline on the same crops "
               "(95% paired bootstrap interval; an interval that contains 0 is a tie):", "",
               paired_table(paired[split]), "",
               "Credible regions: share of true locations inside each method's 50% / 90% region [95% binomial "
               "interval], the regions' median area, and the conformal radius around the answer (median, and the "
               "share of truths within it); raw maps, and conformal (fitted on the validation crops):", "",
               coverage_table(calibration[split]), ""]
    (run_dir / "results.md").write_text("\n".join(md))
    (run_dir / "results.json").write_text(json.dumps({"results": results, "paired_differences": paired,
                                                       "calibration": {k: {m: {str(p): c for p, c in v.items()}
                                                                           for m, v in rows.items()}
                                                                       for k, rows in calibration.items()},
                                                       "validation": {"knn_density_scores": knn_scores,
                                                                      "knn_density_chosen": knn_choice,
                                                                      "calibration": {
                                                                          m: {"signal": c.signal, "sizes": c.sizes,
                                                                              "candidates": r["candidates"]}
                                                                          for m, (c, r) in fitted.items()},
                                                                      "anchored": choice,
                                                                      "sizes": {k: len(v) for k, v in val.items()}},
                                                       "config": asdict(cfg), "sizes": sizes, "timings": timings}, indent=1))
    log("")
    log("\n".join(md))
    log(f"model: {model_dir}\nmap:   {map_path}\nreliability plot: {reliability_path}\n"
        f"try:   locdiff predict {ex_dir}/*.png\n"
        f"took {timings['total_s']:.0f} s (dataset {timings['dataset_s']:.0f}, encoder {timings['encoder_s']:.0f}, "
        f"training {timings['training_s']:.0f}, evaluation {timings['evaluation_s']:.0f})")
    return results
