"""Robustness report: score a model under the perturbations of the Cellpose-SAM paper (Fig. 3).

Each image with ground truth is perturbed by every selected *family* at the paper's *levels*,
segmented with the model (no resizing at test time, as in the paper) and scored against its
ground truth at IoU 0.5 (AP = TP/(TP+FP+FN), error rate = (FP+FN)/(TP+FN); definitions in
:mod:`cpsam_toolkit.metrics`).

============  =====================================================================================
family        levels (what is done to the 1-99 % normalised, 3-channel image)
============  =====================================================================================
clean         ``original`` (the image as prepared), and ``30px`` (resized so the median cell
              diameter is 30 px: the reference of ``downsample`` and ``anisotropic``)
channels      ``RGB`` (as is), ``BRG``, ``GBR`` and ``random`` (one seeded permutation per image)
size          median GT diameter resized to 10, 15, 30, 60, 90 px (image bilinear, labels nearest;
              scored at the resized scale)
poisson       ``Poisson(k * x) / k`` with k = 5, 2.5, 0.5 photons at normalised intensity 1
blur          Gaussian sigma 2, 4, 8 px, then light shot noise (k = 120)
downsample    at 30 px diameter: blur sigma f/2, downsample by f = 2, 5, 10, bilinear back up
anisotropic   at 30 px diameter: along one (seeded) axis blur sigma f/2, downsample by f = 2, 6, 12,
              back up
============  =====================================================================================

Every degraded image is renormalised (1st percentile -> 0, 99th -> 1). The degradations are
those of training (:func:`cpsam_toolkit.training.augment.degrade` with explicit levels), one
implementation for both.

Preparing an image: channels as in :func:`cpsam_toolkit.preprocess.to_channels_last`, each
channel normalised to its 1st/99th percentiles, then made 3-channel. A grayscale image (one
channel, or channels that are all identical) is put in the first channel with the other two
zero (``gray="pad"``, the default) so that the channel permutations move the signal between
channels; ``gray="replicate"`` copies it into all three (then every permutation is the same
image). Two-channel images get a zero third channel.

Randomness (Poisson samples, the random permutation, the anisotropic axis) comes from
``numpy.random.default_rng([seed, image index, family, level])``, so a seed reproduces a
report, and choosing other families does not change the numbers of the others. Identical
network inputs (``RGB`` = clean, ``size 30`` = ``clean 30px``, permutations of gray images
with ``gray="replicate"``) are segmented once.

Typical use::
    from cpsam_toolkit import robustness as R
    data = R.load_folder("val/", max_images=4)
    rep = R.robustness_report("cpsam_toolkit_small", data.images, data.masks, names=data.names)
    print(R.format_report(rep))
    R.write_json(rep, "rob.json"); R.write_csv(rep, "rob.csv")
    R.save_figure(R.plot_report(rep), "rob.png")
"""

from __future__ import annotations

import csv
import hashlib
import io as _io
import json
import math
import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F

from . import evaluate as E
from . import metrics as M
from .io import ImageReadError, find_images, imread, write_atomic
from .preprocess import to_channels_last
from .segment import load_model
from .training import augment as A

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = [
    "FAMILIES",
    "LEVELS",
    "Report",
    "Dataset",
    "robustness_report",
    "prepare_image",
    "median_diameter",
    "perturb",
    "consensus_summary",
    "load_folder",
    "report_table",
    "format_report",
    "to_json_dict",
    "write_json",
    "write_csv",
    "plot_report",
    "save_figure",
]

#: the perturbation families, in report order (``clean`` is always included)
FAMILIES: tuple[str, ...] = ("channels", "size", "poisson", "blur", "downsample", "anisotropic")
#: the paper's levels of each family
LEVELS: dict[str, tuple] = {
    "channels": ("RGB", "BRG", "GBR", "random"),
    "size": (10, 15, 30, 60, 90),
    "poisson": (5.0, 2.5, 0.5),
    "blur": (2.0, 4.0, 8.0),
    "downsample": (2, 5, 10),
    "anisotropic": (2, 6, 12),
}
PERMUTATIONS = {"RGB": (0, 1, 2), "BRG": (2, 0, 1), "GBR": (1, 2, 0)}
#: what each level means (axis labels and documentation)
LEVEL_UNITS = {
    "clean": "",
    "channels": "channel order",
    "size": "median cell diameter (px)",
    "poisson": "photons at normalised intensity 1",
    "blur": "Gaussian sigma (px), + Poisson k=120",
    "downsample": "downsampling factor (at 30 px diameter)",
    "anisotropic": "factor along one axis (at 30 px diameter)",
}
CLEAN, CLEAN_ORIGINAL, CLEAN_30 = "clean", "original", "30px"
#: diameter the downsample and anisotropic families are run at (paper)
REFERENCE_DIAMETER = 30.0
#: the clean condition each family is compared with
BASELINE = {
    "channels": CLEAN_ORIGINAL,
    "size": CLEAN_ORIGINAL,
    "poisson": CLEAN_ORIGINAL,
    "blur": CLEAN_ORIGINAL,
    "downsample": CLEAN_30,
    "anisotropic": CLEAN_30,
}
IOU = 0.5
_FAMILY_INDEX = {f: i + 1 for i, f in enumerate(FAMILIES)}  # 0 is "clean"
_SIZE_BASED = ("size", "downsample", "anisotropic")


