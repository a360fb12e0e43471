"""``LocDiff``: the whole model in one ``nn.Module`` (SHDD encoder/decoder, CS-UNet, noise schedule,
optional retrieval gallery and image encoder), its ``LocDiffConfig``, and ``save_pretrained`` /
``from_pretrained``.

Inference (design.md section 1): for each input, ``num_samples`` SHDD vectors are sampled from
noise by DDIM/DDPM conditioned on the input's embedding, then turned into the top-k modes and
their scores by ``model.aggregate.SampleAggregator``.  ``geolocate`` (locdiff_ext.inference) is
the one-call API over ``LocDiff.predict``; ``locdiff_ext.train`` minimises ``training_loss``.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Dict, Optional, Tuple, Union

import numpy as np
import torch
from torch import Tensor, nn

from .checks import check_fits, check_float, check_int, validate_embeddings
from .data.checkpoint import CheckpointError, read_checkpoint, read_shared, write_checkpoint
from .data.index import GalleryIndex
from .data.store import EmbeddingStore, StoreError
from .encoders import STORED_ENCODERS, ImageEncoder, build_image_encoder
from .evaluation.conformal import ConformalCalibration
from .kernels.geometry import unit_rows
from .kernels.ops import decode_grid_limits, num_coeffs
from .model.aggregate import AGGREGATES, SampleAggregator
from .model.diffusion import (PREDICTIONS, DDIMSampler, DDPMSampler, DPMSolverSampler, NoiseSchedule, SHDDKLLoss,
                              mse_loss)
from .model.metric import QueryMap, map_queries
from .model.retrieval import (Gallery, neighbour_density, neighbour_features, query_signals, sample_holdout,
                              snap_to_neighbours, visible_neighbours)
from .model.shdd import WEIGHTINGS, SHDDDecoder, SHDDEncoder
from .model.unet import CSUNet, CSUNetConfig
from .progress import Progress

PathLike = Union[str, os.PathLike]
LOSSES = ("shdd_kl", "mse")
SAMPLERS = ("ddim", "ddpm", "dpm++")
HYBRID_CANDIDATES = 64  # the neighbours LocDiff-H may snap a mode to (snap_to_neighbours)
MAX_WIDTH = 1 << 16  # bound on cond_dim, time_dim and CS-UNet widths: a 65536^2 layer is already 16 GiB
RETRIEVAL_METRICS = ("cosine", "learned")  # how LocDiff-R searches its gallery (search_neighbours)


@dataclass
class LocDiffConfig:
    """Everything that defines a LocDiff model (saved as config.json by save_pretrained)."""

    cond_dim: int                                   # width of the condition (image/text) embedding
    L: int = 32                                     # SH degree: finest scale ~ 20000 km / L
    weighting: str = "none"                         # per-degree taper of the SHDD vectors ('none', 'gaussian')
    taper_sigma: Optional[float] = None             # radians, for weighting='gaussian' (default 3/L)
    widths: Tuple[int, ...] = (1024, 512, 256)      # CS-UNet encoder widths (decoder mirrors them)
    time_dim: int = 256
    w0_initial: float = 30.0
    w0: float = 1.0
    dropout: float = 0.1
    normalize_condition: bool = True                # L2-normalise embeddings (CLIP-style features)
    schedule: str = "cosine"
    train_timesteps: int = 1000
    prediction: str = "x0"
    loss: str = "shdd_kl"                           # 'shdd_kl' (+ mse_weight * MSE) or 'mse'
    kl_temperature: float = 0.05
    kl_smoothing: Optional[float] = None            # radians (default 3/L), see SHDDKLLoss
    mse_weight: float = 1.0                         # MSE added to SHDD-KL (far-off predictions need it)
    cond_drop_prob: float = 0.1                     # condition dropout (classifier-free guidance)
    sampler: str = "dpm++"                          # DPM-Solver++(2M); "ddim" was the default before (25 steps)
    sample_steps: int = 10
    eta: float = 0.0
    num_samples: int = 16
    guidance_scale: Optional[float] = None          # None: 2.0 if trained with condition dropout, else 1.0
    aggregate: str = "mean"
    map_sharpness: float = 1.0                      # probability maps' density ^ this (calibrated on validation data)
    retrieval_k: int = 0                            # > 0: condition on the k most similar gallery entries
    retrieval_holdout_km: float = 1000.0            # training hold-out caps' radii up to this (locdiff_ext.model.retrieval)
    retrieval_temperature: float = 0.03             # softmax temperature of the neighbours' density prior
    retrieval_metric: str = "cosine"                # 'learned': search with a query map fitted on the gallery (model.metric)
    prior_weight: float = 0.0                       # inference: (1 - w) sample mean + w kNN density (chosen on validation)
    prior_k: int = 16                               # that density's neighbours (retrieval models only)
    prior_temperature: float = 0.03                 # and its softmax temperature
    hybrid: bool = False                            # LocDiff-H: snap each mode to the most similar neighbour near it
    hybrid_km: Optional[float] = None               # the snapping radius (default: lobe_km, the resolution at L)
    image_encoder: Optional[Dict[str, Any]] = None  # config of the image encoder, if any

    def __post_init__(self):
        """Checks every field (type, range, finiteness): a config may come from a file someone else wrote,
        and a bad value must fail here, naming the field, not as an allocation or NaN deep inside."""
        try:
            self._validate()
        except (TypeError, ValueError) as exc:
            raise type(exc)(f"LocDiffConfig: {exc}") from None

    def _validate(self) -> None:
        ints = {"cond_dim": (1, MAX_WIDTH), "L": (1, 256), "time_dim": (1, MAX_WIDTH), "train_timesteps": (1, 100_000),
                "num_samples": (1, 65_536), "retrieval_k": (0, 1024), "prior_k": (1, 1024)}
        for name, (lo, hi) in ints.items():
            check_int(getattr(self, name), name, lo, hi)
        check_int(self.sample_steps, "sample_steps", 1, self.train_timesteps)
        if isinstance(self.widths, (str, bytes)) or not isinstance(self.widths, (list, tuple)) or not 1 <= len(self.widths) <= 16:
            raise ValueError(f"widths must be a list of 1 to 16 ints, got {self.widths!r}")
        self.widths = tuple(check_int(w, "widths[i]", 1, MAX_WIDTH) for w in self.widths)
        check_float(self.map_sharpness, "map_sharpness", 0.0, 100.0, lo_open=True)
        check_float(self.prior_weight, "prior_weight", 0.0, 1.0)
        if self.hybrid_km is not None:
            check_float(self.hybrid_km, "hybrid_km", 0.0, 20038.0, lo_open=True)
        if not isinstance(self.hybrid, bool):
            raise TypeError(f"hybrid must be a bool, got {self.hybrid!r}")
        if self.retrieval_k == 0 and (self.prior_weight > 0 or self.hybrid):
            raise ValueError("prior_weight > 0 and hybrid=True need a gallery: set retrieval_k > 0 (LocDiff-R)")
        if self.retrieval_metric not in RETRIEVAL_METRICS:
            raise ValueError(f"retrieval_metric must be one of {RETRIEVAL_METRICS}, got {self.retrieval_metric!r}")
        if self.retrieval_metric == "learned" and self.retrieval_k == 0:
            raise ValueError("retrieval_metric='learned' needs a gallery: set retrieval_k > 0 (LocDiff-R)")
        for name in ("w0_initial", "w0", "kl_temperature", "retrieval_temperature", "prior_temperature"):
            check_float(getattr(self, name), name, 0.0, lo_open=True)
        for name in ("taper_sigma", "kl_smoothing"):
            if getattr(self, name) is not None:
                check_float(getattr(self, name), name, 0.0, lo_open=True)
        check_float(self.dropout, "dropout", 0.0, 1.0, hi_open=True)
        check_float(self.cond_drop_prob, "cond_drop_prob", 0.0, 1.0, hi_open=True)
        check_float(self.mse_weight, "mse_weight", 0.0)
        check_float(self.eta, "eta", 0.0, 1.0)
        check_float(self.retrieval_holdout_km, "retrieval_holdout_km", 1.0)
        if self.guidance_scale is not None:
            check_float(self.guidance_scale, "guidance_scale", -100.0, 100.0)
        if not isinstance(self.normalize_condition, bool):
            raise TypeError(f"normalize_condition must be a bool, got {self.normalize_condition!r}")
        for name, allowed in [("weighting", WEIGHTINGS), ("schedule", ("linear", "cosine")), ("prediction", PREDICTIONS),
                              ("loss", LOSSES), ("sampler", SAMPLERS), ("aggregate", AGGREGATES)]:
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if self.image_encoder is not None and not isinstance(self.image_encoder, dict):
            raise TypeError(f"image_encoder must be a dict (an encoder's config) or None, got {type(self.image_encoder).__name__}")

    def to_dict(self) -> Dict[str, Any]:
        d = asdict(self)
        d["widths"] = list(self.widths)
        return d

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "LocDiffConfig":
        if not isinstance(d, dict):
            raise TypeError(f"LocDiffConfig: expected a JSON object of fields, got {type(d).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"LocDiffConfig: unknown keys {unknown}")
        return cls(**d)


@dataclass
class Prediction:
    """What ``LocDiff.predict_details`` returns: coords [N, top_k, 2], scores [N, top_k], maps
    [N, nlat, nlon] or None; per input the query-time ``signals`` {name: [N]} ('mode_score': the best
    mode's score; a retrieval model's also its neighbours' ``query_signals``: 'top_similarity',
    'similarity_gap', 'neighbour_agreement', 'neighbour_spread') and the effective
    inference ``settings`` (what a conformal calibration holds for), and the ``map_size`` asked for."""

    coords: Tensor
    scores: Tensor
    maps: Optional[Tensor]
    signals: Dict[str, Tensor]
    settings: Dict[str, Any]
    map_size: Tuple[int, int]


def input_seeds(rows: Tensor, seed: int) -> list:
    """One 63-bit seed per input, from ``seed`` and the SHA-256 of the input's own values (the float32
    bytes of its embedding or preprocessed pixels): an input's samples, hence its answer, do not depend on
    the batch it came in or its position there (issue 13).  Identical inputs get identical answers."""
    prefix = int(seed).to_bytes(8, "little")
    flat = rows.detach().reshape(rows.shape[0], -1).to("cpu", torch.float32).contiguous().numpy()
    return [int.from_bytes(hashlib.sha256(prefix + r.tobytes()).digest()[:8], "little") >> 1 for r in flat]


class _SampleGroups:
    """The CS-UNet as the samplers call it while sampling: an input's samples are consecutive rows that share
    its condition, so FiLM and the condition path run once per input (CSUNet.forward's ``repeats``), and
    guidance runs as CSUNet.forward_guided."""

    def __init__(self, net: CSUNet, samples: int):
        self.net, self.samples = net, samples

    @property
    def training(self) -> bool:
        return self.net.training

    def __call__(self, x: Tensor, t: Tensor, cond: Optional[Tensor], drop_mask: Optional[Tensor] = None) -> Tensor:
        return self.net(x, t, cond, drop_mask, repeats=self.samples)

    def forward_guided(self, x: Tensor, t: Tensor, cond: Tensor, guidance_scale: float) -> Tensor:
        return self.net.forward_guided(x, t, cond, guidance_scale, repeats=self.samples)


class LocDiff(nn.Module):
    """The LocDiff model.  ``predict`` runs inference on embeddings or images; ``training_loss``
    is what ``locdiff_ext.train`` minimises.  Attributes are the state-dict prefixes of saved models
    (``net.``, ``gallery.``, ``image_encoder.``): renaming one breaks every saved model."""

    def __init__(self, config: LocDiffConfig, image_encoder: Optional[ImageEncoder] = None):
        super().__init__()
        self.config = config
        self.shdd = SHDDEncoder(config.L, config.weighting, config.taper_sigma)
        self.decoder = SHDDDecoder(self.shdd)
        k = config.retrieval_k
        self.net = CSUNet(self.net_config(config))
        self.gallery = Gallery(config.cond_dim) if k else None
        # the learned query map of the neighbour search (fitted on the gallery by the Trainer), or None: cosine
        self.query_map = QueryMap(config.cond_dim) if config.retrieval_metric == "learned" else None
        self.schedule = NoiseSchedule(config.schedule, config.train_timesteps)
        weights = self.shdd.weights if self.shdd.weights.numel() else None
        self.kl = SHDDKLLoss(config.L, self.shdd.scale, weights, temperature=config.kl_temperature,
                             smoothing=config.kl_smoothing)
        if image_encoder is None and config.image_encoder is not None:
            image_encoder = build_image_encoder(config.image_encoder)
        if image_encoder is not None:
            if image_encoder.dim != config.cond_dim:
                raise ValueError(f"image_encoder: output width {image_encoder.dim} != cond_dim {config.cond_dim}")
            config.image_encoder = image_encoder.config
        self.image_encoder = image_encoder
        self.aggregator = SampleAggregator(self.shdd, self.decoder, self.kl.smoothing)
        # conformal regions and radii fitted on validation data (locdiff_ext.calibrate); None: uncalibrated
        self.calibration: Optional[ConformalCalibration] = None

    @staticmethod
    def net_config(config: LocDiffConfig) -> CSUNetConfig:
        """The denoiser's configuration implied by a LocDiff config."""
        K, k = num_coeffs(config.L), config.retrieval_k
        return CSUNetConfig(dim=K, cond_dim=config.cond_dim + k, widths=config.widths, time_dim=config.time_dim,
                            w0_initial=config.w0_initial, w0=config.w0, dropout=config.dropout,
                            prior_dim=2 * K if k else 0)

    @classmethod
    def check_weights_match(cls, config: LocDiffConfig, state: Dict[str, Tensor], source: str,
                            gallery_in_state: bool = True) -> None:
        """Compares the weights a config implies (the denoiser and a stored image encoder, built on the
        meta device: no memory) with ``state``, before any real allocation: a config.json edited to
        widths [12000, 12000] beside a 45 KB model fails here, not after allocating gigabytes."""
        try:
            with torch.device("meta"):
                expected = {f"net.{k}": tuple(v.shape) for k, v in CSUNet(cls.net_config(config)).state_dict().items()}
                if config.retrieval_metric == "learned":
                    expected.update({f"query_map.{k}": tuple(v.shape)
                                     for k, v in QueryMap(config.cond_dim).state_dict().items()})
                enc = config.image_encoder
                if enc is not None and enc.get("kind") in STORED_ENCODERS:
                    expected.update({f"image_encoder.{k}": tuple(v.shape)
                                     for k, v in build_image_encoder(enc).state_dict().items()})
        except (TypeError, ValueError, RuntimeError) as exc:
            raise CheckpointError(f"{source}: the config cannot be built: {exc}") from None
        n = 0  # gallery entries
        if config.retrieval_k and gallery_in_state:
            g = state.get("gallery.embeddings")
            n = g.shape[0] if g is not None else 0
            expected.update({"gallery.embeddings": (n, config.cond_dim), "gallery.coords": (n, 2)})
        got = {k: tuple(v.shape) for k, v in state.items()}
        missing = sorted(set(expected) - set(got))
        unexpected = sorted(k for k in set(got) - set(expected) if not k.startswith("image_encoder."))
        wrong = sorted(k for k in set(expected) & set(got) if expected[k] != got[k])
        if missing or unexpected or wrong:
            detail = "; ".join(f"{k}: {got[k]} but the config implies {expected[k]}" for k in wrong[:3])
            raise CheckpointError(f"{source} do not match the config: missing {missing[:5]}, unexpected "
                                  f"{unexpected[:5]}" + (f", {detail}" if detail else ""))
        for k, v in state.items():
            if v.is_floating_point() and not bool(torch.isfinite(v).all()):
                raise CheckpointError(f"{source}: {k} contains NaN or infinite values")
        if n:
            coords = state["gallery.coords"]
            if bool((coords[:, 0].abs() > 90).any()):
                raise CheckpointError(f"{source}: gallery.coords holds latitudes outside [-90, 90]")

    @property
    def device(self) -> torch.device:
        return next(self.net.parameters()).device

    # ------------------------------------------------------------------ conditioning
    def condition(self, embeddings: Tensor) -> Tensor:
        """Validated (and, by default, L2-normalised) float32 embeddings on the model's device."""
        e = validate_embeddings(embeddings, "embeddings", self.config.cond_dim).to(self.device)
        return unit_rows(e) if self.config.normalize_condition else e

    def embed(self, inputs) -> Tensor:
        """Embeddings [N, D] from precomputed embeddings (a [N, D] tensor or array) or from images
        (paths, PIL images, [3, H, W] tensors or a [N, 3, H, W] tensor) through the image encoder."""
        return self._encode(self._model_inputs(inputs))

    def _encode(self, raw: Tuple[Tensor, bool]) -> Tensor:
        x, pixels = raw
        if not pixels:
            return self.condition(x)
        with torch.no_grad():
            return self.condition(self.image_encoder(x.to(self.device)))

    def _model_inputs(self, inputs) -> Tuple[Tensor, bool]:
        """(embeddings [N, D], False) or (preprocessed pixels [N, 3, H, W], True): what the model sees of
        each input, computed per input (so the same input gives the same row in any batch)."""
        if inputs is None:
            raise TypeError("inputs must be images (paths, PIL images, tensors) or embeddings [N, D], got None")
        rows = (list, tuple)
        if isinstance(inputs, rows) and inputs and all(isinstance(r, rows) or (isinstance(r, np.ndarray) and r.ndim == 1)
                                                       for r in inputs):
            try:  # embeddings given as a list of rows
                inputs = np.asarray(inputs, dtype=np.float64)
            except (ValueError, TypeError):
                raise ValueError("inputs: a list of rows must be embeddings of one width holding numbers, [N, D]") from None
        if isinstance(inputs, np.ndarray):
            if inputs.ndim == 2:
                inputs = torch.from_numpy(np.ascontiguousarray(inputs))
            elif inputs.ndim in (3, 4):  # one H x W x C image or N of them, as PIL and OpenCV hold them
                inputs = [inputs] if inputs.ndim == 3 else list(inputs)
            else:
                raise ValueError(f"inputs: expected embeddings [N, D] or images [H, W, 3] / [N, H, W, 3], got an array "
                                 f"of shape {inputs.shape}")
        if isinstance(inputs, Tensor) and inputs.dim() == 2:
            return inputs, False
        if isinstance(inputs, (str, os.PathLike)) or (isinstance(inputs, Tensor) and inputs.dim() == 3):
            inputs = [inputs]
        if isinstance(inputs, Tensor) and inputs.dim() != 4:
            raise ValueError(f"inputs: expected embeddings [N, D] or images [N, 3, H, W], got {tuple(inputs.shape)}")
        if not isinstance(inputs, Tensor):
            inputs = list(inputs)
            if not inputs:
                raise ValueError("inputs is empty: pass at least one image or embedding")
        if self.image_encoder is None:
            raise ValueError("inputs look like images but this model has no image encoder: pass embeddings "
                             f"[N, {self.config.cond_dim}] instead")
        return self.image_encoder.preprocess(inputs), True

    def set_gallery(self, embeddings, coords=None) -> "LocDiff":
        """The reference (embedding, location) pairs a retrieval-conditioned model (retrieval_k > 0)
        looks up; usually its training data (the Trainer sets that when the gallery is empty).  Either
        in-memory arrays (``embeddings`` [G, D], ``coords`` [G, 2]), copied into the model and saved with it,
        or a whole ``EmbeddingStore`` (or its ``GalleryIndex``), memory-mapped and referenced by path and
        content hash: the store's saved index if it has one, else a new default one (saved beside it)."""
        if self.gallery is None:
            raise ValueError("set_gallery: this model has retrieval_k=0 (no gallery)")
        if isinstance(embeddings, (EmbeddingStore, GalleryIndex)):
            if coords is not None:
                raise ValueError("set_gallery: a store holds its own coords; pass the store alone")
            index = embeddings if isinstance(embeddings, GalleryIndex) else GalleryIndex.open_or_build(embeddings)
            self.gallery.attach(index)
        else:
            if coords is None:
                raise ValueError("set_gallery: pass coords [G, 2] with the embeddings (or an EmbeddingStore alone)")
            self.gallery.set(embeddings, coords)
            self.gallery.index = None
        return self

    def _net_condition(self, cond: Tensor, coords: Optional[Tensor] = None,
                       neighbours: Optional[Tuple[Tensor, Tensor]] = None,
                       found: Optional[Tuple[Tensor, Tensor]] = None,
                       holdout: Optional[Tensor] = None) -> Tensor:
        """What the denoiser is conditioned on: the embeddings, plus for a retrieval-conditioned model
        its neighbours' features and prior (locdiff_ext.model.retrieval); given the true ``coords``
        (training), the gallery within a random hold-out region around each is hidden.  ``neighbours``
        (similarities [B, K'], coords [B, K', 2]): each row's precomputed candidates (a store's neighbour
        lists), from which the visible ones are taken instead of searching the gallery.  ``found``: at
        inference, the inputs' neighbours already searched (``_neighbours``), best first: the first k are used.
        ``holdout``: the hold-out regions' random numbers [B, 6] (``holdout_draws``), else drawn here."""
        if self.gallery is None:
            return cond
        k = self.config.retrieval_k
        centre, radius = (None, None) if coords is None else sample_holdout(coords, self.config.retrieval_holdout_km,
                                                                             holdout)
        if neighbours is not None:
            if coords is None:
                raise ValueError("neighbours: candidate lists are for training rows (pass their coords)")
            sims, nb = visible_neighbours(neighbours[0], neighbours[1], k, centre, radius)
        elif found is not None and coords is None:
            sims, nb = found[0][:, :k], found[1][:, :k]
        else:
            sims, nb = self.search_neighbours(cond, k, centre, radius)
        feats, prior = neighbour_features(sims.to(cond.device), nb.to(cond.device), self.shdd,
                                          self.config.retrieval_temperature)
        return torch.cat([cond.float(), feats, prior], dim=-1)

    # ------------------------------------------------------------------ training
    def training_loss(self, cond: Tensor, coords: Tensor, t: Tensor, noise: Tensor,
                      drop_mask: Optional[Tensor] = None, denoiser: Optional[nn.Module] = None,
                      amp_dtype: Optional[torch.dtype] = None, neighbours: Optional[Tuple[Tensor, Tensor]] = None,
                      holdout: Optional[Tensor] = None):
        """Diffusion loss of one batch: (loss, {name: value}).  ``cond`` are conditioned embeddings
        (see ``condition``), ``t``/``noise``/``drop_mask`` the random draws (the trainer makes them,
        so that they are reproducible); ``denoiser`` defaults to ``self.net`` (DDP passes its wrapper).
        With ``amp_dtype`` the network runs under autocast; the loss is always computed in float32.
        ``neighbours``: the rows' precomputed gallery candidates, ``holdout`` the random numbers of their
        hold-out regions (``_net_condition``)."""
        net = denoiser or self.net
        cond = self._net_condition(cond, coords, neighbours, holdout=holdout)
        x0 = self.shdd(coords).to(noise.dtype)
        x_t = self.schedule.q_sample(x0, t, noise)
        with torch.autocast(x_t.device.type, dtype=amp_dtype or torch.bfloat16, enabled=amp_dtype is not None), \
                torch.profiler.record_function("locdiff.network"):
            pred = net(x_t, t, cond, drop_mask)
        pred = pred.float()
        target = x0 if self.config.prediction == "x0" else noise
        mse = mse_loss(pred, target)
        if self.config.loss == "mse":
            return mse, {"mse": mse.detach()}
        if not bool(torch.isfinite(pred).all()):  # a diverging run: the KL's synthesis would refuse the map
            return mse.detach() * float("nan"), {"mse": mse.detach()}
        x0_hat, _ = self.schedule.to_x0_eps(pred, x_t.float(), t, self.config.prediction)
        kl = self.kl(x0_hat, x0.float())
        return kl + self.config.mse_weight * mse, {"kl": kl.detach(), "mse": mse.detach()}

    # ------------------------------------------------------------------ inference
    def _sampler(self, steps: Optional[int]):
        steps = self.config.sample_steps if steps is None else steps
        if self.config.sampler == "ddpm":
            return DDPMSampler(self.schedule, steps, prediction=self.config.prediction)
        if self.config.sampler == "dpm++":
            return DPMSolverSampler(self.schedule, steps, prediction=self.config.prediction)
        return DDIMSampler(self.schedule, steps, eta=self.config.eta, prediction=self.config.prediction)

    @torch.no_grad()
    def sample(self, cond: Tensor, num_samples: int, steps: Optional[int] = None, guidance_scale: Optional[float] = None,
               generator=None, found: Optional[Tuple[Tensor, Tensor]] = None) -> Tensor:
        """Scaled SHDD samples [B, S, K] for conditioned embeddings ``cond`` [B, D]; ``generator``: one
        torch.Generator, or one per row of ``cond`` (each draws that row's samples); ``found``: the rows'
        gallery neighbours when already searched (``_neighbours``)."""
        g = self.default_guidance if guidance_scale is None else float(guidance_scale)
        if g != 1.0 and self.config.cond_drop_prob == 0.0:
            raise ValueError("guidance_scale != 1 needs a model trained with cond_drop_prob > 0 "
                             "(its unconditional branch is untrained)")
        B = cond.shape[0]
        rep = self._net_condition(cond, found=found).repeat_interleave(num_samples, dim=0)
        was_training = self.net.training
        self.net.eval()
        try:
            x = self._sampler(steps).sample(_SampleGroups(self.net, num_samples), rep, (B * num_samples, self.shdd.dim),
                                            generator=generator, device=cond.device, dtype=torch.float32,
                                            guidance_scale=g)
        finally:
            self.net.train(was_training)
        return x.reshape(B, num_samples, -1)

    @property
    def default_guidance(self) -> float:
        """The config's guidance_scale, or 2.0 for a model trained with condition dropout (it improved
        every benchmark in BENCHMARKS.md), 1.0 without (its unconditional branch is untrained)."""
        if self.config.guidance_scale is not None:
            return float(self.config.guidance_scale)
        return 2.0 if self.config.cond_drop_prob > 0 else 1.0

    @property
    def lobe_km(self) -> float:
        """Main-lobe width pi/(L+1) of arc in km: the resolution of the representation."""
        return self.aggregator.lobe_km

    def probability_map(self, samples: Tensor, nlat: int = 180, nlon: int = 360) -> Tensor:
        """Per-cell probabilities [B, nlat, nlon] of samples [B, S, K] (``SampleAggregator.probability_map``),
        temperature-scaled by the config's ``map_sharpness`` (locdiff_ext.evaluation.calibration.sharpen)."""
        return self.aggregator.probability_map(samples, nlat, nlon, self.config.map_sharpness)

    @torch.no_grad()
    def predict(self, inputs, top_k: int = 1, num_samples: Optional[int] = None, steps: Optional[int] = None,
                guidance_scale: Optional[float] = None, aggregate: Optional[str] = None, return_map: bool = False,
                map_size: Tuple[int, int] = (180, 360), batch_size: int = 64, seed: int = 0, progress: bool = False,
                hybrid: Optional[bool] = None, prior_weight: Optional[float] = None):
        """Batched inference: returns (coords [N, top_k, 2], scores [N, top_k], maps [N, nlat, nlon]
        or None) as CPU tensors; rows with fewer distinct modes than top_k are NaN / -inf padded.
        ``progress``: a bar on a terminal, periodic lines in logs (locdiff_ext.progress).
        Retrieval models only (defaults from the config, chosen on validation by
        ``locdiff_ext.selection.tune_inference``): ``prior_weight`` w mixes the samples' mean with
        the inputs' kNN density, (1 - w) LocDiff + w prior (w = 1 is the kNN density itself, and sampling is
        skipped); ``hybrid`` (LocDiff-H) moves each mode to the most similar neighbour within ``hybrid_km``.
        ``predict_details`` returns the same with the query-time signals and the settings used."""
        out = self.predict_details(inputs, top_k, num_samples, steps, guidance_scale, aggregate, return_map, map_size,
                                   batch_size, seed, progress, hybrid, prior_weight)
        return out.coords, out.scores, out.maps

    @torch.no_grad()
    def predict_details(self, inputs, top_k: int = 1, num_samples: Optional[int] = None, steps: Optional[int] = None,
                        guidance_scale: Optional[float] = None, aggregate: Optional[str] = None,
                        return_map: bool = False, map_size: Tuple[int, int] = (180, 360), batch_size: int = 64,
                        seed: int = 0, progress: bool = False, hybrid: Optional[bool] = None,
                        prior_weight: Optional[float] = None) -> "Prediction":
        """``predict`` (same arguments), returning a ``Prediction``: also the signals of how localizable
        each input is that the conformal calibration groups by, and the effective inference settings."""
        (nlat, _), (nlon, _) = decode_grid_limits(self.config.L)
        check_int(top_k, "top_k", 1, nlat * nlon)  # more modes than decoder grid cells cannot exist
        S = check_int(self.config.num_samples if num_samples is None else num_samples, "num_samples", 1, 65_536)
        check_int(batch_size, "batch_size", 1, 1 << 20)
        if steps is not None:
            check_int(steps, "steps", 1, self.config.train_timesteps)
        if guidance_scale is not None:
            check_float(guidance_scale, "guidance_scale", -100.0, 100.0)
        check_int(seed, "seed", 0, 2**63 - 1)
        if not (isinstance(map_size, (tuple, list)) and len(map_size) == 2):
            raise ValueError(f"map_size must be (nlat, nlon), got {map_size!r}")
        map_size = tuple(check_int(v, "map_size[i]", 1, 1 << 16) for v in map_size)
        agg = aggregate or self.config.aggregate
        if agg not in AGGREGATES:
            raise ValueError(f"aggregate must be one of {AGGREGATES}, got {agg!r}")
        w = self.config.prior_weight if prior_weight is None else check_float(prior_weight, "prior_weight", 0.0, 1.0)
        hyb = self.config.hybrid if hybrid is None else hybrid
        if not isinstance(hyb, bool):
            raise TypeError(f"hybrid must be a bool or None, got {hyb!r}")
        if self.gallery is None and (w > 0 or hyb):
            raise ValueError("prior_weight > 0 and hybrid=True need a gallery: this model has retrieval_k=0")
        raw = self._model_inputs(inputs)
        cond = self._encode(raw)
        if cond.shape[0] == 0:
            raise ValueError("inputs is empty: pass at least one image or embedding")
        check_fits(self._predict_bytes(min(batch_size, cond.shape[0]), S, guidance_scale)
                   + (cond.shape[0] * map_size[0] * map_size[1] * 8 if return_map else 0),
                   cond.device, "num_samples/batch_size/map_size")
        seeds = input_seeds(raw[0], seed)
        out_c, out_s, out_m, out_sig = [], [], [], []
        with Progress(cond.shape[0], "predict", "input", enabled=progress) as bar:
            for i in range(0, cond.shape[0], batch_size):
                gens = [torch.Generator().manual_seed(v) for v in seeds[i:i + batch_size]]
                b = cond[i:i + batch_size]
                found = self._neighbours(b, w, hyb)
                samples = self.sample(b, S, steps, guidance_scale, gens, found) if w < 1 else None
                if w > 0:
                    prior = neighbour_density(*found, self.shdd, self.config.prior_k, self.config.prior_temperature)
                    prior = prior[:, None, :].to(b.device)
                    samples = prior if samples is None else torch.lerp(samples, prior.expand_as(samples), w)
                c, s = self.aggregator(samples, top_k, agg)
                if hyb:
                    c = snap_to_neighbours(c, found[0], found[1], self.hybrid_km)
                out_c.append(c.cpu())
                if found is not None:
                    out_sig.append(query_signals(*found))
                out_s.append(s.cpu())
                if return_map:
                    out_m.append(self.probability_map(samples, *map_size).cpu())
                bar.update(samples.shape[0])
        maps = torch.cat(out_m) if return_map else None
        coords, scores = torch.cat(out_c), torch.cat(out_s)
        signals = {"mode_score": scores[:, 0].double().nan_to_num(neginf=0.0)}
        for name in out_sig[0] if out_sig else ():
            signals[name] = torch.cat([o[name] for o in out_sig])
        guidance = self.default_guidance if guidance_scale is None else float(guidance_scale)
        settings = {"prior_weight": float(w), "hybrid": hyb, "num_samples": S,
                    "steps": self.config.sample_steps if steps is None else steps, "guidance_scale": guidance,
                    "aggregate": agg, "map_sharpness": self.config.map_sharpness}
        return Prediction(coords, scores, maps, signals, settings, tuple(map_size))

    def _neighbours(self, cond: Tensor, prior_weight: float, hybrid: bool) -> Optional[Tuple[Tensor, Tensor]]:
        """One gallery search per batch for all that inference needs: the network's k neighbours, the
        prior's ``prior_k`` and the hybrid's ``HYBRID_CANDIDATES``: (similarities [B, K], coords [B, K, 2])."""
        if self.gallery is None:
            return None
        c = self.config
        k = max(c.retrieval_k, c.prior_k if prior_weight > 0 else 0, HYBRID_CANDIDATES if hybrid else 0)
        return self.search_neighbours(cond, k)

    def search_neighbours(self, cond: Tensor, k: int, center: Optional[Tensor] = None,
                          holdout_km: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
        """The gallery's ``k`` nearest entries to conditioned embeddings ``cond`` [B, D], by cosine similarity or,
        with ``retrieval_metric='learned'``, after the query map (``Gallery.search``'s arguments and result)."""
        return self.gallery.search(map_queries(cond, self.query_map), k, center, holdout_km)

    @property
    def hybrid_km(self) -> float:
        """The hybrid's snapping radius: the config's (chosen on validation), else one lobe width."""
        return self.config.hybrid_km if self.config.hybrid_km is not None else self.lobe_km

    def _predict_bytes(self, rows: int, samples: int, guidance_scale: Optional[float]) -> int:
        """Rough peak memory of sampling ``rows`` inputs x ``samples``: the sampler's copies of the
        SHDD vectors and the denoiser's activations (twice with classifier-free guidance)."""
        K, c = self.shdd.dim, self.config
        per_sample = 4 * (8 * K + 4 * sum(c.widths) + 2 * (c.cond_dim + c.time_dim))
        guided = (self.default_guidance if guidance_scale is None else guidance_scale) != 1.0
        return rows * samples * per_sample * (2 if guided else 1)

    # ------------------------------------------------------------------ persistence
    def persistent_state_dict(self) -> Dict[str, Tensor]:
        """The weights that are saved: all but those of an image encoder that is referenced by its
        config (a CLIP tower in the user's cache) rather than stored, and a store-backed gallery's
        (empty) buffers: the store is referenced (``gallery_store_ref``)."""
        external = self.image_encoder is not None and not self.image_encoder.stores_weights
        stored = self.gallery_store_ref() is not None
        return {k: v for k, v in self.state_dict().items()
                if not (external and k.startswith("image_encoder.")) and not (stored and k.startswith("gallery."))}

    def gallery_store_ref(self) -> Optional[Dict[str, Any]]:
        """How a saved model names its store-backed gallery (None for an in-memory one): the store's path and
        content hash, and the index kind."""
        store = self.gallery.store if self.gallery is not None else None
        if store is None:
            return None
        return {"path": str(store.path.resolve()), "store_sha256": store.header["content_sha256"],
                "rows": len(store), "dim": store.dim, "index": self.gallery.index.kind}

    @staticmethod
    def open_gallery_store(directory: PathLike, ref: Any) -> GalleryIndex:
        """The gallery a saved model references (``gallery_store_ref``; a relative path is relative to
        ``directory``), checked to hold the data the model was saved with, with its saved index."""
        if not (isinstance(ref, dict) and isinstance(ref.get("path"), str) and isinstance(ref.get("store_sha256"), str)):
            raise CheckpointError(f"{str(directory)!r}: its gallery.json reference {ref!r} is not valid")
        path = Path(ref["path"])
        path = path if path.is_absolute() else Path(directory) / path
        try:
            store = EmbeddingStore(path)
        except (FileNotFoundError, StoreError) as exc:
            raise CheckpointError(f"{str(directory)!r} references its retrieval gallery, the store {str(path)!r}, "
                                  f"which cannot be opened: {exc}. Move the store back, or save the model with "
                                  "save_pretrained(..., copy_gallery=True) to share it whole") from None
        if store.header["content_sha256"] != ref["store_sha256"]:
            raise CheckpointError(f"{str(directory)!r}: the store {str(path)!r} holds other data than the gallery "
                                  "the model was saved with (content SHA-256 differs)")
        if ref.get("index", "exact") == "exact":
            return GalleryIndex(store, "exact")
        try:
            index = GalleryIndex.load(store)
        except (FileNotFoundError, StoreError) as exc:
            raise CheckpointError(f"{str(directory)!r}: the gallery index beside {str(path)!r}: {exc}") from None
        if index.kind != ref.get("index"):
            raise CheckpointError(f"{str(directory)!r}: the gallery index beside {str(path)!r} is {index.kind!r}, "
                                  f"the model was saved with {ref.get('index')!r}")
        return index

    def load_persistent_state_dict(self, state: Dict[str, Tensor], source: str = "weights") -> None:
        if self.gallery is not None:
            self.gallery.resize_like(state, "gallery.")
        missing, unexpected = self.load_state_dict(state, strict=False)
        external = self.image_encoder is not None and not self.image_encoder.stores_weights
        stored = self.gallery_store_ref() is not None
        missing = [k for k in missing if not (external and k.startswith("image_encoder."))
                   and not (stored and k.startswith("gallery."))]
        if missing or unexpected:
            raise CheckpointError(f"{source} do not match the config: missing {missing[:5]}, unexpected {unexpected[:5]}")

    def save_pretrained(self, directory: PathLike, copy_gallery: bool = False) -> Path:
        """Writes config.json + model.safetensors (+ calibration.json when calibrated, + manifest)
        atomically.  A store-backed gallery is referenced by path and content hash (gallery.json), not copied; ``copy_gallery=True`` copies the
        store (and its index) into ``directory/gallery/`` instead, for a model to share whole."""
        docs: Dict[str, Any] = {"config": self.config.to_dict()}
        if self.calibration is not None:
            docs["calibration"] = self.calibration.to_dict()
        ref = self.gallery_store_ref()
        if ref is not None:
            docs["gallery"] = dict(ref, path="gallery") if copy_gallery else ref
        out = write_checkpoint(directory, {"model": self.persistent_state_dict()}, docs)
        if ref is not None and copy_gallery:
            import shutil

            src, dst = self.gallery.store.path, Path(directory) / "gallery"
            dst.mkdir(exist_ok=True)
            files = sorted(p for p in src.iterdir() if p.is_file() and (p.suffix == ".npy" or p.name.startswith("index."))
                           and not p.name.startswith("neighbours-"))
            for p in files + [src / "store.json"]:  # the header last: a half-copied store does not open
                shutil.copyfile(p, dst / p.name)
        return out

    @staticmethod
    def checkpoint_state(directory: PathLike, tensors: Dict[str, Dict[str, Tensor]], docs: Dict) -> Dict[str, Tensor]:
        """The model's tensors of a read checkpoint, with a gallery that a trainer step checkpoint references
        (stored once per run, ``gallery_ref``) read back in."""
        state = dict(tensors["model"])
        if "gallery_ref" in docs:
            state.update({f"gallery.{k}": v for k, v in read_shared(directory, docs["gallery_ref"], "gallery").items()})
        return state

    @classmethod
    def from_pretrained(cls, directory: PathLike, map_location: Union[str, torch.device] = "cpu") -> "LocDiff":
        """Loads a model written by ``save_pretrained`` (or a trainer checkpoint directory)."""
        tensors, docs = read_checkpoint(directory, map_location="cpu")
        if "config" not in docs or "model" not in tensors:
            raise CheckpointError(f"{str(directory)!r} holds no LocDiff model (config.json / model.safetensors)")
        tensors["model"] = cls.checkpoint_state(directory, tensors, docs)
        try:
            config = LocDiffConfig.from_dict(docs["config"])
        except (TypeError, ValueError) as exc:
            raise CheckpointError(f"{str(directory)!r}: config.json is invalid: {exc}") from None
        store_ref = docs.get("gallery")
        calibration = None
        if "calibration" in docs:  # models saved before issue 25 have none: they load uncalibrated
            try:
                calibration = ConformalCalibration.from_dict(docs["calibration"])
            except (TypeError, ValueError) as exc:
                raise CheckpointError(f"{str(directory)!r}: calibration.json is invalid: {exc}") from None
        cls.check_weights_match(config, tensors["model"], f"{str(directory)!r}: the weights",
                                gallery_in_state=store_ref is None)
        index = cls.open_gallery_store(directory, store_ref) if store_ref is not None else None
        try:
            model = cls(config)
        except (TypeError, ValueError) as exc:  # e.g. an image encoder config its class refuses
            raise CheckpointError(f"{str(directory)!r}: config.json is invalid: {exc}") from None
        if index is not None:
            if model.gallery is None:
                raise CheckpointError(f"{str(directory)!r}: gallery.json references a gallery but the config has "
                                      "retrieval_k = 0")
            model.gallery.attach(index)
        try:
            model.load_persistent_state_dict(tensors["model"], f"{str(directory)!r}: the weights")
        except RuntimeError as exc:
            raise CheckpointError(f"{str(directory)!r}: weights do not match config.json: {exc}") from None
        model.calibration = calibration
        return model.to(map_location).eval()


__all__ = ["LocDiff", "LocDiffConfig", "Prediction"]
