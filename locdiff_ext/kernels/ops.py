"""Torch custom ops (namespace ``locdiff``) over the C++/CUDA kernels.

House style of pytorch/extension-cpp: one thin custom op per kernel, a fake (meta) impl beside it
so that torch.compile can trace it, and autograd registered next to the op.  The ops pass data
pointers to ``locdiff_ext._C`` (which does not link libtorch); the public functions at the bottom
validate arguments and raise ``TypeError``/``ValueError`` naming the offending argument.

Data-dependent checks (NaN coordinates, |lat| > 90, output size) run inside the op bodies, which
execute eagerly even inside a compiled graph, so ``torch.compile(fullgraph=True)`` still works.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import numpy as np
import torch
from torch import Tensor

from ..checks import check_fits, check_int
from ._loader import MAX_DEGREE, _C
from .geometry import EARTH_RADIUS_KM, grid_latlon, grid_points

__all__ = [
    "sh_basis",
    "shdd_encode",
    "sh_synthesis",
    "shdd_decode",
    "grid_latlon",
    "grid_points",
    "num_coeffs",
    "degree_from_num_coeffs",
    "decode_grid_limits",
    "EARTH_RADIUS_KM",
    "MAX_DECODE_ITER",
]

_DTYPE_CODE = {torch.float32: 0, torch.float64: 1}
_INT32_MAX = 2**31 - 1      # the kernels take grid sizes as C ints
MAX_DECODE_ITER = 1000      # Newton steps per candidate: refinement converges in < 10


# ----------------------------------------------------------------------------- helpers


def num_coeffs(L: int) -> int:
    """Number of SH coefficients up to degree L inclusive: (L+1)^2."""
    return (L + 1) * (L + 1)


def degree_from_num_coeffs(K: int, name: str = "coeffs") -> int:
    """Inverse of num_coeffs; raises ValueError (naming ``name``) if K is not a square."""
    r = math.isqrt(K)
    if r * r != K or K == 0:
        raise ValueError(f"{name}: last dimension must be (L+1)^2 for some L >= 0, got {K}")
    return r - 1


def _device_index(t: Tensor) -> int:
    if t.device.type == "cpu":
        return -1
    if t.device.type == "cuda":
        return t.device.index if t.device.index is not None else torch.cuda.current_device()
    raise ValueError(f"tensors on device '{t.device}' are not supported (CPU or CUDA only)")


def _stream(t: Tensor) -> int:
    return torch.cuda.current_stream(t.device).cuda_stream if t.device.type == "cuda" else 0


def _ptr(t: Optional[Tensor]) -> int:
    return 0 if t is None else t.data_ptr()


_BAD_NONFINITE, _BAD_LATITUDE = 1, 2  # bits of the CPU sh_basis kernel's result (csrc/kernels.h)


def _raise_bad_coords(bad: int) -> None:
    if bad & _BAD_NONFINITE:
        raise ValueError("coords contains NaN or infinite values")
    if bad & _BAD_LATITUDE:
        raise ValueError("coords: latitude (coords[..., 0]) must lie in [-90, 90] degrees")


def _check_coord_values(coords: Tensor) -> None:
    if coords.numel() == 0:
        return
    if not bool(torch.isfinite(coords).all()):
        _raise_bad_coords(_BAD_NONFINITE)
    if bool((coords[:, 0].abs() > 90.0).any()):
        _raise_bad_coords(_BAD_LATITUDE)


# Checks of CPU data run in numpy (zero-copy views): single-threaded and 5-10x faster than the torch
# reductions they replace (torch.isfinite(x).all(): 126 us vs 19 us on [64, 1089] float64), and free of
# the OpenMP fork-join that stalls a call for a scheduler time slice when another process holds the
# cores (BENCHMARKS 1e).


def _check_finite(x: Tensor, name: str) -> None:
    if not x.numel():
        return
    finite = np.isfinite(x.detach().numpy()).all() if x.device.type == "cpu" else torch.isfinite(x).all()
    if not bool(finite):
        raise ValueError(f"{name} contains NaN or infinite values")


def _row_absmax(x: Tensor) -> Tensor:
    """max |x| per row of a [B, K] tensor, as [B, 1]; NaN where a row holds a NaN, inf where an inf."""
    if x.device.type == "cpu":
        a = x.detach().numpy()
        return torch.from_numpy(np.maximum(a.max(axis=1), -a.min(axis=1))[:, None])
    return torch.linalg.vector_norm(x, float("inf"), dim=-1, keepdim=True)


def _threads() -> int:
    return max(1, int(_C.num_threads()))


def _separable_work_bytes(L: int, nlon: int) -> int:
    """Per-thread buffers of the separable transform (csrc/separable.h, W = 8 rows at a time): the rows'
    coefficients by order, the Legendre sums of a group of 16 ring pairs, the Legendre table, FFT buffers."""
    M = L + 1
    return 64 * M * (M + 2) + 4400 * M + 700 * nlon + 4096


def _synthesis_bytes(B: int, L: int, nlat: int, nlon: int, esize: int) -> int:
    """Output plus working memory of sh_synthesis."""
    return B * nlat * nlon * esize + _threads() * _separable_work_bytes(L, nlon)


def _decode_bytes(B: int, L: int, top_k: int, nlat: int, nlon: int, candidates: int, esize: int) -> int:
    """Outputs plus working memory of shdd_decode: the separable transform's buffers, the last three rings
    of each hemisphere for 8 rows, the refinement's rows and candidate lists (the map itself is never held)."""
    M = L + 1
    return 3 * B * top_k * esize + _threads() * (_separable_work_bytes(L, nlon) + 192 * nlon + 64 * M
                                                  + 8 * 48 * (candidates + 1))


