"""Cellpose's own files: ``<stem>_seg.npy`` written for the cellpose GUI, and read back safely.

The cellpose GUI opens, corrects and saves ``<stem>_seg.npy`` next to the image: a NumPy file
holding one pickled ``dict`` (``masks``, ``outlines``, ``flows``, thresholds, ``filename``...).
:func:`save_seg_npy` writes that layout from a segmentation result (the one the reference's
``cellpose.io.masks_flows_to_seg`` writes, plus the thresholds the GUI saves), atomically.

A pickle can run code when it is loaded, so :func:`load_seg_npy` never calls ``np.load(...,
allow_pickle=True)``: it reads the ``.npy`` header itself and unpickles the payload with an
unpickler that builds only plain values -- dicts, lists, tuples, strings, numbers, ``None`` and
NumPy arrays/scalars -- and refuses any other object (a function, a class, ``os.system``...)
with :class:`UnsafeFileError` before anything runs.

Ground truth in cellpose's formats (``_seg.npy``, ``_cp_masks.png``/``.tif``, ``_masks.tif``) is
read by :func:`cpsam_toolkit.io.imread` (object ``.npy`` files go through :func:`load_seg_npy`),
so training (``--mask-suffix _seg``) and evaluation (``--gt-suffix _seg.npy``) accept it.
This module is io-layer: it imports only :mod:`cpsam_toolkit.primitives` and :mod:`numpy`
(:mod:`cpsam_toolkit.io` imports it).
"""

from __future__ import annotations

import io as _io
import math
import os
import pickle
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from numpy.lib import format as npy_format

from .primitives import flow_rgb, outlines, write_atomic

SEG_SUFFIX = "_seg.npy"

#: the only globals a ``_seg.npy`` pickle may name: NumPy's array, dtype and scalar rebuilders
_ALLOWED_GLOBALS = frozenset({
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
})


class UnsafeFileError(ValueError):
    """A pickled file that names something other than plain values; it was not loaded."""


class _PlainUnpickler(pickle.Unpickler):
    """Unpickler that builds plain values and NumPy arrays only (see the module notes)."""

    def __init__(self, file: Any, source: str) -> None:
        super().__init__(file)
        self.source = source

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED_GLOBALS:
            return super().find_class(module, name)
        raise UnsafeFileError(
            f"{self.source}: refused to load: the pickle inside asks for {module}.{name}, which is "
            "not a plain array, number, string, list or dict (a cellpose _seg.npy never does). "
            "The file may be malicious or not a cellpose file; nothing from it was run. If you "
            "trust it, convert it with cellpose itself (e.g. save masks as _cp_masks.png)"
        )

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafeFileError(f"{self.source}: refused to load: persistent ids in the pickle")


def _check_plain(obj: Any, source: str, depth: int = 0) -> None:
    """Second line of defence: only plain containers, scalars and non-object arrays."""
    if depth > 50:
        raise UnsafeFileError(f"{source}: refused to load: nested too deeply")
    if obj is None or isinstance(obj, (bool, int, float, complex, str, bytes, np.generic)):
        return
    if isinstance(obj, np.ndarray):
        if obj.dtype.hasobject:
            for v in obj.flat:
                _check_plain(v, source, depth + 1)
        return
    if isinstance(obj, (list, tuple, set, frozenset)):
        for v in obj:
            _check_plain(v, source, depth + 1)
        return
    if isinstance(obj, dict):
        for k, v in obj.items():
            _check_plain(k, source, depth + 1)
            _check_plain(v, source, depth + 1)
        return
    raise UnsafeFileError(f"{source}: refused to load: holds a {type(obj).__name__}")


def _gui_outlines(masks: np.ndarray) -> np.ndarray:
    """Object borders as the cellpose GUI draws them: like :func:`primitives.outlines`, but an
    object's pixels on the image edge are border too (cellpose traces each object's contour)."""
    m = np.asarray(masks)
    pad = [(0, 0)] * (m.ndim - 2) + [(1, 1), (1, 1)]
    crop = (Ellipsis, slice(1, -1), slice(1, -1))
    return outlines(np.pad(m, pad))[crop]


