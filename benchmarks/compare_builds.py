"""Times the kernel ops of whichever locdiff_ext is installed and prints one JSON line of median ms.

Compare two builds (e.g. before and after a change) on one machine by installing each in its own venv
and alternating runs, since these machines are noisy (BENCHMARKS.md, section 5):
    for i in 1 2 3 4 5; do venv_a/bin/python benchmarks/compare_builds.py > a_$i.json
                           venv_b/bin/python benchmarks/compare_builds.py > b_$i.json; done
"""
import json, time
import torch
import locdiff_ext as ld

def t(fn, reps=15):
    fn()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter(); fn(); ts.append(time.perf_counter() - t0)
    ts.sort()
    return ts[len(ts) // 2] * 1e3

g = torch.Generator().manual_seed(0)
z = torch.rand(100_000, generator=g, dtype=torch.float64) * 2 - 1
c64 = torch.stack([torch.rad2deg(torch.asin(z)), torch.rand(100_000, generator=g, dtype=torch.float64) * 360 - 180], 1)
res = {}
for L in (16, 64):
    for dt in (torch.float32, torch.float64):
        c = c64.to(dt)
        res[f"sh_basis N=100k L={L} {str(dt)[6:]}"] = t(lambda: ld.sh_basis(c, L))
for L in (32, 64, 128):
    x = ld.shdd_encode(c64[:64], L)
    res[f"sh_synthesis B=64 L={L} grid"] = t(lambda: ld.sh_synthesis(x, 2 * L + 2, 4 * L + 4), reps=5)
    res[f"shdd_decode B=64 L={L}"] = t(lambda: ld.shdd_decode(x), reps=5)
print(json.dumps(res))
