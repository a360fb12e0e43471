"""Console script ``locdiff``.

Subcommands so far: ``bench`` (times the kernels on this machine and checks them against the
float64 reference).  Training, evaluation, prediction and the demo come with the model issues.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import List, Optional

import torch


def _timeit(fn, min_time: float = 0.2, max_reps: int = 50) -> float:
    """Median seconds per call over repeated calls (after one warm-up)."""
    fn()
    times = []
    start = time.perf_counter()
    while len(times) < 3 or (time.perf_counter() - start < min_time and len(times) < max_reps):
        t0 = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    times.sort()
    return times[len(times) // 2]


def _bench(args) -> int:
    import locdiff_ext as ld
    from locdiff_ext import _C
    from locdiff_ext.reference import great_circle_km, sh_basis_ref

    device = torch.device(args.device)
    if device.type == "cuda" and not (torch.cuda.is_available() and ld.has_cuda()):
        print("locdiff bench: --device cuda needs a GPU and a CUDA build of locdiff_ext", file=sys.stderr)
        return 2
    dtype = torch.float32 if args.dtype == "float32" else torch.float64
    g = torch.Generator().manual_seed(0)
    n, B = (20_000, 64) if args.quick else (100_000, 256)
    z = torch.rand(n, generator=g, dtype=torch.float64) * 2 - 1
    coords = torch.stack([torch.rad2deg(torch.asin(z)), torch.rand(n, generator=g, dtype=torch.float64) * 360 - 180], 1)
    print(f"locdiff_ext {ld.__version__}: {device}, {args.dtype}, CPU threads {_C.num_threads()}, "
          f"CUDA kernels compiled: {ld.has_cuda()}")
    print(f"{'L':>5} {'sh_basis N=' + str(n):>22} {'ns/coef':>8} {'max err':>9} "
          f"{'shdd_decode B=' + str(B):>22} {'max km':>8}")
    for L in args.degrees:
        c = coords.to(device=device, dtype=dtype)
        t_basis = _timeit(lambda: ld.sh_basis(c, L))
        ref = sh_basis_ref(c[:200].cpu().double(), L)
        err = (ld.sh_basis(c[:200], L).cpu().double() - ref).abs().max().item()
        x = ld.shdd_encode(c[:B], L)
        t_dec = _timeit(lambda: ld.shdd_decode(x))
        modes, _ = ld.shdd_decode(x)
        km = great_circle_km(modes[:, 0].cpu(), coords[:B]).max().item()
        ns = t_basis / (n * (L + 1) ** 2) * 1e9
        print(f"{L:>5} {t_basis * 1e3:>19.2f} ms {ns:>8.3f} {err:>9.1e} {t_dec * 1e3:>19.2f} ms {km:>8.1e}")
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="locdiff", description="LocDiff geolocalization")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("bench", help="time the SH kernels on this machine and check them against the float64 reference")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    p.add_argument("--degrees", type=int, nargs="+", default=[16, 64, 128], metavar="L")
    p.add_argument("--quick", action="store_true", help="smaller problem sizes")
    p.set_defaults(func=_bench)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
