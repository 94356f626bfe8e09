"""Instance-segmentation metrics: overlap, IoU, optimal matching, AP, error rate, PQ, AJI.

All functions are pure and work on 2D or 3D integer label images (0 = background, any other
value = one object; labels need not be consecutive).

Matching
    A ground-truth and a predicted object are *matched* at IoU threshold ``t`` by an optimal
    one-to-one assignment that maximises the number of pairs with ``IoU >= t`` and, among
    those assignments, the sum of the matched IoUs (Hungarian algorithm, as in Cellpose and
    StarDist). The number of true positives is therefore the maximum number of disjoint pairs
    with ``IoU >= t`` and equals ``cellpose.metrics.average_precision`` exactly.

Scores per image and threshold (``tp, fp, fn``; ``n_true = tp + fn``, ``n_pred = tp + fp``)
    ===================  ================================  =========================
    name                 definition                         also known as
    ===================  ================================  =========================
    ``ap``               tp / (tp + fp + fn)               Cellpose "average
                                                            precision", StarDist
                                                            "accuracy", micro-sam SA
    ``precision``        tp / (tp + fp)
    ``recall``           tp / (tp + fn)
    ``f1``               2 tp / (2 tp + fp + fn)
    ``error_rate``       (fp + fn) / (tp + fn)             Cellpose-SAM paper
    ``sq``               sum of matched IoU / tp           mean matched IoU
    ``pq``               sum of matched IoU /              panoptic quality = SQ * RQ
                         (tp + fp / 2 + fn / 2)            (RQ = F1)
    ``aji``              see :func:`aggregated_jaccard_index`
    ===================  ================================  =========================

Empty images (documented conventions)
    * no object in either image: a perfect prediction, every score is 1 and the error rate 0;
    * otherwise a ratio whose denominator is 0 is ``nan`` (undefined), never 0 or inf:
      no ground truth but some predictions gives ``ap = f1 = pq = precision = 0`` and
      ``recall = error_rate = nan``; no prediction but some ground truth gives
      ``ap = f1 = pq = recall = 0``, ``error_rate = 1`` and ``precision = nan``;
      ``sq`` is ``nan`` whenever ``tp == 0`` (unless both images are empty).

Shapes: :func:`average_precision` returns ``(n_images, n_thresholds)`` arrays for a list or
tuple of images and ``(n_thresholds,)`` for one array (2D or 3D), like the reference.
Thresholds must be > 0.

Aggregation over images is always explicit: ``"mean_per_image"`` (the mean of per-image scores
ignoring ``nan``, the paper's convention) or ``"pooled"`` (scores of the summed counts, StarDist's
``by_image=False``).

Differences from ``cellpose.metrics`` (4.2.1.1)
    * counts are int64 and scores float64 (the reference returns float32);
    * both images empty: AP 1 here, ``nan`` in the reference;
    * an image without background pixels: the reference counts one object too few
      (``len(np.unique(m)) - 1``); here every non-zero label counts;
    * shapes must be equal (the reference only compares sizes); lists or tuples of arrays are
      several images, one array (of any dimension) is one image, as in the reference;
    * among assignments with the same number of true positives, the reference breaks ties by
      the sum of IoU over all assigned pairs (those below the threshold too); here only the
      matched pairs count. Counts are identical, ``sq``/``pq`` can differ only in such ties.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Literal

import numpy as np
from scipy.optimize import linear_sum_assignment
from scipy.sparse import coo_matrix, csr_matrix
from scipy.sparse.csgraph import connected_components

__all__ = [
    "DEFAULT_THRESHOLDS",
    "IOU_GRID",
    "SCORE_NAMES",
    "COUNT_NAMES",
    "Overlap",
    "MatchingStats",
    "Evaluation",
    "label_overlap",
    "iou_matrix",
    "match_pairs",
    "matching",
    "average_precision",
    "aggregated_jaccard_index",
    "scores",
    "aggregate",
    "matching_per_class",
    "class_average",
    "aggregate_classes",
    "evaluate_images",
]

#: Cellpose's default thresholds.
DEFAULT_THRESHOLDS: tuple[float, ...] = (0.5, 0.75, 0.9)
#: The paper's IoU grid 0.50, 0.55, ..., 0.95.
IOU_GRID: tuple[float, ...] = tuple(round(0.5 + 0.05 * i, 2) for i in range(10))
#: Per-threshold scores (see the module docstring).
SCORE_NAMES: tuple[str, ...] = ("ap", "precision", "recall", "f1", "error_rate", "sq", "pq")
#: Per-threshold counts.
COUNT_NAMES: tuple[str, ...] = ("tp", "fp", "fn")

Aggregation = Literal["mean_per_image", "pooled"]

# up to this many (max true label + 1) x (max pred label + 1) bins (or one per pixel) the
# contingency table is one dense bincount; beyond, labels are compacted and pairs counted
# sparsely (bincount up to _BINCOUNT_MAX_BINS compact pairs, else sorting)
_DENSE_MAX_BINS = 1 << 22
_BINCOUNT_MAX_BINS = 1 << 22


# --------------------------------------------------------------------------------------------
# overlap and IoU


@dataclass(frozen=True)
class Overlap:
    """Sparse contingency table of two label images.

    Objects are indexed ``0..K-1`` (truth) and ``0..L-1`` (prediction) in increasing label order;
    ``rows[i], cols[i], intersections[i]`` list the pairs that share at least one pixel.
    """

    true_labels: np.ndarray  # (K,) label values present in the ground truth, increasing
    pred_labels: np.ndarray  # (L,)
    true_areas: np.ndarray  # (K,) int64 pixel counts
    pred_areas: np.ndarray  # (L,)
    rows: np.ndarray  # (P,) int64 index into true_labels, pairs sorted by (row, col)
    cols: np.ndarray  # (P,) int64 index into pred_labels
    intersections: np.ndarray  # (P,) int64

    @property
    def n_true(self) -> int:
        return int(self.true_labels.size)

    @property
    def n_pred(self) -> int:
        return int(self.pred_labels.size)

    @property
    def iou(self) -> np.ndarray:
        """(P,) float64 IoU of each overlapping pair."""
        inter = self.intersections
        return inter / (self.true_areas[self.rows] + self.pred_areas[self.cols] - inter)

    def subset(self, keep_true: np.ndarray, keep_pred: np.ndarray) -> Overlap:
        """The table restricted to the objects selected by two boolean masks (IoUs unchanged)."""
        new_t = np.cumsum(keep_true) - 1
        new_p = np.cumsum(keep_pred) - 1
        sel = keep_true[self.rows] & keep_pred[self.cols]
        return Overlap(
            self.true_labels[keep_true],
            self.pred_labels[keep_pred],
            self.true_areas[keep_true],
            self.pred_areas[keep_pred],
            new_t[self.rows[sel]],
            new_p[self.cols[sel]],
            self.intersections[sel],
        )


def _as_labels(a: np.ndarray, name: str) -> np.ndarray:
    a = np.asarray(a)
    if a.dtype == bool:
        return a.view(np.uint8)
    if not np.issubdtype(a.dtype, np.integer):
        raise TypeError(
            f"{name}: label images must be integer arrays (got {a.dtype}); "
            "convert with .astype(np.uint32) if the values are whole numbers"
        )
    if a.size and np.issubdtype(a.dtype, np.signedinteger) and a.min() < 0:
        raise ValueError(f"{name}: negative labels are not allowed (min {a.min()})")
    if a.dtype == np.uint64 and (a.size == 0 or a.max() < 2**63):
        return a.view(np.int64)  # same values; keeps index arithmetic in int64
    return a


def _compact(flat: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Relabel a flat label array to 0 (background), 1..K in increasing label order.

    Returns the relabelled array (possibly the input itself), the labels and their areas.
    """
    if flat.size == 0:
        return flat, np.zeros(0, flat.dtype), np.zeros(0, np.int64)
    mx = int(flat.max())
    if mx <= max(_BINCOUNT_MAX_BINS, 2 * flat.size):
        src = flat if flat.dtype.itemsize < 8 or flat.dtype == np.int64 else flat.astype(np.int64)
        counts = np.bincount(src, minlength=mx + 1)
        labels = np.flatnonzero(counts[1:]) + 1
        areas = counts[labels].astype(np.int64)
        if labels.size == mx:  # already 1..K
            return flat, labels.astype(flat.dtype), areas
        lut = np.zeros(mx + 1, np.uint32 if labels.size < 2**32 - 1 else np.int64)
        lut[labels] = np.arange(1, labels.size + 1)
        return lut[flat], labels.astype(flat.dtype), areas
    import fastremap  # large label values: hash-based unique

    uniq, inverse, counts = fastremap.unique(flat, return_inverse=True, return_counts=True)
    inverse = np.asarray(inverse).ravel().astype(np.int64)
    if uniq[0] == 0:
        return inverse, uniq[1:], counts[1:].astype(np.int64)
    return inverse + 1, uniq, counts.astype(np.int64)


