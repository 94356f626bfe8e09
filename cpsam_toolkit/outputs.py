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
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

from .io import imwrite_tiff, write_atomic
from .network.registry import REGISTRY, sha256_file
from .preprocess import to_channels_last
from .primitives import (  # noqa: F401 - outputs' names since before they moved to primitives
    as_label_dtype,
    atomic_path,
    flow_rgb,
    masks_dtype,
    outlines,
    write_text_atomic,
)

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
    "npy": "_seg.npy",  # for the cellpose GUI (cpsam_toolkit.cellpose_files)
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
def save_masks(path: str | os.PathLike, masks: np.ndarray) -> Path:
    """Write a label image as a zlib-compressed TIFF (uint16, or uint32 above 65,535 labels)."""
    return imwrite_tiff(path, as_label_dtype(masks))


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


def summary_row(
    stem: str, objects: Mapping[str, np.ndarray], diameter: float | None = None
) -> dict[str, Any]:
    """One image's summary: object count, mean area, mean confidence (mean cell probability)
    and mean flow error (blank when there are no objects), and the ``diameter`` (px) the image
    was resized from (blank: not resized; see ``SegmentationResult.diameter``)."""
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
        "diameter": float("nan") if diameter is None else float(diameter),
    }


SUMMARY_COLUMNS = ("stem", "count", "mean_area", "mean_confidence", "mean_flow_error", "diameter")


# --------------------------------------------------------------------------------------------
# how to repeat a run
# --------------------------------------------------------------------------------------------
class RepeatCommand(NamedTuple):
    """The same segmentation as a ``cpsam segment`` command line and as a Python call."""

    cli: str
    python: str

    def __str__(self) -> str:
        return f"{self.cli}\n\n{self.python}"


#: setting name → ``cpsam segment`` flag; settings given by value ``None`` are left out
_CLI_FLAGS = {
    "channel_axis": "--channel-axis", "channels": "--channels", "diameter": "--diameter",
    "percentiles": "--norm-percentile", "batch_size": "--batch-size",
    "tile_overlap": "--tile-overlap", "flow_threshold": "--flow-threshold",
    "cellprob_threshold": "--cellprob-threshold", "min_size": "--min-size",
    "max_size_fraction": "--max-size-fraction", "niter": "--niter", "z_axis": "--z-axis",
    "anisotropy": "--anisotropy", "stitch_threshold": "--stitch-threshold",
    "flow3d_smooth": "--flow3d-smooth", "gpu_memory": "--gpu-memory", "host_memory": "--host-memory",
}
_CLI_SWITCHES = {"invert": "--invert", "augment": "--augment", "do_3d": "--do-3d"}
#: written even when equal to today's CLI default (defaults may come from the model)
_ALWAYS = ("flow_threshold", "cellprob_threshold", "min_size")
#: left out of the Python call when equal (the library's defaults)
_PY_DEFAULTS = {"normalize": True, "invert": False, "tile_norm_blocksize": 0, "batch_size": 8,
                "tile_overlap": 0.1, "augment": False, "percentiles": (1.0, 99.0),
                "max_size_fraction": 0.4, "do_3d": False, "flow3d_smooth": 0.0,
                "stitch_threshold": 0.0, "progress": False}
_CLI_DEFAULTS = {"percentiles": (1.0, 99.0), "batch_size": 8, "tile_overlap": 0.1,
                 "max_size_fraction": 0.4, "stitch_threshold": 0.0, "flow3d_smooth": 0.0}


def settings_dict(settings: Any) -> dict[str, Any]:
    """Plain ``{name: value}`` of a settings object (``to_dict()``), dataclass(es) (e.g.
    ``InputOptions``/``MaskOptions``), a mapping of keyword arguments, or a sequence of these."""
    from dataclasses import asdict, is_dataclass

    if settings is None:
        return {}
    if isinstance(settings, Mapping):
        d = dict(settings)
    elif hasattr(settings, "to_dict"):
        d = dict(settings.to_dict())
    elif is_dataclass(settings) and not isinstance(settings, type):
        d = asdict(settings)
    elif isinstance(settings, (list, tuple)):
        d = {}
        for s in settings:
            d.update(settings_dict(s))
    else:
        raise TypeError(f"cannot read settings from a {type(settings).__name__}; pass a Settings "
                        "object, option dataclasses or a dict of keyword arguments")
    d.pop("sources", None)
    return d


