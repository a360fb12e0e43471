"""Checkpoint directories: truncated, tampered, missing, empty or deliberately edited ones (config fields out
of range, hostile JSON, a pickle swapped in, NaN galleries) raise CheckpointError, fast, before allocating."""

import hashlib
import json
import os
import shutil
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import locdiff_ext as ld
from locdiff_ext.data import CheckpointError, write_checkpoint


def test_truncated_or_tampered_checkpoints_raise(trained, tmp_path):
    _, final = trained
    for name, damage in [("truncated", lambda b: b[: len(b) // 2]), ("tampered", lambda b: b[:-8] + b"\x00" * 8)]:
        d = tmp_path / name
        shutil.copytree(final, d)
        blob = (d / "model.safetensors").read_bytes()
        (d / "model.safetensors").write_bytes(damage(blob))
        with pytest.raises(CheckpointError, match="model.safetensors"):
            ld.LocDiff.from_pretrained(d)
    with pytest.raises(CheckpointError, match="does not exist"):
        ld.LocDiff.from_pretrained(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="manifest"):
        ld.LocDiff.from_pretrained(tmp_path / "empty")


# ---------------------------------------------------------------------- mutations (issue 9, defect 4)

FIXTURE = Path(__file__).resolve().parent.parent / "fixtures" / "saved_model_v0.1"


def _rehash(d: Path) -> None:
    """Rewrites the manifest to match the files: what someone who edits a checkpoint on purpose does."""
    m = json.loads((d / "manifest.json").read_text())
    for name in m["files"]:
        blob = (d / name).read_bytes()
        m["files"][name] = {"sha256": hashlib.sha256(blob).hexdigest(), "bytes": len(blob)}
    (d / "manifest.json").write_text(json.dumps(m))


def _edit_config(**fields):
    def edit(d):
        cfg = json.loads((d / "config.json").read_text())
        cfg.update(fields)
        (d / "config.json").write_text(json.dumps(cfg))
        _rehash(d)
    return edit


def _write(name, text, rehash=True):
    def edit(d):
        (d / name).write_text(text)
        if rehash:
            _rehash(d)
    return edit


def _tensors(fn):
    def edit(d):
        t = load_file(str(d / "model.safetensors"))
        fn(t)
        save_file(t, str(d / "model.safetensors"))
        _rehash(d)
    return edit


def _swap_in_pickle(d):
    torch.save({"net.x": torch.zeros(3)}, d / "model.safetensors")  # a pickle under the safetensors name
    _rehash(d)


def _bytes(fn, rehash):
    def edit(d):
        (d / "model.safetensors").write_bytes(fn((d / "model.safetensors").read_bytes()))
        if rehash:
            _rehash(d)
    return edit


def _nan_gallery(t):
    t["gallery.embeddings"][3, 1] = float("nan")


def _bad_gallery_lat(t):
    t["gallery.coords"][0, 0] = 100.0


def _manifest_entry_string(d):
    m = json.loads((d / "manifest.json").read_text())
    m["files"]["config.json"] = "abc"
    (d / "manifest.json").write_text(json.dumps(m))


MUTATIONS = {
    "widths 12000": (_edit_config(widths=[12000, 12000]), "do not match the config"),
    "widths 200000": (_edit_config(widths=[200000, 200000]), "widths"),
    "time_dim -4": (_edit_config(time_dim=-4), "time_dim"),
    "time_dim 1e8": (_edit_config(time_dim=10**8), "time_dim"),
    "cond_dim 1e9": (_edit_config(cond_dim=10**9), "cond_dim"),
    "train_timesteps 1e11": (_edit_config(train_timesteps=10**11), "train_timesteps"),
    "w0 NaN": (_edit_config(w0=float("nan")), "w0"),
    "L string": (_edit_config(L="32"), "L must be an int"),
    "widths string": (_edit_config(widths="ab"), "widths"),
    "unknown key": (_edit_config(colour="red"), "unknown keys"),
    "encoder channels": (_edit_config(image_encoder={"kind": "small_cnn", "dim": 8, "image_size": 16,
                                                     "channels": [-5]}), "channels"),
    "encoder kind": (_edit_config(image_encoder={"kind": "bogus"}), "unknown kind"),
    "config a list": (_write("config.json", "[1, 2]"), "config.json is invalid"),
    "config deep": (_write("config.json", "[" * 100_000 + "]" * 100_000), "config.json"),
    "config not JSON": (_write("config.json", "{'L': 3"), "not valid JSON"),
    "manifest entry string": (_manifest_entry_string, "manifest.json"),
    "manifest a list": (_write("manifest.json", "[]", rehash=False), "manifest.json"),
    "manifest deep": (_write("manifest.json", "{\"files\": " + "[" * 100_000 + "]" * 100_000 + "}", rehash=False),
                      "manifest.json"),
    "truncated": (_bytes(lambda b: b[: len(b) // 2], rehash=False), "truncated"),
    "flipped byte": (_bytes(lambda b: b[:100] + bytes([b[100] ^ 0xFF]) + b[101:], rehash=False), "SHA-256"),
    "flipped header, rehashed": (_bytes(lambda b: b[:8] + b"{" * 20 + b[28:], rehash=True), "cannot be read"),
    "truncated, rehashed": (_bytes(lambda b: b[: len(b) // 2], rehash=True), "cannot be read"),
    "pickle swapped in": (_swap_in_pickle, "cannot be read"),
    "NaN gallery": (_tensors(_nan_gallery), "gallery.embeddings contains NaN"),
    "gallery latitude 100": (_tensors(_bad_gallery_lat), "latitudes outside"),
    "weights missing a layer": (_tensors(lambda t: t.pop(next(k for k in t if k.startswith("net.")))), "missing"),
}


@pytest.mark.parametrize("name", list(MUTATIONS))
def test_every_mutated_checkpoint_gives_a_named_error_fast(name, tmp_path):
    mutate, match = MUTATIONS[name]
    d = tmp_path / "m"
    shutil.copytree(FIXTURE, d)
    mutate(d)
    t0 = time.perf_counter()
    with pytest.raises(CheckpointError, match=match):
        ld.LocDiff.from_pretrained(d)
    assert time.perf_counter() - t0 < 10


def test_a_hostile_config_is_refused_before_it_allocates(tmp_path):
    """widths [12000, 12000] beside the 30 KB fixture used to allocate 3.7 GiB for 17 s before failing:
    under a 2.5 GiB address-space cap that is a RuntimeError (or worse); the check must come first."""
    d = tmp_path / "m"
    shutil.copytree(FIXTURE, d)
    _edit_config(widths=[12000, 12000])(d)
    prog = ("import resource, sys\nresource.setrlimit(resource.RLIMIT_AS, (5 << 29, 5 << 29))\n"
            "import locdiff_ext as ld\n"
            f"try:\n    ld.LocDiff.from_pretrained({str(d)!r})\nexcept ld.CheckpointError as e:\n    print('refused:', e)\n")
    proc = subprocess.run([sys.executable, "-c", prog], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 0 and proc.stdout.startswith("refused:"), proc.stderr[-2000:]


def test_checkpoints_get_the_usual_file_modes(tmp_path):
    """Issue 13 item 7: saved models were 0600 (a private temp directory renamed into place), so other users
    could not read a shared model directory; they follow the umask now."""
    old = os.umask(0o022)
    try:
        d = write_checkpoint(tmp_path / "m", {"model": {"w": torch.zeros(3)}}, {"config": {"a": 1}})
    finally:
        os.umask(old)
    assert stat.S_IMODE(d.stat().st_mode) == 0o755
    assert {stat.S_IMODE(p.stat().st_mode) for p in d.iterdir()} == {0o644}
