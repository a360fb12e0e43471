"""``LocDiff``: the whole model in one ``nn.Module`` (SHDD encoder/decoder, CS-UNet, noise schedule,
optional retrieval gallery and image encoder), its ``LocDiffConfig``, and ``save_pretrained`` /
``from_pretrained``.

Inference (design.md section 1): for each input, ``num_samples`` SHDD vectors are sampled from
noise by DDIM/DDPM conditioned on the input's embedding, then turned into the top-k modes and
their scores by ``model.aggregate.SampleAggregator``.  ``geolocate`` (locdiff_ext.inference) is
the one-call API over ``LocDiff.predict``; ``locdiff_ext.train`` minimises ``training_loss``.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Dict, Optional, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .checks import check_int, validate_embeddings
from .data.checkpoint import CheckpointError, read_checkpoint, write_checkpoint
from .encoders import ImageEncoder, build_image_encoder
from .model.aggregate import AGGREGATES, SampleAggregator
from .model.diffusion import PREDICTIONS, DDIMSampler, DDPMSampler, NoiseSchedule, SHDDKLLoss, mse_loss
from .model.retrieval import Gallery, neighbour_features, sample_holdout
from .model.shdd import SHDDDecoder, SHDDEncoder
from .model.unet import CSUNet, CSUNetConfig

PathLike = Union[str, os.PathLike]
LOSSES = ("shdd_kl", "mse")
SAMPLERS = ("ddim", "ddpm")


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
    sampler: str = "ddim"
    sample_steps: int = 25
    eta: float = 0.0
    num_samples: int = 16
    guidance_scale: Optional[float] = None          # None: 2.0 if trained with condition dropout, else 1.0
    aggregate: str = "mean"
    retrieval_k: int = 0                            # > 0: condition on the k most similar gallery entries
    retrieval_holdout_km: float = 1000.0            # training hold-out caps' radii up to this (locdiff_ext.model.retrieval)
    retrieval_temperature: float = 0.03             # softmax temperature of the neighbours' density prior
    image_encoder: Optional[Dict[str, Any]] = None  # config of the image encoder, if any

    def __post_init__(self):
        self.widths = tuple(int(w) for w in self.widths)
        checks = [
            (isinstance(self.cond_dim, int) and self.cond_dim >= 1, "cond_dim must be a positive int"),
            (isinstance(self.L, int) and 1 <= self.L <= 256, "L must be an int in [1, 256]"),
            (self.schedule in ("linear", "cosine"), "schedule must be 'linear' or 'cosine'"),
            (self.prediction in PREDICTIONS, f"prediction must be one of {PREDICTIONS}"),
            (self.loss in LOSSES, f"loss must be one of {LOSSES}"),
            (self.sampler in SAMPLERS, f"sampler must be one of {SAMPLERS}"),
            (self.aggregate in AGGREGATES, f"aggregate must be one of {AGGREGATES}"),
            (0.0 <= self.cond_drop_prob < 1.0, "cond_drop_prob must be in [0, 1)"),
            (self.mse_weight >= 0, "mse_weight must be >= 0"),
            (isinstance(self.num_samples, int) and self.num_samples >= 1, "num_samples must be an int >= 1"),
            (isinstance(self.retrieval_k, int) and self.retrieval_k >= 0, "retrieval_k must be an int >= 0"),
            (self.retrieval_holdout_km >= 1.0, "retrieval_holdout_km must be >= 1"),
            (self.retrieval_temperature > 0, "retrieval_temperature must be > 0"),
            (isinstance(self.sample_steps, int) and 1 <= self.sample_steps <= self.train_timesteps,
             "sample_steps must be an int in [1, train_timesteps]"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(f"LocDiffConfig: {msg}")

    def to_dict(self) -> Dict[str, Any]:
        d = asdict(self)
        d["widths"] = list(self.widths)
        return d

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "LocDiffConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"LocDiffConfig: unknown keys {unknown}")
        return cls(**d)


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
        self.net = CSUNet(CSUNetConfig(dim=self.shdd.dim, cond_dim=config.cond_dim + k, widths=config.widths,
                                       time_dim=config.time_dim, w0_initial=config.w0_initial, w0=config.w0,
                                       dropout=config.dropout, prior_dim=2 * self.shdd.dim if k else 0))
        self.gallery = Gallery(config.cond_dim) if k else None
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

    @property
    def device(self) -> torch.device:
        return next(self.net.parameters()).device

    # ------------------------------------------------------------------ conditioning
    def condition(self, embeddings: Tensor) -> Tensor:
        """Validated (and, by default, L2-normalised) float32 embeddings on the model's device."""
        e = validate_embeddings(embeddings, "embeddings", self.config.cond_dim).to(self.device)
        return F.normalize(e, dim=-1) if self.config.normalize_condition else e

    def embed(self, inputs) -> Tensor:
        """Embeddings [N, D] from precomputed embeddings (a [N, D] tensor or array) or from images
        (paths, PIL images, [3, H, W] tensors or a [N, 3, H, W] tensor) through the image encoder."""
        if isinstance(inputs, np.ndarray):
            inputs = torch.from_numpy(inputs)
        if isinstance(inputs, Tensor) and inputs.dim() == 2:
            return self.condition(inputs)
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
        pixels = self.image_encoder.preprocess(inputs).to(self.device)
        with torch.no_grad():
            return self.condition(self.image_encoder(pixels))

    def set_gallery(self, embeddings, coords) -> "LocDiff":
        """The reference (embedding, location) pairs a retrieval-conditioned model (retrieval_k > 0)
        looks up; usually its training data (the Trainer sets that when the gallery is empty)."""
        if self.gallery is None:
            raise ValueError("set_gallery: this model has retrieval_k=0 (no gallery)")
        self.gallery.set(embeddings, coords)
        return self

    def _net_condition(self, cond: Tensor, coords: Optional[Tensor] = None) -> Tensor:
        """What the denoiser is conditioned on: the embeddings, plus for a retrieval-conditioned model
        its neighbours' features and prior (locdiff_ext.model.retrieval); given the true ``coords``
        (training), the gallery within a random hold-out region around each is hidden."""
        if self.gallery is None:
            return cond
        k = self.config.retrieval_k
        centre, radius = (None, None) if coords is None else sample_holdout(coords, self.config.retrieval_holdout_km)
        sims, nb = self.gallery.search(F.normalize(cond.float(), dim=-1), k, centre, radius)
        feats, prior = neighbour_features(sims.to(cond.device), nb.to(cond.device), self.shdd,
                                          self.config.retrieval_temperature)
        return torch.cat([cond.float(), feats, prior], dim=-1)

    # ------------------------------------------------------------------ training
    def training_loss(self, cond: Tensor, coords: Tensor, t: Tensor, noise: Tensor,
                      drop_mask: Optional[Tensor] = None, denoiser: Optional[nn.Module] = None,
                      amp_dtype: Optional[torch.dtype] = None):
        """Diffusion loss of one batch: (loss, {name: value}).  ``cond`` are conditioned embeddings
        (see ``condition``), ``t``/``noise``/``drop_mask`` the random draws (the trainer makes them,
        so that they are reproducible); ``denoiser`` defaults to ``self.net`` (DDP passes its wrapper).
        With ``amp_dtype`` the network runs under autocast; the loss is always computed in float32."""
        net = denoiser or self.net
        cond = self._net_condition(cond, coords)
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
        x0_hat, _ = self.schedule.to_x0_eps(pred, x_t.float(), t, self.config.prediction)
        kl = self.kl(x0_hat, x0.float())
        return kl + self.config.mse_weight * mse, {"kl": kl.detach(), "mse": mse.detach()}

    # ------------------------------------------------------------------ inference
    def _sampler(self, steps: Optional[int]):
        steps = steps or self.config.sample_steps
        if self.config.sampler == "ddpm":
            return DDPMSampler(self.schedule, steps, prediction=self.config.prediction)
        return DDIMSampler(self.schedule, steps, eta=self.config.eta, prediction=self.config.prediction)

    @torch.no_grad()
    def sample(self, cond: Tensor, num_samples: int, steps: Optional[int] = None, guidance_scale: Optional[float] = None,
               generator: Optional[torch.Generator] = None) -> Tensor:
        """Scaled SHDD samples [B, S, K] for conditioned embeddings ``cond`` [B, D]."""
        g = self.default_guidance if guidance_scale is None else float(guidance_scale)
        if g != 1.0 and self.config.cond_drop_prob == 0.0:
            raise ValueError("guidance_scale != 1 needs a model trained with cond_drop_prob > 0 "
                             "(its unconditional branch is untrained)")
        B = cond.shape[0]
        rep = self._net_condition(cond).repeat_interleave(num_samples, dim=0)
        was_training = self.net.training
        self.net.eval()
        try:
            x = self._sampler(steps).sample(self.net, rep, (B * num_samples, self.shdd.dim), generator=generator,
                                            device=cond.device, dtype=torch.float32, guidance_scale=g)
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
        """Per-cell probabilities [B, nlat, nlon] of samples [B, S, K] (``SampleAggregator.probability_map``)."""
        return self.aggregator.probability_map(samples, nlat, nlon)

    @torch.no_grad()
    def predict(self, inputs, top_k: int = 1, num_samples: Optional[int] = None, steps: Optional[int] = None,
                guidance_scale: Optional[float] = None, aggregate: Optional[str] = None, return_map: bool = False,
                map_size: Tuple[int, int] = (180, 360), batch_size: int = 64, seed: int = 0):
        """Batched inference: returns (coords [N, top_k, 2], scores [N, top_k], maps [N, nlat, nlon]
        or None) as CPU tensors; rows with fewer distinct modes than top_k are NaN / -inf padded."""
        check_int(top_k, "top_k", 1)
        S = check_int(self.config.num_samples if num_samples is None else num_samples, "num_samples", 1)
        check_int(batch_size, "batch_size", 1)
        agg = aggregate or self.config.aggregate
        if agg not in AGGREGATES:
            raise ValueError(f"aggregate must be one of {AGGREGATES}, got {agg!r}")
        cond = self.embed(inputs)
        if cond.shape[0] == 0:
            raise ValueError("inputs is empty: pass at least one image or embedding")
        gen = torch.Generator().manual_seed(seed)
        out_c, out_s, out_m = [], [], []
        for i in range(0, cond.shape[0], batch_size):
            samples = self.sample(cond[i:i + batch_size], S, steps, guidance_scale, gen)
            c, s = self.aggregator(samples, top_k, agg)
            out_c.append(c.cpu())
            out_s.append(s.cpu())
            if return_map:
                out_m.append(self.probability_map(samples, *map_size).cpu())
        maps = torch.cat(out_m) if return_map else None
        return torch.cat(out_c), torch.cat(out_s), maps

    # ------------------------------------------------------------------ persistence
    def persistent_state_dict(self) -> Dict[str, Tensor]:
        """The weights that are saved: all but those of an image encoder that is referenced by its
        config (a CLIP tower in the user's cache) rather than stored."""
        external = self.image_encoder is not None and not self.image_encoder.stores_weights
        return {k: v for k, v in self.state_dict().items() if not (external and k.startswith("image_encoder."))}

    def load_persistent_state_dict(self, state: Dict[str, Tensor], source: str = "weights") -> None:
        if self.gallery is not None:
            self.gallery.resize_like(state, "gallery.")
        missing, unexpected = self.load_state_dict(state, strict=False)
        external = self.image_encoder is not None and not self.image_encoder.stores_weights
        missing = [k for k in missing if not (external and k.startswith("image_encoder."))]
        if missing or unexpected:
            raise CheckpointError(f"{source} do not match the config: missing {missing[:5]}, unexpected {unexpected[:5]}")

    def save_pretrained(self, directory: PathLike) -> Path:
        """Writes config.json + model.safetensors (+ manifest) atomically."""
        return write_checkpoint(directory, {"model": self.persistent_state_dict()}, {"config": self.config.to_dict()})

    @classmethod
    def from_pretrained(cls, directory: PathLike, map_location: Union[str, torch.device] = "cpu") -> "LocDiff":
        """Loads a model written by ``save_pretrained`` (or a trainer checkpoint directory)."""
        tensors, docs = read_checkpoint(directory, map_location="cpu")
        if "config" not in docs or "model" not in tensors:
            raise CheckpointError(f"{str(directory)!r} holds no LocDiff model (config.json / model.safetensors)")
        try:
            config = LocDiffConfig.from_dict(docs["config"])
        except (TypeError, ValueError) as exc:
            raise CheckpointError(f"{str(directory)!r}: config.json is invalid: {exc}") from None
        model = cls(config)
        try:
            model.load_persistent_state_dict(tensors["model"], f"{str(directory)!r}: the weights")
        except RuntimeError as exc:
            raise CheckpointError(f"{str(directory)!r}: weights do not match config.json: {exc}") from None
        return model.to(map_location).eval()


__all__ = ["LocDiff", "LocDiffConfig"]
