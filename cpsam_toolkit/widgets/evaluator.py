"""``Evaluator``: per-image AP and error rate, AP vs IoU, worst images first with FP/FN drawn.

Two ways in: a model and a test folder (``<id>_img.*`` + ``<id>_masks.*``; the model segments
every image), or a folder of predicted ``<stem>_masks.tif`` and a ground-truth folder (paired by
stem, :func:`cpsam_toolkit.evaluate.pair_files`). Matching and scores are those of
:mod:`cpsam_toolkit.metrics`; the figure is :func:`cpsam_toolkit.evaluate.plot_summary`.

In the browser, predicted objects are outlined green when matched (true positive) and magenta
when unmatched (false positive); ground-truth objects without a match (false negatives) are
outlined yellow. Hover an object for its area, status and best IoU.
"""

from __future__ import annotations

import html
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ipywidgets as W
import numpy as np

from .. import evaluate as E
from .. import metrics as M
from ..io import IMAGE_EXTENSIONS, imread
from ..outputs import outlines, save_masks
from ..preprocess import to_channels_last
from ..training.data import find_pairs
from ._base import (
    Panel,
    ViewControls,
    describe_settings,
    figure_png,
    html_table,
    report_errors,
    resolve_settings,
    safe_output_dir,
    segment_kwargs,
)
from .canvas import LabelCanvas
from .codec import display_rgb

_segment_kwargs = segment_kwargs

TP_COLOR = "#2ecc40"
FP_COLOR = "#ff2fd6"
FN_COLOR = (255, 220, 0)


@dataclass
class EvalImage:
    """One evaluated image: names, files and label arrays kept for browsing."""

    name: str
    gt: np.ndarray
    pred: np.ndarray
    stats: M.MatchingStats
    image_path: Path | None = None
    gt_path: Path | None = None
    pred_path: Path | None = None


def object_status(gt: np.ndarray, pred: np.ndarray, iou: float = 0.5) -> dict[str, np.ndarray]:
    """Match at ``iou`` and classify objects.

    Returns ``tp_pred``, ``fp_pred`` (predicted labels matched / unmatched), ``tp_true``,
    ``fn_true`` (ground-truth labels matched / unmatched) and ``pred_labels`` with their
    ``best_iou`` (highest IoU with any ground-truth object, 0 without overlap).
    """
    t_lab, p_lab, _ = M.match_pairs(gt, pred, iou)
    ov = M.label_overlap(gt, pred)
    best = np.zeros(ov.n_pred)
    if ov.rows.size:
        np.maximum.at(best, ov.cols, ov.iou)
    return {
        "tp_pred": np.sort(p_lab),
        "fp_pred": np.setdiff1d(ov.pred_labels, p_lab),
        "tp_true": np.sort(t_lab),
        "fn_true": np.setdiff1d(ov.true_labels, t_lab),
        "pred_labels": ov.pred_labels,
        "best_iou": best,
    }


