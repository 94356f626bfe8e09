"""Evaluate predicted label images against ground truth: pairing folders, tables, JSON, plots.

The functions return plain data (dataclasses, dicts, strings) and a matplotlib ``Figure``, so a
notebook can use them as well as ``cpsam evaluate``. Metric definitions and empty-image
conventions are those of :mod:`cpsam_toolkit.metrics`.

Typical use::

    pairing = pair_files("preds/", "gt/")               # by stem: <stem>_masks.tif in both
    result = evaluate_pairs(pairing.pairs)              # reads, matches, collects errors
    print(format_table(summary_table(result)))
    write_json(result, "eval.json", pairing=pairing)
    plot_summary(result).savefig("eval.png")

Results are grouped by ``ImageResult.group`` (the dataset: first sub-folder of the ground-truth
folder, or its name for a flat folder); :func:`summarize` accepts any grouping key, which is
the hook for evaluations over conditions (for instance image degradations).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from . import metrics as M
from .io import ImageReadError, imread, write_atomic

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = [
    "Pair",
    "Pairing",
    "ImageResult",
    "FolderEvaluation",
    "pair_files",
    "load_labels",
    "evaluate_pairs",
    "evaluate_folders",
    "summarize",
    "summary_table",
    "format_table",
    "to_json_dict",
    "write_json",
    "plot_summary",
    "save_figure",
    "consensus_bound",
]

DEFAULT_SUFFIX = "_masks.tif"
CLASSES_SUFFIX = "_classes.json"
ALL = "all"
#: thresholds shown in the table (columns are omitted when not evaluated)
TABLE_AP_THRESHOLDS: tuple[float, ...] = (0.5, 0.75, 0.9)


# --------------------------------------------------------------------------------------------
# pairing


@dataclass(frozen=True)
class Pair:
    """A prediction and its ground truth, paired by stem and relative folder."""

    stem: str
    dataset: str
    pred: Path
    gt: Path


@dataclass(frozen=True)
class Pairing:
    """Result of :func:`pair_files`: pairs, and the files left without a partner."""

    pairs: list[Pair]
    pred_only: list[Path]  # predictions with no ground truth
    gt_only: list[Path]  # ground truth with no prediction
    pred_dir: Path
    gt_dir: Path
    pred_suffix: str = DEFAULT_SUFFIX
    gt_suffix: str = DEFAULT_SUFFIX


def _collect(root: Path, suffix: str, recursive: bool) -> dict[tuple[str, str], Path]:
    files = root.rglob(f"*{suffix}") if recursive else root.glob(f"*{suffix}")
    out = {}
    for f in sorted(files):
        if not f.is_file() or f.name.startswith(".") or f.name == suffix:
            continue
        rel = f.relative_to(root)
        out[(rel.parent.as_posix(), f.name[: -len(suffix)])] = f
    return out


def pair_files(
    pred_dir: str | os.PathLike,
    gt_dir: str | os.PathLike,
    pred_suffix: str = DEFAULT_SUFFIX,
    gt_suffix: str = DEFAULT_SUFFIX,
    recursive: bool = True,
) -> Pairing:
    """Pair ``<stem><pred_suffix>`` files with ``<stem><gt_suffix>`` files.

    Parameters
    ----------
    pred_dir, gt_dir
        Folders of predicted and ground-truth label images.
    pred_suffix, gt_suffix
        File-name endings that follow the stem, extension included (``"_masks.tif"``).
    recursive
        Search sub-folders too; a file pairs with the file of the same stem in the same
        relative sub-folder. The dataset of a pair is its first sub-folder (or the name of
        ``gt_dir`` for files at the top).

    Returns
    -------
    Pairing
        Raises ``FileNotFoundError`` naming a folder that does not exist.
    """
    pred_dir, gt_dir = Path(pred_dir), Path(gt_dir)
    for name, d in (("prediction", pred_dir), ("ground-truth", gt_dir)):
        if not d.is_dir():
            raise FileNotFoundError(f"{name} folder {str(d)!r} does not exist or is not a folder")
    preds = _collect(pred_dir, pred_suffix, recursive)
    gts = _collect(gt_dir, gt_suffix, recursive)
    pairs = []
    for key in sorted(preds.keys() & gts.keys()):
        rel, stem = key
        dataset = rel.split("/")[0] if rel != "." else (gt_dir.resolve().name or str(gt_dir))
        pairs.append(Pair(stem, dataset, preds[key], gts[key]))
    return Pairing(
        pairs,
        [preds[k] for k in sorted(preds.keys() - gts.keys())],
        [gts[k] for k in sorted(gts.keys() - preds.keys())],
        pred_dir,
        gt_dir,
        pred_suffix,
        gt_suffix,
    )


# --------------------------------------------------------------------------------------------
# evaluation


def load_labels(path: str | os.PathLike) -> np.ndarray:
    """Read a label image; raises :class:`~cpsam_toolkit.io.ImageReadError` naming the file."""
    a = imread(path)
    if a.dtype == bool:
        return a.astype(np.uint8)
    if np.issubdtype(a.dtype, np.floating):
        if not np.all(np.isfinite(a)) or not np.all(a == np.round(a)):
            raise ImageReadError(f"{path}: not a label image (non-integer values, {a.dtype})")
        a = a.astype(np.int64)
    if not np.issubdtype(a.dtype, np.integer):
        raise ImageReadError(f"{path}: not a label image (dtype {a.dtype})")
    if np.issubdtype(a.dtype, np.signedinteger) and a.min() < 0:
        raise ImageReadError(f"{path}: not a label image (negative values)")
    return a


def _load_classes(path: Path) -> dict[int, str]:
    try:
        d = json.loads(path.read_text())
        return {int(k): str(v) for k, v in d.items()}
    except FileNotFoundError:
        raise ImageReadError(f"{path}: class file not found (needed for per-class)") from None
    except (OSError, ValueError, AttributeError) as e:
        raise ImageReadError(f"{path}: not a {{label: class}} JSON file ({e})") from None


def _classes_path(path: Path, suffix: str) -> Path:
    return path.with_name(path.name[: -len(suffix)] + CLASSES_SUFFIX)


@dataclass(frozen=True)
class ImageResult:
    """The statistics of one pair; ``group`` is what :func:`summarize` groups by."""

    pair: Pair
    stats: M.MatchingStats
    per_class: dict[str, M.MatchingStats] | None = None
    group: Hashable = None


@dataclass(frozen=True)
class FolderEvaluation:
    """Per-image results of :func:`evaluate_pairs`, and the files that could not be used."""

    thresholds: np.ndarray
    images: list[ImageResult]
    errors: list[tuple[str, str]] = field(default_factory=list)  # (file, message)
    per_class: bool = False


def evaluate_pairs(
    pairs: Iterable[Pair],
    thresholds: Sequence[float] = M.IOU_GRID,
    per_class: bool = False,
    suffixes: tuple[str, str] = (DEFAULT_SUFFIX, DEFAULT_SUFFIX),
    reader: Callable[[Path], np.ndarray] = load_labels,
) -> FolderEvaluation:
    """Read and match every pair; unreadable or mismatched pairs are collected, not raised.

    Parameters
    ----------
    pairs
        From :func:`pair_files`.
    thresholds
        IoU thresholds (default the paper's 0.50:0.05:0.95).
    per_class
        Also match class by class, reading ``<stem>_classes.json`` next to each label image
        (the file-name ``suffixes`` ``(pred, gt)`` are replaced).
    reader
        Reads a label image (default :func:`load_labels`).

    Returns
    -------
    FolderEvaluation
    """
    th = np.atleast_1d(np.asarray(thresholds, dtype=np.float64))
    if th.ndim != 1 or th.size == 0 or not np.all(th > 0):
        raise ValueError(f"IoU thresholds must be a non-empty list of numbers > 0, got {thresholds!r}")
    images: list[ImageResult] = []
    errors: list[tuple[str, str]] = []
    for pair in pairs:
        try:
            gt = reader(pair.gt)
            pred = reader(pair.pred)
            if gt.shape != pred.shape and np.squeeze(gt).shape == np.squeeze(pred).shape:
                gt, pred = np.squeeze(gt), np.squeeze(pred)
            if gt.shape != pred.shape:
                raise ImageReadError(
                    f"{pair.pred}: shape {pred.shape} differs from the ground truth {pair.gt} {gt.shape}"
                )
            stats = M.matching(gt, pred, th)
            pc = None
            if per_class:
                ct = _load_classes(_classes_path(pair.gt, suffixes[1]))
                cp = _load_classes(_classes_path(pair.pred, suffixes[0]))
                try:
                    pc = M.matching_per_class(gt, pred, ct, cp, th)
                except ValueError as e:  # a label without a class
                    gt_side = str(e).startswith("masks_true")
                    bad = _classes_path(*((pair.gt, suffixes[1]) if gt_side else (pair.pred, suffixes[0])))
                    raise ImageReadError(f"{bad}: {e}") from None
        except (ImageReadError, OSError) as e:
            msg = str(e)
            candidates = (
                pair.gt,
                pair.pred,
                _classes_path(pair.gt, suffixes[1]),
                _classes_path(pair.pred, suffixes[0]),
            )
            file = next((str(p) for p in candidates if msg.startswith(f"{p}:")), str(pair.pred))
            errors.append((file, msg))
            continue
        images.append(ImageResult(pair, stats, pc, pair.dataset))
    return FolderEvaluation(th, images, errors, per_class)


def evaluate_folders(
    pred_dir: str | os.PathLike,
    gt_dir: str | os.PathLike,
    pred_suffix: str = DEFAULT_SUFFIX,
    gt_suffix: str = DEFAULT_SUFFIX,
    thresholds: Sequence[float] = M.IOU_GRID,
    per_class: bool = False,
    recursive: bool = True,
) -> tuple[Pairing, FolderEvaluation]:
    """:func:`pair_files` followed by :func:`evaluate_pairs`."""
    pairing = pair_files(pred_dir, gt_dir, pred_suffix, gt_suffix, recursive)
    result = evaluate_pairs(pairing.pairs, thresholds, per_class, (pred_suffix, gt_suffix))
    return pairing, result


# --------------------------------------------------------------------------------------------
# summaries


def _group_summary(images: Sequence[ImageResult], per_class: bool) -> dict:
    stats = [r.stats for r in images]
    out = {
        "n_images": len(stats),
        "mean_per_image": M.aggregate(stats, "mean_per_image"),
        "pooled": M.aggregate(stats, "pooled"),
    }
    if per_class and all(r.per_class is not None for r in images):
        out.update(M.aggregate_classes([r.per_class for r in images]))
    return out


def summarize(
    result: FolderEvaluation,
    key: Callable[[ImageResult], Hashable] = lambda r: r.group,
    include_all: bool = True,
) -> dict[Hashable, dict]:
    """Aggregate the images of each group (both ``mean_per_image`` and ``pooled``).

    Parameters
    ----------
    result
        From :func:`evaluate_pairs`.
    key
        Group of an image (default its dataset).
    include_all
        Add a group ``"all"`` over every image when there is more than one group.

    Returns
    -------
    dict
        ``{group: {"n_images", "mean_per_image", "pooled", ...}}`` (per-class entries as in
        :class:`~cpsam_toolkit.metrics.Evaluation` when evaluated per class).
    """
    groups: dict[Hashable, list[ImageResult]] = {}
    for r in result.images:
        groups.setdefault(key(r), []).append(r)
    out = {g: _group_summary(v, result.per_class) for g, v in groups.items()}
    if include_all and len(groups) > 1:
        out[ALL] = _group_summary(result.images, result.per_class)
    return out


def _at(thresholds: np.ndarray, values: np.ndarray, t: float) -> float | None:
    idx = np.flatnonzero(np.isclose(thresholds, t))
    return float(values[idx[0]]) if idx.size else None


def summary_table(
    result: FolderEvaluation,
    aggregation: M.Aggregation = "mean_per_image",
    key: Callable[[ImageResult], Hashable] = lambda r: r.group,
) -> list[dict]:
    """One row per group: AP@0.5/0.75/0.9, error rate, F1 and PQ at 0.5, AJI, image count.

    ``aggregation`` picks ``"mean_per_image"`` (paper) or ``"pooled"`` numbers. Values at a
    threshold that was not evaluated are ``None``.
    """
    th = result.thresholds
    rows = []
    for g, s in summarize(result, key).items():
        a = s[aggregation]
        row: dict = {"dataset": str(g), "n_images": s["n_images"]}
        for t in TABLE_AP_THRESHOLDS:
            row[f"ap@{t:g}"] = _at(th, a["ap"], t)
        for name in ("error_rate", "f1", "pq"):
            row[f"{name}@0.5"] = _at(th, a[name], 0.5)
        row["aji"] = float(a["aji"])
        rows.append(row)
    return rows


def format_table(rows: Sequence[Mapping], aggregation: str = "mean_per_image") -> str:
    """Plain-text table of :func:`summary_table` rows."""
    if not rows:
        return "(no images evaluated)"
    heads = {
        "dataset": "dataset",
        "n_images": "images",
        "ap@0.5": "AP@0.5",
        "ap@0.75": "AP@0.75",
        "ap@0.9": "AP@0.9",
        "error_rate@0.5": "err@0.5",
        "f1@0.5": "F1@0.5",
        "pq@0.5": "PQ@0.5",
        "aji": "AJI",
    }
    cols = [c for c in heads if c in rows[0]]

    def cell(v) -> str:
        if v is None:
            return "-"
        if isinstance(v, float):
            return "nan" if math.isnan(v) else f"{v:.3f}"
        return str(v)

    cells = [[heads[c] for c in cols]] + [[cell(r[c]) for c in cols] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(cols))]
    lines = []
    for j, row in enumerate(cells):
        parts = [
            v.ljust(w) if i == 0 else v.rjust(w) for i, (v, w) in enumerate(zip(row, widths, strict=True))
        ]
        lines.append("  ".join(parts))
        if j == 0:
            lines.append("  ".join("-" * w for w in widths))
    label = "mean over images" if aggregation == "mean_per_image" else "pooled over images"
    return f"({label}; error rate = (FP+FN)/(TP+FN))\n" + "\n".join(lines)


# --------------------------------------------------------------------------------------------
# JSON


def _jsonable(x):
    if isinstance(x, M.MatchingStats):
        return _jsonable(x.as_dict())
    if isinstance(x, Mapping):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.ndarray):
        return _jsonable(x.tolist())
    if isinstance(x, np.generic):
        return _jsonable(x.item())
    if isinstance(x, Path):
        return str(x)
    if isinstance(x, float) and not math.isfinite(x):
        return None  # strict JSON: nan -> null
    return x


def to_json_dict(result: FolderEvaluation, pairing: Pairing | None = None) -> dict:
    """Every per-image and aggregate number as a JSON-ready dict (``nan`` becomes ``null``)."""
    images = []
    for r in result.images:
        d = {
            "dataset": r.pair.dataset,
            "stem": r.pair.stem,
            "pred": str(r.pair.pred),
            "gt": str(r.pair.gt),
            **r.stats.as_dict(),
        }
        if r.per_class is not None:
            d["per_class"] = {c: s.as_dict() for c, s in r.per_class.items()}
            d["class_average"] = M.class_average(r.per_class)
        images.append(d)
    out: dict = {
        "thresholds": result.thresholds,
        "conventions": {
            "ap": "TP/(TP+FP+FN) (Cellpose average precision)",
            "error_rate": "(FP+FN)/(TP+FN) (Cellpose-SAM paper); null when the image has no "
            "ground truth (left out of means)",
            "mean_per_image": "mean of per-image scores, null values left out",
            "pooled": "scores of counts summed over images",
            "matching": "optimal one-to-one (Hungarian), IoU >= threshold",
            "module": M.__name__,
        },
        "summary": summarize(result),
        "images": images,
        "errors": [{"file": f, "error": m} for f, m in result.errors],
    }
    if pairing is not None:
        out.update(
            pred_dir=pairing.pred_dir,
            gt_dir=pairing.gt_dir,
            pred_suffix=pairing.pred_suffix,
            gt_suffix=pairing.gt_suffix,
            unpaired={"pred_only": pairing.pred_only, "gt_only": pairing.gt_only},
        )
    return _jsonable(out)


def write_json(result: FolderEvaluation, path: str | os.PathLike, pairing: Pairing | None = None) -> Path:
    """Write :func:`to_json_dict` to ``path`` atomically (strict JSON)."""
    text = json.dumps(to_json_dict(result, pairing), indent=1, allow_nan=False)
    return write_atomic(path, lambda tmp: Path(tmp).write_text(text + "\n"))


# --------------------------------------------------------------------------------------------
# plots


def plot_summary(result: FolderEvaluation, aggregation: M.Aggregation = "mean_per_image") -> Figure:
    """Figure: AP and error rate vs IoU threshold per dataset, and per-image error rates at 0.5.

    Uses ``matplotlib.figure.Figure`` directly (no pyplot state, no GUI backend).
    """
    from matplotlib.figure import Figure

    th = result.thresholds
    summary = summarize(result, include_all=False)
    fig = Figure(figsize=(13, 4), layout="constrained")
    ax_ap, ax_er, ax_dist = fig.subplots(1, 3)
    for g, s in summary.items():
        a = s[aggregation]
        ax_ap.plot(th, a["ap"], "o-", ms=3, label=f"{g} (n={s['n_images']})")
        ax_er.plot(th, a["error_rate"], "o-", ms=3, label=str(g))
    ax_ap.set(xlabel="IoU threshold", ylabel="AP = TP/(TP+FP+FN)", ylim=(0, 1.02))
    ax_ap.set_title(f"average precision ({aggregation.replace('_', ' ')})")
    ax_ap.legend(fontsize="small")
    ax_er.set(xlabel="IoU threshold", ylabel="error rate = (FP+FN)/(TP+FN)", ylim=(0, None))
    ax_er.set_title(f"error rate ({aggregation.replace('_', ' ')})")
    i05 = np.flatnonzero(np.isclose(th, 0.5))
    k = int(i05[0]) if i05.size else 0
    names, values = [], []
    for g in summary:
        v = np.array([r.stats.error_rate[k] for r in result.images if r.group == g])
        names.append(str(g))
        values.append(v[~np.isnan(v)])
    rng = np.random.default_rng(0)
    for i, v in enumerate(values):
        if v.size > 1 and np.ptp(v) > 0:
            parts = ax_dist.violinplot(v, positions=[i], showmedians=True, widths=0.8)
            for b in parts["bodies"]:
                b.set_alpha(0.3)
        ax_dist.scatter(i + rng.uniform(-0.12, 0.12, v.size), v, s=8, alpha=0.7)
    ax_dist.set_xticks(range(len(names)), names, rotation=20, ha="right", fontsize="small")
    ax_dist.set(ylabel=f"error rate @ IoU {th[k]:g}", ylim=(0, None))
    ax_dist.set_title("per-image error rate")
    return fig


def save_figure(fig: Figure, path: str | os.PathLike, dpi: int = 120) -> Path:
    """Save a figure atomically (format from the extension of ``path``)."""
    fmt = Path(path).suffix.lstrip(".").lower() or "png"
    return write_atomic(path, lambda tmp: fig.savefig(tmp, dpi=dpi, format=fmt))


# --------------------------------------------------------------------------------------------
# human consensus


def consensus_bound(
    annotations_a: np.ndarray | Sequence[np.ndarray],
    annotations_b: np.ndarray | Sequence[np.ndarray],
    threshold: float = 0.5,
) -> dict:
    """Inter-annotator error rate and the paper's human-consensus bound (half of it).

    Two annotations of the same images are compared in both directions (A as reference and
    B as reference, error rate = (FP+FN)/(TP+FN) at ``threshold``); the inter-annotator error
    rate of an image is the mean of the two directions (only the defined one when one
    annotation is empty), and the dataset value is the mean over images. Cellpose-SAM paper,
    "Human-consensus bound": inter-annotator errors are about twice the errors of one
    annotator against the consensus, so the bound is ``inter_annotator_error_rate / 2``.

    Returns
    -------
    dict
        ``threshold``, ``n_images``, ``error_rate_b_vs_a`` and ``error_rate_a_vs_b`` (per
        image), ``per_image`` (their mean), ``inter_annotator_error_rate``,
        ``consensus_bound``, and the pooled versions ``pooled_inter_annotator_error_rate`` and
        ``pooled_consensus_bound``.
    """
    single = not isinstance(annotations_a, (list, tuple))
    a = [annotations_a] if single else list(annotations_a)
    b = [annotations_b] if single else list(annotations_b)
    if len(a) != len(b):
        raise ValueError(f"{len(a)} images in annotations_a but {len(b)} in annotations_b")
    if not a:
        raise ValueError("no images")
    ab = [M.matching(x, y, threshold) for x, y in zip(a, b, strict=True)]
    ba = [M.matching(y, x, threshold) for x, y in zip(a, b, strict=True)]
    e_ab = np.array([s.error_rate[0] for s in ab])
    e_ba = np.array([s.error_rate[0] for s in ba])
    # one direction is undefined (nan) when its reference annotation is empty
    per_image = np.where(np.isnan(e_ab), e_ba, np.where(np.isnan(e_ba), e_ab, (e_ab + e_ba) / 2))
    valid = ~np.isnan(per_image)
    inter = float(per_image[valid].mean()) if valid.any() else float("nan")
    pooled = [M.aggregate(s, "pooled")["error_rate"][0] for s in (ab, ba)]
    pooled_inter = float(np.nanmean(pooled)) if not np.all(np.isnan(pooled)) else float("nan")
    return {
        "threshold": float(threshold),
        "n_images": len(a),
        "error_rate_b_vs_a": e_ab,
        "error_rate_a_vs_b": e_ba,
        "per_image": per_image,
        "inter_annotator_error_rate": inter,
        "consensus_bound": inter / 2,
        "pooled_inter_annotator_error_rate": pooled_inter,
        "pooled_consensus_bound": pooled_inter / 2,
    }


# --------------------------------------------------------------------------------------------
# panoptic scoring (per class)
# --------------------------------------------------------------------------------------------
def evaluate_panoptic(
    masks_true: Sequence[np.ndarray],
    classes_true: Sequence[Mapping[int | str, str]],
    masks_pred: Sequence[np.ndarray],
    classes_pred: Sequence[Mapping[int | str, str]],
    thresholds: float | Sequence[float] = (0.5,),
) -> dict[str, Any]:
    """Per-class instance metrics (a prediction only matches a true object of its class).

    Returns a JSON-ready dict with, at each threshold:

    * ``class_mean``: the paper's convention, per image the mean over the classes present in
      its ground truth, then the mean over images (``ap``, ``error_rate``, ...);
    * ``per_class[c]``: mean over the images that contain class ``c`` (``ap``, ``error_rate``,
      ``n_images``), and ``pooled`` counts (``tp``, ``fp``, ``fn``, pooled ``ap``);
    * ``class_agnostic``: plain instance AP (mean per image);
    * ``classification_accuracy``: among true objects matched (IoU >= the first threshold)
      to a prediction regardless of class, the fraction whose predicted class is right.
    """
    if not (len(masks_true) == len(classes_true) == len(masks_pred) == len(classes_pred)):
        raise ValueError("masks_true, classes_true, masks_pred and classes_pred must be equally long")
    th = np.atleast_1d(np.asarray(thresholds, dtype=np.float64))
    per_images = [M.matching_per_class(t, p, ct, cp, th)
                  for t, p, ct, cp in zip(masks_true, masks_pred, classes_true, classes_pred, strict=True)]
    agg = M.aggregate_classes(per_images)
    plain = M.aggregate([M.matching(t, p, th) for t, p in zip(masks_true, masks_pred, strict=True)],
                        "mean_per_image")
    right = total = 0
    for t, p, ct, cp in zip(masks_true, masks_pred, classes_true, classes_pred, strict=True):
        tl, pl, _ = M.match_pairs(t, p, float(th[0]))
        ctd = {int(k): v for k, v in ct.items()}
        cpd = {int(k): v for k, v in cp.items()}
        total += len(tl)
        right += sum(ctd.get(int(a)) == cpd.get(int(b)) for a, b in zip(tl, pl, strict=True))

    def plain_list(x):
        return [float(v) for v in np.atleast_1d(x)]

    cm = agg["class_mean_per_image"]
    out: dict[str, Any] = {
        "thresholds": plain_list(th),
        "n_images": len(masks_true),
        "class_mean": {k: plain_list(cm[k]) for k in ("ap", "error_rate", "precision", "recall", "f1", "pq")},
        "per_class": {},
        "class_agnostic": {k: plain_list(plain[k]) for k in ("ap", "error_rate")},
        "classification_accuracy": (right / total) if total else float("nan"),
        "n_matched": int(total),
    }
    for c, pooled in agg["per_class_pooled"].items():
        mean = agg["per_class_mean_per_image"].get(c)
        out["per_class"][c] = {
            "ap": plain_list(mean["ap"]) if mean else None,
            "error_rate": plain_list(mean["error_rate"]) if mean else None,
            "n_images": int(mean["n_images"]) if mean else 0,
            "tp": [int(v) for v in np.atleast_1d(pooled["tp"])],
            "fp": [int(v) for v in np.atleast_1d(pooled["fp"])],
            "fn": [int(v) for v in np.atleast_1d(pooled["fn"])],
            "ap_pooled": plain_list(pooled["ap"]),
        }
    return out