def _overlap_dense(tf: np.ndarray, pf: np.ndarray, mt: int, mp: int) -> Overlap:
    """Overlap from one bincount over (true label, pred label) for small label values."""
    key = tf.astype(np.int64)
    key *= mp + 1
    key += pf
    table = np.bincount(key, minlength=(mt + 1) * (mp + 1)).reshape(mt + 1, mp + 1)
    ta, pa = table.sum(axis=1)[1:], table.sum(axis=0)[1:]
    present_t, present_p = ta > 0, pa > 0
    inner = table[1:, 1:]
    rows, cols = np.nonzero(inner)
    inter = inner[rows, cols].astype(np.int64)
    if not present_t.all():  # gaps in the labels: compact indices
        rows = (np.cumsum(present_t) - 1)[rows]
    if not present_p.all():
        cols = (np.cumsum(present_p) - 1)[cols]
    return Overlap(
        (np.flatnonzero(present_t) + 1).astype(tf.dtype),
        (np.flatnonzero(present_p) + 1).astype(pf.dtype),
        ta[present_t].astype(np.int64),
        pa[present_p].astype(np.int64),
        rows.astype(np.int64),
        cols.astype(np.int64),
        inter,
    )


def label_overlap(masks_true: np.ndarray, masks_pred: np.ndarray) -> Overlap:
    """Sparse overlap (contingency) table of two label images of the same shape.

    Parameters
    ----------
    masks_true, masks_pred
        Integer label images (2D or 3D), 0 = background.

    Returns
    -------
    Overlap
        Labels, areas and the overlapping pairs with their intersections.
    """
    t = _as_labels(masks_true, "masks_true")
    p = _as_labels(masks_pred, "masks_pred")
    if t.shape != p.shape:
        raise ValueError(f"masks_true {t.shape} and masks_pred {p.shape} must have the same shape")
    tf, pf = t.ravel(), p.ravel()
    mt = int(tf.max()) if tf.size else 0
    mp = int(pf.max()) if pf.size else 0
    if (mt + 1) * (mp + 1) <= max(_DENSE_MAX_BINS, tf.size):
        return _overlap_dense(tf, pf, mt, mp)
    ti, true_labels, true_areas = _compact(tf)
    pi, pred_labels, pred_areas = _compact(pf)
    n_t, n_p = true_labels.size, pred_labels.size
    empty = np.zeros(0, np.int64)
    if n_t == 0 or n_p == 0:
        return Overlap(true_labels, pred_labels, true_areas, pred_areas, empty, empty, empty)
    both = (ti != 0) & (pi != 0)
    key = ti[both].astype(np.int64)
    key -= 1
    key *= n_p
    key += pi[both]
    key -= 1
    if n_t * n_p <= max(_BINCOUNT_MAX_BINS, key.size):
        counts = np.bincount(key, minlength=n_t * n_p)
        pairs = np.flatnonzero(counts)
        inter = counts[pairs].astype(np.int64)
    else:
        pairs, inter = np.unique(key, return_counts=True)
        inter = inter.astype(np.int64)
    rows, cols = np.divmod(pairs, n_p)
    return Overlap(true_labels, pred_labels, true_areas, pred_areas, rows, cols, inter)