class Evaluator(Panel):
    """Evaluate a model on a test folder, or predictions against ground truth.

    Parameters
    ----------
    model : CellposeSAM, optional
        With ``test_dir``: segment every test image.
    test_dir : folder, optional
        ``<id><img_suffix>.<ext>`` images with ``<id><mask_suffix>.<ext>`` ground truth.
    pred_dir, gt_dir : folders, optional
        Instead of a model: predicted and ground-truth label images paired by stem
        (``pred_suffix`` / ``gt_suffix``); images for display are looked up next to the ground
        truth as ``<stem><img_suffix>.<ext>`` or ``<stem>.<ext>`` (``image_dir`` to look elsewhere).
    out_dir : folder, optional
        Model mode: also write the predictions there as ``<id>_masks.tif``.
    thresholds : IoU thresholds of the table and plot (default 0.50:0.05:0.95).
    iou : IoU threshold that decides TP/FP/FN in the image view (changeable in the panel).
    """

    def __init__(
        self,
        model: Any = None,
        test_dir: str | os.PathLike | None = None,
        *,
        pred_dir: str | os.PathLike | None = None,
        gt_dir: str | os.PathLike | None = None,
        image_dir: str | os.PathLike | None = None,
        img_suffix: str = "_img",
        mask_suffix: str = "_masks",
        pred_suffix: str = "_masks.tif",
        gt_suffix: str = "_masks.tif",
        out_dir: str | os.PathLike | None = None,
        thresholds: Sequence[float] = M.IOU_GRID,
        iou: float = 0.5,
        channel_axis: int | None = None,
        height: int = 480,
        segment_kwargs: dict[str, Any] | None = None,
    ) -> None:
        self.thresholds = np.asarray(thresholds, dtype=np.float64)
        if not np.any(np.isclose(self.thresholds, iou)):
            self.thresholds = np.unique(np.append(self.thresholds, iou))
        self.channel_axis = channel_axis
        self.img_suffix = img_suffix
        self.images: list[EvalImage] = []
        self.errors: list[tuple[str, str]] = []
        self.settings_text = ""
        if model is not None and test_dir is not None:
            # the model's recommended settings unless given (shown in the panel with their sources)
            values, sources = resolve_settings(model, segment_kwargs)
            self.settings_text = f"{model.name}: {describe_settings(values, sources)}"
            self._run_model(model, Path(test_dir), img_suffix, mask_suffix,
                            safe_output_dir(out_dir) if out_dir is not None else None,
                            _segment_kwargs(model, values, sources))
        elif pred_dir is not None and gt_dir is not None:
            self._run_folders(Path(pred_dir), Path(gt_dir), pred_suffix, gt_suffix,
                              Path(image_dir) if image_dir is not None else None)
        else:
            raise ValueError("Evaluator needs model= and test_dir=, or pred_dir= and gt_dir=")
        self.result = E.FolderEvaluation(
            self.thresholds,
            [E.ImageResult(E.Pair(im.name, self._dataset, im.pred_path or Path(im.name),
                                  im.gt_path or Path(im.name)), im.stats, None, self._dataset)
             for im in self.images],
            list(self.errors),
        )

        # -- widgets
        self.canvas = LabelCanvas(tools=["pan"], height=height)
        self.status = W.HTML()
        guard = report_errors(self.status)
        self.table_html = W.HTML()
        self.plot = W.Image(value=self.figure_png(), format="png", layout=W.Layout(width="900px"))
        order = self.worst_first()
        self.browser = W.Dropdown(options=[(self._row_label(i), i) for i in order], description="image",
                                  layout=W.Layout(width="520px"))
        self.iou = W.Dropdown(options=[(f"{t:.2f}", float(t)) for t in self.thresholds], value=float(
            self.thresholds[np.argmin(np.abs(self.thresholds - iou))]), description="IoU",
            layout=W.Layout(width="140px"), style={"description_width": "30px"})
        self.show_fn = W.Checkbox(value=True, description="false negatives", indent=False,
                                  layout=W.Layout(width="140px"))
        self.view = ViewControls(self.canvas, guard(lambda _c: self._show()), 1)
        self.legend = W.HTML(
            f"<span style='color:{TP_COLOR}'>■ true positive</span> &nbsp; "
            f"<span style='color:{FP_COLOR}'>■ false positive</span> &nbsp; "
            f"<span style='color:rgb{FN_COLOR}'>■ false negative (ground truth)</span>")
        self.browser.observe(guard(lambda _c: self._show()), "value")
        self.iou.observe(guard(lambda _c: self._show()), "value")
        self.show_fn.observe(guard(lambda _c: self._show()), "value")
        self.detail = W.HTML()
        self.table_html.value = self.table_html_text()
        self.widget = W.VBox([
            W.HTML(f"<b>{len(self.images)} images</b>" + (f", {len(self.errors)} not usable: "
                   + html.escape("; ".join(f"{f}: {m}" for f, m in self.errors[:5])) if self.errors else "")
                   + ("<div style='font-size:11px;opacity:0.85'>segmented by "
                      f"{html.escape(self.settings_text)}</div>" if self.settings_text else "")),
            self.plot,
            W.Accordion([self.table_html], titles=("per-image table (worst first)",)),
            W.HBox([self.browser, self.iou, self.show_fn], layout=W.Layout(align_items="center")),
            self.legend,
            self.view.box,
            self.canvas,
            W.HBox([self.detail, self.status]),
        ])
        if order:
            self.browser.value = order[0]
            self._show()

    # -- running --------------------------------------------------------------------------
    _dataset = "test"

    def _run_model(self, model: Any, test_dir: Path, img_suffix: str, mask_suffix: str,
                   out_dir: str | os.PathLike | None, seg_kw: dict[str, Any]) -> None:
        self._dataset = test_dir.resolve().name or "test"
        pairs = find_pairs(test_dir, img_suffix, mask_suffix)
        for ip, mp in pairs:
            stem = ip.stem[: len(ip.stem) - len(img_suffix)] if img_suffix else ip.stem
            try:
                img = imread(ip)
                gt = np.squeeze(E.load_labels(mp))
                pred = model.segment(img, channel_axis=self.channel_axis, **seg_kw).masks
                if gt.shape != pred.shape:
                    raise ValueError(f"{mp}: ground truth {gt.shape} differs from the image {pred.shape}")
            except (OSError, ValueError) as e:
                self.errors.append((str(ip), str(e)))
                continue
            pp = None
            if out_dir is not None:
                pp = Path(save_masks(Path(out_dir) / f"{stem}_masks.tif", pred))
            self.images.append(EvalImage(stem, gt, pred, M.matching(gt, pred, self.thresholds), ip, mp, pp))

    def _run_folders(self, pred_dir: Path, gt_dir: Path, pred_suffix: str, gt_suffix: str,
                     image_dir: Path | None) -> None:
        pairing = E.pair_files(pred_dir, gt_dir, pred_suffix, gt_suffix)
        self._dataset = gt_dir.resolve().name or "test"
        for f in pairing.pred_only:
            self.errors.append((str(f), "no ground truth with the same stem"))
        for p in pairing.pairs:
            try:
                gt = np.squeeze(E.load_labels(p.gt))
                pred = np.squeeze(E.load_labels(p.pred))
                if gt.shape != pred.shape:
                    raise ValueError(f"{p.pred}: shape {pred.shape} differs from the ground truth {gt.shape}")
            except (OSError, ValueError) as e:
                self.errors.append((str(p.pred), str(e)))
                continue
            img = self._find_image(p.stem, image_dir or p.gt.parent)
            self.images.append(EvalImage(p.stem, gt, pred, M.matching(gt, pred, self.thresholds),
                                         img, p.gt, p.pred))

    def _find_image(self, stem: str, folder: Path) -> Path | None:
        for base in (stem + self.img_suffix, stem):
            for ext in IMAGE_EXTENSIONS:
                for e in (ext, ext.upper()):
                    f = folder / f"{base}{e}"
                    if f.is_file():
                        return f
        return None

    # -- results --------------------------------------------------------------------------
    def _k(self, t: float) -> int:
        return int(np.argmin(np.abs(self.thresholds - t)))

    def rows(self) -> list[dict[str, Any]]:
        """Per-image scores (in input order): AP at 0.5/0.75/0.9, error rate, counts at 0.5."""
        out = []
        k5 = self._k(0.5)
        for i, im in enumerate(self.images):
            s = im.stats
            r: dict[str, Any] = {"index": i, "name": im.name, "n_true": s.n_true, "n_pred": s.n_pred}
            for t in (0.5, 0.75, 0.9):
                if np.any(np.isclose(self.thresholds, t)):
                    r[f"ap{int(round(t * 100))}"] = float(s.ap[self._k(t)])
            r["error_rate50"] = float(s.error_rate[k5])
            r["tp50"], r["fp50"], r["fn50"] = int(s.tp[k5]), int(s.fp[k5]), int(s.fn[k5])
            r["mean_ap"] = float(np.nanmean(s.ap))
            out.append(r)
        return out

    def worst_first(self) -> list[int]:
        """Image indices sorted by AP@0.5 (then mean AP) ascending: the worst first."""
        rows = self.rows()
        key = [(-1.0 if np.isnan(r.get("ap50", np.nan)) else r.get("ap50", 0.0), r["mean_ap"], r["index"])
               for r in rows]
        return [k[2] for k in sorted(key)]

    def summary(self) -> dict[str, Any]:
        """Mean per-image and pooled scores per threshold (:func:`cpsam_toolkit.evaluate.summarize`)."""
        return E.summarize(self.result)

    def table_html_text(self) -> str:
        rows = self.rows()
        rows = [rows[i] for i in self.worst_first()]
        cols = [("name", "image"), ("n_true", "true"), ("n_pred", "pred"), ("ap50", "AP@0.5"),
                ("ap75", "AP@0.75"), ("ap90", "AP@0.9"), ("error_rate50", "error rate@0.5"),
                ("fp50", "FP@0.5"), ("fn50", "FN@0.5")]
        cols = [c for c in cols if not rows or c[0] in rows[0]]
        return html_table(rows, cols)

    def figure(self) -> Any:
        """AP and error rate vs IoU threshold and per-image error rates (a matplotlib Figure)."""
        return E.plot_summary(self.result)

    def figure_png(self) -> bytes:
        if not self.images:
            return b""
        return figure_png(self.figure(), dpi=80)

    def _row_label(self, i: int) -> str:
        im = self.images[i]
        s = im.stats
        k = self._k(0.5)
        return (f"{im.name}  ·  AP@0.5 {s.ap[k]:.3f}  ·  FP {int(s.fp[k])}  ·  FN {int(s.fn[k])}")

    # -- view -----------------------------------------------------------------------------
    _cache: tuple[int, np.ndarray] | None = None

    def _image(self, i: int) -> np.ndarray:
        if self._cache is None or self._cache[0] != i:
            self._cache = (i, imread(self.images[i].image_path))  # type: ignore[arg-type]
        return self._cache[1]

    def open(self, i: int) -> None:
        """Show image ``i`` (index into ``evaluator.images``)."""
        self.browser.value = i

    def overlay(self, i: int, iou: float | None = None, show_fn: bool = True,
                channel: int | None = None) -> tuple[np.ndarray, dict[str, Any]]:
        """The display image with false negatives drawn in, and the TP/FP colour of each
        predicted label: ``(rgb, {"colors", "status", "objects"})``."""

        im = self.images[i]
        iou = float(self.iou.value if iou is None else iou)
        st = object_status(im.gt, im.pred, iou)
        if im.image_path is not None:
            rgb = display_rgb(self._image(i), channel, self.channel_axis)
        else:
            rgb = np.zeros((*im.gt.shape, 3), np.uint8)
        if show_fn and st["fn_true"].size:
            fn = np.isin(im.gt, st["fn_true"])
            edge = outlines(np.where(fn, im.gt, 0))
            rgb = rgb.copy()
            rgb[edge] = FN_COLOR
        colors = {int(l): TP_COLOR for l in st["tp_pred"]}
        colors.update({int(l): FP_COLOR for l in st["fp_pred"]})
        area = np.bincount(im.pred.ravel().astype(np.int64))
        labels = st["pred_labels"]
        tp = set(int(x) for x in st["tp_pred"])
        objects = {"label": labels, "area": area[labels],
                   "match": np.array(["TP" if int(l) in tp else "FP" for l in labels], dtype=object),
                   "iou": st["best_iou"]}
        return rgb, {"colors": colors, "status": st, "objects": objects}

    def _show(self) -> None:
        i = self.browser.value
        if i is None:
            return
        rgb, info = self.overlay(i, show_fn=self.show_fn.value, channel=self.view.channel.value)

        if self.images[i].image_path is not None:
            n = to_channels_last(self._image(i), self.channel_axis).shape[-1]
            if len(self.view.channel.options) != (n + 1 if n > 1 else 1):
                self.view.set_channels(n)
        with self.canvas.hold_sync():
            self.canvas.set_image(rgb)
            self.canvas.colors = {str(k): v for k, v in info["colors"].items()}
            self.canvas.set_labels(self.images[i].pred)
            self.canvas.set_objects(info["objects"])
        st = info["status"]
        s = self.images[i].stats
        k = self._k(float(self.iou.value))
        self.detail.value = (
            f"<b>{html.escape(self.images[i].name)}</b>: {s.n_true} true, {s.n_pred} predicted · "
            f"at IoU {self.iou.value:.2f}: TP {st['tp_pred'].size}, FP {st['fp_pred'].size}, "
            f"FN {st['fn_true'].size}, AP {s.ap[k]:.3f}, error rate {s.error_rate[k]:.3f}")