def load_plain_npy(path: str | os.PathLike) -> Any:
    """Contents of a ``.npy`` file, unpickling object arrays with the restricted unpickler.

    A numeric array is returned as with ``np.load(path)``; a pickled object (a cellpose
    ``_seg.npy`` is a 0-d object array holding a ``dict``) is returned as the object itself.
    Raises :class:`UnsafeFileError` for pickles that name anything but plain values, and
    ``ValueError`` naming the file for files that are not ``.npy``.
    """
    path = Path(path)
    source = str(path)
    with open(path, "rb") as f:
        try:
            version = npy_format.read_magic(f)
            read_header = (npy_format.read_array_header_1_0 if version == (1, 0)
                           else npy_format.read_array_header_2_0)
            _shape, _fortran, dtype = read_header(f)
        except ValueError as e:
            raise ValueError(f"{source}: not a NumPy .npy file ({e})") from None
        if not dtype.hasobject:
            f.seek(0)
            return np.load(f, allow_pickle=False)
        try:
            obj = _PlainUnpickler(f, source).load()
        except UnsafeFileError:
            raise
        except Exception as e:  # noqa: BLE001 - truncated or garbled pickle
            raise ValueError(f"{source}: unreadable pickled .npy file ({e.__class__.__name__}: "
                             f"{e}); it may be truncated") from None
    _check_plain(obj, source)
    if isinstance(obj, np.ndarray) and obj.shape == () and obj.dtype.hasobject:
        return obj.item()
    return obj


def load_seg_npy(path: str | os.PathLike) -> dict[str, Any]:
    """The ``dict`` of a cellpose ``_seg.npy`` file, read without running code from it.

    Returns the keys as cellpose wrote them (``masks`` (Y, X) or (Z, Y, X) labels, ``outlines``,
    ``flows``, ``filename``, ``flow_threshold``...). Raises :class:`UnsafeFileError` for a file
    that would run code, ``ValueError`` naming the file for anything that is not a cellpose
    segmentation (no ``masks``).
    """
    return check_seg(load_plain_npy(path), path)


def check_seg(obj: Any, path: str | os.PathLike) -> dict[str, Any]:
    """``obj`` as a ``_seg.npy`` dict, or ``ValueError`` naming ``path`` and what is wrong."""
    if not isinstance(obj, Mapping) or "masks" not in obj:
        kind = type(obj).__name__ if not isinstance(obj, np.ndarray) else f"array {obj.shape}"
        raise ValueError(f"{path}: not a cellpose _seg.npy file (it holds a {kind}, not a dict "
                         "with 'masks')")
    masks = np.asarray(obj["masks"])
    if not np.issubdtype(masks.dtype, np.integer) or masks.ndim not in (2, 3):
        raise ValueError(f"{path}: 'masks' is not a 2D or 3D integer label image "
                         f"({masks.dtype}, shape {masks.shape})")
    return dict(obj)


def seg_masks(path: str | os.PathLike) -> np.ndarray:
    """The label image ((Y, X) or (Z, Y, X), 0 = background) of a cellpose ``_seg.npy``."""
    return masks_of(load_seg_npy(path))


def masks_of(dat: Mapping[str, Any]) -> np.ndarray:
    """The labels of a loaded ``_seg.npy`` dict, 0 = background (old files count from -1)."""
    masks = np.asarray(dat["masks"])
    if masks.size and masks.min() < 0:
        masks = masks - masks.min()
    return masks


# ------------------------------------------------------------------------------- writing


def _to_uint8(x: np.ndarray) -> np.ndarray:
    """1st-99th percentile range → 0..255 (the GUI's picture of cell probability)."""
    x = np.asarray(x, np.float32)
    lo, hi = np.percentile(x, [1, 99]) if x.size else (0.0, 0.0)
    y = (x - lo) / (hi - lo) if hi - lo > 1e-12 else np.zeros_like(x)
    return (np.clip(y, 0, 1) * 255).astype(np.uint8)