def iou_matrix(
    masks_true: np.ndarray, masks_pred: np.ndarray, sparse: bool = False
) -> tuple[np.ndarray | csr_matrix, np.ndarray, np.ndarray]:
    """IoU of every (true, predicted) object pair.

    Returns
    -------
    iou
        (K, L) float64 array (or ``scipy.sparse.csr_matrix`` if ``sparse``); row ``i`` is
        ``true_labels[i]``, column ``j`` is ``pred_labels[j]``.
    true_labels, pred_labels
        The label values of the rows and columns.
    """
    ov = label_overlap(masks_true, masks_pred)
    m = csr_matrix((ov.iou, (ov.rows, ov.cols)), shape=(ov.n_true, ov.n_pred))
    return (m if sparse else m.toarray()), ov.true_labels, ov.pred_labels


# --------------------------------------------------------------------------------------------
# optimal matching


def _assign(
    rows: np.ndarray, cols: np.ndarray, weight: np.ndarray, scale: float, primary: np.ndarray
) -> np.ndarray:
    """Optimal assignment on a sparse bipartite graph, one dense problem per component.

    Maximises ``sum(primary + weight / (2 * scale))`` over one-to-one sets of edges (``primary``
    is 1 or 0 per edge, ``weight`` in [0, 1]); returns the indices of the chosen edges.
    """
    if rows.size == 0:
        return np.zeros(0, np.int64)
    # fast path: no node with two edges, every edge is its own component
    r_unique = rows.size < 2 or bool(np.all(rows[1:] != rows[:-1]))  # rows are sorted
    if r_unique and np.unique(cols).size == cols.size:
        return np.flatnonzero(primary + weight > 0)
    ur, ri = np.unique(rows, return_inverse=True)
    uc, ci = np.unique(cols, return_inverse=True)
    nr = ur.size
    graph = coo_matrix((np.ones(rows.size), (ri, nr + ci)), shape=(nr + uc.size,) * 2)
    _, comp = connected_components(graph, directed=False)
    edge_comp = comp[ri]
    order = np.argsort(edge_comp, kind="stable")
    bounds = np.flatnonzero(np.diff(edge_comp[order])) + 1
    chosen = []
    for group in np.split(order, bounds):
        if group.size == 1:
            if primary[group[0]] + weight[group[0]] > 0:
                chosen.append(group)
            continue
        gr, gri = np.unique(ri[group], return_inverse=True)
        gc, gci = np.unique(ci[group], return_inverse=True)
        cost = np.zeros((gr.size, gc.size))
        cost[gri, gci] = -(primary[group] + weight[group] / (2 * scale))
        a, b = linear_sum_assignment(cost)
        lookup = np.full((gr.size, gc.size), -1, np.int64)
        lookup[gri, gci] = group
        sel = lookup[a, b]
        sel = sel[sel >= 0]
        chosen.append(sel[primary[sel] + weight[sel] > 0])
    out = np.concatenate(chosen) if chosen else np.zeros(0, np.int64)
    return np.sort(out)


