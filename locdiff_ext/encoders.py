"""Image encoders behind one interface: images -> condition embeddings [B, D].

Every encoder is an ``ImageEncoder``: ``preprocess(images)`` turns paths / PIL images / tensors
into a float batch [B, 3, S, S] in [0, 1], ``forward`` maps it to [B, dim], and ``config`` is a
JSON dict from which ``build_image_encoder`` rebuilds it.  The small CNN's weights travel in the
LocDiff model's safetensors (``stores_weights``); CLIP towers are referenced by their local
directory or name instead (hundreds of MB, and already in the user's cache):

- ``SmallCNNEncoder``: trained from scratch (the demo's);
- ``HFCLIPEncoder``: ``transformers`` CLIPVisionModelWithProjection from a local directory or the
  Hugging Face cache (``local_files_only`` unless you allow downloads);
- ``OpenCLIPEncoder``: an ``open_clip`` model with a local checkpoint file or a cached tag.

``load_image`` reads files and members of .tar archives ("archive.tar::member/path.jpg") and
gives clear errors for missing, non-image, corrupt or tiny files.
"""

from __future__ import annotations

import io
import json
import os
import threading
from pathlib import Path
from typing import Dict, List, Sequence, Union

import numpy as np
import torch
from torch import Tensor, nn

ImageLike = Union[str, os.PathLike, "PIL.Image.Image", Tensor, np.ndarray]  # noqa: F821

MIN_IMAGE_SIDE = 8
TAR_SEPARATOR = "::"
_TARS: Dict[str, "tarfile.TarFile"] = {}  # noqa: F821  (open archives, per process)
_TARS_LOCK = threading.Lock()  # an open archive is one file position: reads from worker threads must not interleave


def _open_member(ref: str) -> io.BytesIO:
    """'archive.tar::member' -> the member's bytes (archives stay open per process; the bytes are read
    under a lock so that the embedding cache's worker threads can share an archive, and decoded
    outside it)."""
    import tarfile

    archive, member = ref.split(TAR_SEPARATOR, 1)
    with _TARS_LOCK:
        if archive not in _TARS:
            if not os.path.isfile(archive):
                raise FileNotFoundError(f"image archive {archive!r} does not exist")
            _TARS[archive] = tarfile.open(archive)
        try:
            f = _TARS[archive].extractfile(member)
        except KeyError:
            f = None
        if f is None:
            raise FileNotFoundError(f"image {member!r} is not a file in {archive!r}")
        return io.BytesIO(f.read())


def load_image(image) -> "PIL.Image.Image":  # noqa: F821
    """A path or PIL image -> an RGB PIL image.  Grayscale, palette and RGBA images are converted;
    a missing file, a file that is not an image, a corrupt image or one smaller than 8 px per side
    raises FileNotFoundError / ValueError naming the file."""
    from PIL import Image, UnidentifiedImageError

    name = str(image) if isinstance(image, (str, os.PathLike)) else f"<{type(image).__name__}>"
    if isinstance(image, (str, os.PathLike)):
        if TAR_SEPARATOR in str(image):
            source = _open_member(str(image))
        else:
            source = Path(image)
            if not source.is_file():
                raise FileNotFoundError(f"image file {name!r} does not exist")
        try:
            with Image.open(source) as im:
                im.load()
                img = im.convert("RGB")
        except UnidentifiedImageError:
            raise ValueError(f"image file {name!r} is not an image (or of an unknown format)") from None
        except (OSError, SyntaxError, ValueError) as exc:
            raise ValueError(f"image file {name!r} is corrupt or truncated: {exc}") from None
    elif isinstance(image, Image.Image):
        img = image.convert("RGB")
    else:
        raise TypeError(f"images: expected a path, a PIL image or a tensor, got {type(image).__name__}")
    if min(img.size) < MIN_IMAGE_SIDE:
        raise ValueError(f"image {name!r} is {img.size[0]}x{img.size[1]} px: too small (at least "
                         f"{MIN_IMAGE_SIDE} px per side)")
    return img