def level_label(level: Any) -> str:
    """``5.0`` -> ``"5"``, ``2.5`` -> ``"2.5"``, ``"RGB"`` -> ``"RGB"``."""
    return f"{level:g}" if isinstance(level, (int, float)) else str(level)


# --------------------------------------------------------------------------------------------
# image preparation and perturbations


def prepare_image(
    image: np.ndarray, channel_axis: int | None = None, gray: str = "pad", name: str = "image"
) -> tuple[np.ndarray, bool]:
    """Any 2D image -> ((3, Y, X) float32 normalised to 1-99 percentiles per channel, is_gray).

    See the module docstring for the grayscale rule (``gray="pad"`` or ``"replicate"``).
    """
    if gray not in ("pad", "replicate"):
        raise ValueError(f"gray must be 'pad' or 'replicate', not {gray!r}")
    arr = to_channels_last(image, channel_axis=channel_axis, name=name)
    chw = np.moveaxis(np.asarray(arr, dtype=np.float32), -1, 0)
    is_gray = chw.shape[0] == 1 or all(np.array_equal(chw[0], c) for c in chw[1:])
    x = np.asarray(A.renormalize(chw[:1] if is_gray else chw), dtype=np.float32)
    if is_gray:
        x = np.repeat(x, 3, axis=0) if gray == "replicate" else A.pad_channels(x, 3)
    else:
        x = A.pad_channels(x, 3)
    return np.ascontiguousarray(x, dtype=np.float32), bool(is_gray)


def median_diameter(masks: np.ndarray) -> float:
    """Median equivalent diameter ``2 sqrt(area / pi)`` of the labels (0 when there are none)."""
    areas = np.bincount(np.asarray(masks).ravel().astype(np.int64))[1:]
    areas = areas[areas > 0]
    return float(np.median(2 * np.sqrt(areas / np.pi))) if areas.size else 0.0


def _resize_image(x: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of (C, Y, X) float32 (no antialiasing, like the paper's cv2 bilinear)."""
    t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))[None]
    return F.interpolate(t, size=shape, mode="bilinear", align_corners=False)[0].numpy()


