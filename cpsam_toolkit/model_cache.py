"""One process-wide model cache, shared by batch/Dask workers, the CellProfiler module and
the widgets.

Loading Cellpose-SAM costs seconds (and GPU memory), so a model is loaded once per process
and reused. The key is (weights name, or resolved file path + size + modification time,
device, dtype): a re-saved file is picked up and another device loads another copy. The
cached model keeps its own out-of-memory state (the batch size that fit), so later images
start from it.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
from typing import Any

import torch

from .segment import CellposeSAM, load_model

log = logging.getLogger("cpsam_toolkit")

__all__ = ["get_model", "clear_model_cache", "model_key", "model_loads", "release_gpu_memory",
           "weights_sha256"]

_CACHE: dict[tuple, CellposeSAM] = {}
_LOCK = threading.Lock()
_LOADS = [0]


def model_key(spec: str | os.PathLike | None, device: Any = None, dtype: Any = None) -> tuple:
    """The cache key of a model name or file, a device and a dtype."""
    spec = None if spec is None else os.fspath(spec)
    if spec is not None and (os.path.sep in spec or os.path.isfile(spec)):
        path = os.path.realpath(spec)
        try:
            st = os.stat(path)
            spec_key: tuple = (path, st.st_size, st.st_mtime_ns)
        except OSError:
            spec_key = (path,)
    else:
        spec_key = (spec,)
    return (spec_key, None if device is None else str(device), None if dtype is None else str(dtype))


def get_model(
    spec: str | os.PathLike | None, device: Any = None, dtype: Any = None, name: str | None = None
) -> tuple[CellposeSAM, tuple]:
    """``(model, key)``: the cached model for (weights, device, dtype), loaded on first use.

    ``spec`` is None for the default model, a registry name, or a file path (see
    :func:`cpsam_toolkit.load_model`); ``name`` renames a newly loaded model.
    """
    key = model_key(spec, device, dtype)
    with _LOCK:
        model = _CACHE.get(key)
        if model is None:
            t0 = time.perf_counter()
            model = load_model(spec, device=device, dtype=dtype)
            if name:
                model.name = name
            log.info("cpsam: loaded model %s on %s in %.1f s", model.name, model.device,
                     time.perf_counter() - t0)
            _CACHE[key] = model
            _LOADS[0] += 1
    return model, key


def model_loads() -> int:
    """Models loaded by this process so far."""
    return _LOADS[0]


def release_gpu_memory() -> None:
    """Give cached GPU memory back to the driver (models stay loaded)."""
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    mps = getattr(torch, "mps", None)
    if mps is not None and getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        mps.empty_cache()


def clear_model_cache() -> None:
    """Forget every cached model and release cached GPU memory."""
    with _LOCK:
        _CACHE.clear()
    release_gpu_memory()


_SHA: dict[tuple, str] = {}


def weights_sha256(model: Any) -> str:
    """SHA-256 of the weights file a model was loaded from (``info["sha256"]`` if recorded,
    else hashed once per file version); ``""`` for a model without a readable file."""
    info = getattr(model, "info", None) or {}
    if info.get("sha256"):
        return str(info["sha256"])
    path = info.get("path")
    try:
        st = os.stat(path) if path else None
    except OSError:
        st = None
    if st is None:
        return ""
    key = (os.path.realpath(path), st.st_size, st.st_mtime_ns)
    if key not in _SHA:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        _SHA[key] = h.hexdigest()
    return _SHA[key]
