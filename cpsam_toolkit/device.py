"""Choosing the compute device and precision."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """Return the device to run on: ``None``/"auto" picks CUDA, then MPS, then CPU.

    "gpu" means CUDA (or MPS on a Mac). Asking for a device that is not present raises a
    ``ValueError`` that says so, instead of failing later inside torch.
    """
    if device is None or (isinstance(device, str) and device.lower() in ("auto", "")):
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if isinstance(device, str) and device.lower() == "gpu":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        raise ValueError("device 'gpu' was requested but no CUDA or MPS device is available; use 'cpu'")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"unknown device {device!r}; use 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} was requested but CUDA is not available; use 'cpu'")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ValueError(f"device {device!r}: only {torch.cuda.device_count()} CUDA devices present")
    if dev.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ValueError(f"device {device!r} was requested but MPS is not available; use 'cpu'")
    return dev


_DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16,
           "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """Precision for inference: bf16 on CUDA, fp32 elsewhere by default; never bf16 on MPS."""
    if dtype is None or dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, str):
        if dtype.lower() not in _DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}; use 'auto', 'fp32' or 'bf16'")
        dtype = _DTYPES[dtype.lower()]
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"unsupported dtype {dtype}; use torch.float32 or torch.bfloat16")
    if device.type == "mps" and dtype == torch.bfloat16:
        raise ValueError("bf16 fails on Apple MPS devices; use dtype='fp32' there")
    if device.type == "cpu" and dtype == torch.float16:
        raise ValueError("fp16 is not supported on the CPU; use 'fp32' or 'bf16'")
    return dtype


@contextmanager
def one_cpu_thread() -> Iterator[None]:
    """Run the calling thread's torch CPU ops single-threaded inside the block or function.

    For flow tracking, masks and flow errors: many small element-wise ops, which two intra-op
    threads do not speed up on idle cores and slow down 5-35x on shared ones (spin-waiting
    OpenMP threads: several CellProfiler or Dask workers on one node, a busy JupyterHub).
    The previous count is restored on exit, also after an error. Set from a worker thread
    (the Jupyter viewer, Dask tasks) the count is that thread's own; set from the main thread
    torch applies it process-wide, so other threads' torch CPU ops also run single-threaded
    while the block runs (the package's reader/writer threads do no torch work). GPU work is
    unaffected. Use as ``with one_cpu_thread():`` or as ``@one_cpu_thread()``.
    """
    n = torch.get_num_threads()
    if n == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)