def image_to_tensor(image: ImageLike, size: int, center_crop: bool = False) -> Tensor:
    """One image -> float32 [3, size, size] in [0, 1].  Default: the whole image resized to
    size x size (bilinear); ``center_crop``: CLIP's preprocessing, shortest side resized to
    ``size`` (bicubic), then the central size x size square."""
    if isinstance(image, np.ndarray):
        image = torch.from_numpy(image)
    if isinstance(image, Tensor):
        t = image
        if t.dim() == 2:
            t = t[None]
        if t.dim() != 3 or t.shape[0] not in (1, 3):
            raise ValueError(f"images: an image tensor must have shape [3, H, W] or [H, W], got {tuple(image.shape)}")
        if min(t.shape[-2:]) < MIN_IMAGE_SIDE:
            raise ValueError(f"images: an image tensor of {tuple(t.shape)} is too small (at least {MIN_IMAGE_SIDE} px per side)")
        t = t.float()
        if image.dtype == torch.uint8:
            t = t / 255.0
        if not bool(torch.isfinite(t).all()):
            raise ValueError("images: an image tensor contains NaN or infinite values")
        t = t.expand(3, -1, -1)
        if tuple(t.shape[-2:]) != (size, size):
            t = nn.functional.interpolate(t[None], size=(size, size), mode="bilinear", align_corners=False,
                                          antialias=True)[0]
        return t.contiguous()
    from PIL import Image

    img = load_image(image)
    if center_crop:
        w, h = img.size
        scale = size / min(w, h)
        nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
        img = img.resize((nw, nh), Image.BICUBIC)
        left, top = (nw - size) // 2, (nh - size) // 2
        img = img.crop((left, top, left + size, top + size))
    elif img.size != (size, size):
        img = img.resize((size, size), Image.BILINEAR)
    return torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1).contiguous()


class ImageEncoder(nn.Module):
    """Base class: subclasses set ``dim``, ``image_size`` and ``config`` and implement forward."""

    dim: int
    image_size: int
    center_crop: bool = False     # CLIP-style resize + centre crop instead of a plain resize
    stores_weights: bool = True   # False: weights are referenced by config, not saved with LocDiff

    @property
    def config(self) -> Dict:
        raise NotImplementedError

    def preprocess(self, images: Sequence[ImageLike]) -> Tensor:
        """Images (a sequence, or a [B, 3, H, W] tensor) -> [B, 3, S, S] float32 in [0, 1]."""
        return torch.stack([image_to_tensor(im, self.image_size, self.center_crop) for im in images])


class SmallCNNEncoder(ImageEncoder):
    """A small convolutional encoder trainable from scratch on a CPU in minutes (the demo's).

    Four stride-2 3x3 conv blocks (GroupNorm + SiLU), global average pooling, a linear head.
    Input is normalised with fixed per-channel statistics (``mean``/``std``, part of the config)."""

    def __init__(self, dim: int = 128, image_size: int = 64, channels: Sequence[int] = (32, 64, 128, 256),
                 mean: Sequence[float] = (0.5, 0.5, 0.5), std: Sequence[float] = (0.25, 0.25, 0.25)):
        super().__init__()
        self.dim, self.image_size, self.channels = int(dim), int(image_size), [int(c) for c in channels]
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        layers: List[nn.Module] = []
        c_in = 3
        for c in self.channels:
            layers += [nn.Conv2d(c_in, c, 3, stride=2, padding=1), nn.GroupNorm(min(8, c), c), nn.SiLU()]
            c_in = c
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(c_in, self.dim)

    @property
    def config(self) -> Dict:
        return {"kind": "small_cnn", "dim": self.dim, "image_size": self.image_size, "channels": self.channels,
                "mean": self.mean.flatten().tolist(), "std": self.std.flatten().tolist()}

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"images must have shape [B, 3, H, W], got {tuple(x.shape)}")
        h = self.features((x - self.mean) / self.std)
        return self.head(h.mean(dim=(2, 3)))


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


ENCODERS = {"small_cnn": SmallCNNEncoder, "hf_clip": HFCLIPEncoder, "open_clip": OpenCLIPEncoder}


def build_image_encoder(config: Dict) -> ImageEncoder:
    """Rebuilds an encoder from its ``config`` dict (``kind`` selects the class)."""
    cfg = dict(config)
    kind = cfg.pop("kind", None)
    if kind not in ENCODERS:
        raise ValueError(f"image_encoder: unknown kind {kind!r} (known: {sorted(ENCODERS)})")
    try:
        return ENCODERS[kind](**cfg)
    except TypeError as exc:
        raise ValueError(f"image_encoder: bad config for {kind!r}: {exc}") from None


def parse_encoder_spec(spec: str) -> ImageEncoder:
    """Command-line form: 'hf:<directory or cached name>' or 'open_clip:<model>:<weights file or tag>'."""
    kind, _, rest = spec.partition(":")
    if kind == "hf" and rest:
        return HFCLIPEncoder(rest)
    if kind == "open_clip" and ":" in rest:
        name, _, weights = rest.partition(":")
        return OpenCLIPEncoder(name, weights)
    raise ValueError(f"encoder: expected 'hf:<path>' or 'open_clip:<model>:<weights>', got {spec!r}")
