"""Plants bugs in a scratch copy of csrc/sh_cuda.cu and shows that the SIMT-emulation tests catch each one
(issue: the harness must catch a removed __syncthreads, an off-by-one shared-memory size and a wrong shuffle
lane).  Nothing here is committed into the kernels: each bug lives only in a temporary copy of the tree.

    python tests/kernels/simt_planted_bugs.py        # from the repository root, with locdiff_ext installed

Prints, per bug, which checks failed (a bug is caught when at least one does) and exits 1 if one was missed."""

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

BUGS = {
    "removed __syncthreads (synthesis: between the Legendre and Fourier stages)": (
        "  ring_legendre(coeffs + b * K, L, tab, ring_theta(j, nlat), gc, gs);\n  __syncthreads();\n",
        "  ring_legendre(coeffs + b * K, L, tab, ring_theta(j, nlat), gc, gs);\n",
        "synthesis", True),
    "off-by-one shared-memory size (synthesis: 2L + 1 values instead of 2(L + 1))": (
        "const size_t smem = sizeof(double) * 2 * (L + 1);",
        "const size_t smem = sizeof(double) * (2 * L + 1);",
        "synthesis", False),
    "off-by-one shared-memory size (decoder: one candidate slot short)": (
        "sizeof(double) * (2 * (L + 1) + 3 * opt.candidates)",
        "sizeof(double) * (2 * (L + 1) + 3 * opt.candidates - 1)",
        "decode", False),
    "wrong lane offset in a shuffle (decoder argmax: index from lane + off + 1)": (
        "const int os = __shfl_down_sync(0xffffffffu, bs, off);",
        "const int os = __shfl_down_sync(0xffffffffu, bs, off + 1);",
        "decode", False),
    "wrong lane offset in a shuffle (refinement butterfly: xor off / 2)": (
        "      d.ft += __shfl_xor_sync(0xffffffffu, d.ft, off);",
        "      d.ft += __shfl_xor_sync(0xffffffffu, d.ft, off / 2);",
        "decode", False),
}


def run(cmd, cwd):
    p = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=1800)
    return p.returncode, p.stdout + p.stderr


def main():
    missed = 0
    for name, (old, new, tests, tsan) in BUGS.items():
        with tempfile.TemporaryDirectory() as tmp:
            tree = Path(tmp) / "tree"
            for part in ["csrc", "tests", "pyproject.toml"]:
                (shutil.copytree if (ROOT / part).is_dir() else shutil.copy)(ROOT / part, tree / part)
            src = tree / "csrc" / "sh_cuda.cu"
            text = src.read_text()
            assert text.count(old) == 1, f"planting '{name}': the line to change is not in sh_cuda.cu"
            src.write_text(text.replace(old, new))
            caught = []
            # run from a folder without the source package beside it (tests import the installed one)
            code, out = run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
                             str(tree / "tests" / "kernels" / "test_simt.py"), "-k", tests, "-m", "not slow"], tmp)
            if code != 0:
                first = next((ln for ln in out.splitlines() if ln.startswith("E ")), "").strip()
                caught.append(f"pytest -k {tests}: {first[:220]}")
            if tsan:
                sys.path.insert(0, str(tree / "tests"))
                import simt
                try:
                    exe = simt.build(tmp, "thread", main=tree / "tests" / "kernels" / "simt_driver.cpp")
                    code, out = run([str(exe), "quick"], tmp)
                    if "ThreadSanitizer: data race" in out:
                        line = next(ln for ln in out.splitlines() if "sh_cuda.cu" in ln)
                        caught.append(f"ThreadSanitizer: data race, {line.strip()[:160]}")
                finally:
                    sys.path.pop(0)
                    sys.modules.pop("simt", None)
            print(f"{'CAUGHT' if caught else 'MISSED'}: {name}")
            for c in caught:
                print(f"    {c}")
            missed += not caught
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
