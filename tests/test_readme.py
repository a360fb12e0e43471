"""Every code block of the README runs as written (issue 13 item 5), with small sizes: the python blocks
and every `locdiff` / `torchrun` line, in a fresh directory with HOME pointing at a folder where
`locdiff demo --quick` has run (the README's ~/.cache/locdiff).  Substitutions only shrink sizes
(--steps, --L, the multi-GPU process count) and make optional [arguments] concrete; a README line that
needs a GPU, an install or data we cannot have here is named below with the test that covers it."""

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import locdiff_ext as ld

from helpers import region_dataset

README = Path(__file__).resolve().parent.parent / "README.md"
SIZES = [(r"--steps 20000", "--steps 20"), (r"--L 32", "--L 4"), (r"steps=20000", "steps=20"),
         (r"--nproc_per_node=4", "--nproc_per_node=2"), (r"^locdiff bench", "locdiff bench --quick --degrees 4 8")]
# Lines that cannot run here, and where what they do is tested instead.
NOT_HERE = {
    "pip install": "installs: .ci/run does the README's install and test commands; `locdiff demo --quick` runs here "
                   "and in tests/datasets/test_demo.py (the full demo's tables are in the README with its date)",
    "python python/": "needs MP16/Im2GPS3k data and CLIP weights, or runs for an hour (the Blue Marble protocol): "
                      "tests/test_recipes.py runs these recipes small (a tiny CLIP, the protocol's quick config)",
    "--device cuda": "needs a GPU: tests/kernels/test_cuda.py",
    "data/mp16.store": "needs MP16 embeddings: the Command line block builds, indexes and trains on a store here, "
                       "tests/test_cli.py and tests/test_store_training.py in more detail",
}


def blocks(lang):
    text = README.read_text()
    return [m.group(1) for m in re.finditer(r"```" + lang + r"\n(.*?)```", text, re.S)]


def shrink(text, multiline=False):
    for a, b in SIZES:
        text = re.sub(a, b, text, flags=re.M if multiline else 0)
    return text


@pytest.fixture(scope="module")
def place(tmp_path_factory):
    """A user's directory after `locdiff demo --quick`: HOME with the demo model and examples, data files."""
    root = tmp_path_factory.mktemp("readme")
    home, work = root / "home", root / "work"
    work.mkdir()
    env = dict(os.environ, HOME=str(home))
    env.pop("LOCDIFF_HOME", None)
    subprocess.run([sys.executable, "-m", "locdiff_ext", "demo", "--quick", "--no-progress"], cwd=work, env=env,
                   check=True, capture_output=True, timeout=900)
    train, _ = region_dataset(600, seed=1)
    train.save(work / "train.npz")
    region_dataset(60, seed=2)[0].save(work / "val.npz")
    np.save(work / "queries.npy", region_dataset(5, seed=3)[0].embeddings.numpy())
    (work / "cfg.json").write_text(json.dumps({"model": {"widths": [32, 16], "time_dim": 16},
                                               "train": {"batch_size": 64, "eval_every": 0}}))
    examples = sorted((home / ".cache" / "locdiff" / "demo" / "examples").glob("*.png"))
    shutil.copy(examples[0], work / "img1.png")
    from PIL import Image

    Image.open(examples[1]).convert("RGB").save(work / "img2.jpg")
    torch.manual_seed(0)  # the API example's "your own model"
    ld.LocDiff(ld.LocDiffConfig(cond_dim=16, L=4, widths=(16,), time_dim=8)).save_pretrained(work / "runs/mp16/final")
    return work, env


def _run(cmd, place, **kw):
    work, env = place
    proc = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True, timeout=900, **kw)
    assert proc.returncode == 0, f"{cmd}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    return proc


@pytest.mark.parametrize("i", range(len(blocks("python"))))
def test_python_blocks_run(i, place):
    _run([sys.executable, "-c", shrink(blocks("python")[i])], place)


def _command_lines():
    lines = []
    for block in blocks("bash"):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split("  #")[0].split("# ")[0].strip() if not line.startswith("#") else ""
            if line:
                lines.append(line)
    return lines


@pytest.mark.parametrize("line", _command_lines())
def test_command_lines_run(line, place):
    # [--option value] is optional: give it, except a placeholder (DIR: its default is what the line means)
    # or an option that needs a GPU (run without it)
    line = re.sub(r"\[([^\]]*)\]", lambda m: "" if re.search(r"\b[A-Z]{2,}\b|cuda", m.group(1)) else m.group(1), line)
    for key, why in NOT_HERE.items():
        if key in line:
            pytest.skip(reason=why)
    argv = shlex.split(shrink(line, multiline=True))
    if "train" in argv and "--steps" not in argv:  # the default scales with the data: a minute here
        argv += ["--steps", "20"]
    if argv[0] == "locdiff":
        argv = [sys.executable, "-m", "locdiff_ext", *argv[1:]]
    elif argv[0] == "torchrun":
        argv = [sys.executable, "-m", "torch.distributed.run", *argv[1:]]
    _run(argv, place)
