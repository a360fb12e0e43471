"""Loads the compiled kernels (locdiff_ext._C) with an error that says how to fix a missing build."""

try:
    from . import _C  # noqa: F401
except ImportError as exc:  # pragma: no cover - only hit on a broken install
    raise ImportError(
        "locdiff_ext._C (the compiled kernels) could not be imported. Install the package with "
        "`pip install .` from the repository root; if you run Python from the repository root, "
        "the source folder may shadow the installed package (run from elsewhere or use "
        "`pytest --import-mode=importlib`). Original error: " + str(exc)
    ) from exc

MAX_DEGREE: int = _C.MAX_DEGREE


def has_cuda() -> bool:
    """True if the extension was compiled with the CUDA kernels."""
    return bool(_C.has_cuda())