# ----------------------------------------------------------------------------- sh_basis / shdd_encode


def _basis_impl(coords: Tensor, L: int, weights: Optional[Tensor], out: Optional[Tensor] = None) -> Tensor:
    if coords.device.type != "cpu":  # the CPU kernel checks the coordinates in its own pass over them
        _check_coord_values(coords)
    if weights is not None:
        _check_finite(weights, "weights")
    n, K = coords.shape[0], num_coeffs(L)
    if out is None:
        check_fits(n * K * coords.element_size(), coords.device, "coords/L")
        out = coords.new_empty((n, K))
    if n:
        _raise_bad_coords(_C.sh_basis(_ptr(coords), _ptr(out), n, L, _ptr(weights), _DTYPE_CODE[coords.dtype],
                                      _device_index(coords), _stream(coords)))
    return out


@torch.library.custom_op("locdiff::sh_basis", mutates_args=())
def _sh_basis_op(coords: Tensor, L: int) -> Tensor:
    return _basis_impl(coords, L, None)


@_sh_basis_op.register_fake
def _(coords: Tensor, L: int) -> Tensor:
    return coords.new_empty((coords.shape[0], num_coeffs(L)))


@torch.library.custom_op("locdiff::shdd_encode", mutates_args=())
def _shdd_encode_op(coords: Tensor, L: int, weights: Optional[Tensor]) -> Tensor:
    return _basis_impl(coords, L, weights)


@_shdd_encode_op.register_fake
def _(coords: Tensor, L: int, weights: Optional[Tensor]) -> Tensor:
    return coords.new_empty((coords.shape[0], num_coeffs(L)))


@torch.library.custom_op("locdiff::sh_basis_backward", mutates_args=())
def _sh_basis_backward_op(coords: Tensor, grad_out: Tensor, L: int, weights: Optional[Tensor]) -> Tensor:
    """Gradient of sum(grad_out * basis(coords)) w.r.t. coords in degrees: the analytic derivative
    kernel, fused so that the [N, 2, K] Jacobian is never materialised."""
    n = coords.shape[0]
    grad_coords = coords.new_empty((n, 2))
    if n:
        _C.sh_basis_backward(_ptr(coords), _ptr(grad_out), _ptr(grad_coords), n, L, _ptr(weights),
                             _DTYPE_CODE[coords.dtype], _device_index(coords), _stream(coords))
    return grad_coords


@_sh_basis_backward_op.register_fake
def _(coords: Tensor, grad_out: Tensor, L: int, weights: Optional[Tensor]) -> Tensor:
    return coords.new_empty((coords.shape[0], 2))


