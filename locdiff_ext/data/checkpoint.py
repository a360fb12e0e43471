"""Checkpoint files: safetensors tensors + JSON, written atomically, verified on load.

A checkpoint is a directory holding ``*.safetensors`` files (tensors only: nothing is ever
unpickled) and ``*.json`` files, plus ``manifest.json`` with the SHA-256 and size of every other
file.  It is written into a temporary sibling directory and renamed into place, so a reader never
sees a half-written checkpoint; loading checks the manifest first, so a truncated or tampered
file raises ``CheckpointError`` naming the file instead of returning garbage.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Dict, Mapping, Optional, Union

import torch
from torch import Tensor

MANIFEST = "manifest.json"
FORMAT = "locdiff-checkpoint/1"

PathLike = Union[str, os.PathLike]


class CheckpointError(ValueError):
    """A checkpoint directory is missing, incomplete, truncated or was modified after writing."""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_checkpoint(
    directory: PathLike,
    tensors: Mapping[str, Mapping[str, Tensor]],
    documents: Mapping[str, object],
    overwrite: bool = True,
) -> Path:
    """Writes ``{name}.safetensors`` for each entry of ``tensors`` and ``{name}.json`` for each
    entry of ``documents`` into ``directory``, atomically (temp dir + rename)."""
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    for name, group in tensors.items():  # a diverged model is never saved (loading refuses one too)
        for key, v in group.items():
            if v.dtype.is_floating_point and not bool(torch.isfinite(v).all()):
                raise CheckpointError(f"refusing to write {directory}: {name} tensor {key!r} contains NaN or "
                                      "infinite values")
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.tmp-", dir=directory.parent))
    try:
        files: Dict[str, dict] = {}
        for name, group in tensors.items():
            path = tmp / f"{name}.safetensors"
            save_file({k: v.detach().contiguous().cpu() for k, v in group.items()}, str(path))
        for name, doc in documents.items():
            (tmp / f"{name}.json").write_text(json.dumps(doc, indent=2, sort_keys=True))
        _seal(tmp, files)
        _publish(tmp, directory, overwrite)
    except SafetensorError as exc:  # e.g. a full disk while writing tensors: an I/O error like any other
        shutil.rmtree(tmp, ignore_errors=True)
        raise OSError(f"cannot write checkpoint {str(directory)!r}: {exc}") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


def _seal(tmp: Path, known: Dict[str, dict]) -> None:
    """Writes the manifest of ``tmp`` (entries of ``known`` are trusted, the other files hashed) and gives
    its entries the usual modes, flushed to disk."""
    files = {}
    for path in sorted(tmp.iterdir()):
        if path.is_file() and path.name != MANIFEST:
            files[path.name] = known.get(path.name) or {"sha256": _sha256(path), "bytes": path.stat().st_size}
    (tmp / MANIFEST).write_text(json.dumps({"format": FORMAT, "files": files}, indent=2))
    mask = _umask()  # mkdtemp and safetensors make private (0700 / 0600) entries: give them the usual modes
    os.chmod(tmp, 0o777 & ~mask)
    for path in tmp.iterdir():  # flush file contents before the rename makes them visible
        if path.is_file():
            os.chmod(path, 0o666 & ~mask)
            with open(path, "rb") as f:
                os.fsync(f.fileno())


def _publish(tmp: Path, directory: Path, overwrite: bool = True) -> None:
    """Renames the finished ``tmp`` into place (an old ``directory`` is swapped out, then removed)."""
    if directory.exists():
        if not overwrite:
            raise FileExistsError(f"{directory} already exists")
        old = Path(tempfile.mkdtemp(prefix=f".{directory.name}.old-", dir=directory.parent))
        os.replace(directory, old / "x")
        os.replace(tmp, directory)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, directory)


def update_documents(directory: PathLike, documents: Mapping[str, object]) -> Path:
    """Adds or replaces ``{name}.json`` documents of an existing checkpoint, atomically: the checkpoint is
    verified, hard-linked (copied where links fail) into a temporary sibling with everything else it holds
    (e.g. a copied gallery), the documents written, the manifest re-sealed, and the result renamed into
    place.  Used to save a calibration into a model directory without rewriting its weights."""
    directory = Path(directory)
    files = _verified_manifest(directory)
    root = Path(tempfile.mkdtemp(prefix=f".{directory.name}.tmp-", dir=directory.parent))
    try:
        def link(src, dst):
            try:
                os.link(src, dst)
            except OSError:
                shutil.copy2(src, dst)

        tmp = root / "x"
        shutil.copytree(directory, tmp, copy_function=link)
        for name, doc in documents.items():
            path = tmp / f"{name}.json"
            path.unlink(missing_ok=True)  # a hard link: writing through it would change the original
            path.write_text(json.dumps(doc, indent=2, sort_keys=True))
            files.pop(path.name, None)
        (tmp / MANIFEST).unlink()
        _seal(tmp, files)
        _publish(tmp, directory)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return directory


def _umask() -> int:
    """The process umask, read without changing it where Linux reports it (setting it to read it would,
    for an instant, give files that another thread creates the wrong mode)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)  # elsewhere: the portable way, set and restore at once
    os.umask(mask)
    return mask


