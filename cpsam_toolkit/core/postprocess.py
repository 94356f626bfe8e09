"""Network maps + mask settings → masks, in 2D or 3D, and the per-object table.

2D masks go through a cache of the tracking stage (:func:`staged_masks`), so changing only
``flow_threshold`` or ``min_size`` later costs just the filtering. :func:`object_table` is the
one per-object table (2D and 3D); :func:`select_objects` filters masks and table together.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from .. import dynamics
from .options import MaskOptions

__all__ = ["masks_from_flows", "tracked_masks", "staged_masks", "object_table", "select_objects",
           "sigmoid", "touching_border"]


def sigmoid(x: np.ndarray) -> np.ndarray:
    """Logits → probabilities (float64)."""
    return 1 / (1 + np.exp(-np.asarray(x, dtype=np.float64)))


def masks_from_flows(flows: np.ndarray, cellprob: np.ndarray, opts: MaskOptions) -> np.ndarray:
    """Masks of 2D ``(2, Y, X)`` or 3D ``(3, Z, Y, X)`` flows (see :func:`dynamics.compute_masks`)."""
    opts.validate()
    return dynamics.compute_masks(
        flows,
        cellprob,
        niter=opts.niter or 200,
        cellprob_threshold=opts.cellprob_threshold,
        flow_threshold=opts.flow_threshold,
        min_size=opts.min_size,
        max_size_fraction=opts.max_size_fraction,
    )


def tracked_masks(flows: np.ndarray, cellprob: np.ndarray, opts: MaskOptions) -> np.ndarray:
    """Masks straight from flow tracking (before flow QC, hole filling and the size filter)."""
    fg = cellprob > opts.cellprob_threshold
    if not fg.any():
        return np.zeros(cellprob.shape, np.uint16)
    inds = np.nonzero(fg)
    final = dynamics.follow_flows(flows * fg / 5.0, inds, niter=opts.niter or 200)
    return dynamics.get_masks(final, inds, cellprob.shape, max_size_fraction=opts.max_size_fraction)


def staged_masks(
    flows: np.ndarray, cellprob: np.ndarray, opts: MaskOptions, stages: dict
) -> tuple[np.ndarray, np.ndarray | None]:
    """2D masks as :func:`masks_from_flows`, through a cache of the tracking stage.

    ``stages`` maps ``(cellprob_threshold, niter, max_size_fraction)`` to the tracked masks and
    their flow errors (at most 8 entries; filled here). Returns the masks and the QC flow error
    of each final mask (float64, row i for label i+1), or None when the QC is off.
    """
    key = (opts.cellprob_threshold, opts.niter or 200, opts.max_size_fraction)
    if key not in stages:
        if len(stages) >= 8:
            stages.pop(next(iter(stages)))
        stages[key] = (tracked_masks(flows, cellprob, opts), None)
    raw, errors = stages[key]
    qc_on = opts.flow_threshold is not None and opts.flow_threshold > 0
    if errors is None and qc_on and raw.max() > 0:
        errors = np.asarray(dynamics.flow_errors(raw, flows), dtype=np.float64)
        stages[key] = (raw, errors)
    masks = raw
    if qc_on and raw.max() > 0:
        lut = np.ones(int(raw.max()) + 1, bool)
        lut[1:] = errors[: len(lut) - 1] <= opts.flow_threshold
        masks = np.where(lut[raw], raw, 0).astype(raw.dtype)
    masks = dynamics.fill_holes_and_remove_small_masks(masks, min_size=opts.min_size)
    if not qc_on:
        return masks, None
    # final labels are renumbered in raster order; the raster-first pixel of a final mask is
    # never a filled hole (holes lie strictly inside the mask's bounding box), so it names the
    # tracked mask it came from
    labels, first = np.unique(masks.ravel(), return_index=True)
    first = first[labels > 0]
    qc = errors[raw.ravel()[first].astype(np.int64) - 1] if len(first) else np.zeros(0)
    return masks, qc


def object_table(
    masks: np.ndarray,
    flows: np.ndarray | None = None,
    cellprob: np.ndarray | None = None,
    flow_error: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """Per-object measurements of a 2D or 3D label image; row i is label i+1.

    Columns: ``label``, ``area`` (2D, pixels) or ``volume`` (3D, voxels), ``centroid_z`` (3D),
    ``centroid_y``, ``centroid_x``, ``mean_cellprob`` (probability 0..1, when ``cellprob`` is
    given) and, in 2D with ``flows``, ``flow_error``: ``flow_error`` (one per label, e.g. the
    QC errors from :func:`staged_masks`) is used as given, else computed from ``masks`` with
    :func:`cpsam_toolkit.dynamics.flow_errors`.
    """
    n = int(masks.max()) if masks.size else 0
    lab = masks.ravel().astype(np.int64)
    count = np.bincount(lab, minlength=n + 1)[1:]
    safe = np.maximum(count, 1)
    table: dict[str, np.ndarray] = {
        "label": np.arange(1, n + 1, dtype=np.int64),
        "area" if masks.ndim == 2 else "volume": count.astype(np.int64),
    }
    axes = "zyx"[-masks.ndim:] if masks.ndim <= 3 else [str(i) for i in range(masks.ndim)]
    for ax, nm in enumerate(axes):
        shape = [1] * masks.ndim
        shape[ax] = masks.shape[ax]
        coord = np.broadcast_to(np.arange(masks.shape[ax]).reshape(shape), masks.shape).ravel()
        table[f"centroid_{nm}"] = np.bincount(lab, coord, n + 1)[1:] / safe
    if cellprob is not None:
        table["mean_cellprob"] = np.bincount(lab, sigmoid(cellprob).ravel(), n + 1)[1:] / safe
    if masks.ndim == 2 and flows is not None:
        if flow_error is not None and len(flow_error) == n:
            table["flow_error"] = np.asarray(flow_error, dtype=np.float64)
        else:
            table["flow_error"] = (
                np.asarray(dynamics.flow_errors(masks, flows), dtype=np.float64)[:n] if n else np.zeros(0)
            )
    return table


def select_objects(
    masks: np.ndarray, table: Mapping[str, np.ndarray], keep: np.ndarray
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Keep some objects: masks relabelled 1..M in the old order, and the table's rows with them.

    ``keep`` is a boolean array with one entry per object (row of ``table``), or the labels to
    keep. Returns the new masks (same dtype) and table (``label`` renumbered 1..M).
    """
    n = int(masks.max()) if masks.size else 0
    keep = np.asarray(keep)
    if keep.dtype == bool:
        if keep.shape != (n,):
            raise ValueError(f"keep: expected {n} booleans (one per object), got shape {keep.shape}")
        rows = np.flatnonzero(keep)
    else:
        labels = np.unique(keep.astype(np.int64))
        if labels.size and (labels[0] < 1 or labels[-1] > n):
            raise ValueError(f"keep: labels must be in 1..{n}, got {labels[0]}..{labels[-1]}")
        rows = labels - 1
    lut = np.zeros(n + 1, dtype=masks.dtype)
    lut[rows + 1] = np.arange(1, len(rows) + 1)
    new_table = {k: np.asarray(v)[rows] for k, v in table.items()}
    new_table["label"] = np.arange(1, len(rows) + 1, dtype=np.int64)
    return lut[masks], new_table


def touching_border(masks: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    """One boolean per object (label i+1 at index i): True if it touches any face of the array
    (4 edges in 2D, 6 faces in 3D) or covers pixels outside ``mask`` (a boolean array of the
    same shape, e.g. the region of a cropped or masked image)."""
    n = int(masks.max()) if masks.size else 0
    found = [np.take(masks, i, axis=ax).ravel() for ax in range(masks.ndim) for i in (0, -1)]
    if mask is not None:
        mask = np.asarray(mask, bool)
        if mask.shape != masks.shape:
            raise ValueError(f"mask shape {mask.shape} differs from the masks' {masks.shape}")
        found.append(masks[~mask])
    out = np.zeros(n + 1, bool)
    out[np.concatenate(found).astype(np.int64)] = True
    return out[1:]