def seg_dict(
    masks: np.ndarray,
    flows: np.ndarray | None = None,
    cellprob: np.ndarray | None = None,
    *,
    filename: str | os.PathLike = "",
    flow_threshold: float | None = None,
    cellprob_threshold: float | None = None,
    diameter: float | None = None,
    model_path: str | None = None,
    channels: tuple[int, int] = (0, 0),
    settings: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The ``dict`` that the cellpose GUI reads from ``_seg.npy``.

    Parameters
    ----------
    masks : (Y, X) or (Z, Y, X) int
        Labels, 0 = background.
    flows : (2, Y, X) or (3, Z, Y, X) float32, optional
        Flows in network units (``[dY, dX]``, or ``[dZ, dY, dX]``).
    cellprob : like ``masks``, float32, optional
        Cell-probability logits.
    filename
        The image the masks belong to (the GUI opens it with the masks).
    flow_threshold, cellprob_threshold, diameter
        The settings used (``diameter`` in pixels; ``None`` → NaN, as cellpose writes).
    settings
        Every setting of the run (JSON-safe values), kept under ``"cpsam_settings"``.

    ``flows`` is laid out as cellpose's ``masks_flows_to_seg`` writes it: ``[RGB flow picture,
    cell probability as uint8, dZ (3D) or zeros, [] (no pixel destinations), flows stacked
    with the cell probability logits]``, each with a leading plane axis in 2D.
    """
    masks = np.asarray(masks)
    if masks.ndim not in (2, 3):
        raise ValueError(f"masks must be (Y, X) or (Z, Y, X), got shape {masks.shape}")
    n = int(masks.max()) if masks.size else 0
    dt = np.uint16 if n < 2**16 - 1 else np.uint32
    masks = masks.astype(dt, copy=False)
    dat: dict[str, Any] = {
        "masks": masks,
        "outlines": (masks * _gui_outlines(masks)).astype(dt),
        "chan_choose": list(channels),
        "ismanual": np.zeros(n, bool),
        "filename": os.fspath(filename),
        "flows": [],
        "diameter": float(diameter) if isinstance(diameter, (int, float)) and diameter else math.nan,
    }
    if flows is not None and cellprob is not None:
        flows = np.asarray(flows, np.float32)
        cellprob = np.asarray(cellprob, np.float32)
        if flows.shape[1:] != masks.shape or cellprob.shape != masks.shape:
            raise ValueError(f"flows {flows.shape} / cellprob {cellprob.shape} do not match masks "
                             f"{masks.shape}")
        stacked = np.concatenate([flows, cellprob[None]], axis=0)
        if masks.ndim == 2:
            rgb = flow_rgb(flows)
            dat["flows"] = [rgb[None], _to_uint8(cellprob)[None],
                            np.zeros((1, *rgb.shape), np.uint8), [], stacked]
        else:
            rgb = np.stack([flow_rgb(flows[1:, z]) for z in range(masks.shape[0])])
            dz = np.clip(flows[0] / 10 * 127 + 127, 0, 255).astype(np.uint8)
            dat["flows"] = [rgb, _to_uint8(cellprob), dz, [], stacked]
    if flow_threshold is not None:
        dat["flow_threshold"] = float(flow_threshold)
    if cellprob_threshold is not None:
        dat["cellprob_threshold"] = float(cellprob_threshold)
    if model_path is not None:
        dat["model_path"] = os.fspath(model_path)
    if settings:
        dat["cpsam_settings"] = {str(k): _plain(v) for k, v in settings.items()}
    return dat


def _plain(v: Any) -> Any:
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if isinstance(v, np.generic):
        return v.item()
    return str(v)


def save_seg_npy(path: str | os.PathLike, result: Any, **kwargs: Any) -> Path:
    """Write ``<stem>_seg.npy`` for the cellpose GUI from a segmentation result (atomically).

    ``result`` has ``masks`` and optionally ``flows``/``cellprob``/``options`` (a
    :class:`~cpsam_toolkit.segment.SegmentationResult`); its ``options.flow_threshold`` and
    ``cellprob_threshold`` are recorded unless given. Other keywords go to :func:`seg_dict`.
    """
    opts = getattr(result, "options", None)
    if opts is not None:
        kwargs.setdefault("flow_threshold", getattr(opts, "flow_threshold", None))
        kwargs.setdefault("cellprob_threshold", getattr(opts, "cellprob_threshold", None))
    dat = seg_dict(result.masks, getattr(result, "flows", None), getattr(result, "cellprob", None),
                   **kwargs)
    buf = _io.BytesIO()
    np.save(buf, np.array(dat, dtype=object), allow_pickle=True)
    data = buf.getvalue()

    def write(tmp: Path) -> None:
        tmp.write_bytes(data)

    return write_atomic(path, write)


def seg_path(image_path: str | os.PathLike) -> Path:
    """``<folder>/<stem>_seg.npy`` for an image path (the name the cellpose GUI looks for)."""
    p = Path(image_path)
    return p.with_name(p.stem + SEG_SUFFIX)
