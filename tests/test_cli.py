"""The `locdiff` console script through subprocesses: train, eval, predict, errors, help."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

from locdiff_ext import cli
from locdiff_ext.kernels.geometry import great_circle_km

from helpers import REGION_CENTRES, region_dataset, run_cli


def test_cli_train_eval_predict(tmp_path):
    train, _ = region_dataset(1500, seed=9)
    val, cls = region_dataset(50, seed=10)
    train.save(tmp_path / "train.npz")
    val.save(tmp_path / "val.safetensors")
    cfg = {"model": {"L": 6, "widths": [64, 32], "time_dim": 32, "dropout": 0.0, "sample_steps": 8, "num_samples": 4},
           "train": {"batch_size": 64, "lr": 0.002, "warmup_steps": 20, "eval_every": 150, "eval_size": 32}}
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    run_cli("train", tmp_path / "train.npz", "--out", tmp_path / "run", "--config", tmp_path / "cfg.json",
            "--steps", 300, "--val", tmp_path / "val.safetensors", "--no-progress", cwd=tmp_path)
    assert (tmp_path / "run" / "final" / "config.json").is_file()
    out = run_cli("eval", tmp_path / "val.safetensors", "--model", tmp_path / "run", "--json", tmp_path / "eval.json",
                  cwd=tmp_path)
    assert "| LocDiff |" in out.stdout
    report = json.loads((tmp_path / "eval.json").read_text())
    assert report["results"]["LocDiff"]["acc_2500km"] >= 90
    np.save(tmp_path / "q.npy", val.embeddings[:3].numpy())
    out = run_cli("predict", tmp_path / "q.npy", "--model", tmp_path / "run", "--top-k", 2, "--json", cwd=tmp_path)
    records = json.loads(out.stdout)
    assert len(records) == 3 and all(1 <= len(r["modes"]) <= 2 for r in records)
    # train --val calibrated the model's regions and radii on the validation rows: predict shows the radius
    assert all(r["calibrated"] and 0 < r["radius_km"]["0.5"] <= r["radius_km"]["0.9"] for r in records)
    for r, c in zip(records, cls[:3]):
        m = r["modes"][0]
        assert great_circle_km(torch.tensor([m["lat"], m["lon"]]), REGION_CENTRES[c]).item() < 2500
    bad = run_cli("predict", tmp_path / "missing.png", "--model", tmp_path / "run", cwd=tmp_path, check=False)
    assert bad.returncode == 2 and "missing.png" in bad.stderr
    bad = run_cli("train", tmp_path / "nothing.npz", "--out", tmp_path / "x", cwd=tmp_path, check=False)
    assert bad.returncode == 2 and "does not exist" in bad.stderr
    # a fresh run over an existing one is refused (one line, status 2), --overwrite replaces it
    bad = run_cli("train", tmp_path / "train.npz", "--out", tmp_path / "run", "--no-resume", "--steps", 10,
                  "--no-progress", cwd=tmp_path, check=False)
    assert bad.returncode == 2 and "--overwrite" in bad.stderr and "Traceback" not in bad.stderr
    bad = run_cli("train", tmp_path / "train.npz", "--out", tmp_path / "eval.json", cwd=tmp_path, check=False)
    assert bad.returncode == 2 and "is a file" in bad.stderr and "Traceback" not in bad.stderr
    for cmd in ("train", "eval", "predict", "calibrate", "store", "bench"):
        assert run_cli(cmd, "--help", cwd=tmp_path).stdout.startswith("usage: locdiff " + cmd)


def test_cli_store_build_index_train_eval_and_damaged_stores(tmp_path):
    train, _ = region_dataset(1200, seed=11)
    val, _ = region_dataset(60, seed=12)
    train.save(tmp_path / "train.npz")
    val.save(tmp_path / "val.npz")
    out = run_cli("store", "build", tmp_path / "train.npz", tmp_path / "train.store", "--no-progress", cwd=tmp_path)
    assert "wrote EmbeddingStore" in out.stdout
    run_cli("store", "build", tmp_path / "val.npz", tmp_path / "val.store", "--dtype", "float32", "--no-progress",
            cwd=tmp_path)
    info = json.loads(run_cli("store", "info", tmp_path / "train.store", cwd=tmp_path).stdout)
    assert info["rows"] == 1200 and info["dim"] == 16 and info["dtype"] == "float16"
    assert "every byte matches" in run_cli("store", "verify", tmp_path / "train.store", cwd=tmp_path).stdout
    assert "recall@8" in run_cli("store", "index", tmp_path / "train.store", "--no-progress", cwd=tmp_path).stdout
    out = run_cli("train", tmp_path / "train.store", "--val", tmp_path / "val.store", "--retrieval-k", 4, "--L", 6,
                  "--widths", 32, 16, "--steps", 30, "--batch-size", 64, "--eval-every", 15, "--out", tmp_path / "run",
                  "--no-progress", cwd=tmp_path)
    assert json.loads((tmp_path / "run" / "final" / "gallery.json").read_text())["rows"] == 1200
    # LocDiff-R's prior weight and hybrid radius chosen on the validation store, saved with the model
    assert "chosen on 60 validation rows" in out.stdout
    from locdiff_ext.selection import PRIOR_WEIGHTS

    saved = json.loads((tmp_path / "run" / "final" / "config.json").read_text())
    saved = saved.get("model", saved)
    assert saved["prior_weight"] in PRIOR_WEIGHTS and isinstance(saved["hybrid"], bool)
    out = run_cli("eval", tmp_path / "val.store", "--model", tmp_path / "run", "--num-samples", 2, "--no-progress",
                  cwd=tmp_path)
    assert "| LocDiff |" in out.stdout and "| 60 |" in out.stdout
    # a retrieval model cannot split its validation rows off its gallery store: a named refusal
    bad = run_cli("train", tmp_path / "train.store", "--retrieval-k", 4, "--steps", 5, "--out", tmp_path / "x",
                  cwd=tmp_path, check=False)
    assert bad.returncode == 2 and "whole store" in bad.stderr and "Traceback" not in bad.stderr
    # a learned query map needs an in-memory gallery (a store's neighbour lists are cosine ones): named, status 2
    bad = run_cli("train", tmp_path / "train.store", "--val", tmp_path / "val.store", "--retrieval-k", 4,
                  "--retrieval-metric", "learned", "--steps", 5, "--out", tmp_path / "y", cwd=tmp_path, check=False)
    assert bad.returncode == 2 and "in-memory gallery" in bad.stderr and "Traceback" not in bad.stderr
    # damaged stores: one line naming the file, status 2
    emb = tmp_path / "val.store" / "embeddings.npy"
    emb.write_bytes(emb.read_bytes()[:-64])
    for argv in (["eval", tmp_path / "val.store", "--model", tmp_path / "run"], ["store", "verify", tmp_path / "val.store"]):
        bad = run_cli(*argv, cwd=tmp_path, check=False)
        assert bad.returncode == 2 and "embeddings.npy" in bad.stderr and "Traceback" not in bad.stderr
    bad = run_cli("store", "build", tmp_path / "train.npz", tmp_path / "train.store", cwd=tmp_path, check=False)
    assert bad.returncode == 2 and "already exists" in bad.stderr


FIXTURE_MODEL = Path(__file__).resolve().parent / "fixtures" / "saved_model_v0.1"


def _main(argv, capsys):
    """locdiff ARGV in-process: (exit status, stderr).  A traceback would be an exception here."""
    try:
        rc = cli.main([str(a) for a in argv])
    except SystemExit as exc:  # argparse: usage line + error line, status 2
        rc = exc.code
    return rc, capsys.readouterr().err


def test_user_errors_are_one_line_and_status_2(tmp_path, capsys, monkeypatch):
    """Issue 9, defect 8: each of these printed a traceback."""
    np.savez(tmp_path / "no_emb.npz", other=np.zeros((2, 8), np.float32))
    np.savez(tmp_path / "ok.npz", embeddings=np.zeros((2, 8), np.float32))
    (tmp_path / "trunc.npz").write_bytes((tmp_path / "ok.npz").read_bytes()[:60])
    (tmp_path / "adir").mkdir()
    val, _ = region_dataset(20, seed=1, dim=8)
    val.save(tmp_path / "val.npz")
    from PIL import Image

    Image.new("RGB", (64, 64)).save(tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 64 x 64 > 2 x 1000: a decompression bomb to Pillow
    cases = [
        (["predict", tmp_path / "no_emb.npz", "--model", FIXTURE_MODEL], "no 'embeddings' array"),
        (["predict", tmp_path / "trunc.npz", "--model", FIXTURE_MODEL], "cannot be read"),
        (["predict", tmp_path / "big.png", "--model", FIXTURE_MODEL], "too large to decode safely"),
        (["eval", tmp_path / "val.npz", "--model", FIXTURE_MODEL, "--json", tmp_path / "adir"], "is a directory"),
        (["predict", tmp_path / "ok.npz", "--model", FIXTURE_MODEL, "--device", "tpu"], "'tpu' is not a device"),
        (["predict", tmp_path / "ok.npz", "--model", FIXTURE_MODEL, "--device", "gpu0"], "is not a device"),
        (["demo", "--threads", "-1"], "must be >= 1"),
        (["predict", tmp_path / "ok.npz", "--model", FIXTURE_MODEL, "--top-k", 2**30], "top_k must be in"),
        (["predict", tmp_path / "ok.npz", "--model", tmp_path / "adir"], "manifest.json is missing"),
    ]
    if not torch.cuda.is_available():
        cases.append((["eval", tmp_path / "val.npz", "--device", "cuda"], "no CUDA GPU"))
    for argv, message in cases:
        rc, err = _main(argv, capsys)
        assert rc == 2 and message in err and "Traceback" not in err, (argv, rc, err)
        assert err.strip().splitlines()[-1].startswith("locdiff "), err  # one error line (argparse adds its usage)


def test_a_full_disk_during_a_checkpoint_write_is_an_os_error(tmp_path):
    """SafetensorError escaped from write_checkpoint when the disk filled up; now an OSError naming the
    checkpoint (the CLI prints it as one line), and no half-written temporary is left behind."""
    prog = """
import resource, signal, torch
from locdiff_ext.data import write_checkpoint
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)          # over the size limit a write fails with EFBIG
resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))
try:
    write_checkpoint("ck", {"model": {"w": torch.zeros(1 << 20)}}, {"config": {}})
except OSError as e:
    print("OSError", e)
"""
    proc = subprocess.run([sys.executable, "-c", prog], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 0 and proc.stdout.startswith("OSError cannot write checkpoint 'ck'"), \
        (proc.stdout, proc.stderr[-2000:])
    assert sorted(p.name for p in tmp_path.iterdir()) == []
