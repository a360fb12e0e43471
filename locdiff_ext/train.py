"""Training loop for LocDiff over an (embeddings, coords) dataset.

AdamW with linear warmup + cosine decay, gradient clipping, EMA weights, bf16 autocast on GPU,
a tqdm bar with loss and learning rate, periodic evaluation of the EMA model on a validation
split, and checkpoints (safetensors + JSON, atomic, keep last k) from which training resumes
exactly.  Multi-GPU / multi-node through torch.distributed DDP: launch the same command with
``torchrun --nproc_per_node=N``; only rank 0 writes.

A directory holds one run.  ``fit()`` resumes the run in ``out_dir`` only if it was started with the
same model config, training settings (bookkeeping such as ``eval_every`` may change) and data;
otherwise it refuses and says what differs.  Starting afresh where a run exists needs
``overwrite=True`` (``locdiff train --overwrite``), which deletes that run first: a new run's
checkpoints are never mixed with an old run's, and ``out_dir/final`` is always the newest run's model.

Reproducibility by construction: every random draw of step s (the batch, timesteps, noise,
condition dropout and the network's dropout) comes from generators seeded by (seed, s), so a
resumed run needs no saved RNG state to continue bit-for-bit, and the global batch of step s is
the same set of rows whatever the number of processes: rank r takes rows r, r + W, ... of it
(a DistributedSampler-style split of one global order rather than W independent samplers), which
is why a W-process run matches the 1-process run up to float summation order.
"""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

import torch
import torch.distributed as dist
from torch import Tensor

from .checks import check_float, check_int
from .data.checkpoint import (CheckpointError, checkpoint_step, latest_checkpoint, list_checkpoints, read_checkpoint,
                              remove_stale_temporaries, write_checkpoint, write_shared)
from .data.datasets import EmbeddingDataset
from .data.index import GalleryIndex, NeighbourLists
from .data.store import EmbeddingStore
from .evaluation.metrics import geolocation_metrics
from .kernels.geometry import unit_rows
from .locdiff import LocDiff
from .model.retrieval import holdout_draws, holdout_shortfall
from .progress import Progress

PathLike = Union[str, os.PathLike]


class TrainingDiverged(RuntimeError):
    """Training stopped because a loss or gradient became NaN or infinite (``step`` names the step)."""

    def __init__(self, message: str, step: int):
        super().__init__(message)
        self.step = step