def _model_ref(model: Any) -> tuple[str | None, str | None]:
    """(name or path to pass as ``--model``, SHA-256 if known) of a model, name or path."""
    if model is None:
        return None, None
    if isinstance(model, (str, os.PathLike)):
        return os.fspath(model), None
    info = getattr(model, "info", None) or {}
    name = getattr(model, "name", None)
    path = info.get("path")
    ref = name if name in REGISTRY else (path or name)
    return (os.fspath(ref) if ref is not None else None), info.get("sha256")


def repeat_command(
    settings: Any, model: Any = None, *, inputs: str = "IMAGES", out: str = "OUT"
) -> RepeatCommand:
    """How to run the same segmentation again: a ``cpsam segment`` command and a Python call.

    Parameters
    ----------
    settings
        The settings used: a ``Settings`` object, ``InputOptions``/``NetOptions``/``MaskOptions``
        (or a list of them), or a dict of :meth:`CellposeSAM.segment` keyword arguments.
    model
        The loaded model, a registry name or a weights path (``None``: the default model).
    inputs, out
        What to write for the images and the output folder in the command.

    Settings with no command-line flag (e.g. ``tile_norm_blocksize``) appear only in the
    Python call, and the command says so in a trailing comment.
    """
    import shlex

    d = settings_dict(settings)
    ref, sha = _model_ref(model)
    args = ["cpsam", "segment", inputs, "--out", out]
    if ref is not None:
        args += ["--model", ref]
    left_out = []
    # one canonical order (input, network, masks, volumes), whatever order the settings came in
    order = ("channel_axis", "channels", "normalize", "percentiles", "invert", "tile_norm_blocksize",
             "diameter", "batch_size", "tile_overlap", "augment", "gpu_memory", "host_memory",
             "flow_threshold",
             "cellprob_threshold", "min_size", "max_size_fraction", "niter", "do_3d", "z_axis",
             "anisotropy", "flow3d_smooth", "stitch_threshold")
    d = {k: d[k] for k in sorted(d, key=lambda k: (order.index(k) if k in order else len(order), k))}
    for key, value in d.items():
        if key in _CLI_SWITCHES:
            if value:
                args.append(_CLI_SWITCHES[key])
        elif key == "normalize":
            if value is False:
                args.append("--no-norm")
        elif key in _CLI_FLAGS:
            if value is None or (key not in _ALWAYS and _CLI_DEFAULTS.get(key) == _norm(value)):
                continue
            if key == "channels":
                args += [_CLI_FLAGS[key], ",".join(str(int(c)) for c in value)]
            elif key == "percentiles":
                args += [_CLI_FLAGS[key], *(f"{float(v):g}" for v in value)]
            else:
                args += [_CLI_FLAGS[key], f"{value:g}" if isinstance(value, float) else str(value)]
        elif value not in (None, False):
            left_out.append(f"{key}={value!r}")
    cli = shlex.join(args)
    if sha:
        cli += f"  # weights sha256 {sha}"
    if left_out:
        cli += ("  #" if not sha else ";") + " not on the command line: " + ", ".join(left_out)
    kwargs = ", ".join(f"{k}={_norm(v)!r}" for k, v in d.items() if v is not None and (
        k in _ALWAYS or _PY_DEFAULTS.get(k, object()) != _norm(v)))
    load = f"cp.load_model({ref!r})" if ref is not None else "cp.load_model()"
    python = (f"import cpsam_toolkit as cp\n\nmodel = {load}\n"
              f"result = model.segment(image{', ' if kwargs else ''}{kwargs})")
    return RepeatCommand(cli, python)


def _norm(v: Any) -> Any:
    if isinstance(v, list):
        return tuple(_norm(x) for x in v)
    if isinstance(v, np.generic):
        return v.item()
    return v


def run_record(settings: Any, model: Any = None) -> str:
    """One JSON line that says how a result was made: model (name, path, SHA-256), every
    setting and the equivalent ``cpsam segment`` command (CellProfiler image measurement)."""
    import json

    ref, sha = _model_ref(model)
    info = getattr(model, "info", None) or {}
    if sha is None and info.get("path") and os.path.isfile(info["path"]):
        sha = sha256_file(info["path"])
    try:
        from importlib.metadata import version

        toolkit = version("cpsam-toolkit")
    except Exception:  # noqa: BLE001 - a source checkout that is not installed
        toolkit = "unknown"
    rec = {"model": ref, "sha256": sha, "cpsam_toolkit": toolkit,
           "settings": {k: _norm(v) for k, v in settings_dict(settings).items()},
           "cli": repeat_command(settings, model).cli.split("  #")[0]}
    return json.dumps(rec, default=str, separators=(",", ":"))
