"""The `locdiff` console script through subprocesses: train, eval, predict, errors, help."""

import json

import numpy as np
import torch

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
    for cmd in ("train", "eval", "predict", "bench"):
        assert run_cli(cmd, "--help", cwd=tmp_path).stdout.startswith("usage: locdiff " + cmd)
