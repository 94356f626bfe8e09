"""Writing segmentation results: masks, flows, outlines, ImageJ ROIs and object tables.

Every writer is atomic: it writes a temporary file next to the target and renames it into
place only when the file is complete, so an interrupted or failing write never leaves a
partial file (an existing file of the same name stays as it was). File names follow the
reference's conventions (``<stem>_masks.tif``, ``_flows.tif``, ``_dP.tif``, ``_cellprob.tif``,
``_outlines.png``, ``_rois.zip``) plus ``_objects.csv`` for the per-object table.

Used by ``cpsam segment``, the plate runner (:mod:`cpsam_toolkit.batch`), the widgets and the
Dask workers; nothing here needs torch.
"""

from __future__ import annotations

import csv
import io as _io
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .io import atomic_path, imwrite_tiff, masks_dtype, write_atomic
from .preprocess import to_channels_last

if TYPE_CHECKING:  # pragma: no cover
    from .segment import SegmentationResult

#: suffix → what it holds; the keys name outputs in manifests and on the command line
OUTPUT_SUFFIXES = {
    "masks": "_masks.tif",
    "flows": "_flows.tif",
    "dP": "_dP.tif",
    "cellprob": "_cellprob.tif",
    "outlines": "_outlines.png",
    "rois": "_rois.zip",
    "table": "_objects.csv",
}

#: column order of the per-object table
OBJECT_COLUMNS = ("label", "area", "centroid_y", "centroid_x", "mean_cellprob", "flow_error")


def output_path(out_dir: str | os.PathLike, stem: str, kind: str) -> Path:
    """``out_dir / (stem + suffix)`` for an output kind (see :data:`OUTPUT_SUFFIXES`)."""
    try:
        return Path(out_dir) / f"{stem}{OUTPUT_SUFFIXES[kind]}"
    except KeyError:
        raise ValueError(f"unknown output kind {kind!r}; one of {sorted(OUTPUT_SUFFIXES)}") from None


# --------------------------------------------------------------------------------------------
# masks and flows
# --------------------------------------------------------------------------------------------
def as_label_dtype(masks: np.ndarray) -> np.ndarray:
    """Labels as uint16 (uint32 when there are 65,536 or more)."""
    masks = np.asarray(masks)
    if masks.size and masks.min() < 0:
        raise ValueError("label images must not contain negative values")
    top = int(masks.max()) if masks.size else 0
    return masks.astype(masks_dtype(top), copy=False)


def save_masks(path: str | os.PathLike, masks: np.ndarray) -> Path:
    """Write a label image as a zlib-compressed TIFF (uint16, or uint32 above 65,535 labels)."""
    return imwrite_tiff(path, as_label_dtype(masks))


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


def save_flows(stem_path: str | os.PathLike, result: SegmentationResult | Any) -> list[Path]:
    """Write ``<stem>_flows.tif`` (RGB picture), ``<stem>_dP.tif`` ((2, Y, X) float32) and
    ``<stem>_cellprob.tif`` ((Y, X) float32 logits).

    ``stem_path`` is the output path without suffix, e.g. ``out/plate1_A01``. ``result`` is a
    :class:`~cpsam_toolkit.segment.SegmentationResult` (or anything with ``flows`` and
    ``cellprob``).
    """
    stem_path = Path(stem_path)
    out_dir, stem = stem_path.parent, stem_path.name
    flows = np.asarray(result.flows, dtype=np.float32)
    cellprob = np.asarray(result.cellprob, dtype=np.float32)
    paths = [
        imwrite_tiff(output_path(out_dir, stem, "flows"), flow_rgb(flows)),
        imwrite_tiff(output_path(out_dir, stem, "dP"), flows),
        imwrite_tiff(output_path(out_dir, stem, "cellprob"), cellprob),
    ]
    return paths


# --------------------------------------------------------------------------------------------
# outlines
# --------------------------------------------------------------------------------------------
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


def to_uint8_rgb(image: np.ndarray, channel_axis: int | None = None) -> np.ndarray:
    """A display version of an image: (Y, X, 3) uint8, each channel stretched 1st–99th
    percentile. One channel becomes grey, two become red/green."""

    img = to_channels_last(np.asarray(image), channel_axis=channel_axis, name="image")
    img = img.astype(np.float32)
    out = np.zeros((*img.shape[:2], 3), np.uint8)
    chans = []
    for c in range(img.shape[-1]):
        ch = img[..., c]
        lo, hi = np.percentile(ch, [1, 99])
        if hi - lo <= 1e-6:
            lo, hi = float(ch.min()), float(ch.max())
        chans.append(np.zeros(ch.shape, np.uint8) if hi - lo <= 1e-6 else
                     (np.clip((ch - lo) / (hi - lo), 0, 1) * 255).astype(np.uint8))
    if len(chans) == 1:
        out[...] = chans[0][..., None]
    else:
        for c, ch in enumerate(chans[:3]):
            out[..., c] = ch
    return out


def outline_overlay(
    image: np.ndarray | None,
    masks: np.ndarray,
    color: tuple[int, int, int] = (255, 0, 0),
    channel_axis: int | None = None,
) -> np.ndarray:
    """(Y, X, 3) uint8: the image (8-bit, stretched) with object outlines painted in ``color``."""
    masks = np.asarray(masks)
    if image is None:
        rgb = np.zeros((*masks.shape, 3), np.uint8)
    else:
        rgb = to_uint8_rgb(image, channel_axis)
        if rgb.shape[:2] != masks.shape:
            raise ValueError(f"image {rgb.shape[:2]} and masks {masks.shape} differ in size")
    rgb[outlines(masks)] = color
    return rgb


