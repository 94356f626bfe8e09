"""What the canvas receives: the image as PNG bytes and the labels as zlib-compressed uint32.

Both are decoded by the browser itself (``createImageBitmap`` and
``DecompressionStream("deflate")``), so no JavaScript library and no network are needed.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Mapping
from typing import Any

import numpy as np

from ..outputs import to_uint8_rgb
from ..preprocess import to_channels_last

__all__ = ["png_bytes", "encode_labels", "decode_labels", "display_rgb", "object_columns"]


def _chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)


def png_bytes(rgb: np.ndarray, level: int = 3) -> bytes:
    """Encode a (Y, X) grey, (Y, X, 3) RGB or (Y, X, 4) RGBA uint8 array as PNG."""
    a = np.asarray(rgb)
    if a.dtype != np.uint8:
        raise ValueError(f"png_bytes needs uint8, got {a.dtype}")
    if a.ndim == 2:
        a = a[..., None]
    if a.ndim != 3 or a.shape[2] not in (1, 3, 4):
        raise ValueError(f"png_bytes needs (Y, X), (Y, X, 3) or (Y, X, 4), got {a.shape}")
    h, w, c = a.shape
    colour_type = {1: 0, 3: 2, 4: 6}[c]
    raw = np.empty((h, 1 + w * c), np.uint8)
    raw[:, 0] = 0  # filter: none
    raw[:, 1:] = np.ascontiguousarray(a).reshape(h, w * c)
    ihdr = struct.pack(">IIBBBBB", w, h, 8, colour_type, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr)
            + _chunk(b"IDAT", zlib.compress(raw.tobytes(), level)) + _chunk(b"IEND", b""))


def encode_labels(labels: np.ndarray, level: int = 1) -> bytes:
    """(Y, X) labels → zlib stream of little-endian uint32 (the canvas's label format)."""
    a = np.ascontiguousarray(np.asarray(labels), dtype="<u4")
    return zlib.compress(a.tobytes(), level)


def decode_labels(data: bytes, shape: tuple[int, int]) -> np.ndarray:
    """Inverse of :func:`encode_labels`."""
    return np.frombuffer(zlib.decompress(data), dtype="<u4").reshape(shape).copy()


def display_rgb(image: np.ndarray, channel: int | None = None, channel_axis: int | None = None) -> np.ndarray:
    """(Y, X, 3) uint8 for display: all channels (grey / red-green / RGB) or one channel in grey.

    Each channel is stretched between its 1st and 99th percentile
    (:func:`cpsam_toolkit.outputs.to_uint8_rgb`).
    """
    img = to_channels_last(np.asarray(image), channel_axis=channel_axis, name="image")
    if channel is not None:
        if not 0 <= channel < img.shape[-1]:
            raise ValueError(f"channel {channel} does not exist: the image has {img.shape[-1]} channel(s)")
        img = img[..., channel]
    return to_uint8_rgb(img)


def n_channels(image: np.ndarray, channel_axis: int | None = None) -> int:
    return int(to_channels_last(np.asarray(image), channel_axis=channel_axis, name="image").shape[-1])


def object_columns(objects: Mapping[str, Any], digits: int = 4) -> dict[str, list]:
    """Per-object arrays as JSON-friendly lists (floats rounded) for the hover read-out."""
    out: dict[str, list] = {}
    for k, v in objects.items():
        a = np.asarray(v)
        if a.dtype.kind == "f":
            out[k] = [None if not np.isfinite(x) else round(float(x), digits) for x in a]
        elif a.dtype.kind in "iub":
            out[k] = [int(x) for x in a]
        else:
            out[k] = [str(x) for x in a]
    return out


def cheap_objects(labels: np.ndarray, cellprob: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Label, area and (with ``cellprob``) mean probability of each non-empty object — fast
    enough to refresh after every brush stroke (no flow error)."""
    lab = np.asarray(labels).ravel().astype(np.int64)
    n = int(lab.max()) if lab.size else 0
    area = np.bincount(lab, minlength=n + 1)[1:]
    keep = np.flatnonzero(area > 0)
    out: dict[str, np.ndarray] = {"label": keep + 1, "area": area[keep]}
    if cellprob is not None and np.shape(cellprob) == np.shape(labels):
        prob = 1 / (1 + np.exp(-np.asarray(cellprob, np.float64).ravel()))
        s = np.bincount(lab, prob, n + 1)[1:]
        out["mean_cellprob"] = s[keep] / area[keep]
    return out