def _resize_labels(m: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize of (Y, X) labels (pixel centres, same grid as bilinear)."""
    h, w = m.shape
    ys = np.minimum(((np.arange(shape[0]) + 0.5) * h / shape[0]).astype(np.int64), h - 1)
    xs = np.minimum(((np.arange(shape[1]) + 0.5) * w / shape[1]).astype(np.int64), w - 1)
    return m[ys[:, None], xs[None, :]]


def _center_crop(x: np.ndarray, m: np.ndarray, max_side: int | None) -> tuple[np.ndarray, np.ndarray, bool]:
    h, w = m.shape
    if not max_side or (h <= max_side and w <= max_side):
        return x, m, False
    y0, x0 = max(0, (h - max_side) // 2), max(0, (w - max_side) // 2)
    sl = (slice(y0, y0 + max_side), slice(x0, x0 + max_side))
    return x[(slice(None), *sl)], m[sl], True


def resize_to_diameter(
    x: np.ndarray, masks: np.ndarray, diameter: float, target: float
) -> tuple[np.ndarray, np.ndarray]:
    """Resize image (bilinear) and labels (nearest) so the median diameter becomes ``target``."""
    scale = target / diameter
    shape = (max(2, round(masks.shape[0] * scale)), max(2, round(masks.shape[1] * scale)))
    return _resize_image(x, shape), _resize_labels(masks, shape)


def _rng(seed: int, image: int, family: str, level: int) -> np.random.Generator:
    return np.random.default_rng([seed, image, _FAMILY_INDEX.get(family, 0), level])


def random_permutation(seed: int, image: int) -> tuple[int, int, int]:
    """The ``random`` channel order of image ``image``."""
    return tuple(int(i) for i in _rng(seed, image, "channels", 3).permutation(3))


def anisotropic_axis(seed: int, image: int) -> int:
    """The axis (0 = Y, 1 = X) degraded by the ``anisotropic`` family on image ``image``."""
    return int(_rng(seed, image, "anisotropic", 99).integers(2))


def perturb(
    x: np.ndarray,
    masks: np.ndarray,
    family: str,
    level: Any,
    *,
    seed: int = 0,
    image_index: int = 0,
    diameter: float | None = None,
    max_side: int | None = 2048,
) -> tuple[np.ndarray, np.ndarray, dict]:
    """One perturbed image: ``(image (3,Y,X), ground truth at its scale, info)``.

    ``x`` comes from :func:`prepare_image`; ``diameter`` (the median GT diameter) is needed by
    the size-based families and computed from ``masks`` when None. Images larger than
    ``max_side`` after resizing are centre-cropped (image and labels alike; ``info["cropped"]``).
    """
    info: dict = {}
    if family == CLEAN:
        if level not in (CLEAN_ORIGINAL, CLEAN_30):
            raise ValueError(f"unknown clean level {level!r}; choose {CLEAN_ORIGINAL!r} or {CLEAN_30!r}")
        if level == CLEAN_ORIGINAL:
            return x, masks, info
    elif family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; choose from {', '.join(FAMILIES)}")
    elif family != "channels" and level not in LEVELS[family]:
        try:
            float(level)
        except (TypeError, ValueError):
            raise ValueError(f"{family}: level {level!r} is not a number") from None
    if family == "channels":
        perm = PERMUTATIONS.get(level)
        if level == "random":
            perm = random_permutation(seed, image_index)
        if perm is None:
            raise ValueError(f"unknown channel order {level!r}; choose one of {LEVELS['channels']}")
        info["permutation"] = list(perm)
        return np.ascontiguousarray(x[list(perm)]), masks, info
    if family in ("poisson", "blur"):
        lvl = LEVELS[family].index(level) if level in LEVELS[family] else 9
        out, _ = A.degrade(x, _rng(seed, image_index, family, lvl), kind=family, level=float(level))
        return out, masks, info
    # size-based families
    d = median_diameter(masks) if diameter is None else diameter
    if d <= 0:
        raise ValueError("the ground truth has no objects: cannot resize to a cell diameter")
    target = float(level) if family == "size" else REFERENCE_DIAMETER
    y, m = resize_to_diameter(x, masks, d, target)
    y, m, cropped = _center_crop(y, m, max_side)
    info["scale"] = target / d
    if cropped:
        info["cropped"] = True
    if family in ("downsample", "anisotropic"):
        lvl = LEVELS[family].index(level) if level in LEVELS[family] else 9
        rng = _rng(seed, image_index, family, lvl)
        axis = anisotropic_axis(seed, image_index) if family == "anisotropic" else None
        if axis is not None:
            info["axis"] = axis
        y, _ = A.degrade(y, rng, kind=family, level=float(level), axis=axis)
    return np.ascontiguousarray(y, dtype=np.float32), m, info


# --------------------------------------------------------------------------------------------
# the report


@dataclass
class Report:
    """The result of :func:`robustness_report` (JSON form: :func:`to_json_dict`).

    ``rows``: one dict per (family, level, image) with ``ap50``, ``error_rate`` (``None``
    when the image has no ground truth at that scale), ``n_true``, ``n_pred``, ``tp``.
    ``means``: one dict per (family, level) with the mean over images (``None`` left out).
    ``images``: name, shape, gray, median diameter, random permutation, anisotropic axis.
    ``consensus``: see :func:`consensus_summary` (None when no second annotation was given).
    """

    rows: list[dict]
    means: list[dict]
    images: list[dict]
    model: dict
    settings: dict
    consensus: dict | None = None
    notes: list[str] = field(default_factory=list)

    def mean(self, family: str, level: Any, score: str = "ap50") -> float | None:
        """Mean ``score`` of a (family, level)."""
        lab = level_label(level)
        for r in self.means:
            if r["family"] == family and r["level"] == lab:
                return r[score]
        raise KeyError(f"no ({family}, {lab}) in the report")

    def baseline(self, family: str, score: str = "ap50") -> float | None:
        """Clean score a family is compared with (``clean original`` or ``clean 30px``)."""
        return self.mean(CLEAN, BASELINE.get(family, CLEAN_ORIGINAL), score)

    def to_dict(self) -> dict:
        return to_json_dict(self)


@dataclass
class Dataset:
    """Images and labels read by :func:`load_folder`."""

    images: list[np.ndarray]
    masks: list[np.ndarray]
    names: list[str]
    annotations_b: list[np.ndarray | None] | None = None
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (file, reason)


def _model_description(model: Any) -> dict:
    info = dict(getattr(model, "info", {}) or {})
    out: dict = {"name": str(getattr(model, "name", type(model).__name__))}
    for k, v in info.items():
        if k == "config":
            v = v.to_dict() if hasattr(v, "to_dict") else v
        out["weights_name" if k == "name" else k] = v  # "name": how the model was asked for
    path = out.get("path")
    if path and "sha256" not in out and Path(str(path)).is_file():
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        out["sha256"] = h.hexdigest()  # which weights made the report
    return E._jsonable(out)


def _hash(x: np.ndarray) -> str:
    h = hashlib.sha1(np.ascontiguousarray(x).tobytes())
    h.update(str(x.shape).encode())
    return h.hexdigest()


def _n_tiles(shape: tuple[int, ...], tile: int = 256, overlap: float = 0.1) -> int:
    """About how many network tiles an image of ``shape`` needs (for progress lines)."""
    stride = tile * (1 - overlap)
    return math.prod(1 if n <= tile else math.ceil((n - tile) / stride) + 1 for n in shape)


def _conditions(families: Sequence[str]) -> list[tuple[str, Any]]:
    conds: list[tuple[str, Any]] = [(CLEAN, CLEAN_ORIGINAL)]
    if any(f in families for f in ("downsample", "anisotropic")):
        conds.append((CLEAN, CLEAN_30))
    for f in FAMILIES:
        if f in families:
            conds += [(f, lv) for lv in LEVELS[f]]
    return conds


def _score(gt: np.ndarray, pred: np.ndarray) -> M.MatchingStats:
    return M.matching(gt, pred, IOU)


def consensus_summary(
    annotations_a: Sequence[np.ndarray],
    annotations_b: Sequence[np.ndarray],
    predictions: Sequence[np.ndarray] | None = None,
    names: Sequence[str] | None = None,
) -> dict:
    """Human-consensus estimate (paper Methods) and where the model's error rate lies.

    ``inter_annotator_error_rate`` and ``consensus_bound`` (half of it) come from
    :func:`cpsam_toolkit.evaluate.consensus_bound` on the image pairs. With ``predictions``
    (the model on the same clean images), ``model_error_rate`` is the mean per-image error
    rate against annotation A (the report's ground truth), ``model_error_rate_vs_b`` against
    B, and ``position`` says where the A number lies: ``"at or below the consensus bound"``,
    ``"between the consensus bound and the inter-annotator error rate"`` or ``"above the
    inter-annotator error rate"``; ``fraction_of_gap`` is 0 at the bound and 1 at the
    inter-annotator error rate.
    """
    cb = E.consensus_bound(list(annotations_a), list(annotations_b), IOU)
    out = {
        "threshold": cb["threshold"],
        "n_images": cb["n_images"],
        "images": list(names) if names is not None else None,
        "inter_annotator_error_rate": cb["inter_annotator_error_rate"],
        "consensus_bound": cb["consensus_bound"],
        "per_image_inter_annotator": cb["per_image"],
        "pooled_inter_annotator_error_rate": cb["pooled_inter_annotator_error_rate"],
        "pooled_consensus_bound": cb["pooled_consensus_bound"],
    }
    if predictions is not None:
        ea = M.aggregate([_score(a, p) for a, p in zip(annotations_a, predictions, strict=True)])
        eb = M.aggregate([_score(b, p) for b, p in zip(annotations_b, predictions, strict=True)])
        model = float(ea["error_rate"][0])
        inter, bound = out["inter_annotator_error_rate"], out["consensus_bound"]
        out["model_error_rate"] = model
        out["model_error_rate_vs_b"] = float(eb["error_rate"][0])
        if any(map(math.isnan, (model, inter))):
            pos, frac = "undefined", float("nan")
        else:
            frac = (model - bound) / (inter - bound) if inter > bound else float("nan")
            if model <= bound:
                pos = "at or below the consensus bound"
            elif model <= inter:
                pos = "between the consensus bound and the inter-annotator error rate"
            else:
                pos = "above the inter-annotator error rate"
        out["position"] = pos
        out["fraction_of_gap"] = frac
    return E._jsonable(out)


def robustness_report(
    model: Any,
    images: Sequence[np.ndarray],
    masks: Sequence[np.ndarray],
    families: Sequence[str] = FAMILIES,
    seed: int = 0,
    progress: bool | Callable[[str], None] = False,
    *,
    names: Sequence[str] | None = None,
    annotations_b: Sequence[np.ndarray | None] | None = None,
    channel_axis: int | None = None,
    gray: str = "pad",
    max_side: int | None = 2048,
    segment_kwargs: Mapping[str, Any] | None = None,
) -> Report:
    """Score ``model`` on ``images`` under each perturbation family at the paper's levels.

    Parameters
    ----------
    model
        A :class:`~cpsam_toolkit.segment.CellposeSAM` (or anything with the same
        ``segment(list, channel_axis=-1, **kw)``), or a model name/path for
        :func:`~cpsam_toolkit.segment.load_model`.
    images, masks
        2D images (any channel layout :mod:`~cpsam_toolkit.preprocess` accepts) and their
        (Y, X) ground-truth labels. Images without any labelled object are left out (noted).
    families
        Subset of :data:`FAMILIES`; the clean baseline is always scored.
    seed
        Seeds every random choice (see the module docstring).
    progress
        True prints one line per condition to stderr; a callable receives the lines.
    names
        Image names for the table (default ``image0``, ``image1`` ...).
    annotations_b
        A second annotation per image (``None`` where missing): adds the human-consensus
        estimate, see :func:`consensus_summary`.
    gray
        ``"pad"`` or ``"replicate"``, see the module docstring.
    max_side
        Resized images larger than this are centre-cropped (bounds time and memory).
    segment_kwargs
        Passed to ``model.segment`` (e.g. ``batch_size``, ``flow_threshold``); the image is
        never resized by the model (``diameter`` is not allowed).
    """
    families = tuple(families)
    bad = [f for f in families if f not in FAMILIES]
    if bad:
        raise ValueError(f"unknown robustness families {bad}; choose from {', '.join(FAMILIES)}")
    if len(images) != len(masks):
        raise ValueError(f"{len(images)} images but {len(masks)} label images")
    if names is not None and len(names) != len(images):
        raise ValueError(f"{len(names)} names for {len(images)} images")
    if annotations_b is not None and len(annotations_b) != len(images):
        raise ValueError(f"{len(annotations_b)} second annotations for {len(images)} images")
    kw = dict(segment_kwargs or {})
    if kw.get("diameter"):
        raise ValueError("segment_kwargs: diameter is not allowed (the report tests size invariance)")
    kw.pop("diameter", None)
    kw.pop("channel_axis", None)
    if isinstance(model, (str, os.PathLike)):
        model = load_model(model)
    names = [str(n) for n in names] if names is not None else [f"image{i}" for i in range(len(images))]

    say: Callable[[str], None] | None
    if callable(progress):
        say = progress
    elif progress:
        def say(msg: str) -> None:
            print(f"robustness: {msg}", file=sys.stderr, flush=True)
    else:
        say = None

    # prepare images; keep those with ground-truth objects
    notes: list[str] = []
    prepared: list[tuple[int, np.ndarray, np.ndarray, float]] = []  # (index, x, masks, diameter)
    img_info: list[dict] = []
    for i, (img, m) in enumerate(zip(images, masks, strict=True)):
        x, is_gray = prepare_image(img, channel_axis, gray, names[i])
        m = np.asarray(m)
        if m.ndim != 2 or m.shape != x.shape[1:]:
            m = np.squeeze(m)
        if m.shape != x.shape[1:]:
            raise ValueError(f"{names[i]}: labels {np.shape(masks[i])} do not match the image {x.shape[1:]}")
        d = median_diameter(m)
        if d <= 0:
            notes.append(f"{names[i]}: no ground-truth objects; left out")
            continue
        prepared.append((i, x, m, d))
        info = {"name": names[i], "index": i, "shape": list(m.shape), "gray": is_gray,
                "median_diameter": round(d, 3), "n_objects": int(len(np.unique(m)) - 1)}
        if "channels" in families:
            info["random_permutation"] = list(random_permutation(seed, i))
        if "anisotropic" in families:
            info["anisotropic_axis"] = anisotropic_axis(seed, i)
        img_info.append(info)
    if not prepared:
        raise ValueError("no image with ground-truth objects to evaluate")

    conds = _conditions(families)
    rows: list[dict] = []
    results: list[E.ImageResult] = []
    clean_cache: dict[int, dict[str, np.ndarray]] = {i: {} for i, *_ in prepared}  # hash -> masks
    clean_preds: dict[int, np.ndarray] = {}
    t0 = time.perf_counter()
    for k, (family, level) in enumerate(conds):
        lab = level_label(level)
        inputs, gts, keys, infos, todo = [], [], [], [], []
        for i, x, m, d in prepared:
            y, g, info = perturb(x, m, family, level, seed=seed, image_index=i, diameter=d, max_side=max_side)
            h = _hash(y)
            inputs.append(y)
            gts.append(g)
            keys.append(h)
            infos.append(info)
            if h not in clean_cache[i]:
                todo.append(len(inputs) - 1)
        n_tiles = sum(_n_tiles(inputs[j].shape[1:]) for j in todo)
        if say:
            say(f"[{k + 1}/{len(conds)}] {family} {lab}: {len(todo)} of {len(inputs)} images to segment "
                f"(~{n_tiles} tiles; {time.perf_counter() - t0:.0f} s so far)")
        preds: dict[int, np.ndarray] = {}
        if todo:
            batch = [np.moveaxis(inputs[j], 0, -1) for j in todo]
            res = model.segment(batch, channel_axis=-1, **kw)
            for j, r in zip(todo, res, strict=True):
                preds[j] = np.asarray(r.masks)
        for j, (i, *_rest) in enumerate(prepared):
            pred = preds[j] if j in preds else clean_cache[i][keys[j]]
            if family == CLEAN:
                clean_cache[i][keys[j]] = pred
                if level == CLEAN_ORIGINAL:
                    clean_preds[i] = pred
            st = _score(gts[j], pred)
            name = names[i]
            row = {"family": family, "level": lab, "image": name,
                   "ap50": float(st.ap[0]), "error_rate": float(st.error_rate[0]),
                   "n_true": int(st.n_true), "n_pred": int(st.n_pred), "tp": int(st.tp[0]),
                   "shape": list(gts[j].shape), **infos[j]}
            rows.append(row)
            pair = E.Pair(stem=name, dataset=family, pred=Path(f"<{family} {lab}>"), gt=Path(name))
            results.append(E.ImageResult(pair, st, None, (family, lab)))

    # means per (family, level) through evaluate.summarize (nan error rates left out)
    ev = E.FolderEvaluation(np.array([IOU]), results)
    summ = E.summarize(ev, key=lambda r: r.group, include_all=False)
    means = []
    for family, level in conds:
        lab = level_label(level)
        s = summ[(family, lab)]["mean_per_image"]
        means.append({"family": family, "level": lab, "n_images": int(s["n_images"]),
                      "ap50": float(s["ap"][0]), "error_rate": float(s["error_rate"][0])})

    consensus = None
    if annotations_b is not None:
        pairs = [(i, annotations_b[i]) for i, *_ in prepared if annotations_b[i] is not None]
        if pairs:
            gt_of = {i: m for i, _x, m, _d in prepared}
            a = [gt_of[i] for i, _ in pairs]
            b = [np.squeeze(np.asarray(bb)) for _, bb in pairs]
            for (i, _), aa, bb in zip(pairs, a, b, strict=True):
                if aa.shape != bb.shape:
                    raise ValueError(
                        f"{names[i]}: second annotation {bb.shape} differs from the labels {aa.shape}"
                    )
            model_masks = [clean_preds[i] for i, _ in pairs]
            consensus = consensus_summary(a, b, model_masks, [names[i] for i, _ in pairs])
        else:
            notes.append("no second annotation matched an evaluated image; no consensus estimate")

    levels = {f: [level_label(v) for v in LEVELS[f]] for f in families}
    settings = {"families": list(families), "levels": levels,
                "seed": int(seed), "gray": gray, "max_side": max_side, "iou_threshold": IOU,
                "reference_diameter": REFERENCE_DIAMETER, "segment_kwargs": kw,
                "seconds": round(time.perf_counter() - t0, 1)}
    return Report(E._jsonable(rows), E._jsonable(means), img_info, _model_description(model),
                  E._jsonable(settings), consensus, notes)


# --------------------------------------------------------------------------------------------
# reading folders


def _gt_for(image: Path, gt_suffix: str) -> tuple[str, Path | None]:
    stem = image.name[: -len(image.suffix)] if image.suffix else image.name
    cands = [stem]
    if stem.endswith("_img"):
        cands.insert(0, stem[: -len("_img")])
    for s in cands:
        p = image.with_name(s + gt_suffix)
        if p.is_file():
            return s, p
    return cands[0], None


def _split_stems(split: str | os.PathLike | Mapping) -> set[str]:
    d = json.loads(Path(split).read_text()) if not isinstance(split, Mapping) else split
    val = d.get("val", d) if isinstance(d, Mapping) else d
    if isinstance(val, Mapping):
        return {str(s) for v in val.values() for s in v}
    return {str(s) for s in val}


def _center_crop_2d(a: np.ndarray, n: int | None) -> np.ndarray:
    if not n:
        return a
    h, w = a.shape[:2]
    y0, x0 = max(0, (h - n) // 2), max(0, (w - n) // 2)
    return a[y0 : y0 + n, x0 : x0 + n]


def load_folder(
    folders: str | os.PathLike | Sequence[str | os.PathLike],
    gt_suffix: str = E.DEFAULT_SUFFIX,
    max_images: int | None = None,
    split: str | os.PathLike | Mapping | None = None,
    annotations_b: str | os.PathLike | None = None,
    crop: int | None = None,
    recursive: bool = True,
) -> Dataset:
    """Read images and their ground truth from folders.

    An image ``<stem>.<ext>`` or ``<stem>_img.<ext>`` pairs with ``<stem><gt_suffix>`` in the
    same folder; images without one are skipped (listed in ``skipped``), as are images that are
    not 2D. ``split`` keeps only stems listed in a split JSON (the ``"val"`` lists of e.g.
    ``cpsam_toolkit/models/shipped_split.json``, or a plain list). ``max_images`` applies to
    each folder (first ones in sorted order). ``crop`` centre-crops images and labels to at
    most ``crop`` x ``crop`` pixels. ``annotations_b``: a folder with a second annotation,
    found by the same relative path and file name as the ground truth (recursive search
    falls back to the file name alone).
    """
    if isinstance(folders, (str, os.PathLike)):
        folders = [folders]
    keep = _split_stems(split) if split is not None else None
    exclude = (gt_suffix[: -len(Path(gt_suffix).suffix)] if Path(gt_suffix).suffix else gt_suffix,)
    b_root = Path(annotations_b) if annotations_b is not None else None
    if b_root is not None and not b_root.is_dir():
        raise FileNotFoundError(f"second-annotation folder {str(b_root)!r} does not exist")
    b_index: dict[str, list[Path]] = {}
    if b_root is not None:
        for f in sorted(b_root.rglob(f"*{gt_suffix}")):
            b_index.setdefault(f.name, []).append(f)
    out = Dataset([], [], [], [] if b_root is not None else None)
    for folder in folders:
        folder = Path(folder)
        if not folder.is_dir():
            raise FileNotFoundError(f"image folder {str(folder)!r} does not exist or is not a folder")
        n = 0
        for img_path in find_images(folder, recursive=recursive, exclude_suffixes=exclude):
            if img_path.name.endswith(gt_suffix):
                continue
            stem, gt_path = _gt_for(img_path, gt_suffix)
            if keep is not None and stem not in keep:
                continue
            if gt_path is None:
                out.skipped.append((str(img_path), f"no ground truth {stem}{gt_suffix}"))
                continue
            if max_images is not None and n >= max_images:
                break
            try:
                img = imread(img_path)
                gt = E.load_labels(gt_path)
                arr = to_channels_last(img, name=str(img_path))
                gt = np.squeeze(gt)
                if gt.ndim != 2 or gt.shape != arr.shape[:2]:
                    raise ImageReadError(
                        f"{gt_path}: labels {gt.shape} do not match the image {arr.shape[:2]}"
                    )
                b = None
                if b_root is not None:
                    rel = gt_path.relative_to(folder)
                    cand = b_root / rel
                    if not cand.is_file():
                        found = b_index.get(gt_path.name, [])
                        cand = found[0] if len(found) == 1 else None
                    if cand is not None:
                        b = np.squeeze(E.load_labels(cand))
                        if b.shape != gt.shape:
                            raise ImageReadError(f"{cand}: shape {b.shape} differs from {gt_path} {gt.shape}")
            except (ImageReadError, OSError, ValueError) as e:
                out.skipped.append((str(img_path), str(e)))
                continue
            out.images.append(_center_crop_2d(arr, crop))
            out.masks.append(_center_crop_2d(gt, crop))
            rel = img_path.parent.relative_to(folder).as_posix()
            out.names.append(stem if rel == "." else f"{rel}/{stem}")
            if out.annotations_b is not None:
                out.annotations_b.append(_center_crop_2d(b, crop) if b is not None else None)
            n += 1
    return out


# --------------------------------------------------------------------------------------------
# tables, files, figure


def _as_dict(report: Report | Mapping) -> dict:
    return to_json_dict(report) if isinstance(report, Report) else dict(report)


def report_table(report: Report | Mapping) -> list[dict]:
    """One row per (family, level): ``family, level, n_images, ap50, error_rate`` and the
    change against the family's clean baseline (``d_ap50``, ``d_error_rate``)."""
    d = _as_dict(report)
    base = {(r["family"], r["level"]): r for r in d["means"] if r["family"] == CLEAN}
    out = []
    for r in d["means"]:
        ref_level = r["level"] if r["family"] == CLEAN else BASELINE[r["family"]]
        ref = base.get((CLEAN, ref_level))
        row = {k: r[k] for k in ("family", "level", "n_images", "ap50", "error_rate")}
        for s in ("ap50", "error_rate"):
            a, b = r[s], (ref or {}).get(s)
            row[f"d_{s}"] = None if a is None or b is None else a - b
        out.append(row)
    return out


def format_report(report: Report | Mapping) -> str:
    """Plain-text summary: the table of :func:`report_table` and the consensus estimate."""
    d = _as_dict(report)

    def cell(v, signed=False) -> str:
        if v is None or (isinstance(v, float) and math.isnan(v)):
            return "-"
        if isinstance(v, float):
            return f"{v:+.3f}" if signed else f"{v:.3f}"
        return str(v)

    heads = ["family", "level", "images", "AP@0.5", "dAP", "err@0.5", "derr"]
    cells = [heads] + [
        [r["family"], r["level"], str(r["n_images"]), cell(r["ap50"]), cell(r["d_ap50"], True),
         cell(r["error_rate"]), cell(r["d_error_rate"], True)]
        for r in report_table(d)
    ]
    widths = [max(len(c[i]) for c in cells) for i in range(len(heads))]
    lines = []
    for j, c in enumerate(cells):
        parts = [v.ljust(w) if i < 2 else v.rjust(w) for i, (v, w) in enumerate(zip(c, widths, strict=True))]
        lines.append("  ".join(parts))
        if j == 0:
            lines.append("  ".join("-" * w for w in widths))
    m = d.get("model", {})
    head = (f"robustness of {m.get('name', '?')} on {len(d['images'])} images "
            f"(seed {d['settings']['seed']}); "
            "mean over images at IoU 0.5; d = change vs the clean baseline "
            "(clean 30px for downsample/anisotropic)")
    text = head + "\n" + "\n".join(lines)
    c = d.get("consensus")
    if c:
        text += (f"\nhuman consensus ({c['n_images']} images with two annotations): inter-annotator "
                 f"error rate {cell(c['inter_annotator_error_rate'])}, consensus bound "
                 f"{cell(c['consensus_bound'])}")
        if "model_error_rate" in c:
            text += (f"; model (clean) {cell(c['model_error_rate'])} vs annotation A, "
                     f"{cell(c['model_error_rate_vs_b'])} vs B: {c['position']}")
    for n in d.get("notes", []):
        text += f"\nnote: {n}"
    return text


def to_json_dict(report: Report) -> dict:
    """Everything in the report as strict-JSON-ready data."""
    return E._jsonable({
        "model": report.model,
        "settings": report.settings,
        "conventions": {
            "ap50": "TP/(TP+FP+FN) at IoU 0.5",
            "error_rate": "(FP+FN)/(TP+FN) at IoU 0.5; null without ground truth (left out of means)",
            "means": "mean of per-image scores over the images of each (family, level)",
            "baseline": {f: f"{CLEAN} {b}" for f, b in BASELINE.items()},
            "level_units": LEVEL_UNITS,
        },
        "images": report.images,
        "means": report.means,
        "table": report_table_from(report.means),
        "rows": report.rows,
        "consensus": report.consensus,
        "notes": report.notes,
    })


def report_table_from(means: list[dict]) -> list[dict]:
    return report_table({"means": means})


def from_json(path_or_dict: str | os.PathLike | Mapping) -> Report:
    """Read a report written by :func:`write_json` back into a :class:`Report`."""
    d = path_or_dict if isinstance(path_or_dict, Mapping) else json.loads(Path(path_or_dict).read_text())
    return Report(list(d["rows"]), list(d["means"]), list(d["images"]), dict(d["model"]),
                  dict(d["settings"]), d.get("consensus"), list(d.get("notes", [])))


def write_json(report: Report, path: str | os.PathLike) -> Path:
    """Write :func:`to_json_dict` atomically (strict JSON, ``nan`` -> ``null``)."""
    text = json.dumps(to_json_dict(report), indent=1, allow_nan=False)
    return write_atomic(path, lambda tmp: Path(tmp).write_text(text + "\n"))


CSV_COLUMNS = ("family", "level", "image", "ap50", "error_rate", "n_true", "n_pred", "tp")


def write_csv(report: Report, path: str | os.PathLike) -> Path:
    """Per-image rows, then one ``image = "mean"`` row per (family, level), atomically."""
    buf = _io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(CSV_COLUMNS)

    def fmt(v):
        if v is None or (isinstance(v, float) and math.isnan(v)):
            return ""
        return f"{v:.6g}" if isinstance(v, float) else v

    for r in report.rows:
        w.writerow([fmt(r[c]) for c in CSV_COLUMNS])
    sums: dict[tuple[str, str], list[int]] = {}
    for r in report.rows:
        s = sums.setdefault((r["family"], r["level"]), [0, 0, 0])
        s[0] += r["n_true"]
        s[1] += r["n_pred"]
        s[2] += r["tp"]
    for r in report.means:
        s = sums[(r["family"], r["level"])]
        w.writerow([r["family"], r["level"], "mean", fmt(r["ap50"]), fmt(r["error_rate"]), *s])
    text = buf.getvalue()
    return write_atomic(path, lambda tmp: Path(tmp).write_text(text))


def plot_report(report: Report | Mapping) -> Figure:
    """Figure like the paper's Fig. 3: AP@0.5 (top) and error rate (bottom) against the level,
    one column per family; grey lines are images, black the mean, the dashed line the clean
    baseline (clean at 30 px for downsample/anisotropic). With a consensus estimate, the
    error-rate panels at the original scale shade the band between the consensus bound and
    the inter-annotator error rate."""
    from matplotlib.figure import Figure

    d = _as_dict(report)
    fams = [f for f in FAMILIES if any(r["family"] == f for r in d["means"])]
    cols = max(1, len(fams))
    fig = Figure(figsize=(2.9 * cols + 0.6, 6.0), layout="constrained")
    axes = np.asarray(fig.subplots(2, cols, squeeze=False))
    means = {(r["family"], r["level"]): r for r in d["means"]}
    cons = d.get("consensus")
    for c, fam in enumerate(fams):
        levels = [level_label(v) for v in LEVELS[fam] if (fam, level_label(v)) in means]
        xs = np.arange(len(levels))
        base_lab = BASELINE[fam]
        panels = (("ap50", "AP @ IoU 0.5"), ("error_rate", "error rate @ IoU 0.5"))
        for r_i, (score, ylabel) in enumerate(panels):
            ax = axes[r_i, c]
            per_img: dict[str, list] = {}
            for row in d["rows"]:
                if row["family"] == fam:
                    per_img.setdefault(row["image"], [None] * len(levels))
                    if row["level"] in levels:
                        per_img[row["image"]][levels.index(row["level"])] = row[score]
            for vals in per_img.values():
                v = np.array([np.nan if x is None else x for x in vals], float)
                ax.plot(xs, v, "-", color="0.75", lw=0.8, marker=".", ms=3, zorder=1)
            mv = np.array([np.nan if means[(fam, lv)][score] is None else means[(fam, lv)][score]
                           for lv in levels], float)
            ax.plot(xs, mv, "o-", color="k", lw=2, ms=5, zorder=3, label="mean")
            b = means.get((CLEAN, base_lab), {}).get(score)
            if b is not None:
                ax.axhline(b, ls="--", color="C3", lw=1.5, zorder=2,
                           label="clean" if base_lab == CLEAN_ORIGINAL else "clean @30 px")
            if (score == "error_rate" and cons and base_lab == CLEAN_ORIGINAL and fam != "size"
                    and cons.get("consensus_bound") is not None):
                ax.axhspan(cons["consensus_bound"], cons["inter_annotator_error_rate"], color="C0",
                           alpha=0.15, zorder=0, label="consensus bound .. inter-annotator")
            ax.set_xticks(xs, levels)
            if score == "ap50":
                ax.set_ylim(0, 1.02)
                ax.set_title(fam)
            else:
                ax.set_ylim(0, None)
                ax.set_xlabel(LEVEL_UNITS[fam], fontsize="small")
            if c == 0:
                ax.set_ylabel(ylabel)
            if c == 0 or (r_i == 1 and cons and fam == fams[-1]):
                ax.legend(fontsize="x-small", loc="best")
    m = d.get("model", {})
    fig.suptitle(f"robustness of {m.get('name', '?')} ({len(d['images'])} images, seed "
                 f"{d['settings']['seed']})", fontsize="medium")
    return fig


def save_figure(fig: Figure, path: str | os.PathLike, dpi: int = 120) -> Path:
    """Save a figure atomically (:func:`cpsam_toolkit.evaluate.save_figure`)."""
    return E.save_figure(fig, path, dpi)