@dataclass
class TrainConfig:
    steps: int = 20000
    batch_size: int = 256          # global batch (split across DDP processes)
    lr: float = 3e-4
    weight_decay: float = 0.01
    warmup_steps: int = 500
    min_lr_ratio: float = 0.01     # cosine decays to lr * min_lr_ratio
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    amp: bool = True               # bf16 autocast on CUDA (ignored on CPU)
    eval_every: int = 1000         # 0: never
    eval_size: int = 512           # validation rows used by the periodic evaluation
    eval_samples: int = 8
    eval_steps: int = 25
    checkpoint_every: int = 1000   # 0: only at the end
    keep_last: int = 3
    log_every: int = 50
    seed: int = 0
    val_fraction: float = 0.05     # used when no validation set is given
    metric_steps: int = 1000       # fitting steps of a learned query map (retrieval_metric='learned', model.metric)

    def __post_init__(self):
        """Checks every field (type, range, finiteness), naming it: a config may come from a JSON file."""
        try:
            for name in ["steps", "batch_size", "keep_last", "log_every", "eval_samples", "eval_steps", "metric_steps"]:
                check_int(getattr(self, name), name, 1, 2**62)
            for name in ["warmup_steps", "eval_every", "eval_size", "checkpoint_every"]:
                check_int(getattr(self, name), name, 0, 2**62)
            check_int(self.seed, "seed", 0, 2**63 - 1)
            check_float(self.lr, "lr", 0.0, lo_open=True)
            check_float(self.weight_decay, "weight_decay", 0.0)
            check_float(self.min_lr_ratio, "min_lr_ratio", 0.0, 1.0)
            check_float(self.grad_clip, "grad_clip", 0.0)
            check_float(self.ema_decay, "ema_decay", 0.0, 1.0, hi_open=True)
            check_float(self.val_fraction, "val_fraction", 0.0, 1.0, lo_open=True, hi_open=True)
            if not isinstance(self.amp, bool):
                raise TypeError(f"amp must be a bool, got {self.amp!r}")
        except (TypeError, ValueError) as exc:
            raise type(exc)(f"TrainConfig: {exc}") from None

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "TrainConfig":
        if not isinstance(d, dict):
            raise TypeError(f"TrainConfig: expected a JSON object of fields, got {type(d).__name__}")
        unknown = sorted(set(d) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(f"TrainConfig: unknown keys {unknown}")
        return cls(**d)


# Training settings that may change when a run is resumed: they schedule evaluation, logging and
# checkpoints, not the optimisation, so the resumed run still reproduces the uninterrupted one.
RESUMABLE_CHANGES = ("eval_every", "eval_size", "eval_samples", "eval_steps", "checkpoint_every", "keep_last",
                     "log_every")


Data = Union[EmbeddingDataset, EmbeddingStore]
NEIGHBOUR_CANDIDATES = 64  # K': each training row's precomputed gallery candidates (a store's neighbour lists)


def data_fingerprint(data: Data) -> Dict[str, Any]:
    """What identifies the training data of a run without re-reading it (``fingerprint()`` of an
    EmbeddingDataset: a strided sample's SHA-256; of an EmbeddingStore: its header's content hash)."""
    return data.fingerprint()


def run_files(out_dir: PathLike) -> List[Path]:
    """What a training run leaves in ``out_dir``: step_* checkpoints, the gallery-* they share, final/ and
    history.json."""
    d = Path(out_dir)
    if not d.is_dir():
        return []
    return sorted(p for p in d.iterdir() if p.name in ("final", "history.json")
                  or (p.is_dir() and p.name.startswith("step_") and p.name[5:].isdigit())
                  or (p.is_dir() and p.name.startswith("gallery-") and len(p.name) == 24))


def _step_seed(seed: int, step: int, salt: int = 0) -> int:
    return (seed * 1_000_003 + step * 7919 + salt * 104_729) % (2**63 - 1)


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Linear warmup over warmup_steps, then cosine from 1 to min_lr_ratio at cfg.steps."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps))
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def init_distributed():
    """(rank, world_size, device) from torchrun's environment; initialises the process group
    (NCCL on GPUs, gloo on CPUs) if WORLD_SIZE > 1 and nobody did yet."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    if dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
    else:
        rank, world = 0, 1
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
    return rank, world, device


def _flatten_optimizer(opt: torch.optim.Optimizer):
    sd = opt.state_dict()
    tensors, extra = {}, {}
    for idx, st in sd["state"].items():
        for k, v in st.items():
            if isinstance(v, Tensor):
                tensors[f"{idx}.{k}"] = v
            else:
                extra[f"{idx}.{k}"] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": extra}


def _unflatten_optimizer(tensors: Dict[str, Tensor], doc: Dict) -> Dict:
    state: Dict[int, Dict[str, Any]] = {}
    for key, v in list(tensors.items()) + list(doc.get("scalars", {}).items()):
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = v
    return {"state": state, "param_groups": doc["param_groups"]}


class Trainer:
    """Trains ``model`` on ``train_data``, writing checkpoints and the final model to ``out_dir``.

    ``out_dir/step_XXXXXXXX/``: trainer checkpoints (EMA weights as ``model``, so that
    ``LocDiff.from_pretrained`` loads them; raw weights, optimizer and LR state for resuming).
    ``out_dir/final/``: the EMA model (``save_pretrained``) once training ends."""

    def __init__(self, model: LocDiff, train_data: Data, out_dir: PathLike,
                 config: Optional[TrainConfig] = None, val_data: Optional[Data] = None,
                 progress: bool = True, device: Union[str, torch.device, None] = None,
                 neighbour_candidates: int = NEIGHBOUR_CANDIDATES):
        self.cfg = config or TrainConfig()
        if train_data.dim != model.config.cond_dim:
            raise ValueError(f"train_data: embeddings have width {train_data.dim} but the model expects "
                             f"cond_dim={model.config.cond_dim}")
        if val_data is None and self.cfg.eval_every:
            train_data, val_data = train_data.split(self.cfg.val_fraction, self.cfg.seed)
        if val_data is not None and val_data.dim != model.config.cond_dim:
            raise ValueError(f"val_data: embeddings have width {val_data.dim}, expected {model.config.cond_dim}")
        self.rank, self.world, self.device = init_distributed()
        if device is not None:  # default: this process's GPU if there is one, else the CPU
            if self.world > 1:
                raise ValueError("device: under torchrun each process uses its LOCAL_RANK's GPU; do not pass device")
            self.device = torch.device(device)
        if self.cfg.batch_size % self.world:
            raise ValueError(f"batch_size {self.cfg.batch_size} must be divisible by the {self.world} processes")
        if len(train_data) < self.cfg.batch_size:
            raise ValueError(f"train_data has {len(train_data)} rows, fewer than batch_size={self.cfg.batch_size}")
        self.neighbours: Optional[NeighbourLists] = None
        gallery, on_disk = model.gallery, isinstance(train_data, EmbeddingStore)
        if gallery is not None and gallery.store is not None:  # a store the user attached: it must be this one
            if not (on_disk and train_data.fingerprint() == gallery.store.fingerprint()):
                raise ValueError("train_data: the model's gallery is a store, and a store-backed gallery is trained "
                                 "through its own neighbour lists, so train_data must be that same (whole) store")
        if gallery is not None and (gallery.store is not None or (on_disk and len(gallery) == 0)):
            if model.query_map is not None:
                raise ValueError("retrieval_metric='learned' needs an in-memory gallery: a store's neighbour lists "
                                 "are searched by cosine similarity (train from an EmbeddingDataset)")
            self.neighbours = self._store_gallery(model, train_data, neighbour_candidates, progress)
        elif gallery is not None and len(gallery) == 0:  # retrieval over the in-memory training data
            model.set_gallery(train_data.embeddings, train_data.coords)
        self.model = model.to(self.device).train()
        self.train_data, self.val_data = train_data, val_data
        self.out_dir = Path(out_dir)
        if self.out_dir.exists() and not self.out_dir.is_dir():
            raise ValueError(f"out_dir {str(self.out_dir)!r} is a file, not a directory")
        self.data_fingerprint = data_fingerprint(train_data)
        self.progress = progress
        self.ema = copy.deepcopy(self.model).eval().requires_grad_(False)
        self.params = [p for p in self.model.net.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(self.params, lr=self.cfg.lr, weight_decay=self.cfg.weight_decay)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lambda s: lr_factor(s, self.cfg))
        self.denoiser = self.model.net
        if self.world > 1:
            from torch.nn.parallel import DistributedDataParallel as DDP

            ids = [self.device.index] if self.device.type == "cuda" else None
            self.denoiser = DDP(self.model.net, device_ids=ids)
        self.amp_dtype = torch.bfloat16 if (self.cfg.amp and self.device.type == "cuda") else None
        self.step = 0
        self._epoch_order: Optional[tuple] = None  # (epoch, its permutation of the training rows)
        self._gallery_ref: Optional[Dict[str, str]] = None  # the run's gallery-*/ directory, once written
        self.history: List[Dict[str, float]] = []
        self._bar: Optional[Progress] = None  # during fit()

    def _normalize(self, e: Tensor) -> Tensor:
        return unit_rows(e) if self.model.config.normalize_condition else e

    def _store_gallery(self, model: LocDiff, store: EmbeddingStore, k: int, progress: bool) -> NeighbourLists:
        """A retrieval model trained on a store: the store is its gallery (its saved index, or a new one) and
        each step's neighbours come from the store's neighbour lists (built once, beside it, by rank 0;
        the others wait and open them).  Why: a step's cost must not grow with the gallery (data/index.py)."""
        if not store.is_whole:
            raise ValueError("train_data: a retrieval model's training store is also its gallery, so it must be a "
                             "whole store, not a view (split/subset); give validation data as its own store "
                             "(val_data), or train with eval_every=0")
        if k < model.config.retrieval_k:
            raise ValueError(f"neighbour_candidates {k} < retrieval_k {model.config.retrieval_k}")
        show = progress and self.rank == 0
        if self.rank == 0:
            index = GalleryIndex.open_or_build(store, progress=show)
            lists = NeighbourLists.build(index, k, far_km=2 * model.config.retrieval_holdout_km, progress=show)
        if self.world > 1:
            dist.barrier()
        if self.rank != 0:
            index, lists = GalleryIndex.load(store), NeighbourLists(store, k)
        model.set_gallery(index)
        if show:  # how often the lists run short under the hold-out caps (data/index.py says what then happens)
            rows = torch.randperm(len(store), generator=torch.Generator().manual_seed(0))[:10_000]
            sims, idx = lists.take(rows)
            short = holdout_shortfall(sims, model.gallery.store_coords(idx), store.take(rows).coords,
                                      model.config.retrieval_k, model.config.retrieval_holdout_km)
            print(f"neighbour lists: {100 * short:.1f}% of training rows have fewer than {model.config.retrieval_k} of "
                  f"their {k} + {lists.far} candidates outside a hold-out cap (those are given as missing neighbours)")
        return lists

    def batch(self, rows: Tensor):
        """(conditioned embeddings, coords, gallery candidates or None) of training rows ``rows``: read from
        the data (a store reads only these rows), normalised per batch."""
        part = self.train_data.take(rows)
        cond = self._normalize(part.embeddings.to(self.device))
        neighbours = None
        if self.neighbours is not None:
            sims, idx = self.neighbours.take(rows)
            neighbours = (sims, self.model.gallery.store_coords(idx))
        return cond, part.coords.to(self.device), neighbours

    # ------------------------------------------------------------------ randomness of one step
    def global_batch(self, step: int) -> Tensor:
        """Row indices of the global batch of ``step``: consecutive slices of a per-epoch
        permutation seeded by (seed, epoch); the tail of each epoch that fills no batch is dropped."""
        n, B = len(self.train_data), self.cfg.batch_size
        per_epoch = n // B
        epoch, i = divmod(step, per_epoch)
        if self._epoch_order is None or self._epoch_order[0] != epoch:  # one permutation of n per epoch, not per step
            g = torch.Generator().manual_seed(_step_seed(self.cfg.seed, epoch, 1))
            self._epoch_order = (epoch, torch.randperm(n, generator=g))
        return self._epoch_order[1][i * B:(i + 1) * B]

    def draws(self, step: int):
        """(t, noise, drop_mask, hold-out draws) for the whole global batch of ``step`` (each process takes
        its rows, so any number of processes draws what one does)."""
        B, K = self.cfg.batch_size, self.model.shdd.dim
        g = torch.Generator().manual_seed(_step_seed(self.cfg.seed, step, 2))
        t = torch.randint(0, self.model.schedule.num_steps, (B,), generator=g)
        noise = torch.randn(B, K, generator=g)
        drop = torch.rand(B, generator=g) < self.model.config.cond_drop_prob
        return t, noise, drop, holdout_draws(B, g)

    # ------------------------------------------------------------------ one optimisation step
    def train_step(self, step: int) -> Tensor:
        mine = slice(self.rank, None, self.world)
        cond, coords, neighbours = self.batch(self.global_batch(step)[mine])
        t, noise, drop, holdout = (x[mine].to(self.device) for x in self.draws(step))
        torch.manual_seed(_step_seed(self.cfg.seed, step, 3 + self.rank))  # the network's dropout
        loss, _ = self.model.training_loss(cond, coords, t, noise, drop, denoiser=self.denoiser,
                                           amp_dtype=self.amp_dtype, neighbours=neighbours, holdout=holdout)
        if not bool(torch.isfinite(loss)):
            raise self._diverged(step, f"the loss is {float(loss.detach())}")
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        # the norm is needed to see a non-finite gradient before it reaches the weights (inf: no clipping)
        norm = torch.nn.utils.clip_grad_norm_(self.params, self.cfg.grad_clip if self.cfg.grad_clip > 0 else math.inf)
        if not bool(torch.isfinite(norm)):
            raise self._diverged(step, f"the loss is {float(loss.detach()):.4g} but its gradient norm is {float(norm)}")
        self.opt.step()
        self.sched.step()
        decay = min(self.cfg.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for pe, p in zip(self.ema.net.parameters(), self.model.net.parameters()):
                pe.lerp_(p, 1 - decay)
        return loss.detach()

    def _diverged(self, step: int, what: str) -> "TrainingDiverged":
        """The error a diverging run stops with; no weight was updated from this step, and nothing is written."""
        lr = self.sched.get_last_lr()[0]
        last = latest_checkpoint(self.out_dir) if self.rank == 0 else None
        kept = f"the last checkpoint, {last}, is untouched" if last is not None else "no checkpoint was written yet"
        return TrainingDiverged(
            f"training diverged at step {step}: {what} (learning rate {lr:.3g} at this step, lr = {self.cfg.lr:g}); "
            f"{kept}. Try a lower lr (e.g. {self.cfg.lr / 10:g}), a longer warmup_steps or a smaller grad_clip, "
            "then resume or start again with overwrite=True.", step=step)

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(self) -> Dict[str, float]:
        """Metrics of the EMA model on (the first eval_size rows of) the validation set."""
        val = self.val_data.take(slice(0, min(self.cfg.eval_size, len(self.val_data))))
        coords, _, _ = self.ema.predict(val.embeddings, num_samples=self.cfg.eval_samples,
                                        steps=self.cfg.eval_steps, seed=self.cfg.seed)
        return geolocation_metrics(coords[:, 0], val.coords)

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(self) -> Optional[Path]:
        if self.rank != 0:
            return None
        opt_tensors, opt_doc = _flatten_optimizer(self.opt)
        state = {"step": self.step, "scheduler": self.sched.state_dict(), "optimizer": opt_doc,
                 "history": self.history, "train_config": asdict(self.cfg), "world_size": self.world,
                 "data": self.data_fingerprint}
        def weights(m):  # the gallery is not copied into step checkpoints: it is stored once per run
            return {k: v for k, v in m.persistent_state_dict().items() if not k.startswith("gallery.")}

        docs = {"config": self.model.config.to_dict(), "trainer_state": state}
        if self.ema.gallery_store_ref() is not None:  # a store: referenced by path and content hash
            docs["gallery"] = self.ema.gallery_store_ref()
        elif self.ema.gallery is not None and len(self.ema.gallery):
            if self._gallery_ref is None:  # hashed and, unless already there, written once per run start
                g = self.ema.gallery
                self._gallery_ref = write_shared(self.out_dir, "gallery", {"embeddings": g.embeddings,
                                                                           "coords": g.coords})
            docs["gallery_ref"] = self._gallery_ref
        path = write_checkpoint(self.out_dir / f"step_{self.step:08d}",
                                {"model": weights(self.ema), "train_model": weights(self.model),
                                 "optimizer": opt_tensors}, docs)
        if self._bar is not None:
            mb = sum(p.stat().st_size for p in path.iterdir()) / 1e6
            self._bar.log(f"checkpoint {path.name}: {mb:.1f} MB (EMA and raw weights and AdamW state, for an exact "
                          "resume; a retrieval gallery is stored once, in gallery-*/; final/ holds the EMA model "
                          "alone, gallery included)")
        done = [p for p in list_checkpoints(self.out_dir) if checkpoint_step(p) <= self.step]
        for old in done[:-self.cfg.keep_last]:  # the newest keep_last, this one included, stay
            shutil.rmtree(old, ignore_errors=True)
        return path

    def load_checkpoint(self, path: PathLike) -> None:
        tensors, docs = read_checkpoint(path)
        try:
            if docs["config"] != self.model.config.to_dict():
                raise CheckpointError(f"{str(path)!r} was written for another model config; resume with the same "
                                      "config, or start afresh with overwrite=True (--overwrite) or another out_dir")
            st = docs["trainer_state"]
            self._check_same_run(path, st)
            ema = LocDiff.checkpoint_state(path, tensors, docs)  # with the run's gallery (or an older inline one)
            raw = dict(tensors["train_model"])  # the gallery is saved once, not with the raw weights
            raw.update({k: v for k, v in ema.items() if k.startswith("gallery.") and k not in raw})
            self.model.load_persistent_state_dict(raw, f"{str(path)!r}: train_model")
            self.ema.load_persistent_state_dict(ema, f"{str(path)!r}: model")
            self.opt.load_state_dict(_unflatten_optimizer(tensors["optimizer"], st["optimizer"]))
            self.sched.load_state_dict(st["scheduler"])
            self.step, self.history = int(st["step"]), list(st["history"])
        except (KeyError, RuntimeError, ValueError, TypeError) as exc:
            if isinstance(exc, CheckpointError):
                raise
            raise CheckpointError(f"{str(path)!r} is not a usable trainer checkpoint: {exc!r}") from None

    def _check_same_run(self, path: PathLike, state: Dict[str, Any]) -> None:
        """Refuses to resume a run started with other training settings or other data."""
        saved = state.get("train_config") or {}
        now = asdict(self.cfg)
        diffs = [f"{k} {saved.get(k)!r} -> {v!r}" for k, v in now.items()
                 if k not in RESUMABLE_CHANGES and k in saved and saved[k] != v]
        data = state.get("data")
        if data is not None and data != self.data_fingerprint:
            diffs.append(f"training data ({data.get('rows')} rows of width {data.get('dim')} -> "
                         f"{self.data_fingerprint['rows']} rows of width {self.data_fingerprint['dim']}"
                         + (", same size but other values" if data.get("rows") == self.data_fingerprint["rows"] else "")
                         + ")")
        if diffs:
            raise CheckpointError(f"{str(path)!r} belongs to a run with other settings ({'; '.join(diffs)}): resume it "
                                  "with the same ones, or start afresh with overwrite=True (--overwrite) or another "
                                  "out_dir")

    def _prepare_out_dir(self, resume: bool, overwrite: bool) -> None:
        """Rank 0, before training: removes temporaries of a killed checkpoint write, and the old run
        if ``overwrite``; refuses to start a fresh run over an old one (module docstring)."""
        removed = remove_stale_temporaries(self.out_dir)
        if removed and self.progress:
            print(f"removed {len(removed)} unfinished checkpoint write(s) in {self.out_dir}")
        existing = run_files(self.out_dir)
        if existing and overwrite:
            for p in existing:
                if p.is_dir():
                    shutil.rmtree(p)
                else:
                    p.unlink()
        elif existing and (not resume or latest_checkpoint(self.out_dir) is None):
            names = ", ".join(p.name for p in existing[:3]) + (", ..." if len(existing) > 3 else "")
            why = "resume=False (--no-resume) asks for a fresh run" if not resume else "it has no checkpoint to resume"
            raise ValueError(f"out_dir {str(self.out_dir)!r} holds a training run ({names}) and {why}: pass "
                             "overwrite=True (--overwrite) to delete that run and start afresh, or choose another out_dir")

    def _fit_query_map(self) -> None:
        """A fresh run of a learned-map model fits its query map on the gallery before the first step (a
        resumed run loads it from the checkpoint instead), and gives the EMA model the same map.  The fit is
        deterministic on the CPU; under torchrun rank 0's map is broadcast so that every rank searches alike."""
        qm = self.model.query_map
        if qm is None or qm.is_fitted:
            return
        g = self.model.gallery
        qm.fit(g.embeddings.cpu(), g.coords.cpu(), steps=self.cfg.metric_steps, seed=self.cfg.seed)
        if self.world > 1:
            dist.broadcast(qm.weight, 0)
        self.ema.query_map.load_state_dict(qm.state_dict())

    # ------------------------------------------------------------------ the loop
    def fit(self, resume: bool = True, overwrite: bool = False) -> List[Dict[str, float]]:
        """Trains to ``config.steps`` and writes out_dir/final; returns the history of logged losses and
        evaluations.  ``resume``: continue the run in out_dir (same settings and data, else
        CheckpointError); ``overwrite``: delete the run in out_dir and start afresh (without it, a
        fresh start over an existing run raises ValueError)."""
        if self.rank == 0:
            self._prepare_out_dir(resume, overwrite)
        if self.world > 1:
            dist.barrier()
        ckpt = latest_checkpoint(self.out_dir) if resume and not overwrite else None
        if ckpt is not None:
            self.load_checkpoint(ckpt)
        else:
            self._fit_query_map()
        if self.rank == 0:
            self.out_dir.mkdir(parents=True, exist_ok=True)
        cfg = self.cfg
        bar = self._bar = Progress(cfg.steps, "train", "step", enabled=self.progress and self.rank == 0,
                                   initial=self.step)
        running, count, t0 = torch.zeros((), device=self.device), 0, time.perf_counter()
        while self.step < cfg.steps:
            running += self.train_step(self.step)
            count += 1
            self.step += 1
            bar.update(1)
            if self.step % cfg.log_every == 0 or self.step == cfg.steps:
                loss = float(running) / count
                rate = count * cfg.batch_size / (time.perf_counter() - t0)
                lr = self.sched.get_last_lr()[0]
                self.history.append({"step": self.step, "loss": loss, "lr": lr, "samples_per_s": rate})
                bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}")
                running.zero_()
                count, t0 = 0, time.perf_counter()
            due = cfg.eval_every and (self.step % cfg.eval_every == 0 or self.step == cfg.steps)  # the last step too
            if due and self.val_data is not None and self.rank == 0:
                m = self.evaluate()
                self.history.append({"step": self.step, **{f"val_{k}": v for k, v in m.items()}})
                bar.write(f"step {self.step}: val median {m['median_km']:.0f} km, "
                          f"200 km {m['acc_200km']:.1f}%, 750 km {m['acc_750km']:.1f}%, 2500 km {m['acc_2500km']:.1f}%")
            if (cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0) or self.step == cfg.steps:
                self.save_checkpoint()
        bar.close()
        self._bar = None
        if self.rank == 0:
            self.ema.save_pretrained(self.out_dir / "final")
            (self.out_dir / "history.json").write_text(json.dumps(self.history, indent=1))
        if self.world > 1:
            dist.barrier()
        return self.history


def train(model: LocDiff, train_data: Data, out_dir: PathLike, config: Optional[TrainConfig] = None,
          val_data: Optional[Data] = None, resume: bool = True, progress: bool = True,
          device: Union[str, torch.device, None] = None, overwrite: bool = False) -> LocDiff:
    """Trains ``model`` and returns its EMA version (also saved to out_dir/final); ``resume`` and
    ``overwrite`` as in ``Trainer.fit``."""
    trainer = Trainer(model, train_data, out_dir, config, val_data, progress, device)
    trainer.fit(resume=resume, overwrite=overwrite)
    return trainer.ema