def _match_overlap(ov: Overlap, iou: np.ndarray, threshold: float) -> np.ndarray:
    """Indices (into the pair list) of the optimal matching at ``threshold``."""
    cand = np.flatnonzero(iou >= threshold)
    if cand.size == 0:
        return cand
    r, c, w = ov.rows[cand], ov.cols[cand], iou[cand]
    scale = max(1, min(np.unique(r).size, np.unique(c).size))
    return cand[_assign(r, c, w, scale, np.ones(cand.size))]


def match_pairs(
    masks_true: np.ndarray, masks_pred: np.ndarray, threshold: float = 0.5
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Optimal one-to-one matching at an IoU threshold.

    Returns
    -------
    true_labels, pred_labels, iou
        The label values of the matched pairs (each with ``iou >= threshold``), sorted by true
        label.
    """
    ov = label_overlap(masks_true, masks_pred)
    iou = ov.iou
    sel = _match_overlap(ov, iou, float(threshold))
    return ov.true_labels[ov.rows[sel]], ov.pred_labels[ov.cols[sel]], iou[sel]


# --------------------------------------------------------------------------------------------
# per-image statistics


@dataclass(frozen=True)
class MatchingStats:
    """Counts of one image (or of pooled images) at each IoU threshold.

    Scores are derived on access (``stats.ap``, ``stats.error_rate`` ...), see the module
    docstring for definitions and empty-image conventions. ``aji`` is the standard aggregated
    Jaccard index from ``aji_intersection / aji_union``.
    """

    thresholds: np.ndarray  # (T,)
    n_true: int
    n_pred: int
    tp: np.ndarray  # (T,) int64
    sum_iou: np.ndarray  # (T,) float64, sum of IoU over matched pairs
    aji_intersection: int = 0
    aji_union: int = 0

    @property
    def fp(self) -> np.ndarray:
        return self.n_pred - self.tp

    @property
    def fn(self) -> np.ndarray:
        return self.n_true - self.tp

    def scores(self) -> dict[str, np.ndarray]:
        """All per-threshold scores, as a dict of (T,) arrays."""
        return scores(self.tp, self.fp, self.fn, self.sum_iou)

    @property
    def ap(self) -> np.ndarray:
        return self.scores()["ap"]

    @property
    def precision(self) -> np.ndarray:
        return self.scores()["precision"]

    @property
    def recall(self) -> np.ndarray:
        return self.scores()["recall"]

    @property
    def f1(self) -> np.ndarray:
        return self.scores()["f1"]

    @property
    def error_rate(self) -> np.ndarray:
        return self.scores()["error_rate"]

    @property
    def sq(self) -> np.ndarray:
        return self.scores()["sq"]

    @property
    def pq(self) -> np.ndarray:
        return self.scores()["pq"]

    @property
    def aji(self) -> float:
        if self.aji_union == 0:
            return 1.0 if self.n_true == 0 and self.n_pred == 0 else float("nan")
        return self.aji_intersection / self.aji_union

    def as_dict(self) -> dict[str, object]:
        """Counts and scores as plain Python values (lists per threshold)."""
        d: dict[str, object] = {
            "thresholds": [float(t) for t in self.thresholds],
            "n_true": int(self.n_true),
            "n_pred": int(self.n_pred),
        }
        for k in COUNT_NAMES:
            d[k] = [int(v) for v in getattr(self, k)]
        for k, v in self.scores().items():
            d[k] = [float(x) for x in v]
        d["aji"] = float(self.aji)
        return d


def scores(
    tp: np.ndarray, fp: np.ndarray, fn: np.ndarray, sum_iou: np.ndarray | None = None
) -> dict[str, np.ndarray]:
    """Scores from counts (any broadcastable shapes), with the documented empty conventions.

    Parameters
    ----------
    tp, fp, fn
        True positives, false positives, false negatives.
    sum_iou
        Sum of matched IoUs (for ``sq`` and ``pq``; ``nan`` if omitted).
    """
    tp, fp, fn = (np.asarray(x, dtype=np.float64) for x in (tp, fp, fn))
    s = np.full(np.broadcast(tp, fp, fn).shape, np.nan) if sum_iou is None else sum_iou
    s = np.asarray(s, dtype=np.float64)
    empty = (tp + fp + fn) == 0

    def ratio(num, den, perfect):
        num, den = np.broadcast_arrays(np.asarray(num, float), np.asarray(den, float))
        out = np.full(num.shape, np.nan)
        np.divide(num, den, out=out, where=den != 0)
        return np.where(empty, perfect, out)

    return {
        "ap": ratio(tp, tp + fp + fn, 1.0),
        "precision": ratio(tp, tp + fp, 1.0),
        "recall": ratio(tp, tp + fn, 1.0),
        "f1": ratio(2 * tp, 2 * tp + fp + fn, 1.0),
        "error_rate": ratio(fp + fn, tp + fn, 0.0),
        "sq": ratio(s, tp, 1.0),
        "pq": ratio(s, tp + 0.5 * fp + 0.5 * fn, 1.0),
    }


def _thresholds(thresholds: float | Sequence[float] | np.ndarray) -> np.ndarray:
    th = np.atleast_1d(np.asarray(thresholds, dtype=np.float64))
    if th.ndim != 1 or th.size == 0:
        raise ValueError(f"thresholds must be a number or a 1D sequence, got {thresholds!r}")
    if not np.all(th > 0):  # at 0 any pair, even without overlap, would be a match
        raise ValueError(f"IoU thresholds must be > 0, got {th.tolist()}")
    return th


def _aji_standard(ov: Overlap, iou: np.ndarray) -> tuple[int, int]:
    """(intersection, union) sums of the standard AJI (Kumar et al. 2017)."""
    union = 0
    inter = 0
    paired_true = np.zeros(ov.n_true, bool)
    used_pred = np.zeros(ov.n_pred, bool)
    if iou.size:
        # best predicted object per true object: highest IoU, ties to the lowest label
        order = np.lexsort((ov.cols, -iou, ov.rows))
        first = np.ones(order.size, bool)
        first[1:] = ov.rows[order][1:] != ov.rows[order][:-1]
        best = order[first]
        paired_true[ov.rows[best]] = True
        used_pred[ov.cols[best]] = True
        i = ov.intersections[best]
        inter = int(i.sum())
        union = int((ov.true_areas[ov.rows[best]] + ov.pred_areas[ov.cols[best]] - i).sum())
    union += int(ov.true_areas[~paired_true].sum()) + int(ov.pred_areas[~used_pred].sum())
    return inter, union


def _stats_from_overlap(ov: Overlap, th: np.ndarray) -> MatchingStats:
    iou = ov.iou
    tp = np.zeros(th.size, np.int64)
    sum_iou = np.zeros(th.size)
    for k, t in enumerate(th):
        sel = _match_overlap(ov, iou, float(t))
        tp[k] = sel.size
        sum_iou[k] = iou[sel].sum()
    inter, union = _aji_standard(ov, iou)
    return MatchingStats(th, ov.n_true, ov.n_pred, tp, sum_iou, inter, union)


def matching(
    masks_true: np.ndarray,
    masks_pred: np.ndarray,
    thresholds: float | Sequence[float] = DEFAULT_THRESHOLDS,
) -> MatchingStats:
    """Match one image pair at each threshold and return all counts and scores.

    Parameters
    ----------
    masks_true, masks_pred
        Label images of the same shape (2D or 3D).
    thresholds
        IoU threshold(s).

    Returns
    -------
    MatchingStats
        ``stats.tp``, ``stats.fp``, ``stats.fn``, ``stats.ap``, ``stats.error_rate`` ... per
        threshold, ``stats.aji`` and ``stats.as_dict()``.
    """
    return _stats_from_overlap(label_overlap(masks_true, masks_pred), _thresholds(thresholds))


def average_precision(
    masks_true: np.ndarray | Sequence[np.ndarray],
    masks_pred: np.ndarray | Sequence[np.ndarray],
    thresholds: float | Sequence[float] = DEFAULT_THRESHOLDS,
    *,
    threshold: float | Sequence[float] | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Cellpose's "average precision" AP = TP / (TP + FP + FN), with its counts.

    Parameters
    ----------
    masks_true, masks_pred
        One label image each (2D or 3D) or equally long lists/tuples of label images.
    thresholds
        IoU threshold(s). ``threshold=`` is accepted as an alias (the reference's name).

    Returns
    -------
    ap, tp, fp, fn
        Shape ``(n_images, n_thresholds)`` for lists, ``(n_thresholds,)`` for a single image
        (a scalar threshold still gives a threshold axis of length 1), as in
        ``cellpose.metrics.average_precision``. ``ap`` is float64, counts are int64.
    """
    if threshold is not None:
        thresholds = threshold
    th = _thresholds(thresholds)
    single = not isinstance(masks_true, (list, tuple))
    if single != (not isinstance(masks_pred, (list, tuple))):
        raise TypeError("masks_true and masks_pred must both be arrays or both be lists")
    mt = [masks_true] if single else list(masks_true)
    mp = [masks_pred] if single else list(masks_pred)
    if len(mt) != len(mp):
        raise ValueError(f"{len(mt)} true label images but {len(mp)} predicted ones")
    tp = np.zeros((len(mt), th.size), np.int64)
    fp = np.zeros_like(tp)
    fn = np.zeros_like(tp)
    for n, (t, p) in enumerate(zip(mt, mp, strict=True)):
        ov = label_overlap(t, p)
        iou = ov.iou
        for k, thr in enumerate(th):
            tp[n, k] = _match_overlap(ov, iou, float(thr)).size
        fp[n] = ov.n_pred - tp[n]
        fn[n] = ov.n_true - tp[n]
    ap = scores(tp, fp, fn)["ap"]
    if single:
        return ap[0], tp[0], fp[0], fn[0]
    return ap, tp, fp, fn


def _cellpose_aji_pairs(ov: Overlap, iou: np.ndarray) -> np.ndarray:
    """Pairs of the reference's assignment: most pairs with IoU >= 0.5, then most total IoU."""
    hi = np.flatnonzero(iou >= 0.5)
    r, c = ov.rows[hi], ov.cols[hi]
    if np.unique(r).size == hi.size and np.unique(c).size == hi.size:
        # disjoint pairs >= 0.5: every optimal assignment holds them all (one fewer costs 1,
        # the IoU term is worth < 1/2 in total); the rest maximises IoU among the others
        free_t = np.ones(ov.n_true, bool)
        free_t[r] = False
        free_p = np.ones(ov.n_pred, bool)
        free_p[c] = False
        lo = np.flatnonzero((iou > 0) & (iou < 0.5) & free_t[ov.rows] & free_p[ov.cols])
        zero = np.zeros(lo.size)
        return np.concatenate([hi, lo[_assign(ov.rows[lo], ov.cols[lo], iou[lo], 1.0, zero)]])
    nz = np.flatnonzero(iou > 0)
    scale = max(1, min(ov.n_true, ov.n_pred))
    return nz[_assign(ov.rows[nz], ov.cols[nz], iou[nz], scale, (iou[nz] >= 0.5) * 1.0)]


def aggregated_jaccard_index(
    masks_true: np.ndarray | Sequence[np.ndarray],
    masks_pred: np.ndarray | Sequence[np.ndarray],
    variant: Literal["standard", "cellpose"] = "standard",
) -> float | np.ndarray:
    """Aggregated Jaccard index of one image (float) or of each image of a list (array).

    ``"standard"`` (Kumar et al. 2017, MoNuSeg/HoVer-Net): every true object is paired with the
    predicted object of highest IoU (ties to the lowest label; a prediction may serve several
    true objects); AJI = sum of pair intersections / (sum of pair unions + areas of unpaired
    true and unused predicted objects).

    ``"cellpose"`` (``cellpose.metrics.aggregated_jaccard_index``): one-to-one Hungarian
    assignment with the cost of the 0.5 matching over all pairs; AJI = sum of the assigned
    pairs' intersections / area of the union of both foregrounds. Identical to the reference
    up to ties between equally good assignments. Both images empty gives 1 (reference: nan).
    """
    single = not isinstance(masks_true, (list, tuple))
    mt = [masks_true] if single else list(masks_true)
    mp = [masks_pred] if single else list(masks_pred)
    if len(mt) != len(mp):
        raise ValueError(f"{len(mt)} true label images but {len(mp)} predicted ones")
    out = np.zeros(len(mt))
    for n, (t, p) in enumerate(zip(mt, mp, strict=True)):
        ov = label_overlap(t, p)
        iou = ov.iou
        if variant == "standard":
            inter, union = _aji_standard(ov, iou)
        elif variant == "cellpose":
            union = int(ov.true_areas.sum() + ov.pred_areas.sum() - ov.intersections.sum())
            inter = int(ov.intersections[_cellpose_aji_pairs(ov, iou)].sum())
        else:
            raise ValueError(f"variant must be 'standard' or 'cellpose', not {variant!r}")
        if union == 0:
            out[n] = 1.0 if ov.n_true == 0 and ov.n_pred == 0 else np.nan
        else:
            out[n] = inter / union
    return float(out[0]) if single else out


# --------------------------------------------------------------------------------------------
# aggregation over images


def aggregate(
    stats: Sequence[MatchingStats], how: Aggregation = "mean_per_image"
) -> dict[str, np.ndarray | float | int]:
    """Aggregate per-image statistics over images.

    Parameters
    ----------
    stats
        One :class:`MatchingStats` per image, all with the same thresholds.
    how
        ``"mean_per_image"``: mean of the per-image scores, ignoring ``nan`` (for instance the
        error rate of images without ground truth); ``n_<score>`` gives how many images
        entered each mean. Counts are summed. ``"pooled"``: scores of the summed counts over
        all images (AJI: summed intersections / summed unions).

    Returns
    -------
    dict
        ``thresholds``, ``n_images``, ``n_true``, ``n_pred``, ``tp``/``fp``/``fn`` (summed), each
        score in :data:`SCORE_NAMES` as a (T,) array, and ``aji``.
    """
    if how not in ("mean_per_image", "pooled"):
        raise ValueError(f"how must be 'mean_per_image' or 'pooled', not {how!r}")
    if not stats:
        raise ValueError("no images to aggregate")
    th = stats[0].thresholds
    for s in stats:
        if not np.array_equal(s.thresholds, th):
            raise ValueError("all images must be evaluated at the same thresholds")
    tp = np.sum([s.tp for s in stats], axis=0)
    fp = np.sum([s.fp for s in stats], axis=0)
    fn = np.sum([s.fn for s in stats], axis=0)
    out: dict[str, np.ndarray | float | int] = {
        "aggregation": how,
        "thresholds": th,
        "n_images": len(stats),
        "n_true": int(sum(s.n_true for s in stats)),
        "n_pred": int(sum(s.n_pred for s in stats)),
        "tp": tp,
        "fp": fp,
        "fn": fn,
    }
    if how == "pooled":
        out.update(scores(tp, fp, fn, np.sum([s.sum_iou for s in stats], axis=0)))
        inter = sum(s.aji_intersection for s in stats)
        union = sum(s.aji_union for s in stats)
        empty = out["n_true"] == 0 and out["n_pred"] == 0
        out["aji"] = inter / union if union else (1.0 if empty else float("nan"))
        return out
    per = [s.scores() for s in stats]
    for name in SCORE_NAMES:
        arr = np.array([p[name] for p in per])
        out[name] = _nanmean(arr, axis=0)
        out[f"n_{name}"] = np.sum(~np.isnan(arr), axis=0)
    aji = np.array([s.aji for s in stats])
    out["aji"] = float(_nanmean(aji, axis=0))
    return out


def _nanmean(a: np.ndarray, axis: int = 0) -> np.ndarray:
    """Mean ignoring nan; nan (without a warning) where every value is nan."""
    a = np.asarray(a, dtype=np.float64)
    valid = ~np.isnan(a)
    n = valid.sum(axis=axis)
    total = np.where(valid, a, 0.0).sum(axis=axis)
    return np.divide(total, n, out=np.full(np.shape(total), np.nan), where=n > 0)


# --------------------------------------------------------------------------------------------
# per-class metrics


def _class_array(labels: np.ndarray, classes: Mapping, name: str) -> np.ndarray:
    lookup = {int(k): v for k, v in classes.items()}
    missing = [int(x) for x in labels if int(x) not in lookup]
    if missing:
        raise ValueError(
            f"{name}: labels {missing[:10]}{' ...' if len(missing) > 10 else ''} have no class "
            "in the class mapping"
        )
    return np.array([str(lookup[int(x)]) for x in labels], dtype=object)


def matching_per_class(
    masks_true: np.ndarray,
    masks_pred: np.ndarray,
    classes_true: Mapping[int | str, str],
    classes_pred: Mapping[int | str, str],
    thresholds: float | Sequence[float] = DEFAULT_THRESHOLDS,
) -> dict[str, MatchingStats]:
    """Match objects class by class (a true object can only match a prediction of its class).

    Parameters
    ----------
    masks_true, masks_pred
        Label images of the same shape.
    classes_true, classes_pred
        ``{instance label: class name}`` for every label of each image (keys may be strings,
        as in ``<id>_classes.json``).

    Returns
    -------
    dict
        ``{class: MatchingStats}`` for every class present in either image, sorted by name.
        Use :func:`class_average` for the paper's per-image score.
    """
    th = _thresholds(thresholds)
    ov = label_overlap(masks_true, masks_pred)
    ct = _class_array(ov.true_labels, classes_true, "masks_true")
    cp = _class_array(ov.pred_labels, classes_pred, "masks_pred")
    names = sorted(set(ct.tolist()) | set(cp.tolist()))
    return {c: _stats_from_overlap(ov.subset(ct == c, cp == c), th) for c in names}


def class_average(per_class: Mapping[str, MatchingStats]) -> dict[str, np.ndarray | float]:
    """The paper's per-image score: the mean over the classes present in the ground truth.

    Classes with no ground-truth object are left out. Scores that are ``nan`` for a class
    (for instance precision with no prediction of it) are left out of that score's mean. No
    class in the ground truth gives ``nan`` scores.
    """
    present = [s for s in per_class.values() if s.n_true > 0]
    out: dict[str, np.ndarray | float] = {}
    if not present:
        t = next(iter(per_class.values())).thresholds.size if per_class else 1
        for name in SCORE_NAMES:
            out[name] = np.full(t, np.nan)
        out["aji"] = float("nan")
        return out
    per = [s.scores() for s in present]
    for name in SCORE_NAMES:
        out[name] = _nanmean(np.array([p[name] for p in per]), axis=0)
    out["aji"] = float(_nanmean(np.array([s.aji for s in present])))
    return out


def aggregate_classes(per_images: Sequence[Mapping[str, MatchingStats]]) -> dict[str, dict]:
    """Aggregate per-class matchings (one :func:`matching_per_class` dict per image).

    Returns
    -------
    dict
        ``class_mean_per_image``: mean over images of :func:`class_average` (the paper's
        convention; images without ground truth are left out, ``n_<score>`` counts the images
        used); ``per_class_mean_per_image[c]``: :func:`aggregate` over the images whose ground
        truth contains class ``c``; ``per_class_pooled[c]``: pooled over all images.
    """
    if not per_images:
        raise ValueError("no images to aggregate")
    th = next((s.thresholds for d in per_images for s in d.values()), None)
    avg = [class_average(d) for d in per_images if d]
    cm: dict = {"aggregation": "mean_per_image of class_average", "n_images": len(per_images)}
    for name in (*SCORE_NAMES, "aji"):
        arr = np.array([a[name] for a in avg], dtype=np.float64)
        cm[name] = _nanmean(arr, axis=0) if avg else np.nan
        cm[f"n_{name}"] = np.sum(~np.isnan(arr), axis=0) if avg else 0
    per_mean: dict[str, dict] = {}
    per_pooled: dict[str, dict] = {}
    if th is None:
        return {"class_mean_per_image": cm, "per_class_mean_per_image": {}, "per_class_pooled": {}}
    empty = MatchingStats(th, 0, 0, np.zeros(th.size, np.int64), np.zeros(th.size))
    for c in sorted({c for d in per_images for c in d}):
        all_c = [d.get(c, empty) for d in per_images]
        with_gt = [s for s in all_c if s.n_true > 0]
        if with_gt:
            per_mean[c] = aggregate(with_gt, "mean_per_image")
        per_pooled[c] = aggregate(all_c, "pooled")
    return {
        "class_mean_per_image": cm,
        "per_class_mean_per_image": per_mean,
        "per_class_pooled": per_pooled,
    }


# --------------------------------------------------------------------------------------------
# a set of images


@dataclass(frozen=True)
class Evaluation:
    """Per-image statistics of a set of images and their aggregates.

    ``mean_per_image`` and ``pooled`` are :func:`aggregate` results. With classes,
    ``class_mean_per_image`` is the mean over images of :func:`class_average` (paper
    convention), ``per_class_mean_per_image[c]`` / ``per_class_pooled[c]`` aggregate class ``c``
    over the images whose ground truth contains it (pooled: over all images).
    """

    thresholds: np.ndarray
    images: list[MatchingStats]
    mean_per_image: dict
    pooled: dict
    per_class_images: list[dict[str, MatchingStats]] | None = None
    class_mean_per_image: dict | None = None
    per_class_mean_per_image: dict[str, dict] | None = None
    per_class_pooled: dict[str, dict] | None = None
    names: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        """JSON-ready nested dict (lists, floats; ``nan`` stays ``nan``)."""
        names = self.names or [str(i) for i in range(len(self.images))]
        out = {
            "thresholds": [float(t) for t in self.thresholds],
            "mean_per_image": _plain(self.mean_per_image),
            "pooled": _plain(self.pooled),
            "images": [{"name": n, **s.as_dict()} for n, s in zip(names, self.images, strict=True)],
        }
        for f in fields(self):
            if f.name.startswith(("per_class", "class_")) and getattr(self, f.name) is not None:
                out[f.name] = _plain(getattr(self, f.name))
        return out


def _plain(x):
    if isinstance(x, MatchingStats):
        return x.as_dict()
    if isinstance(x, Mapping):
        return {str(k): _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, np.generic):
        return x.item()
    return x


def evaluate_images(
    list_true: Sequence[np.ndarray],
    list_pred: Sequence[np.ndarray],
    thresholds: float | Sequence[float] = DEFAULT_THRESHOLDS,
    per_class: tuple[Sequence[Mapping], Sequence[Mapping]] | None = None,
    names: Sequence[str] | None = None,
) -> Evaluation:
    """Match every image pair and aggregate (both per image and pooled).

    Parameters
    ----------
    list_true, list_pred
        Equally long sequences of label images.
    thresholds
        IoU thresholds.
    per_class
        ``(classes_true, classes_pred)``: one ``{label: class}`` mapping per image for each
        side, to add class-wise results (see :class:`Evaluation`).
    names
        Optional image names, kept in the results.

    Returns
    -------
    Evaluation
    """
    if len(list_true) != len(list_pred):
        raise ValueError(f"{len(list_true)} true label images but {len(list_pred)} predicted ones")
    if not len(list_true):
        raise ValueError("no images to evaluate")
    th = _thresholds(thresholds)
    images = [matching(t, p, th) for t, p in zip(list_true, list_pred, strict=True)]
    kw: dict = {}
    if per_class is not None:
        ct, cp = per_class
        if not len(ct) == len(cp) == len(list_true):
            raise ValueError("per_class needs one class mapping per image on each side")
        pci = [
            matching_per_class(t, p, a, b, th)
            for t, p, a, b in zip(list_true, list_pred, ct, cp, strict=True)
        ]
        kw = dict(per_class_images=pci, **aggregate_classes(pci))
    return Evaluation(
        th,
        images,
        aggregate(images, "mean_per_image"),
        aggregate(images, "pooled"),
        names=list(names) if names is not None else [],
        **kw,
    )
