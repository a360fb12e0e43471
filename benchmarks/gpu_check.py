"""One-call GPU check of the CUDA kernels: every op CUDA vs CPU, then timings, as one Markdown table.

Run by benchmarks/gpu_check.sh after it has built the extension for the local GPU and run the CUDA tests.
``--device cpu --quick`` runs every code path on the CPU with small sizes (the dry run the tests do, so
that the script works the first time it meets a GPU); the real check needs ``--device cuda``.

Rows: correctness (max error of each op on CUDA against the CPU kernel, float64 and float32), then
sh_basis write bandwidth against a device-to-device copy of the same bytes, sh_synthesis against
torch-harmonics' InverseRealSHT (where installed) on the same grid, shdd_decode against a cuBLAS dense
decode (matmul with the precomputed grid basis + argmax), a bf16 training step (samples/s) and geolocate
throughput (embeddings/s, B = 1024, 25 steps, 16 samples) at L = 32 and 64.
"""

from __future__ import annotations

import argparse
import math
import platform
import sys
import tempfile
import time

import torch

import locdiff_ext as ld
from locdiff_ext.kernels import ops
from locdiff_ext.data import EmbeddingDataset
from locdiff_ext.kernels.geometry import great_circle_km
from locdiff_ext.train import TrainConfig, Trainer

ROWS: list = []


def row(what: str, value: str, target: str = "", note: str = "") -> None:
    ROWS.append((what, value, target, note))
    print(f"  {what}: {value} {target} {note}", file=sys.stderr, flush=True)


def timed(fn, device: str, reps: int) -> float:
    """Median seconds of ``reps`` calls after one warm-up, synchronised on CUDA (CUDA events)."""
    fn()
    times = []
    for _ in range(reps):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def correctness(device: str, quick: bool) -> bool:
    """Each op on ``device`` against the CPU kernels, both dtypes; returns False on any failure."""
    ok = True
    g = torch.Generator().manual_seed(0)
    for L in ([8] if quick else [8, 32, 64]):
        n, B = (200, 5) if quick else (20_000, 64)
        z = torch.rand(n, generator=g, dtype=torch.float64) * 2 - 1
        coords = torch.stack([torch.rad2deg(torch.asin(z)), torch.rand(n, generator=g, dtype=torch.float64) * 360 - 180], 1)
        coeffs = ld.shdd_encode(coords[:B], L) + 0.05 * torch.randn(B, (L + 1) ** 2, generator=g, dtype=torch.float64)
        nlat, nlon = 2 * L + 2, 4 * L + 4
        for dtype, tol in [(torch.float64, 1e-10), (torch.float32, 2e-4)]:
            c, x = coords.to(dtype), coeffs.to(dtype)
            checks = {}
            ref = ld.sh_basis(c, L)
            checks["sh_basis"] = (ld.sh_basis(c.to(device), L).cpu() - ref).abs().max().item()
            cg = c.clone().requires_grad_(True)
            ld.sh_basis(cg, L).square().sum().backward()
            cd = c.detach().to(device, copy=True).requires_grad_(True)
            ld.sh_basis(cd, L).square().sum().backward()
            checks["sh_basis backward"] = ((cd.grad.cpu() - cg.grad).abs().max() / cg.grad.abs().max()).item()
            ref = ld.sh_synthesis(x, nlat, nlon)
            checks["sh_synthesis"] = ((ld.sh_synthesis(x.to(device), nlat, nlon).cpu() - ref).abs().max()
                                      / ref.abs().max()).item()
            grid = torch.randn(B, nlat, nlon, generator=g, dtype=torch.float64).to(dtype)
            ref = torch.ops.locdiff.sh_synthesis_backward(grid, L)
            got = torch.ops.locdiff.sh_synthesis_backward(grid.to(device), L).cpu()
            checks["sh_synthesis backward"] = ((got - ref).abs().max() / ref.abs().max()).item()
            ref_c, _ = ld.shdd_decode(x)
            got_c, _ = ld.shdd_decode(x.to(device))
            km = great_circle_km(got_c.cpu()[:, 0].double(), ref_c[:, 0].double()).max().item()
            checks["shdd_decode (km)"] = km
            for name, err in checks.items():
                limit = 1.0 if "km" in name else tol
                good = math.isfinite(err) and err <= limit
                ok &= good
                row(f"{name} L={L} {str(dtype)[6:]} vs CPU", f"{err:.2g}", f"<= {limit:g}", "ok" if good else "FAILED")
    return ok


