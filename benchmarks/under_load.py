"""Kernels under a concurrent CPU load, and the first call's latency (issue 11, "robust under load").

Times sh_basis (N = 20,000, L = 20, float64) and sphericart side by side, 15 interleaved calls each, first on
an idle machine, then while as many busy-looping processes as there are cores compete for them (as a
DataLoader or a second job would); then shdd_decode (B = 64, L = 32, geolocate's decoder) and sh_synthesis
(B = 64, L = 32, 64, 128) beside ducc0's synthesis_2d where ducc0 is installed (one call per map, as in
test_bench_synthesis.py, given our kernels' thread count, and given one thread).  Also the first call of a
fresh process (import and first sh_basis).  No environment variable is set: this is what users get.

Run:  python benchmarks/under_load.py
"""

from __future__ import annotations

import importlib.util
import multiprocessing as mp
import os
import statistics
import subprocess
import sys
import time

import torch

import locdiff_ext as ld
from locdiff_ext.kernels.geometry import latlon_to_xyz


def busy(stop):
    x = 0
    while not stop.is_set():
        for _ in range(100_000):
            x += 1


def interleaved(fns: dict, rounds: int = 15) -> dict:
    times = {k: [] for k in fns}
    for f in fns.values():
        f()
    for _ in range(rounds):
        for k, f in fns.items():
            t = time.perf_counter()
            f()
            times[k].append((time.perf_counter() - t) * 1e3)
    return {k: statistics.median(v) for k, v in times.items()}


def cases():
    g = torch.Generator().manual_seed(0)
    pts = torch.stack([torch.rand(20_000, generator=g, dtype=torch.float64) * 180 - 90,
                       torch.rand(20_000, generator=g, dtype=torch.float64) * 360 - 180], 1)
    fns = {"locdiff sh_basis L=20": lambda: ld.sh_basis(pts, 20)}
    try:
        import sphericart

        sph = sphericart.SphericalHarmonics(20)
        xyz = latlon_to_xyz(pts).numpy()
        fns["sphericart L=20"] = lambda: sph.compute(xyz)
    except ImportError:
        pass
    y = ld.shdd_encode(pts[:64], 32)
    fns["locdiff shdd_decode B=64 L=32"] = lambda: ld.shdd_decode(y)
    ducc_maps = None
    if importlib.util.find_spec("ducc0") is not None:
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        from ducc_reference import ducc_maps, to_ducc_alm
    for L in (32, 64, 128):
        x = torch.randn(64, (L + 1) ** 2, generator=g, dtype=torch.float64)
        fns[f"locdiff sh_synthesis B=64 L={L}"] = lambda x=x, L=L: ld.sh_synthesis(x, 2 * L + 2, 4 * L + 4)
        if ducc_maps is not None:
            alm = to_ducc_alm(x.numpy(), L)
            fns[f"ducc0 synthesis_2d B=64 L={L}"] = lambda a=alm, L=L: ducc_maps(a, L, 2 * L + 2, 4 * L + 4)
            fns[f"ducc0 1 thread B=64 L={L}"] = lambda a=alm, L=L: ducc_maps(a, L, 2 * L + 2, 4 * L + 4, 1)
    return fns


def first_call_ms() -> float:
    code = ("import time; t=time.perf_counter(); import torch, locdiff_ext as ld; "
            "ld.sh_basis(torch.zeros(1000, 2, dtype=torch.float64), 20); print((time.perf_counter()-t)*1e3)")
    return float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)


def main() -> None:
    ncpu = os.cpu_count() or 1
    fns = cases()
    print(f"{ld.__name__}: {torch.get_num_threads()} threads, {ncpu} cores; first call of a fresh process "
          f"(import + sh_basis): {statistics.median(first_call_ms() for _ in range(3)):.0f} ms")
    idle = interleaved(fns)
    stop = mp.Event()
    procs = [mp.Process(target=busy, args=(stop,), daemon=True) for _ in range(ncpu)]
    for p in procs:
        p.start()
    time.sleep(0.5)
    try:
        loaded = interleaved(fns)
    finally:
        stop.set()
        for p in procs:
            p.join()
    print("\n| call | idle median (ms) | under load (ms) | load / idle |\n|---|---:|---:|---:|")
    for k in fns:
        print(f"| {k} | {idle[k]:.2f} | {loaded[k]:.2f} | {loaded[k] / idle[k]:.1f}x |")
    pairs = [(k, k.replace("locdiff sh_synthesis", "ducc0 synthesis_2d")) for k in fns if "sh_synthesis" in k]
    pairs = [(ours, theirs) for ours, theirs in pairs if theirs in fns]
    if pairs:
        print("\n| synthesis | ducc0 / locdiff idle | ducc0 / locdiff under load |\n|---|---:|---:|")
        for ours, theirs in pairs:
            case = ours.split(" ", 2)[2]
            print(f"| {case} | {idle[theirs] / idle[ours]:.2f}x | {loaded[theirs] / loaded[ours]:.2f}x |")


if __name__ == "__main__":
    main()
