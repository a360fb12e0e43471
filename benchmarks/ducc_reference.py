"""ducc0's synthesis_2d on our grid and coefficients, for the benchmarks that compare against it
(test_bench_synthesis.py, under_load.py).

Our real coefficients become ducc0's complex ones (m >= 0, healpy order) by a_l0 = c_l0 and, for m > 0,
a_lm = (-1)^m (c_{l,m} - i c_{l,-m}) / sqrt(2) (our real SH have no Condon-Shortley phase; the complex ones
do).  ducc0's geometry "F1" with phi0 = -pi + pi/nlon is exactly our cell-centred grid.  ducc0 is called once
per map (its alm argument holds components, not a batch) with the threads our kernels are given.
"""

import math

import ducc0
import numpy as np

from locdiff_ext.kernels._loader import _C


def to_ducc_alm(c: np.ndarray, L: int) -> np.ndarray:
    """Real coefficients [B, (L+1)^2] (column l*l + l + m) -> ducc0/healpy complex alm [B, nalm]."""
    B = c.shape[0]
    nalm = (L + 1) * (L + 2) // 2
    alm = np.zeros((B, nalm), dtype=np.complex128)
    for m in range(L + 1):
        ls = np.arange(m, L + 1)
        idx = m * (2 * L + 1 - m) // 2 + ls
        if m == 0:
            alm[:, idx] = c[:, ls * ls + ls]
        else:
            alm[:, idx] = (-1) ** m * (c[:, ls * ls + ls + m] - 1j * c[:, ls * ls + ls - m]) / math.sqrt(2)
    return alm


def ducc_maps(alm: np.ndarray, L: int, nlat: int, nlon: int, nthreads: int = 0) -> np.ndarray:
    """The maps [B, nlat, nlon] of alm; nthreads 0: as many as our kernels are given."""
    out = np.empty((alm.shape[0], nlat, nlon), dtype=np.float64 if alm.dtype == np.complex128 else np.float32)
    for b in range(alm.shape[0]):
        ducc0.sht.synthesis_2d(alm=alm[b:b + 1], spin=0, lmax=L, geometry="F1", ntheta=nlat, nphi=nlon,
                               phi0=-math.pi + math.pi / nlon, nthreads=nthreads or _C.num_threads(), map=out[b:b + 1])
    return out