def _basis_setup_context(ctx, inputs, output):
    coords, L = inputs[0], inputs[1]
    weights = inputs[2] if len(inputs) > 2 else None
    ctx.save_for_backward(coords, weights)
    ctx.L = L
    ctx.has_weights = len(inputs) > 2


def _basis_backward(ctx, grad):
    coords, weights = ctx.saved_tensors
    grad_coords = None
    if ctx.needs_input_grad[0]:
        grad_coords = _sh_basis_backward_op(coords, grad.contiguous(), ctx.L, weights)
    return (grad_coords, None, None) if ctx.has_weights else (grad_coords, None)


torch.library.register_autograd("locdiff::sh_basis", _basis_backward, setup_context=_basis_setup_context)
torch.library.register_autograd("locdiff::shdd_encode", _basis_backward, setup_context=_basis_setup_context)


# ----------------------------------------------------------------------------- sh_synthesis


def _synthesis_impl(coeffs: Tensor, nlat: int, nlon: int) -> Tensor:
    _check_finite(coeffs, "coeffs")
    B, K = coeffs.shape
    L = degree_from_num_coeffs(K)
    check_fits(_synthesis_bytes(B, L, nlat, nlon, coeffs.element_size()), coeffs.device, "coeffs/nlat/nlon")
    out = coeffs.new_empty((B, nlat, nlon))
    if B and nlat and nlon:
        _C.sh_synthesis(_ptr(coeffs), _ptr(out), B, L, nlat, nlon, _DTYPE_CODE[coeffs.dtype],
                        _device_index(coeffs), _stream(coeffs))
    return out


@torch.library.custom_op("locdiff::sh_synthesis", mutates_args=())
def _sh_synthesis_op(coeffs: Tensor, nlat: int, nlon: int) -> Tensor:
    return _synthesis_impl(coeffs, nlat, nlon)


@_sh_synthesis_op.register_fake
def _(coeffs: Tensor, nlat: int, nlon: int) -> Tensor:
    return coeffs.new_empty((coeffs.shape[0], nlat, nlon))


@torch.library.custom_op("locdiff::sh_synthesis_backward", mutates_args=())
def _sh_synthesis_backward_op(grad: Tensor, L: int) -> Tensor:
    """Adjoint of sh_synthesis: grad [B, nlat, nlon] -> sum_jk grad_jk Y_lm(t_j, p_k) [B, (L+1)^2].
    CPU: the transposed separable kernel; CUDA: batched matmuls (``_synthesis_adjoint_matmul``)."""
    B, nlat, nlon = grad.shape
    if grad.device.type == "cuda":
        return _synthesis_adjoint_matmul(grad, L)
    check_fits(B * num_coeffs(L) * grad.element_size() + _threads() * (_separable_work_bytes(L, nlon) + 64 * nlon),
               grad.device, "grad/L")
    out = grad.new_empty((B, num_coeffs(L)))
    if B:
        _C.sh_synthesis_backward(_ptr(grad), _ptr(out), B, L, nlat, nlon, _DTYPE_CODE[grad.dtype])
    return out


@_sh_synthesis_backward_op.register_fake
def _(grad: Tensor, L: int) -> Tensor:
    return grad.new_empty((grad.shape[0], num_coeffs(L)))


def _synthesis_setup_context(ctx, inputs, output):
    coeffs = inputs[0]
    ctx.L = degree_from_num_coeffs(coeffs.shape[-1])


def _synthesis_backward(ctx, grad):
    return _sh_synthesis_backward_op(grad.contiguous(), ctx.L), None, None


def _synthesis_backward_setup_context(ctx, inputs, output):
    grad = inputs[0]
    ctx.grid = tuple(grad.shape[1:])


def _synthesis_backward_backward(ctx, gg):
    return _sh_synthesis_op(gg.contiguous(), *ctx.grid), None


torch.library.register_autograd("locdiff::sh_synthesis", _synthesis_backward, setup_context=_synthesis_setup_context)
torch.library.register_autograd("locdiff::sh_synthesis_backward", _synthesis_backward_backward,
                                setup_context=_synthesis_backward_setup_context)

