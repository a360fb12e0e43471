"""CLIP image towers, referenced by their local directory or name rather than stored with a model
(hundreds of MB, and already in the user's cache):

- ``HFCLIPEncoder``: ``transformers`` CLIPVisionModelWithProjection from a local directory or the
  Hugging Face cache (``local_files_only`` unless you allow downloads);
- ``OpenCLIPEncoder``: an ``open_clip`` model with a local checkpoint file or a cached tag.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, Sequence

import torch
from torch import Tensor

from .images import ImageEncoder


OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class _Normalised(ImageEncoder):
    """Shared by the CLIP wrappers: [0, 1] pixels -> (x - mean) / std -> the tower."""

    center_crop = True
    stores_weights = False

    def _set_norm(self, mean: Sequence[float], std: Sequence[float]) -> None:
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)

    def _normalise(self, x: Tensor) -> Tensor:
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"images must have shape [B, 3, H, W], got {tuple(x.shape)}")
        return (x - self.mean) / self.std


class HFCLIPEncoder(_Normalised):
    """CLIP image tower through ``transformers`` (CLIPVisionModelWithProjection): the projected
    image embedding (``image_embeds``).  ``path`` is a local directory (save_pretrained layout) or a
    model name already in the Hugging Face cache; nothing is downloaded unless
    ``local_files_only=False``.  Preprocessing follows the directory's preprocessor_config.json
    (shortest edge, centre crop, mean/std) when there is one, CLIP's defaults otherwise."""

    def __init__(self, path: str, local_files_only: bool = True):
        super().__init__()
        try:
            from transformers import CLIPVisionModelWithProjection
        except ImportError:
            raise ImportError("HFCLIPEncoder needs transformers: pip install transformers") from None
        self.path, self.local_files_only = str(path), bool(local_files_only)
        try:
            self.model = CLIPVisionModelWithProjection.from_pretrained(self.path, local_files_only=self.local_files_only)
        except OSError as exc:
            raise FileNotFoundError(f"image_encoder: no CLIP model at {self.path!r} (a local directory or a "
                                    f"model in the Hugging Face cache): {exc}") from None
        self.model.eval().requires_grad_(False)
        cfg = self.model.config
        pre = Path(self.path) / "preprocessor_config.json"
        pp = json.loads(pre.read_text()) if pre.is_file() else {}
        crop = pp.get("crop_size", cfg.image_size)
        self.image_size = int(crop["height"] if isinstance(crop, dict) else crop)
        self.dim = int(cfg.projection_dim)
        self._set_norm(pp.get("image_mean", OPENAI_CLIP_MEAN), pp.get("image_std", OPENAI_CLIP_STD))

    @property
    def config(self) -> Dict:
        return {"kind": "hf_clip", "path": self.path, "local_files_only": self.local_files_only}

    def forward(self, x: Tensor) -> Tensor:
        return self.model(pixel_values=self._normalise(x)).image_embeds


class OpenCLIPEncoder(_Normalised):
    """An ``open_clip`` model's image tower (``encode_image``): ``model_name`` as open_clip names it
    (e.g. 'ViT-L-14'), ``pretrained`` a local checkpoint file or a tag whose weights are already
    in the open_clip cache.  Preprocessing from the model's preprocess_cfg (size, mean, std)."""

    def __init__(self, model_name: str, pretrained: str):
        super().__init__()
        try:
            import open_clip
        except ImportError:
            raise ImportError("OpenCLIPEncoder needs open_clip: pip install open_clip_torch") from None
        self.model_name, self.pretrained = str(model_name), str(pretrained)
        try:
            model = open_clip.create_model(self.model_name, pretrained=self.pretrained)
        except (RuntimeError, OSError) as exc:
            raise FileNotFoundError(f"image_encoder: cannot load open_clip {self.model_name!r} with weights "
                                    f"{self.pretrained!r}: {exc}") from None
        self.model = model.eval().requires_grad_(False)
        cfg = dict(getattr(model.visual, "preprocess_cfg", {}) or {})
        size = cfg.get("size", getattr(model.visual, "image_size", 224))
        self.image_size = int(size[0] if isinstance(size, (tuple, list)) else size)
        with torch.no_grad():
            self.dim = int(self.model.encode_image(torch.zeros(1, 3, self.image_size, self.image_size)).shape[-1])
        self._set_norm(cfg.get("mean", OPENAI_CLIP_MEAN), cfg.get("std", OPENAI_CLIP_STD))

    @property
    def config(self) -> Dict:
        return {"kind": "open_clip", "model_name": self.model_name, "pretrained": self.pretrained}

    def forward(self, x: Tensor) -> Tensor:
        return self.model.encode_image(self._normalise(x))


__all__ = ["HFCLIPEncoder", "OpenCLIPEncoder", "OPENAI_CLIP_MEAN", "OPENAI_CLIP_STD"]
