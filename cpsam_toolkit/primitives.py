"""Pure helpers at the bottom of the data path: atomic writes, label dtypes, the flow and
outline pictures.

:mod:`cpsam_toolkit.io`, the file formats (:mod:`~cpsam_toolkit.omezarr`,
:mod:`~cpsam_toolkit.cellpose_files`) and :mod:`cpsam_toolkit.outputs` all use them, so they live
below all of those and import nothing of the package. ``io`` and ``outputs`` re-export them under
their old names.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

import numpy as np


def _current_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_UMASK = _current_umask()


@contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield a temporary path next to ``path``; rename it into place only on success.

    On any error the temporary file is removed and an existing ``path`` is left intact.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=f".part{path.suffix}", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        # mkstemp makes 0600 files; give the result the usual permissions (0666 & ~umask)
        os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_atomic(path: str | os.PathLike, writer: Callable[[Path], None]) -> Path:
    """Call ``writer(tmp_path)`` and move the result to ``path`` atomically."""
    with atomic_path(path) as tmp:
        writer(tmp)
    return Path(path)


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write a text file atomically (UTF-8)."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def masks_dtype(n_labels: int) -> np.dtype:
    """uint16 for up to 65,535 labels, else uint32."""
    return np.dtype(np.uint16 if n_labels < 2**16 else np.uint32)


def as_label_dtype(masks: np.ndarray) -> np.ndarray:
    """Labels as uint16 (uint32 when there are 65,536 or more)."""
    masks = np.asarray(masks)
    if masks.size and masks.min() < 0:
        raise ValueError("label images must not contain negative values")
    top = int(masks.max()) if masks.size else 0
    return masks.astype(masks_dtype(top), copy=False)


def flow_rgb(flows: np.ndarray) -> np.ndarray:
    """(2, Y, X) ``[dY, dX]`` flows → (Y, X, 3) uint8 colour wheel.

    Hue encodes the direction (three cosines 120° apart), brightness the magnitude scaled so
    that its 1st–99th percentile range spans 0–1 (the same picture as the reference's
    ``dx_to_circ``).
    """
    flows = np.asarray(flows, dtype=np.float32)
    if flows.ndim != 3 or flows.shape[0] != 2:
        raise ValueError(f"flows must be (2, Y, X), got shape {flows.shape}")
    mag = np.hypot(flows[0], flows[1])
    lo, hi = (np.percentile(mag, [1, 99]) if mag.size else (0.0, 0.0))
    scaled = np.clip((mag - lo) / (hi - lo), 0, 1) if hi - lo > 1e-3 else np.zeros_like(mag)
    scaled *= 255.0 / 2
    angle = np.arctan2(flows[1], flows[0]) + np.pi
    rgb = np.empty((*mag.shape, 3), np.uint8)
    for c in range(3):
        rgb[..., c] = np.clip(scaled * (np.cos(angle + 2 * np.pi * c / 3) + 1), 0, 255)
    return rgb


def outlines(masks: np.ndarray) -> np.ndarray:
    """Boolean image of object borders: labelled pixels with a 4-neighbour of another value
    (another object or background; the image edge itself is not a border).

    Works for 2D and 3D label images (borders within each plane for 3D).
    """
    m = np.asarray(masks)
    if m.ndim == 3:
        return np.stack([outlines(p) for p in m])
    if m.ndim != 2:
        raise ValueError(f"masks must be 2D (or 3D), got shape {m.shape}")
    out = np.zeros(m.shape, bool)
    diff_y = m[1:, :] != m[:-1, :]
    diff_x = m[:, 1:] != m[:, :-1]
    out[1:, :] |= diff_y
    out[:-1, :] |= diff_y
    out[:, 1:] |= diff_x
    out[:, :-1] |= diff_x
    out &= m != 0
    return out
