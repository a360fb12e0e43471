"""benchmarks/gpu_check.sh, the one-command GPU check: it must fail clearly without a GPU, and its
Python part must run every code path (here on the CPU, small sizes) so that it works the first time it
meets a GPU."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present: the script would run the full check")
def test_without_a_gpu_the_script_stops_with_a_message():
    r = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh")], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 2
    assert "no CUDA GPU visible" in r.stderr
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py")], capture_output=True, text=True,
                       timeout=120, cwd="/")
    assert r.returncode == 2 and "no CUDA GPU visible" in r.stderr


def test_dry_run_on_the_cpu_prints_the_table():
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--device", "cpu", "--quick"],
                       capture_output=True, text=True, timeout=600, cwd="/")
    assert r.returncode == 0, r.stderr[-2000:]
    table = [line for line in r.stdout.splitlines() if line.startswith("| ")]
    names = " ".join(table)
    for what in ["sh_basis L=8 float64 vs CPU", "sh_synthesis backward", "shdd_decode (km)", "GB/s written",
                 "sh_synthesis B=", "dense cuBLAS", "train step", "embeddings/s"]:
        assert what in names, what
    assert "FAILED" not in names
