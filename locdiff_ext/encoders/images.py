"""Images in: reading files and tar members, pixels as tensors, and the ``ImageEncoder`` interface.

Every encoder is an ``ImageEncoder``: ``preprocess(images)`` turns paths / PIL images / tensors
into a float batch [B, 3, S, S] in [0, 1], ``forward`` maps it to [B, dim], and ``config`` is a
JSON dict from which ``build_image_encoder`` rebuilds it.  ``load_image`` reads files and members
of .tar archives ("archive.tar::member/path.jpg") and gives clear errors for missing, non-image,
corrupt or tiny files.
"""

from __future__ import annotations

import io
import os
import threading
from pathlib import Path
from typing import Dict, Sequence, Union

import numpy as np
import torch
from torch import Tensor, nn

from ..data import TAR_SEPARATOR

ImageLike = Union[str, os.PathLike, "PIL.Image.Image", Tensor, np.ndarray]  # noqa: F821

MIN_IMAGE_SIDE = 8
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


# Pillow modes of more than 8 bits per sample and the value that maps to 255: 16-bit integers by their type's
# range; 32-bit integers ("I") by the 16-bit range when their values fit in it (Pillow opens some 16-bit PNGs
# and TIFFs as "I"), else by the int32 range; 32-bit floats ("F") as 0..1, the convention of scikit-image and
# torchvision for float images.  Values outside the range are clipped (negative ones to 0).
_WIDE_MODES = {"I;16": 65535.0, "I;16L": 65535.0, "I;16B": 65535.0, "I;16N": 65535.0, "I": None, "F": 1.0}


def to_rgb(img: "PIL.Image.Image", name: str = "<image>") -> "PIL.Image.Image":  # noqa: F821
    """A PIL image as every viewer shows it, in 8-bit RGB: the EXIF orientation (all 8 values) applied, so a
    phone's portrait shot is upright; 16- and 32-bit grayscale scaled to 8 bits by their range (see
    ``_WIDE_MODES``) instead of Pillow's ``convert`` clipping them; palette, CMYK, LA/RGBA (alpha dropped)
    converted by Pillow."""
    from PIL import Image, ImageOps

    try:
        img = ImageOps.exif_transpose(img)
    except Exception as exc:  # an unreadable EXIF block: say so rather than guess the orientation
        raise ValueError(f"image {name!r} has an EXIF orientation that cannot be applied: {exc}") from None
    if img.mode in _WIDE_MODES:
        a = np.asarray(img).astype(np.float64)
        if not np.isfinite(a).all():
            raise ValueError(f"image {name!r} ({img.mode}) contains NaN or infinite pixel values")
        top = _WIDE_MODES[img.mode]
        if top is None:
            top = 65535.0 if a.size and a.min() >= 0 and a.max() <= 65535 else 2147483647.0
        img = Image.fromarray(np.clip(np.rint(a * (255.0 / top)), 0, 255).astype(np.uint8), "L")
    return img if img.mode == "RGB" else img.convert("RGB")


def load_image(image) -> "PIL.Image.Image":  # noqa: F821
    """A path or PIL image -> an upright 8-bit RGB PIL image (``to_rgb``: EXIF orientation applied, 16/32-bit
    images scaled, grayscale, palette, CMYK and RGBA converted); a missing file, a file that is not an image,
    a corrupt image or one smaller than 8 px per side raises FileNotFoundError / ValueError naming the file."""
    from PIL import Image, UnidentifiedImageError

    name = str(image) if isinstance(image, (str, os.PathLike)) else f"<{type(image).__name__}>"
    if isinstance(image, (str, os.PathLike)):
        if TAR_SEPARATOR in str(image):
            source = _open_member(str(image))
        else:
            source = Path(image)
            if source.is_dir():
                raise ValueError(f"image {name!r} is a directory, not an image file")
            if not source.is_file():
                raise FileNotFoundError(f"image file {name!r} does not exist")
        try:
            with Image.open(source) as im:
                im.load()
                img = to_rgb(im, name)
        except UnidentifiedImageError:
            raise ValueError(f"image file {name!r} is not an image (or of an unknown format)") from None
        except Image.DecompressionBombError as exc:  # Pillow's guard against decompression bombs
            raise ValueError(f"image file {name!r} is too large to decode safely: {exc}") from None
        except (OSError, SyntaxError, ValueError) as exc:
            raise ValueError(f"image file {name!r} is corrupt or truncated: {exc}") from None
    elif isinstance(image, Image.Image):
        img = to_rgb(image, name)
    else:
        raise TypeError(f"images: expected a path, a PIL image or a tensor, got {type(image).__name__}")
    if min(img.size) < MIN_IMAGE_SIDE:
        raise ValueError(f"image {name!r} is {img.size[0]}x{img.size[1]} px: too small (at least "
                         f"{MIN_IMAGE_SIDE} px per side)")
    return img


def image_to_tensor(image: ImageLike, size: int, center_crop: bool = False) -> Tensor:
    """One image -> float32 [3, size, size] in [0, 1].  Tensors are [3, H, W] or [H, W]; numpy arrays are
    H x W x 3 (RGB; OpenCV users convert from BGR first) or H x W; uint8 means 0..255, uint16 0..65535, floats 0..1.
    Default: the whole image resized to size x size (bilinear); ``center_crop``: CLIP's preprocessing,
    shortest side resized to ``size`` (bicubic), then the central size x size square."""
    if isinstance(image, np.ndarray):  # H x W x C (RGB, or RGBA: alpha dropped) or H x W, as PIL and OpenCV hold them
        a = image
        if a.ndim == 3 and a.shape[-1] in (3, 4):
            a = a[..., :3].transpose(2, 0, 1)
        elif a.ndim == 3 and a.shape[-1] == 1:
            a = a[..., 0]
        if a.dtype == np.uint16:  # 16-bit pixels (e.g. from imageio / OpenCV's IMREAD_UNCHANGED): 0..65535 -> 0..1
            a = a.astype(np.float32) / 65535.0
        image = torch.from_numpy(np.ascontiguousarray(a))
    if isinstance(image, Tensor):
        t = image
        if not (t.dtype == torch.uint8 or t.dtype.is_floating_point) or t.dtype.is_complex:
            raise TypeError(f"images: an image tensor must be uint8 (0..255) or float (0..1), got {t.dtype}")
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


__all__ = ["ImageLike", "ImageEncoder", "load_image", "to_rgb", "image_to_tensor", "MIN_IMAGE_SIDE"]