_ADJOINT_TABLES: dict = {}


def _synthesis_adjoint_matmul(grad: Tensor, L: int) -> Tensor:
    """The adjoint as two batched matmuls, for devices without a separable kernel (CUDA): Fourier sums
    against [nlon, L+1] cos/sin tables, then per-order Legendre sums against a [L+1, nlat, L+1] table of
    Pbar_lm at the rings (from sh_basis at longitude 0).  O(B nlat (nlon + L^2)) work on the GPU's BLAS."""
    B, nlat, nlon = grad.shape
    M, K = L + 1, num_coeffs(L)
    key = (L, nlat, nlon, grad.device, grad.dtype)
    if key not in _ADJOINT_TABLES:
        lat, lon = grid_latlon(nlat, nlon)
        phi = torch.deg2rad(lon)
        m = torch.arange(M, dtype=torch.float64)
        norm = torch.where(m > 0, math.sqrt(2.0), 1.0)
        cos = torch.cos(phi[:, None] * m) * norm
        sin = torch.sin(phi[:, None] * m) * norm * (m > 0)
        Y = _basis_impl(torch.stack([lat, torch.zeros_like(lat)], 1), L, None)  # [nlat, K], CPU float64
        l = torch.arange(M)
        mm, ll = torch.meshgrid(torch.arange(M), l, indexing="ij")  # [m, l]
        valid = ll >= mm
        cols = (ll * ll + ll + mm).clamp(max=K - 1)
        P = Y[:, cols] / norm[mm] * valid  # [nlat, m, l] = Pbar_lm(cos t_j); Y_lm(t, 0) = sqrt2 Pbar_lm
        k = torch.arange(K)
        deg = torch.floor(torch.sqrt(k.double())).long()
        order = k - deg * deg - deg
        index = (order < 0).long() * M * M + order.abs() * M + deg  # into [cos | sin] x [m, l]
        tables = (torch.cat([cos, sin], 1), P.permute(1, 0, 2).contiguous(), index)
        _ADJOINT_TABLES[key] = tuple(t.to(grad.device, grad.dtype if t.is_floating_point() else t.dtype)
                                     for t in tables)
    fourier, legendre, index = _ADJOINT_TABLES[key]
    ab = (grad.reshape(B * nlat, nlon) @ fourier).reshape(B, nlat, 2, M)   # [B, j, cos/sin, m]
    ab = ab.permute(2, 3, 0, 1).reshape(2 * M, B, nlat)                    # [(cos/sin, m), B, j]
    c = torch.bmm(ab, legendre.repeat(2, 1, 1))                            # [(cos/sin, m), B, l]
    return c.permute(1, 0, 2).reshape(B, 2 * M * M)[:, index]


# ----------------------------------------------------------------------------- shdd_decode


def _decode_impl(coeffs: Tensor, top_k: int, nlat: int, nlon: int, candidates: int, max_iter: int,
                 min_separation: float) -> Tuple[Tensor, Tensor]:
    B, K = coeffs.shape
    amax = _row_absmax(coeffs)  # NaN/inf rows give NaN/inf
    if B and not bool(torch.isfinite(amax).all()):
        raise ValueError("coeffs contains NaN or infinite values")
    coeffs, scale = _scale_rows(coeffs, amax)
    L = degree_from_num_coeffs(K)
    check_fits(_decode_bytes(B, L, top_k, nlat or 2 * L + 2, nlon or 2 * (nlat or 2 * L + 2),
                             candidates or 2 * top_k + 2, coeffs.element_size()), coeffs.device, "coeffs/top_k/grid")
    out_coords = coeffs.new_empty((B, top_k, 2))
    out_scores = coeffs.new_empty((B, top_k))
    if B:
        _C.shdd_decode(_ptr(coeffs), _ptr(out_coords), _ptr(out_scores), B, L, top_k, nlat, nlon,
                       candidates, max_iter, min_separation, _DTYPE_CODE[coeffs.dtype],
                       _device_index(coeffs), _stream(coeffs))
    return out_coords, out_scores if scale is None else out_scores / scale


