"""Optional numba compilation of the CPU kernels of dynamics and flows.

numba is a dependency, but the package must still run where it cannot be installed or
imported (a bare GPU machine with a new numpy, an unusual platform): :func:`ready` is then
False and the callers use their torch/NumPy paths, which give the same bits. numba is imported
only when a kernel is first needed (its import takes a good fraction of a second), and each
kernel is compiled on its first call (cached on disk by numba afterwards).
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable
from typing import Any

__all__ = ["available", "jit", "ready"]

_numba: list[Any] = []  # [module or None] once an import was tried


def available() -> bool:
    """True when numba is installed and not disabled with ``CPSAM_NO_NUMBA=1``."""
    if os.environ.get("CPSAM_NO_NUMBA", "") not in ("", "0"):
        return False
    return importlib.util.find_spec("numba") is not None


def _import_numba() -> Any:
    if not _numba:
        try:
            import numba
        except Exception:  # any import failure: missing, or built for another numpy
            numba = None
        _numba.append(numba)
    return _numba[0]


class _Lazy:
    """A kernel compiled with ``numba.njit(cache=True, nogil=True)`` on its first call."""

    def __init__(self, fn: Callable[..., Any]) -> None:
        self.fn = fn
        self._compiled: Callable[..., Any] | None = None

    def __call__(self, *args: Any) -> Any:
        if self._compiled is None:
            self._compiled = _import_numba().njit(cache=True, nogil=True)(self.fn)
        return self._compiled(*args)


def jit(fn: Callable[..., Any]) -> Callable[..., Any] | None:
    """A lazily compiled ``fn`` (no fastmath: the kernels repeat float32 operations bit for
    bit), or ``None`` when numba is not :func:`available`."""
    return _Lazy(fn) if available() else None


def ready(kernel: Callable[..., Any] | None) -> bool:
    """True when ``kernel`` (from :func:`jit`) can run: numba is installed and imports."""
    return kernel is not None and _import_numba() is not None
