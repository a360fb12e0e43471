"""Resumable image-embedding extraction: a list of images -> shards of embeddings on disk.

``embed_images`` runs an ``ImageEncoder`` over millions of images (MP16 has 4.7M) with a progress
bar, writing ``shard_XXXXX.safetensors`` files of ``shard_size`` rows each, atomically.  Killed and
restarted with the same arguments, it skips the shards already written.  Images that cannot be
read (missing, corrupt, not an image) do not stop the run: their rows are marked invalid and the
reasons listed in ``failures.json``.  ``load_embeddings`` concatenates the shards.
"""

from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Sequence, Tuple, Union

import torch
from torch import Tensor

from .images import ImageEncoder, image_to_tensor

PathLike = Union[str, os.PathLike]
INDEX = "index.json"


def _fingerprint(images: Sequence[str]) -> str:
    h = hashlib.sha256()
    for im in images:
        h.update(str(im).encode())
        h.update(b"\0")
    return h.hexdigest()


def _load(encoder: ImageEncoder, ref: str):
    try:
        return image_to_tensor(ref, encoder.image_size, encoder.center_crop), None
    except (OSError, ValueError, TypeError) as exc:
        return None, f"{type(exc).__name__}: {exc}"


@torch.no_grad()
def embed_images(encoder: ImageEncoder, images: Sequence[PathLike], out_dir: PathLike, batch_size: int = 64,
                 shard_size: int = 8192, device: Union[str, torch.device, None] = None, workers: int = 4,
                 progress: bool = True) -> Path:
    """Embeds ``images`` (paths or 'archive.tar::member' references) into ``out_dir`` (see the
    module docstring).  Returns out_dir."""
    from safetensors.torch import save_file

    from ..progress import Progress

    if len(images) == 0:
        raise ValueError("images is empty")
    if batch_size < 1 or shard_size < 1:
        raise ValueError("batch_size and shard_size must be >= 1")
    refs = [str(p) for p in images]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    index = {"encoder": encoder.config, "num_images": len(refs), "shard_size": shard_size, "dim": encoder.dim,
             "images_sha256": _fingerprint(refs)}
    ipath = out / INDEX
    if ipath.is_file():
        old = json.loads(ipath.read_text())
        if old != index:
            raise ValueError(f"out_dir {str(out)!r} holds a cache of other images or another encoder; "
                             "use a new directory")
    else:
        ipath.write_text(json.dumps(index, indent=1))
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    encoder = encoder.to(dev).eval()
    n_shards = (len(refs) + shard_size - 1) // shard_size
    todo = [k for k in range(n_shards) if not (out / f"shard_{k:05d}.safetensors").is_file()]
    done_rows = sum(min(shard_size, len(refs) - k * shard_size) for k in range(n_shards) if k not in set(todo))
    bar = Progress(len(refs), "embedding", "img", enabled=progress, initial=done_rows)
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        for k in todo:
            chunk = refs[k * shard_size:(k + 1) * shard_size]
            embs = torch.full((len(chunk), encoder.dim), float("nan"), dtype=torch.float32)
            valid = torch.zeros(len(chunk), dtype=torch.uint8)
            failures = {}
            for b in range(0, len(chunk), batch_size):
                loaded = list(pool.map(lambda r: _load(encoder, r), chunk[b:b + batch_size]))
                ok = [i for i, (t, _) in enumerate(loaded) if t is not None]
                for i, (_, err) in enumerate(loaded):
                    if err is not None:
                        failures[chunk[b + i]] = err
                if ok:
                    x = torch.stack([loaded[i][0] for i in ok]).to(dev)
                    e = encoder(x).float().cpu()
                    rows = torch.tensor(ok) + b
                    embs[rows] = e
                    valid[rows] = 1
                bar.update(len(loaded))
            tmp = out / f".shard_{k:05d}.tmp"
            save_file({"embeddings": embs, "valid": valid}, str(tmp))
            os.replace(tmp, out / f"shard_{k:05d}.safetensors")
            if failures:
                fpath = out / "failures.json"
                allf = json.loads(fpath.read_text()) if fpath.is_file() else {}
                allf.update(failures)
                fpath.write_text(json.dumps(allf, indent=1))
    bar.close()
    return out


def load_embeddings(out_dir: PathLike) -> Tuple[Tensor, Tensor]:
    """(embeddings [N, D] float32 with NaN rows where images failed, valid [N] bool)."""
    from safetensors.torch import load_file

    out = Path(out_dir)
    if not (out / INDEX).is_file():
        raise FileNotFoundError(f"{str(out)!r} is not an embedding cache (no {INDEX})")
    index = json.loads((out / INDEX).read_text())
    n_shards = (index["num_images"] + index["shard_size"] - 1) // index["shard_size"]
    missing = [k for k in range(n_shards) if not (out / f"shard_{k:05d}.safetensors").is_file()]
    if missing:
        raise ValueError(f"embedding cache {str(out)!r} is incomplete ({len(missing)} of {n_shards} shards "
                         "missing): run embed_images again with the same arguments to finish it")
    parts = [load_file(str(out / f"shard_{k:05d}.safetensors")) for k in range(n_shards)]
    return torch.cat([p["embeddings"] for p in parts]), torch.cat([p["valid"] for p in parts]).bool()


def failures(out_dir: PathLike) -> dict:
    """{image: reason} of the images that could not be embedded."""
    f = Path(out_dir) / "failures.json"
    return json.loads(f.read_text()) if f.is_file() else {}


__all__ = ["embed_images", "load_embeddings", "failures"]