@torch.library.custom_op("locdiff::shdd_decode", mutates_args=())
def _shdd_decode_op(
    coeffs: Tensor, top_k: int, nlat: int, nlon: int, candidates: int, max_iter: int, min_separation: float
) -> Tuple[Tensor, Tensor]:
    return _decode_impl(coeffs, top_k, nlat, nlon, candidates, max_iter, min_separation)


def _scale_rows(coeffs: Tensor, amax: Tensor) -> Tuple[Tensor, Optional[Tensor]]:
    """Modes do not depend on the scale of f, but the float32 coarse map does: rows whose largest
    |c| lies outside [2^-60, 2^60] (|c| ~ 1e-45 underflows it, 1e40 overflows it) are scaled by an exact
    power of two into [0.5, 1).  Ordinary rows are left alone, at no cost."""
    nz = amax[amax > 0]
    if not nz.numel() or (float(nz.min()) >= 2.0 ** -60 and float(nz.max()) <= 2.0 ** 60):
        return coeffs, None
    lim = 1000 if coeffs.dtype == torch.float64 else 120  # 2^lim must be representable in the dtype
    scale = torch.ldexp(torch.ones_like(amax), -torch.frexp(amax)[1].clamp(-lim, lim))
    return coeffs * scale, scale


@_shdd_decode_op.register_fake
def _(coeffs, top_k, nlat, nlon, candidates, max_iter, min_separation):
    B = coeffs.shape[0]
    return coeffs.new_empty((B, top_k, 2)), coeffs.new_empty((B, top_k))


# ----------------------------------------------------------------------------- public API


def _eager(*tensors: Optional[Tensor]) -> bool:
    """True where a public function may run the op's body directly: eager mode, plain CPU/CUDA tensors,
    no gradient to record.  Same result; it skips the dispatcher, whose custom-op wrapper imports
    torch._dynamo on the first call of a process (1.2-1.8 s on the CI machine: the whole first-call
    latency of our kernels).  Under torch.compile, for fake/meta tensors and for autograd, the op is used."""
    if torch.compiler.is_compiling():
        return False
    grad = torch.is_grad_enabled()
    for t in tensors:
        if t is not None and (type(t) is not Tensor or t.device.type not in ("cpu", "cuda")
                              or (grad and t.requires_grad)):
            return False
    return True


def _check_float(x, name: str) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in _DTYPE_CODE:
        raise TypeError(f"{name} must be float32 or float64, got {x.dtype}")


def _prep_coords(coords) -> Tuple[Tensor, Tuple[int, ...]]:
    _check_float(coords, "coords")
    if coords.dim() < 1 or coords.shape[-1] != 2:
        raise ValueError(f"coords must have shape [..., 2] (lat, lon in degrees), got {tuple(coords.shape)}")
    lead = tuple(coords.shape[:-1])
    # no copy for a contiguous input; the kernels wrap longitudes exactly (fmod first: |lon| of 1e20 keeps its angle)
    return coords.reshape(-1, 2).contiguous(), lead


def _check_out(out, flat: Tensor, shape: Tuple[int, ...]) -> Tensor:
    """``out=`` of sh_basis / shdd_encode: a contiguous tensor of the result's shape, dtype and device, not
    overlapping ``coords``, in an eager call that records no gradient."""
    if not isinstance(out, Tensor):
        raise TypeError(f"out must be a torch.Tensor, got {type(out).__name__}")
    if out.dtype != flat.dtype:
        raise TypeError(f"out dtype {out.dtype} differs from coords dtype {flat.dtype}")
    if out.device != flat.device:
        raise ValueError(f"out is on {out.device} but coords is on {flat.device}")
    if tuple(out.shape) != shape:
        raise ValueError(f"out must have shape {shape}, got {tuple(out.shape)}")
    if not out.is_contiguous():
        raise ValueError("out must be contiguous")
    if not _eager(flat) or (torch.is_grad_enabled() and out.requires_grad):
        raise ValueError("out= is for eager calls that record no gradient (coords.requires_grad, out.requires_grad "
                         "or torch.compile): call without out=")
    a0, a1 = out.data_ptr(), out.data_ptr() + out.numel() * out.element_size()
    b0, b1 = flat.data_ptr(), flat.data_ptr() + flat.numel() * flat.element_size()
    if out.numel() and flat.numel() and a0 < b1 and b0 < a1:
        raise ValueError("out overlaps coords")
    return out.view(-1, shape[-1])


