"""Optional numba compilation of the CPU kernels of dynamics and flows.

numba is a dependency, but the package must still run where it cannot be installed (a bare GPU
machine with a new numpy, an unusual platform): :func:`jit` then returns ``None`` and the
callers use their torch/NumPy paths, which give the same bits.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

try:  # pragma: no cover - depends on the environment
    import numba
except Exception:  # any import failure: missing, or built for another numpy
    numba = None

__all__ = ["jit", "available"]


def available() -> bool:
    """True when numba is importable and not disabled with ``CPSAM_NO_NUMBA=1``."""
    return numba is not None and os.environ.get("CPSAM_NO_NUMBA", "") in ("", "0")


def jit(fn: Callable[..., Any]) -> Callable[..., Any] | None:
    """``numba.njit(cache=True, nogil=True)(fn)``, compiled lazily on first call; ``None``
    without numba. No fastmath: the kernels repeat float32 operations bit for bit."""
    if not available():
        return None
    return numba.njit(cache=True, nogil=True)(fn)