def save_outlines_png(
    path: str | os.PathLike,
    image: np.ndarray | None,
    masks: np.ndarray,
    color: tuple[int, int, int] = (255, 0, 0),
    channel_axis: int | None = None,
) -> Path:
    """Write the image (normalised to 8 bit) with red object outlines as an RGB PNG."""
    from PIL import Image

    rgb = outline_overlay(image, masks, color, channel_axis)
    return write_atomic(path, lambda tmp: Image.fromarray(rgb).save(tmp, format="PNG"))


# --------------------------------------------------------------------------------------------
# ImageJ ROIs
# --------------------------------------------------------------------------------------------
def _polygon_area(c: np.ndarray) -> float:
    y, x = c[:, 0], c[:, 1]
    return 0.5 * abs(float(np.dot(x, np.roll(y, 1)) - np.dot(y, np.roll(x, 1))))


def object_contours(masks: np.ndarray) -> dict[int, np.ndarray]:
    """Largest outer contour of each object, as (N, 2) ``(x, y)`` float ImageJ coordinates.

    The contour runs along the pixel edges of the object (``find_contours`` at level 0.5 on
    the object's padded binary mask, with corners cut diagonally), so it encloses the object's
    pixels in ImageJ's convention (pixel (r, c) covers x in [c, c+1], y in [r, r+1]). For an
    object in several pieces the piece with the largest enclosed area is used; holes are
    ignored. Empty labels are skipped.
    """
    from scipy import ndimage
    from skimage.measure import find_contours

    masks = np.asarray(masks)
    if masks.ndim != 2:
        raise ValueError(f"ROIs need a 2D label image, got shape {masks.shape}")
    out: dict[int, np.ndarray] = {}
    for i, sl in enumerate(ndimage.find_objects(masks.astype(np.int64, copy=False))):
        if sl is None:
            continue
        label = i + 1
        obj = np.pad(masks[sl] == label, 1).astype(np.float32)
        contours = [c for c in find_contours(obj, 0.5) if len(c) >= 3]
        if not contours:
            continue
        best = max(contours, key=_polygon_area)
        if np.allclose(best[0], best[-1]):
            best = best[:-1]
        # padded index coords -> image index coords -> ImageJ (pixel centre at +0.5)
        y = best[:, 0] - 1 + sl[0].start + 0.5
        x = best[:, 1] - 1 + sl[1].start + 0.5
        out[label] = np.stack([x, y], axis=1)
    return out


def save_rois(path: str | os.PathLike, masks: np.ndarray) -> Path | None:
    """Write one ImageJ polygon ROI per object into a ZIP (``roifile``), named by its label.

    Returns the path, or None (and writes nothing) when there are no objects, as the reference
    does.
    """
    import roifile

    contours = object_contours(masks)
    if not contours:
        return None
    rois = []
    for label, pts in contours.items():
        roi = roifile.ImagejRoi.frompoints(pts.astype(np.float32), name=str(label))
        rois.append(roi)
    return write_atomic(path, lambda tmp: roifile.roiwrite(tmp, rois, mode="w"))


# --------------------------------------------------------------------------------------------
# tables
# --------------------------------------------------------------------------------------------
def _fmt(v: Any) -> str:
    if isinstance(v, (float, np.floating)):
        return "" if not np.isfinite(v) else f"{float(v):.6g}"
    if isinstance(v, (np.integer,)):
        return str(int(v))
    return str(v)


def csv_text(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> str:
    buf = _io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(columns)
    for r in rows:
        w.writerow([_fmt(r.get(c, "")) for c in columns])
    return buf.getvalue()


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write a text file atomically (UTF-8)."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def object_rows(objects: Mapping[str, np.ndarray], **extra: Any) -> list[dict[str, Any]]:
    """Rows (one dict per object) of a ``SegmentationResult.objects`` table; ``extra``
    columns (e.g. ``image=stem``) come first in every row."""
    n = len(objects.get("label", ()))
    rows = []
    for i in range(n):
        row = dict(extra)
        for c in OBJECT_COLUMNS:
            if c in objects:
                row[c] = objects[c][i]
        rows.append(row)
    return rows


def object_table_csv(
    path: str | os.PathLike,
    objects: Mapping[str, np.ndarray] | SegmentationResult,
    **extra: Any,
) -> Path:
    """Write the per-object table (label, area, centroid_y, centroid_x, mean_cellprob,
    flow_error) as CSV; ``objects`` is a result or its ``objects`` dict. Extra keyword
    columns (constant per file) come first."""
    if not isinstance(objects, Mapping):
        objects = objects.objects
    columns = [*extra, *(c for c in OBJECT_COLUMNS if c in objects)]
    return write_text_atomic(path, csv_text(object_rows(objects, **extra), columns))


def summary_row(stem: str, objects: Mapping[str, np.ndarray]) -> dict[str, Any]:
    """One image's summary: object count, mean area, mean confidence (mean cell probability)
    and mean flow error (blank when there are no objects)."""
    n = len(objects.get("label", ()))

    def mean(key: str) -> float:
        v = np.asarray(objects.get(key, ()), dtype=np.float64)
        return float(v.mean()) if n and v.size else float("nan")

    return {
        "stem": stem,
        "count": n,
        "mean_area": mean("area"),
        "mean_confidence": mean("mean_cellprob"),
        "mean_flow_error": mean("flow_error"),
    }


SUMMARY_COLUMNS = ("stem", "count", "mean_area", "mean_confidence", "mean_flow_error")