def sh_basis(coords: Tensor, L: int, out: Optional[Tensor] = None) -> Tensor:
    """Real orthonormal spherical harmonics (no Condon-Shortley phase) up to degree ``L`` at
    ``coords`` [..., 2] = (lat, lon) degrees.  Returns [..., (L+1)^2], column l*l + l + m.
    Differentiable w.r.t. ``coords`` (analytic derivative kernel).

    ``out``: a tensor to write the result into (and return), for loops that call this with one size
    again and again: a fresh output's pages cost the operating system as much time to clear as the
    kernel takes to fill them (BENCHMARKS.md 1f)."""
    L = check_int(L, "L", 0, MAX_DEGREE)
    flat, lead = _prep_coords(coords)
    return _encode(flat, lead, L, None, out)


def shdd_encode(coords: Tensor, L: int, weights: Optional[Tensor] = None, out: Optional[Tensor] = None) -> Tensor:
    """SHDD vector of each location: the SH coefficients of the Dirac delta at ``coords``, i.e. the
    basis evaluated there, optionally multiplied per degree by ``weights`` [L+1] (a taper).
    ``out``: as for sh_basis."""
    if weights is None:
        return sh_basis(coords, L, out=out)
    L = check_int(L, "L", 0, MAX_DEGREE)
    flat, lead = _prep_coords(coords)
    _check_float(weights, "weights")
    if weights.shape != (L + 1,):
        raise ValueError(f"weights must have shape [L+1] = [{L + 1}], got {tuple(weights.shape)}")
    if weights.device != flat.device:
        raise ValueError(f"weights is on {weights.device} but coords is on {flat.device}")
    if weights.dtype != flat.dtype:
        raise TypeError(f"weights dtype {weights.dtype} differs from coords dtype {flat.dtype}")
    if weights.requires_grad:
        raise ValueError("weights: gradients with respect to the per-degree weights are not supported; pass "
                         "weights.detach() (gradients with respect to coords are)")
    return _encode(flat, lead, L, weights.contiguous(), out)


def _encode(flat: Tensor, lead: Tuple[int, ...], L: int, weights: Optional[Tensor], out: Optional[Tensor]) -> Tensor:
    """sh_basis / shdd_encode on checked arguments: into ``out``, or a new tensor (through the custom op
    where autograd or torch.compile needs it)."""
    shape = lead + (num_coeffs(L),)
    if out is not None:
        _basis_impl(flat, L, weights, _check_out(out, flat, shape))
        return out
    if _eager(flat):
        res = _basis_impl(flat, L, weights)
    else:
        res = _sh_basis_op(flat, L) if weights is None else _shdd_encode_op(flat, L, weights)
    return res.reshape(shape)


def _prep_coeffs(coeffs) -> Tuple[Tensor, Tuple[int, ...], int]:
    _check_float(coeffs, "coeffs")
    if coeffs.dim() < 1:
        raise ValueError("coeffs must have shape [..., (L+1)^2]")
    L = degree_from_num_coeffs(coeffs.shape[-1])
    if L > MAX_DEGREE:
        raise ValueError(f"coeffs: degree L={L} exceeds the supported maximum {MAX_DEGREE}")
    lead = tuple(coeffs.shape[:-1])
    return coeffs.reshape(-1, coeffs.shape[-1]).contiguous(), lead, L


def sh_synthesis(coeffs: Tensor, nlat: int, nlon: int) -> Tensor:
    """The band-limited function sum_lm c_lm Y_lm on an equiangular cell-centred grid (see
    ``grid_latlon``): [..., nlat, nlon].  Separable: Legendre sums per north/south ring pair, then a
    real FFT per ring (any nlon), O(B nlat (L^2 / 2 + nlon log nlon)).  Differentiable w.r.t. ``coeffs``:
    the backward pass is the adjoint transform (same cost), so a loss on the grid costs no [grid, K] basis."""
    flat, lead, _ = _prep_coeffs(coeffs)
    nlat = check_int(nlat, "nlat", 1, _INT32_MAX)
    nlon = check_int(nlon, "nlon", 1, _INT32_MAX)
    out = _synthesis_impl(flat, nlat, nlon) if _eager(flat) else _sh_synthesis_op(flat, nlat, nlon)
    return out.reshape(*lead, nlat, nlon)


