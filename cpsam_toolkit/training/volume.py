"""2D training pairs from labelled volumes (the YX, ZX and ZY slices the network sees in 3D)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from ..flows import _check_masks
from ..modes.volume import VIEWS, network_depth, resample_z, to_zyxc

__all__ = ["slices_from_volume"]


def slices_from_volume(
    volume: Any,
    labels: np.ndarray,
    *,
    z_axis: int = 0,
    channel_axis: int | None = None,
    anisotropy: float = 1.0,
    views: Sequence[str] = VIEWS,
    n_per_view: int | dict[str, int] | None = None,
    margin: int = 0,
    min_masks: int = 1,
) -> list[tuple[np.ndarray, np.ndarray]]:
    """2D ``(image, masks)`` training pairs from the YX, ZX and ZY slices of a labelled volume.

    Z is resampled by ``anisotropy`` first (image: linear, labels: nearest), so ZX/ZY slices
    have square pixels like the ones the network sees in :func:`segment_volume`.

    Parameters
    ----------
    volume : array
        (Z, Y, X) or 4-D with channels (``z_axis``, ``channel_axis`` as in :func:`to_zyxc`).
    labels : 3-D int array
        Instance labels on the same grid, in the volume's axis order without its channel axis.
    views : subset of ("yx", "zx", "zy")
        Orientations: ``"yx"`` gives (Y, X) planes, ``"zx"`` (Z', X) rows at fixed Y and
        ``"zy"`` (Z', Y) columns at fixed X (Z' = resampled planes, first axis).
    n_per_view : int or {view: int}, optional
        Evenly spaced slices per view (default: every slice).
    margin : int
        Slices skipped at each end of the sampled axis (the paper used 10).
    min_masks : int
        Skip slices with fewer objects.

    Returns
    -------
    list of (image, masks)
        ``image`` float32 (A, B) or (A, B, C) raw intensities (training normalises each),
        ``masks`` int32 (A, B) relabelled 1..N. Feed them to
        :func:`cpsam_toolkit.training.train` as a list of pairs.
    """
    arr = np.asarray(volume)
    zyxc = to_zyxc(arr, z_axis, channel_axis, name="volume")
    lab = np.asarray(labels)
    if lab.ndim != 3:
        raise ValueError(f"labels must be a 3-D label volume, got shape {lab.shape}")
    lz = z_axis % arr.ndim
    if channel_axis is not None and channel_axis % arr.ndim < lz:
        lz -= 1  # the labels have no channel axis
    lab = np.moveaxis(lab, lz, 0)
    if lab.shape != zyxc.shape[:3]:
        raise ValueError(
            f"labels {np.asarray(labels).shape} do not match the volume {arr.shape} (labels take "
            "the volume's axis order, without its channel axis)"
        )
    lab = _check_masks(lab)
    bad = [v for v in views if v not in VIEWS]
    if bad:
        raise ValueError(f"unknown views {bad}; choose from {VIEWS}")
    img = zyxc.astype(np.float32)
    nz_net = network_depth(img.shape[0], anisotropy)
    img = resample_z(img, nz_net, axis=0, order=1)
    lab = resample_z(lab, nz_net, axis=0, order=0)
    pairs: list[tuple[np.ndarray, np.ndarray]] = []
    for v in views:
        axis = {"yx": 0, "zx": 1, "zy": 2}[v]
        n_avail = img.shape[axis]
        lo, hi = margin, n_avail - margin
        if hi <= lo:
            continue
        n = n_per_view.get(v) if isinstance(n_per_view, dict) else n_per_view
        idx = (
            np.arange(lo, hi)
            if n is None or n >= hi - lo
            else np.unique(np.linspace(lo, hi - 1, int(n)).round().astype(int))
        )
        for i in idx:
            im = np.take(img, i, axis=axis)
            m = np.take(lab, i, axis=axis)
            ids, inv = np.unique(m, return_inverse=True)
            m = inv.reshape(m.shape).astype(np.int32)
            if ids[0] != 0:
                m += 1
            if int(m.max()) < min_masks:
                continue
            pairs.append((im[..., 0] if im.shape[-1] == 1 else im, m))
    return pairs
