"""Calibrating a model's credible regions and radii on validation data (issue 25): run the model as
``geolocate`` will, measure where the truths fall (locdiff_ext.evaluation.conformal), keep the fitted
``ConformalCalibration`` on the model and save it with the model.

Why here and not in the model: it needs labelled data the model never trained on, like the settings that
``selection`` chooses; it runs after them, because the prior weight and the hybrid change the maps and the
answers it calibrates (a calibration records those settings, and ``geolocate`` with other ones reports its
predictions as uncalibrated).  Used by ``locdiff calibrate``, ``locdiff train --val``, python/train.py and
the demo.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import numpy as np
import torch
from torch import Tensor

from .checks import check_int, validate_coords, validate_embeddings
from .data.checkpoint import update_documents
from .evaluation.conformal import conformal_coverage, fit_conformal, needed_items
from .kernels.geometry import unit_rows
from .locdiff import LocDiff
from .model.retrieval import SIGNAL_K, query_signals

MIN_ITEMS = 50  # below this a 90% region rests on the 46th-50th smallest scores: refused, not guessed


def run_with_maps(model: LocDiff, embeddings: Tensor, map_size: Tuple[int, int] = (180, 360), seed: int = 0,
                  batch_size: int = 64, progress: bool = False, **inference) -> Dict[str, Any]:
    """The model's answers [N, 2], maps [N, nlat, nlon] (float32), signals and settings for ``embeddings``,
    in chunks (a map of 180 x 360 is 260 KB)."""
    answers, maps, signals, settings = [], [], {}, None
    for i in range(0, embeddings.shape[0], 256):
        out = model.predict_details(embeddings[i:i + 256], top_k=1, return_map=True, map_size=map_size, seed=seed,
                                    batch_size=batch_size, progress=progress, **inference)
        answers.append(out.coords[:, 0])
        maps.append(out.maps.float())
        for k, v in out.signals.items():
            signals.setdefault(k, []).append(v)
        settings = out.settings
    return {"answers": torch.cat(answers), "maps": torch.cat(maps), "settings": settings,
            "signals": {k: torch.cat(v) for k, v in signals.items()}}


def run_as_numpy(run: Dict[str, Any]) -> Dict[str, Any]:
    """A run of ``run_with_maps`` / ``knn_run_with_maps`` as the numpy arrays the conformal functions take."""
    return {"answers": run["answers"].numpy(), "maps": run["maps"].numpy(), "settings": run["settings"],
            "signals": {k: v.numpy() for k, v in run["signals"].items()}}


@torch.no_grad()
def knn_run_with_maps(knn, embeddings: Tensor, map_size: Tuple[int, int] = (180, 360)) -> Dict[str, Any]:
    """The same for a ``KNNDensity`` (the training-free prior), so that it is calibrated like the model:
    its answers, maps, and the same query-time signals as ``predict_details`` gives a model's (its answer's
    score and its neighbours' ``query_signals``)."""
    signals = query_signals(*knn.gallery.search(unit_rows(embeddings.float()), SIGNAL_K))
    maps, answers, scores = [], [], []
    for i in range(0, embeddings.shape[0], 256):
        mixture = knn.mixture(embeddings[i:i + 256])
        maps.append(knn.aggregator.probability_map(mixture, *map_size).float())
        c, s = knn.aggregator(mixture, 1)
        answers.append(c[:, 0].cpu())
        scores.append(s[:, 0].double().cpu())
    return {"answers": torch.cat(answers), "maps": torch.cat(maps), "settings": {},
            "signals": {"mode_score": torch.cat(scores).nan_to_num(neginf=0.0), **signals}}


def calibrate(model: LocDiff, embeddings: Tensor, coords: Tensor, map_size: Tuple[int, int] = (180, 360),
              seed: int = 0, batch_size: int = 64, min_group: int = 100, max_groups: int = 4, progress: bool = False,
              **inference) -> Dict[str, Any]:
    """Fits the model's conformal regions and radius on held-out ``embeddings`` [N, D] and ``coords`` [N, 2]
    (never the test data; at least ``MIN_ITEMS``) at ``map_size``, with the inference settings that
    ``geolocate`` will use (``inference``: num_samples, steps, prior_weight, hybrid, ...; default the
    model's), and sets ``model.calibration``.  Returns the fit's report with the in-sample coverage."""
    emb = validate_embeddings(embeddings, "embeddings", model.config.cond_dim).to(model.device)
    coords = validate_coords(coords, "coords")
    if coords.shape[0] != emb.shape[0]:
        raise ValueError(f"embeddings and coords must have as many rows, got {emb.shape[0]} and {coords.shape[0]}")
    if emb.shape[0] < MIN_ITEMS:
        raise ValueError(f"embeddings: {emb.shape[0]} calibration items are too few: at least {MIN_ITEMS} are needed "
                         f"(a 90% region needs n >= {needed_items(0.9)} per group, and its promise is loose below ~100)")
    check_int(min_group, "min_group", MIN_ITEMS)
    run = run_as_numpy(run_with_maps(model, emb, map_size, seed, batch_size, progress, **inference))
    missing = np.isnan(run["answers"][:, 0])
    if missing.any():
        raise ValueError(f"the model found no answer for {int(missing.sum())} calibration inputs")
    truth = coords.double().cpu().numpy()
    cal, report = fit_conformal(run["maps"], truth, run["answers"], run["signals"], run["settings"],
                                min_group=min_group, max_groups=max_groups, seed=seed)
    model.calibration = cal
    report["in_sample"] = conformal_coverage(cal, run["maps"], truth, run["answers"], run["signals"])
    report["raw"] = conformal_coverage(None, run["maps"], truth, run["answers"])
    report["settings"] = run["settings"]
    return report


def calibrate_and_save(model: LocDiff, val_data, directory, seed: int = 0, rows: int = 2000, log=print,
                       **kwargs) -> Optional[Dict[str, Any]]:
    """``calibrate`` on up to ``rows`` random rows of ``val_data`` (an EmbeddingDataset or EmbeddingStore)
    and the calibration saved into the model directory ``directory`` (the weights are not rewritten).
    None, with a line saying why, when the validation data is too small."""
    n = len(val_data)
    if n < MIN_ITEMS:
        log(f"not calibrated: {n} validation rows, at least {MIN_ITEMS} are needed")
        return None
    idx = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:rows].sort().values
    part = val_data.take(idx)
    kwargs.setdefault("min_group", max(MIN_ITEMS, min(100, len(part) // 2)))
    report = calibrate(model, part.embeddings, part.coords, seed=seed, **kwargs)
    update_documents(Path(directory), {"calibration": model.calibration.to_dict()})
    log(summary(report, model))
    return report


def summary(report: Dict[str, Any], model: LocDiff) -> str:
    """One line: what was fitted and its in-sample coverage (by construction >= the level)."""
    cov = report["in_sample"]
    raw = report["raw"]
    levels = ", ".join(f"{p:.0%} region {cov[p]['coverage']:.1%} (raw {raw[p]['coverage']:.1%}), radius "
                       f"{cov[p]['median_radius_km']:.0f} km" for p in sorted(cov))
    return f"calibrated: {model.calibration.describe()}; on those items {levels}"


__all__ = ["calibrate", "calibrate_and_save", "knn_run_with_maps", "run_as_numpy", "run_with_maps", "summary", "MIN_ITEMS"]