def _verified_manifest(directory: Path) -> dict:
    if not directory.is_dir():
        raise CheckpointError(f"checkpoint directory {str(directory)!r} does not exist")
    mpath = directory / MANIFEST
    if not mpath.is_file():
        raise CheckpointError(f"{str(directory)!r} is not a locdiff checkpoint: {MANIFEST} is missing")
    try:
        manifest = json.loads(mpath.read_text())
        files = manifest["files"]
        if manifest.get("format") != FORMAT or not isinstance(files, dict):
            raise KeyError("format")
        if not all(isinstance(m, dict) and isinstance(m.get("bytes"), int) and isinstance(m.get("sha256"), str)
                   for m in files.values()):
            raise KeyError("files")
    except (ValueError, KeyError, TypeError, AttributeError, RecursionError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{str(mpath)!r} is corrupt or of an unknown format ({type(exc).__name__}: {exc})") from None
    for name, meta in files.items():
        path = directory / name
        if os.sep in name or "/" in name or name.startswith(".") or not path.is_file():
            raise CheckpointError(f"checkpoint file {str(path)!r} is missing")
        if path.stat().st_size != meta.get("bytes"):
            raise CheckpointError(f"checkpoint file {str(path)!r} is truncated or was modified "
                                  f"(size {path.stat().st_size}, expected {meta.get('bytes')})")
        if _sha256(path) != meta.get("sha256"):
            raise CheckpointError(f"checkpoint file {str(path)!r} was modified after it was written "
                                  "(SHA-256 mismatch)")
    return files


def read_checkpoint(directory: PathLike, map_location: Union[str, torch.device] = "cpu"):
    """Verifies the manifest, then returns (tensors: {name: {key: Tensor}}, documents: {name: obj})."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    directory = Path(directory)
    files = _verified_manifest(directory)
    tensors, documents = {}, {}
    for fname in files:
        path = directory / fname
        if fname.endswith(".safetensors"):
            try:
                tensors[fname[: -len(".safetensors")]] = load_file(str(path), device=str(map_location))
            except (SafetensorError, OSError, ValueError) as exc:
                raise CheckpointError(f"checkpoint file {str(path)!r} cannot be read: {exc}") from None
        elif fname.endswith(".json"):
            try:
                documents[fname[: -len(".json")]] = json.loads(path.read_text())
            except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
                raise CheckpointError(f"checkpoint file {str(path)!r} is not valid JSON: {exc}") from None
    return tensors, documents


def _content_sha256(tensors: Mapping[str, Tensor]) -> str:
    h = hashlib.sha256()
    for key in sorted(tensors):
        t = tensors[key].detach().contiguous().cpu()
        h.update(f"{key}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def write_shared(root: PathLike, kind: str, tensors: Mapping[str, Tensor]) -> Dict[str, str]:
    """Writes ``tensors`` once, as the checkpoint directory ``root/{kind}-{hash}`` named by their content's
    SHA-256 (already there: nothing is written), and returns the reference a checkpoint stores instead of a
    copy: {"directory": its name, "sha256": its file's SHA-256}.  Why: a trainer's step checkpoints share one
    retrieval gallery (gigabytes at MP16 size) rather than each carrying it."""
    name = f"{kind}-{_content_sha256(tensors)[:16]}"
    directory = Path(root) / name
    if not (directory / MANIFEST).is_file():
        write_checkpoint(directory, {kind: tensors}, {})
    files = _verified_manifest(directory)
    return {"directory": name, "sha256": files[f"{kind}.safetensors"]["sha256"]}


def read_shared(checkpoint: PathLike, ref: object, kind: str) -> Dict[str, Tensor]:
    """The tensors a checkpoint references with ``write_shared``'s reference (a sibling directory of the
    checkpoint), verified: the directory's manifest and hashes, and the file being the one referenced."""
    checkpoint = Path(checkpoint)
    name = ref.get("directory") if isinstance(ref, dict) else None
    sha = ref.get("sha256") if isinstance(ref, dict) else None
    if not (isinstance(name, str) and name.startswith(f"{kind}-") and len(name) == len(kind) + 17
            and all(c in "0123456789abcdef" for c in name[len(kind) + 1:]) and isinstance(sha, str)):
        raise CheckpointError(f"{str(checkpoint)!r}: its {kind} reference {ref!r} is not valid")
    directory = checkpoint.parent / name
    if not directory.is_dir():
        raise CheckpointError(f"{str(checkpoint)!r} stores its {kind} once for the whole run, in {str(directory)!r}, "
                              "which is missing: copy the run directory whole, or share a model written by "
                              "save_pretrained (final/), which holds everything")
    tensors, _ = read_checkpoint(directory)
    files = _verified_manifest(directory)
    if kind not in tensors or files.get(f"{kind}.safetensors", {}).get("sha256") != sha:
        raise CheckpointError(f"{str(directory)!r} holds another {kind} than {str(checkpoint)!r} was written with")
    return tensors[kind]


def list_checkpoints(root: PathLike, prefix: str = "step_") -> list:
    """Complete checkpoints (those with a manifest) under ``root``, oldest step first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        if p.is_dir() and p.name.startswith(prefix) and (p / MANIFEST).is_file():
            try:
                found.append((int(p.name[len(prefix):]), p))
            except ValueError:
                continue
    return [p for _, p in sorted(found)]


def checkpoint_step(path: PathLike, prefix: str = "step_") -> int:
    """The step number in a checkpoint directory's name (step_00001000 -> 1000)."""
    return int(Path(path).name[len(prefix):])


def remove_stale_temporaries(root: PathLike) -> list:
    """Deletes the temporary directories that ``write_checkpoint`` leaves in ``root`` when the process
    is killed mid-write (``.NAME.tmp-*``, ``.NAME.old-*``: each up to a checkpoint in size, never read).
    Returns the removed paths.  Call it only where no other process writes checkpoints into ``root``."""
    root = Path(root)
    if not root.is_dir():
        return []
    stale = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(".") and (".tmp-" in p.name or ".old-" in p.name)]
    for p in stale:
        shutil.rmtree(p, ignore_errors=True)
    return stale


def latest_checkpoint(root: PathLike) -> Optional[Path]:
    ckpts = list_checkpoints(root)
    return ckpts[-1] if ckpts else None
