"""How accurate the CUDA kernels' float32 compute path is, measured on the CPU (issue 11, section 3).

csrc/sh_cuda.cu runs sh_basis and sh_synthesis for float32 data in float arithmetic up to a degree
(kFloatBasisMaxL, kFloatSynthesisMaxL) and in double above it.  No GPU is needed to choose those degrees:
this script repeats the kernels' float operations in numpy float32, step for step (cos/sin of the
colatitude rounded to float, float recurrence tables, the sectoral start exp(logsect + m log u), the
three-term recurrence, the rotation of the Fourier stage re-anchored every 16 orders), and compares them
with the float64 reference on the float32 inputs.  The criterion is the issue's: within 1e-5 (sh_basis:
absolute; sh_synthesis: relative to the map's largest value).  CUDA's expf/sincosf are within 2 ulp, numpy's
within 1: expect the GPU a little worse, hence the margin in the chosen degrees.

Run:  python benchmarks/cuda_float_emulation.py      (about a minute)
"""

from __future__ import annotations

import math

import numpy as np
import torch

from locdiff_ext.kernels.reference import sh_basis_ref, sh_synthesis_ref

F = np.float32
Y00 = 0.5 / math.sqrt(math.pi)
BASIS_MAX_L, SYNTHESIS_MAX_L = 16, 32  # csrc/sh_cuda.cu's kFloatBasisMaxL, kFloatSynthesisMaxL


def tables(L: int):
    """The recurrence tables of sh_math.h's fill_tables, rounded to float (as the device's float copies)."""
    a, b = np.zeros((L + 1, L + 1)), np.zeros((L + 1, L + 1))
    for l in range(1, L + 1):
        for m in range(l):
            a[l, m] = math.sqrt((4 * l * l - 1) / (l * l - m * m))
            if l - 1 > m:
                b[l, m] = math.sqrt(((l - 1) ** 2 - m * m) / (4 * (l - 1) ** 2 - 1))
    logsect = np.cumsum([math.log(Y00)] + [0.5 * math.log((2 * m + 1) / (2 * m)) for m in range(1, L + 1)])
    return a.astype(F), b.astype(F), logsect.astype(F)


def sectoral(logsect, m: int, u):
    if m == 0:
        return np.full_like(u, F(Y00))
    with np.errstate(divide="ignore"):
        return np.where(u <= 0, F(0), np.exp(logsect[m] + F(m) * np.log(u))).astype(F)


def order_trig(m: int, phi):
    """sqrt2 cos(m phi), sqrt2 sin(m phi): the angle reduced in double, sin/cos in float."""
    a = m * phi
    a = (a - 2 * math.pi * np.rint(a / (2 * math.pi))).astype(F)
    return F(math.sqrt(2)) * np.cos(a), F(math.sqrt(2)) * np.sin(a)


def legendre_rows(x, u, L: int, m: int, a, b, logsect):
    """Pbar_lm for l = m..L by the float recurrence (basis_kernel / ring_legendre)."""
    p1, p2 = sectoral(logsect, m, u), np.zeros_like(x)
    for l in range(m, L + 1):
        if l == m:
            pv, p1 = p1, np.zeros_like(x)
        else:
            pv = (a[l, m] * (x * p1 - b[l, m] * p2)).astype(F)
        p2, p1 = p1, pv
        yield l, pv


def basis_float(coords: np.ndarray, L: int) -> np.ndarray:
    lat = np.deg2rad(coords[:, 0])
    phi = np.deg2rad((coords[:, 1] + 180.0) % 360.0 - 180.0)
    theta = math.pi / 2 - lat
    x, u = np.cos(theta).astype(F), np.sin(theta).astype(F)
    a, b, logsect = tables(L)
    out = np.zeros((len(coords), (L + 1) ** 2), F)
    for m in range(L + 1):
        cm, sm = (F(1), F(0)) if m == 0 else order_trig(m, phi)
        for l, pv in legendre_rows(x, u, L, m, a, b, logsect):
            if m == 0:
                out[:, l * l + l] = pv
            else:
                out[:, l * l + l + m], out[:, l * l + l - m] = pv * cm, pv * sm
    return out


def synthesis_float(c: np.ndarray, L: int, nlat: int, nlon: int) -> np.ndarray:
    a, b, logsect = tables(L)
    out = np.zeros((c.shape[0], nlat, nlon), F)
    phi = -math.pi + (np.arange(nlon) + 0.5) * 2 * math.pi / nlon
    s1, c1 = np.sin(phi.astype(F)), np.cos(phi.astype(F))
    for j in range(nlat):
        th = (j + 0.5) * math.pi / nlat
        x, u = np.array([math.cos(th)], F), np.array([math.sin(th)], F)
        gc, gs = np.zeros((c.shape[0], L + 1), F), np.zeros((c.shape[0], L + 1), F)
        for m in range(L + 1):
            for l, pv in legendre_rows(x, u, L, m, a, b, logsect):
                gc[:, m] += c[:, l * l + l + m] * pv[0]
                if m:
                    gs[:, m] += c[:, l * l + l - m] * pv[0]
        cm, sm, f = np.ones(nlon, F), np.zeros(nlon, F), np.repeat(gc[:, :1], nlon, 1)
        for m in range(1, L + 1):
            cm, sm = cm * c1 - sm * s1, sm * c1 + cm * s1
            if m % 16 == 0:
                cm, sm = (v * F(1 / math.sqrt(2)) for v in order_trig(m, phi))
            f = f + F(math.sqrt(2)) * (gc[:, m:m + 1] * cm + gs[:, m:m + 1] * sm)
        out[:, j] = f
    return out


def uniform_coords(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    lat = torch.rad2deg(torch.asin(torch.rand(n, generator=g, dtype=torch.float64) * 2 - 1))
    lon = torch.rand(n, generator=g, dtype=torch.float64) * 360 - 180
    return torch.stack([lat, lon], 1).float()


def main() -> None:
    print("| L | sh_basis max abs error (2000 points) | sh_synthesis max error / max abs (3 x 4 maps) | compute |")
    print("|---:|---:|---:|---|")
    for L in (8, 12, 16, 20, 24, 32, 40, 48, 56, 64):
        c = uniform_coords(2000, seed=L)
        e_basis = np.abs(basis_float(c.double().numpy(), L) - sh_basis_ref(c.double(), L).numpy()).max()
        e_syn = 0.0
        for seed in range(3):
            x = torch.randn(4, (L + 1) ** 2, generator=torch.Generator().manual_seed(seed)).double()
            ref = sh_synthesis_ref(x, 2 * L + 2, 4 * L + 4).numpy()
            got = synthesis_float(x.float().numpy(), L, 2 * L + 2, 4 * L + 4)
            e_syn = max(e_syn, np.abs(got - ref).max() / max(1.0, np.abs(ref).max()))
        ops = (("sh_basis", BASIS_MAX_L), ("sh_synthesis", SYNTHESIS_MAX_L))
        which = ", ".join(name for name, top in ops if L <= top)
        print(f"| {L} | {e_basis:.1e} | {e_syn:.1e} | float: {which or 'neither'} |", flush=True)


if __name__ == "__main__":
    main()
