"""Checkpoint directories: truncated, tampered, missing and empty ones raise CheckpointError."""

import pytest

import locdiff_ext as ld
from locdiff_ext.data import CheckpointError


def test_truncated_or_tampered_checkpoints_raise(trained, tmp_path):
    import shutil

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
