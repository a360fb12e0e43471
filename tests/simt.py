"""The CUDA kernels' own source run on the CPU (test-only): builds csrc/sh_cuda.cu as C++ under the SIMT
emulation (csrc/simt_emulation.h) into a shared library and calls the locdiff::cuda entry points through
ctypes on CPU tensors, so that tests compare them with the CPU ops where no GPU is present."""

import ctypes
import os
import shutil
import subprocess
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
CSRC = ROOT / "csrc"
# sh_cuda.cu is compiled as C++ (-x c++); the rest are the emulated runtime, the host tables and the C entry points.
LIBRARY_SOURCES = ["csrc/simt_emulation.cpp", "csrc/tables.cpp", "csrc/simt_entry.cpp", "tests/kernels/simt_misuse.cpp"]
FLAVOURS = {
    "plain": ["-O2"],
    "thread": ["-O1", "-g", "-fsanitize=thread"],
    "address": ["-O1", "-g", "-fsanitize=address", "-fno-omit-frame-pointer"],
}
_DTYPE = {torch.float32: 0, torch.float64: 1}


def unavailable_reason():
    """Why the emulated build cannot run here (None when it can)."""
    if not (CSRC / "sh_cuda.cu").exists():
        return "the emulated CUDA build needs the source tree's csrc/ (run pytest from a checkout)"
    if shutil.which(os.environ.get("CXX", "g++")) is None:
        return "the emulated CUDA build needs a C++20 compiler (g++ or $CXX)"
    return None


def compile_command(out, flavour="plain", main=None):
    """g++ command line: a shared library of the emulated kernels, or (main=source) an executable."""
    cxx = os.environ.get("CXX", "g++")
    cmd = [cxx, "-std=c++20", "-pthread", "-DLOCDIFF_SIMT_EMULATION", f"-I{CSRC}", *FLAVOURS[flavour]]
    cmd += ["-x", "c++", str(CSRC / "sh_cuda.cu"), "-x", "none", *(str(ROOT / s) for s in LIBRARY_SOURCES)]
    cmd += [str(main)] if main else ["-shared", "-fPIC"]
    return cmd + ["-o", str(out)]


def build(out_dir, flavour="plain", main=None):
    """Compiles into out_dir and returns the path; raises with the compiler's output on failure."""
    out = Path(out_dir) / (f"simt_{flavour}" + ("" if main else ".so"))
    proc = subprocess.run(compile_command(out, flavour, main), capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        raise RuntimeError(f"emulated CUDA build failed:\n{proc.stderr[-4000:]}")
    return out


class EmulatedCuda:
    """locdiff::cuda::* of the emulated build on contiguous CPU tensors (their pointers are the 'device' ones)."""

    def __init__(self, path):
        self.lib = ctypes.CDLL(str(path))

    def _call(self, name, *args):
        err = ctypes.create_string_buffer(4096)
        if getattr(self.lib, name)(*args, err, ctypes.c_size_t(len(err))) != 0:
            raise RuntimeError(err.value.decode())

    @staticmethod
    def _p(t):
        return ctypes.c_void_p(t.data_ptr() if t is not None else 0)

    def sh_basis(self, coords, L, weights=None):
        coords = coords.contiguous()
        out = torch.empty(coords.shape[0], (L + 1) ** 2, dtype=coords.dtype)
        self._call("locdiff_simt_sh_basis", _DTYPE[coords.dtype], self._p(coords), self._p(out),
                   ctypes.c_int64(coords.shape[0]), L, self._p(weights))
        return out

    def sh_basis_backward(self, coords, grad_out, L, weights=None):
        coords, grad_out = coords.contiguous(), grad_out.contiguous()
        out = torch.empty_like(coords)
        self._call("locdiff_simt_sh_basis_backward", _DTYPE[coords.dtype], self._p(coords), self._p(grad_out),
                   self._p(out), ctypes.c_int64(coords.shape[0]), L, self._p(weights))
        return out

    def sh_synthesis(self, coeffs, L, nlat, nlon):
        coeffs = coeffs.contiguous()
        out = torch.empty(coeffs.shape[0], nlat, nlon, dtype=coeffs.dtype)
        self._call("locdiff_simt_sh_synthesis", _DTYPE[coeffs.dtype], self._p(coeffs), self._p(out),
                   ctypes.c_int64(coeffs.shape[0]), L, nlat, nlon)
        return out

    def shdd_decode(self, coeffs, L, top_k=1, nlat=0, nlon=0, candidates=0, max_iter=30, min_separation=0.0):
        coeffs = coeffs.contiguous()
        B = coeffs.shape[0]
        out_c = torch.empty(B, top_k, 2, dtype=coeffs.dtype)
        out_s = torch.empty(B, top_k, dtype=coeffs.dtype)
        self._call("locdiff_simt_shdd_decode", _DTYPE[coeffs.dtype], self._p(coeffs), self._p(out_c),
                   self._p(out_s), ctypes.c_int64(B), L, top_k, nlat, nlon, candidates, max_iter,
                   ctypes.c_double(min_separation))
        return out_c, out_s

    def misuse(self, case):
        """Runs one of tests/kernels/simt_misuse.cpp's kernels; raises with the emulated launch's error."""
        self._call("locdiff_simt_misuse", case.encode())