def timings(device: str, quick: bool) -> None:
    reps = 3 if quick else 20
    # sh_basis: output bytes per second against a device-to-device copy of the same bytes
    for L in ([8] if quick else [16, 32, 64]):
        n = 2_000 if quick else 1_000_000
        coords = torch.zeros(n, 2, dtype=torch.float32, device=device)
        coords[:, 0].uniform_(-90, 90)
        coords[:, 1].uniform_(-180, 180)
        out_bytes = n * (L + 1) ** 2 * 4
        t = timed(lambda: ld.sh_basis(coords, L), device, reps)
        buf = torch.empty(out_bytes // 4, device=device)
        dst = torch.empty_like(buf)
        tc = timed(lambda: dst.copy_(buf), device, reps)
        # a copy reads and writes: its bandwidth counts both
        row(f"sh_basis N={n} L={L} float32", f"{out_bytes / t / 1e9:.0f} GB/s written",
            ">= 50% of copy", f"copy {2 * out_bytes / tc / 1e9:.0f} GB/s ({out_bytes / t / (2 * out_bytes / tc):.0%})")
    # synthesis vs torch-harmonics, decode vs a dense cuBLAS decode
    try:
        import torch_harmonics as th
    except Exception:  # noqa: BLE001 (not installed, or built for another torch)
        th = None
    for L in ([8] if quick else [32, 64]):
        B = 16 if quick else 1024
        nlat, nlon = 2 * L + 2, 4 * L + 4
        x = torch.randn(B, (L + 1) ** 2, device=device)
        t = timed(lambda: ld.sh_synthesis(x, nlat, nlon), device, reps)
        note = ""
        if th is not None:
            try:
                isht = th.InverseRealSHT(nlat, nlon, lmax=L + 1, mmax=L + 1, grid="equiangular").to(device)
                spec = torch.randn(B, L + 1, L + 1, dtype=torch.complex64, device=device)
                tt = timed(lambda: isht(spec), device, reps)
                note = f"torch-harmonics {tt * 1e3:.2f} ms: ours at {tt / t:.2f}x its speed"
            except Exception as e:  # noqa: BLE001
                note = f"torch-harmonics failed: {type(e).__name__}"
        row(f"sh_synthesis B={B} L={L} float32", f"{t * 1e3:.2f} ms", "", note or "torch-harmonics not installed")
        td = timed(lambda: ld.shdd_decode(x), device, reps)
        basis = ld.sh_basis(ops.grid_points(nlat, nlon, dtype=torch.float32, device=device), L)
        tdense = timed(lambda: (x @ basis.T).argmax(-1), device, reps)
        row(f"shdd_decode B={B} L={L} float32 (refined)", f"{td * 1e3:.2f} ms", "<= 1 ms at L=64" if L == 64 else "",
            f"dense cuBLAS grid decode {tdense * 1e3:.2f} ms: ours at {tdense / td:.2f}x its speed")
        tg = timed(lambda: ld.shdd_decode(x, refine=False), device, reps)
        row(f"shdd_decode B={B} L={L} float32 (grid only)", f"{tg * 1e3:.2f} ms", "", "")
    # a training step (bf16 autocast on CUDA) and geolocate throughput
    for L in ([8] if quick else [32, 64]):
        torch.manual_seed(0)
        dim = 32 if quick else 512
        cfg_model = ld.LocDiffConfig(cond_dim=dim, L=L, widths=(32, 16) if quick else (1024, 512, 256))
        n = 256 if quick else 8192
        z = torch.rand(n, dtype=torch.float64) * 2 - 1
        coords = torch.stack([torch.rad2deg(torch.asin(z)), torch.rand(n, dtype=torch.float64) * 360 - 180], 1)
        data = EmbeddingDataset(torch.randn(n, dim), coords)
        batch = 64 if quick else 1024
        with tempfile.TemporaryDirectory() as tmp:
            model = ld.LocDiff(cfg_model).to(device)
            trainer = Trainer(model, data, tmp, TrainConfig(steps=10**6, batch_size=batch, eval_every=0, amp=True),
                              progress=False)
            state = {"step": 0}

            def step():
                trainer.train_step(state["step"])
                state["step"] += 1

            ts = timed(step, device, reps)
        row(f"train step L={L} batch={batch} (bf16 autocast)", f"{batch / ts:,.0f} samples/s", "", f"{ts * 1e3:.1f} ms")
        model.eval()
        N = 64 if quick else 1024
        emb = torch.randn(N, dim)
        tp = timed(lambda: model.predict(emb, num_samples=16, steps=25, batch_size=N), device, 1 if quick else 3)
        row(f"geolocate L={L} B={N}, 25 steps x 16 samples", f"{N / tp:,.0f} embeddings/s",
            ">= 10,000/s at L=32" if L == 32 else "", "default guidance")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--quick", action="store_true", help="small sizes (the CPU dry run)")
    args = ap.parse_args(argv)
    if args.device == "cuda":
        if not torch.cuda.is_available():
            print("gpu_check: no CUDA GPU visible to torch (torch.cuda.is_available() is False): nothing to check",
                  file=sys.stderr)
            return 2
        if not ld.has_cuda():
            print("gpu_check: locdiff_ext was built without its CUDA kernels (no nvcc at build time?)", file=sys.stderr)
            return 2
        name = torch.cuda.get_device_name()
    else:
        name = f"CPU ({platform.processor() or platform.machine()}), dry run"
    print(f"gpu_check on {name}, torch {torch.__version__}", file=sys.stderr)
    ok = correctness(args.device, args.quick)
    timings(args.device, args.quick)
    print(f"\n### GPU check: {name}, torch {torch.__version__}, {time.strftime('%Y-%m-%d')}\n")
    print("| what | measured | target | note |\n|---|---:|---|---|")
    for r in ROWS:
        print("| " + " | ".join(r) + " |")
    if not ok:
        print("\ngpu_check: some CUDA results differ from the CPU kernels (rows marked FAILED)", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
