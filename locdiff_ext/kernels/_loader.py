"""Loads the compiled kernels, ``locdiff_ext._C`` (csrc/, built by ``pip install .``).

Imported by name with importlib rather than ``from .. import _C``: the latter, run while
``locdiff_ext/__init__.py`` is still executing, turns a missing build into Python's misleading
"partially initialized module (most likely due to a circular import)".  When the module is missing
the error leads with the usual cause, a source checkout's ``locdiff_ext/`` folder shadowing the
installed package, and the command that fixes it.
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path


def _load():
    try:
        return importlib.import_module("locdiff_ext._C")
    except ImportError as exc:
        here = Path(__file__).resolve().parent.parent
        source_tree = (here.parent / "csrc").is_dir() and (here.parent / "pyproject.toml").is_file()
        if source_tree:
            cause = (f"Python imported the source folder {here} of a checkout, which holds no compiled kernels, "
                     "instead of the installed package (the current directory comes first on sys.path). "
                     "Run from another directory, or install the checkout in editable mode "
                     "(`pip install --no-build-isolation -e .`, see the README's developer setup)")
        else:
            cause = "the package's compiled module is missing: reinstall it with `pip install .`"
        raise ImportError(f"locdiff_ext._C (the compiled kernels) could not be imported: {cause}. "
                          f"Original error: {exc}") from exc


_C = _load()
MAX_DEGREE: int = _C.MAX_DEGREE


def _one_torch_thread_in_forked_child():
    """GNU OpenMP is not fork-safe: in a child made by fork() after the parent ran a parallel region, the next
    region waits forever for the parent's threads.  Our kernels see the fork themselves (csrc/threads.h) and run
    on the calling thread there; torch's own ops get one thread, as in torch's DataLoader workers."""
    import torch

    torch.set_num_threads(1)


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_one_torch_thread_in_forked_child)


def has_cuda() -> bool:
    """True if the extension was compiled with the CUDA kernels."""
    return bool(_C.has_cuda())
