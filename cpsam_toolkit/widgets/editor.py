"""Editing an instance label image: brush, eraser, delete, flood fill, new id, undo/redo.

:class:`LabelEditor` is pure numpy/scipy (no widgets, no browser), so every correction the
Jupyter corrector makes can be scripted and unit-tested. The browser sends each stroke as one
compact event (a polyline in image coordinates, a radius and a label id) and
:meth:`LabelEditor.apply` turns it into pixels; the same events can be built in Python::

    ed = LabelEditor(result.masks)
    ed.paint([(10, 10), (10, 40)], radius=3, label=ed.new_label())   # a new object
    ed.delete(120, 64)                                                 # remove a false positive
    ed.fill(50, 50, label=7)                                           # fill a hole in object 7
    ed.undo(); ed.redo()
    ed.save("image_masks.tif")                                         # atomic

Coordinates are ``(y, x)`` in pixels of the label image; a pixel belongs to a stroke when its
centre is within ``radius`` of the polyline (a chain of round-capped segments).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..outputs import save_masks

__all__ = ["Stroke", "Edit", "LabelEditor", "stroke_mask", "is_closed_outline"]

#: event types understood by :meth:`LabelEditor.apply`
EVENT_TYPES = ("paint", "erase", "delete", "fill", "new_label", "pick", "undo", "redo")


@dataclass(frozen=True)
class Stroke:
    """A brush stroke: ``points`` (N, 2) as ``(y, x)``, a radius in pixels and a label
    (None: the editor's current label; 0: background)."""

    points: np.ndarray
    radius: float = 3.0
    label: int | None = None

    @classmethod
    def of(cls, points: Any, radius: float = 3.0, label: int | None = None) -> Stroke:
        pts = np.asarray(points, dtype=np.float64).reshape(-1, 2)
        if pts.size == 0:
            raise ValueError("a stroke needs at least one (y, x) point")
        if not np.all(np.isfinite(pts)):
            raise ValueError("stroke points must be finite numbers")
        return cls(pts, float(radius), None if label is None else int(label))


@dataclass(frozen=True)
class Edit:
    """One undoable change: flat pixel indices with their values before and after."""

    kind: str
    index: np.ndarray  # int64 flat indices
    before: np.ndarray
    after: np.ndarray
    serial: int = 0  # identifies the state this edit leads to

    @property
    def n_pixels(self) -> int:
        return int(self.index.size)


def stroke_mask(shape: tuple[int, int], points: np.ndarray, radius: float) -> tuple[slice, slice, np.ndarray]:
    """Pixels within ``radius`` of the polyline ``points`` ((N, 2) y, x).

    Returns ``(ys, xs, mask)``: a bounding-box window of the image and a boolean mask of that
    window (empty window when the stroke lies outside the image). A radius below 0.5 still
    covers the pixels the line passes through.
    """
    h, w = shape
    r = max(float(radius), 0.5)
    pts = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    y0 = max(int(np.floor(pts[:, 0].min() - r)), 0)
    y1 = min(int(np.ceil(pts[:, 0].max() + r)) + 1, h)
    x0 = max(int(np.floor(pts[:, 1].min() - r)), 0)
    x1 = min(int(np.ceil(pts[:, 1].max() + r)) + 1, w)
    if y0 >= y1 or x0 >= x1:
        return slice(0, 0), slice(0, 0), np.zeros((0, 0), bool)
    mask = np.zeros((y1 - y0, x1 - x0), bool)
    r2 = r * r
    segs = [(pts[0], pts[0])] if len(pts) == 1 else list(zip(pts[:-1], pts[1:]))
    for a, b in segs:
        # the window of this segment only (cheap for long strokes)
        sy0 = max(int(np.floor(min(a[0], b[0]) - r)), y0)
        sy1 = min(int(np.ceil(max(a[0], b[0]) + r)) + 1, y1)
        sx0 = max(int(np.floor(min(a[1], b[1]) - r)), x0)
        sx1 = min(int(np.ceil(max(a[1], b[1]) + r)) + 1, x1)
        if sy0 >= sy1 or sx0 >= sx1:
            continue
        yy = np.arange(sy0, sy1, dtype=np.float64)[:, None]
        xx = np.arange(sx0, sx1, dtype=np.float64)[None, :]
        d = b - a
        dd = float(d @ d)
        if dd == 0:
            dist2 = (yy - a[0]) ** 2 + (xx - a[1]) ** 2
        else:
            t = np.clip(((yy - a[0]) * d[0] + (xx - a[1]) * d[1]) / dd, 0.0, 1.0)
            dist2 = (yy - (a[0] + t * d[0])) ** 2 + (xx - (a[1] + t * d[1])) ** 2
        mask[sy0 - y0 : sy1 - y0, sx0 - x0 : sx1 - x0] |= dist2 <= r2
    return slice(y0, y1), slice(x0, x1), mask


def is_closed_outline(points: Any, radius: float = 0.0) -> bool:
    """Whether a stroke is a drawn outline: it ends where it started (within ``max(5, 3 *
    radius)`` px) after going around something at least twice as wide as that gap."""
    pts = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    if len(pts) < 4:
        return False
    gap = float(np.hypot(*(pts[-1] - pts[0])))
    tol = max(5.0, 3.0 * float(radius))
    extent = float(np.hypot(*(pts.max(0) - pts.min(0))))
    return gap <= tol and extent > 2 * max(gap, tol)


class LabelEditor:
    """An editable copy of a 2D instance label image with undo/redo.

    Parameters
    ----------
    labels : (Y, X) integer array
        Starting labels (copied; 0 is background).
    max_history : int
        Undo steps kept (oldest dropped first).

    Attributes
    ----------
    labels : (Y, X) uint32
        The current labels (read it; change it only through the methods).
    label : int
        The current brush label (``new_label`` and ``pick`` set it).
    version : int
        Incremented by every change, undo and redo (for views to refresh).
    dirty : bool
        Changed since the last :meth:`save` / :meth:`mark_saved`.
    """

    def __init__(self, labels: np.ndarray, max_history: int = 200) -> None:
        arr = np.asarray(labels)
        if arr.ndim != 2:
            raise ValueError(f"LabelEditor edits 2D label images, got shape {arr.shape}")
        if not (np.issubdtype(arr.dtype, np.integer) or arr.dtype == bool):
            raise ValueError(f"labels must be an integer array, got {arr.dtype}")
        if arr.size and arr.min() < 0:
            raise ValueError("labels must not be negative")
        self.labels = np.ascontiguousarray(arr, dtype=np.uint32).copy()
        self.max_history = int(max_history)
        self._undo: list[Edit] = []
        self._redo: list[Edit] = []
        self.version = 0
        self._serial = 0  # last edit number handed out
        self._base_state = 0  # state id when the undo stack is empty (0: the starting labels)
        self._saved_state = 0
        self.label = self.next_label()

    # -- queries --------------------------------------------------------------------------
    @property
    def shape(self) -> tuple[int, int]:
        return self.labels.shape  # type: ignore[return-value]

    @property
    def state_id(self) -> int:
        """Identifies the current labels among the states reachable by undo/redo (0: the
        starting labels)."""
        return self._undo[-1].serial if self._undo else self._base_state

    @property
    def dirty(self) -> bool:
        """The labels differ from the last saved (or the starting) state; undoing back to it
        makes them clean again."""
        return self.state_id != self._saved_state

    @property
    def can_undo(self) -> bool:
        return bool(self._undo)

    @property
    def can_redo(self) -> bool:
        return bool(self._redo)

    @property
    def n_objects(self) -> int:
        """Number of distinct non-zero labels."""
        if not self.labels.size or self.labels.max() == 0:
            return 0
        return int(np.count_nonzero(np.bincount(self.labels.ravel())[1:]))

    def next_label(self) -> int:
        """The next free id: one above the largest label in use."""
        return int(self.labels.max()) + 1 if self.labels.size else 1

    def label_at(self, y: float, x: float) -> int:
        yi, xi = self._pixel(y, x)
        return int(self.labels[yi, xi]) if yi is not None else 0

    def _pixel(self, y: float, x: float) -> tuple[int | None, int | None]:
        yi, xi = int(np.floor(float(y) + 0.5)), int(np.floor(float(x) + 0.5))
        if 0 <= yi < self.labels.shape[0] and 0 <= xi < self.labels.shape[1]:
            return yi, xi
        return None, None

    # -- edits ----------------------------------------------------------------------------
    def _commit(self, kind: str, index: np.ndarray, new: np.ndarray | int) -> int:
        """Set flat ``index`` to ``new`` (array or scalar), recording only changed pixels."""
        flat = self.labels.reshape(-1)
        before = flat[index]
        after = np.broadcast_to(np.asarray(new, dtype=np.uint32), before.shape)
        changed = before != after
        if not changed.any():
            return 0
        self._serial += 1
        edit = Edit(kind, index[changed].astype(np.int64), before[changed].copy(), after[changed].copy(),
                    self._serial)
        flat[edit.index] = edit.after
        self._undo.append(edit)
        if len(self._undo) > self.max_history:
            self._base_state = self._undo.pop(0).serial
        self._redo.clear()
        self.version += 1
        return edit.n_pixels

    def _stroke_index(self, stroke: Stroke, fill_closed: bool = False) -> np.ndarray:
        pts = stroke.points
        closed = fill_closed and is_closed_outline(pts, stroke.radius)
        if closed:
            pts = np.vstack([pts, pts[:1]])
        ys, xs, m = stroke_mask(self.shape, pts, stroke.radius)
        if closed and m.size:
            from scipy import ndimage

            m = ndimage.binary_fill_holes(m)
        if not m.any():
            return np.zeros(0, np.int64)
        yy, xx = np.nonzero(m)
        return np.ravel_multi_index((yy + ys.start, xx + xs.start), self.shape).astype(np.int64)

    def paint(
        self,
        points: Stroke | Sequence[Sequence[float]] | np.ndarray,
        radius: float | None = None,
        label: int | None = None,
        *,
        overwrite: bool = True,
        fill_closed: bool = False,
    ) -> int:
        """Paint a stroke with ``label`` (default the current label; 0 erases).

        ``points`` is a :class:`Stroke` or (N, 2) ``(y, x)`` points. With ``overwrite=False``
        only background and pixels already of ``label`` change (other objects are protected).
        With ``fill_closed=True`` a stroke that ends where it started (a drawn outline, see
        :func:`is_closed_outline`) is closed and filled, in the same undo step.
        Returns the number of pixels changed.
        """
        stroke = self._as_stroke(points, radius, label)
        lab = int(stroke.label or 0)
        idx = self._stroke_index(stroke, fill_closed=fill_closed and lab != 0)
        if not overwrite and lab != 0:
            cur = self.labels.reshape(-1)[idx]
            idx = idx[(cur == 0) | (cur == lab)]
        if lab:
            self.label = lab
        return self._commit("paint" if lab else "erase", idx, lab)

    def erase(
        self,
        points: Stroke | Sequence[Sequence[float]] | np.ndarray,
        radius: float | None = None,
        only: int | None = None,
    ) -> int:
        """Set the pixels of a stroke to background (only those of label ``only`` if given)."""
        stroke = self._as_stroke(points, radius, 0)
        idx = self._stroke_index(stroke)
        if only:
            idx = idx[self.labels.reshape(-1)[idx] == int(only)]
        return self._commit("erase", idx, 0)

    def delete(self, y: float, x: float) -> int:
        """Remove the object under ``(y, x)``; returns its label (0: nothing there)."""
        lab = self.label_at(y, x)
        if lab == 0:
            return 0
        idx = np.flatnonzero(self.labels.reshape(-1) == lab)
        self._commit("delete", idx, 0)
        return lab

    def delete_label(self, label: int) -> int:
        """Remove every pixel of ``label``; returns the number of pixels removed."""
        idx = np.flatnonzero(self.labels.reshape(-1) == int(label))
        return self._commit("delete", idx, 0)

    def fill(self, y: float, x: float, label: int | None = None) -> int:
        """Flood-fill the 4-connected region of equal value under ``(y, x)`` with ``label``.

        On background this fills an enclosed hole (or the whole connected background: undo
        reverts it); on an object it relabels the connected part of that object. Returns the
        number of pixels changed.
        """
        from scipy import ndimage

        lab = self.label if label is None else int(label)
        yi, xi = self._pixel(y, x)
        if yi is None:
            return 0
        old = int(self.labels[yi, xi])
        if old == lab:
            return 0
        region = self.labels == old
        comp, _ = ndimage.label(region)
        idx = np.flatnonzero(comp.reshape(-1) == comp[yi, xi])
        n = self._commit("fill", idx, lab)
        if lab:
            self.label = lab
        return n

    def new_label(self) -> int:
        """Make the next free id the current label and return it."""
        self.label = self.next_label()
        return self.label

    def pick(self, y: float, x: float) -> int:
        """Make the label under ``(y, x)`` the current one (background leaves it unchanged)."""
        lab = self.label_at(y, x)
        if lab:
            self.label = lab
        return lab

    def paint_mask(self, mask: np.ndarray, label: int | None = None, *, overwrite: bool = True) -> int:
        """Paint every pixel of a boolean ``mask`` (same shape) with ``label`` (a lasso, a
        polygon or a prompt result); ``overwrite=False`` protects other objects."""
        m = np.asarray(mask, dtype=bool)
        if m.shape != self.shape:
            raise ValueError(f"mask of shape {m.shape} does not match the labels {self.shape}")
        lab = self.label if label is None else int(label)
        idx = np.flatnonzero(m.reshape(-1))
        if not overwrite and lab != 0:
            cur = self.labels.reshape(-1)[idx]
            idx = idx[(cur == 0) | (cur == lab)]
        if lab:
            self.label = lab
        return self._commit("paint" if lab else "erase", idx, lab)

    def set_labels(self, labels: np.ndarray, kind: str = "replace") -> int:
        """Replace the whole label image as one undoable edit (same shape)."""
        arr = np.asarray(labels)
        if arr.shape != self.shape:
            raise ValueError(f"labels of shape {arr.shape} cannot replace {self.shape}")
        return self._commit(kind, np.arange(self.labels.size, dtype=np.int64), arr.reshape(-1))

    # -- history --------------------------------------------------------------------------
    def undo(self) -> bool:
        """Revert the last edit; False if there is nothing to undo."""
        if not self._undo:
            return False
        e = self._undo.pop()
        self.labels.reshape(-1)[e.index] = e.before
        self._redo.append(e)
        self.version += 1
        return True

    def redo(self) -> bool:
        """Re-apply the last undone edit; False if there is nothing to redo."""
        if not self._redo:
            return False
        e = self._redo.pop()
        self.labels.reshape(-1)[e.index] = e.after
        self._undo.append(e)
        self.version += 1
        return True

    # -- events from the browser ----------------------------------------------------------
    def apply(self, event: Mapping[str, Any]) -> dict[str, Any]:
        """Apply one event dict (what the canvas sends) and report what happened.

        Events: ``{"type": "paint", "points": [[y, x], ...], "radius": r, "label": l}``,
        ``{"type": "erase", "points": ..., "radius": r}``, ``{"type": "delete", "y", "x"}``,
        ``{"type": "fill", "y", "x", "label"}``, ``{"type": "pick", "y", "x"}``,
        ``{"type": "new_label"}``, ``{"type": "undo"}``, ``{"type": "redo"}``.
        Paint events may carry ``"overwrite": false`` and ``"fill_closed": true`` (fill a
        drawn outline). Returns ``{"type", "changed", "label"}``
        (``changed``: pixels changed, or whether undo/redo did something).
        """
        kind = str(event.get("type", ""))
        if kind == "paint":
            lab = event.get("label")
            n: Any = self.paint(event["points"], event.get("radius", 3.0),
                                None if lab is None else int(lab),
                                overwrite=bool(event.get("overwrite", True)),
                                fill_closed=bool(event.get("fill_closed", False)))
        elif kind == "erase":
            n = self.erase(event["points"], event.get("radius", 3.0), event.get("only"))
        elif kind == "delete":
            n = self.delete(event["y"], event["x"])
        elif kind == "fill":
            lab = event.get("label")
            n = self.fill(event["y"], event["x"], None if lab is None else int(lab))
        elif kind == "pick":
            n = self.pick(event["y"], event["x"])
        elif kind == "new_label":
            n = self.new_label()
        elif kind == "undo":
            n = self.undo()
        elif kind == "redo":
            n = self.redo()
        else:
            raise ValueError(f"unknown edit event type {kind!r}; one of {', '.join(EVENT_TYPES)}")
        return {"type": kind, "changed": n, "label": self.label}

    def apply_all(self, events: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
        return [self.apply(e) for e in events]

    # -- saving ---------------------------------------------------------------------------
    def mark_saved(self) -> None:
        self._saved_state = self.state_id

    def save(self, path: str | os.PathLike) -> Path:
        """Write the labels as a zlib TIFF atomically (a failed write leaves no partial file
        and an existing file untouched); uint16, or uint32 above 65,535 labels."""

        out = save_masks(path, self.labels)
        self.mark_saved()
        return Path(out)

    # -- helpers --------------------------------------------------------------------------
    def _as_stroke(self, points: Any, radius: float | None, label: int | None) -> Stroke:
        if isinstance(points, Stroke):
            if label is None:
                label = points.label
            radius = points.radius if radius is None else radius
            points = points.points
        lab = self.label if label is None else int(label)
        if lab < 0:
            raise ValueError(f"label must be >= 0, got {lab}")
        return Stroke.of(points, 3.0 if radius is None else radius, lab)

    def __repr__(self) -> str:
        return (f"LabelEditor(shape={self.shape}, objects={self.n_objects}, label={self.label}, "
                f"undo={len(self._undo)}, redo={len(self._redo)})")