def decode_grid_limits(L: int) -> Tuple[Tuple[int, int], Tuple[int, int]]:
    """(nlat_min, nlat_max), (nlon_min, nlon_max) of the decoder's coarse grid at degree L.  The minimum
    is the default grid, (2L+2) x (4L+4): steps of half the main-lobe width pi/(L+1), so that every
    mode's lobe holds grid points and refinement starts inside it (coarser grids can miss the global
    maximum by thousands of km).  The maximum, 4x finer or 0.25 degree, bounds the work per row."""
    nlat_min, nlon_min = 2 * L + 2, 4 * L + 4
    return (nlat_min, max(4 * nlat_min, 720)), (nlon_min, max(4 * nlon_min, 1440))


def shdd_decode(
    coeffs: Tensor,
    top_k: int = 1,
    *,
    nlat: Optional[int] = None,
    nlon: Optional[int] = None,
    candidates: Optional[int] = None,
    refine: bool = True,
    max_iter: int = 30,
    min_separation_km: Optional[float] = None,
) -> Tuple[Tensor, Tensor]:
    """Mode-seeking SHDD decoder: the ``top_k`` largest local maxima of f = sum c_lm Y_lm per row.

    Synthesises f on a coarse grid (default ``nlat = 2L+2`` rings by ``nlon = 2 nlat``: steps of half
    the main-lobe width pi/(L+1); ``decode_grid_limits`` gives the allowed range), keeps the best
    ``candidates`` local maxima (default 2*top_k+2), refines each with trust-region Newton steps on the
    sphere (analytic derivatives; ``refine=False`` returns grid points), and keeps modes at least
    ``min_separation_km`` apart (default: the main-lobe width pi/(L+1) of arc).  Returns coords [..., top_k, 2] (lat, lon degrees, lon in [-180, 180)) and
    scores [..., top_k] (f at the mode).  Rows with fewer distinct maxima than top_k are padded
    with NaN coordinates and -inf scores.  Scale invariant: modes of c * f are those of f, scores c times
    (from 1e-300 to 1e300 in float64)."""
    flat, lead, L = _prep_coeffs(coeffs)
    (lat_lo, lat_hi), (lon_lo, lon_hi) = decode_grid_limits(L)
    nlat = 0 if nlat is None else check_int(nlat, "nlat", lat_lo, lat_hi)
    nlon = 0 if nlon is None else check_int(nlon, "nlon", lon_lo, lon_hi)
    cells = (nlat or lat_lo) * (nlon or 2 * (nlat or lat_lo))
    top_k = check_int(top_k, "top_k", 1, cells)  # a grid of `cells` points has fewer local maxima
    candidates = 0 if candidates is None else check_int(candidates, "candidates", top_k, cells)
    max_iter = check_int(max_iter, "max_iter", 0, MAX_DECODE_ITER)
    if not refine:
        max_iter = 0
    if flat.device.type == "cuda" and (candidates or 2 * top_k + 2) > 32:
        raise ValueError("top_k/candidates: the CUDA decoder refines at most 32 candidates per row "
                         "(default candidates = 2 * top_k + 2)")
    if min_separation_km is None:
        min_sep = 0.0
    else:
        if (isinstance(min_separation_km, bool) or not isinstance(min_separation_km, (int, float))
                or not math.isfinite(min_separation_km) or min_separation_km < 0):
            raise ValueError(f"min_separation_km must be a finite number >= 0, got {min_separation_km!r}")
        min_sep = max(float(min_separation_km) / EARTH_RADIUS_KM, 1e-15)
    decode = _decode_impl if _eager(flat) else _shdd_decode_op
    out_coords, out_scores = decode(flat, top_k, nlat, nlon, candidates, max_iter, min_sep)
    return out_coords.reshape(*lead, top_k, 2), out_scores.reshape(*lead, top_k)
