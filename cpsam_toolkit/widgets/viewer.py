"""``Viewer``: an image with its masks, live post-processing thresholds and hover read-out."""

from __future__ import annotations

import os
import threading
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any

import ipywidgets as W
import numpy as np

from ..io import imread
from ._base import Panel, ViewControls, channels_of, report_errors, show_image, status_html
from .canvas import LabelCanvas
from .codec import cheap_objects


class Viewer(Panel):
    """Segment an image and explore the result.

    Parameters
    ----------
    image : array or path
        (Y, X), (Y, X, C) or (C, Y, X) image, or a file read with :func:`cpsam_toolkit.io.imread`.
    model : CellposeSAM, optional
        Used to segment the image (and again by :meth:`set_model`); not needed with ``result``.
    result : SegmentationResult, optional
        An existing result (its cached flows feed the threshold sliders).
    channel_axis : int, optional
        Passed to ``model.segment`` and used for display.
    height : int
        Height of the canvas in CSS pixels.
    background : bool
        Run slider updates in a worker thread (the kernel stays free; while one update runs,
        further slider moves are coalesced into one). ``viewer.wait()`` waits for it.
    **segment_kwargs
        Other ``model.segment`` arguments (``diameter``, ``tile_overlap`` ...).

    The sliders (cell probability, flow threshold, minimum size) call
    :meth:`SegmentationResult.recompute`, which re-runs only the post-processing on the cached
    flows; the network does not run again. ``viewer.result`` is always the result on screen.
    The masks are shown as soon as they are computed, with area and mean cell probability on
    hover; the flow error of each object follows. Results of recent threshold settings are kept,
    so going back to one is instant.
    """

    CACHE_SIZE = 8

    def __init__(
        self,
        image: np.ndarray | str | os.PathLike,
        model: Any = None,
        *,
        result: Any = None,
        channel_axis: int | None = None,
        name: str | None = None,
        height: int = 480,
        background: bool = True,
        **segment_kwargs: Any,
    ) -> None:
        if isinstance(image, (str, os.PathLike)):
            self.path: Path | None = Path(image)
            name = name or self.path.stem
            image = imread(image)
        else:
            self.path = None
        self.image = np.asarray(image)
        self.name = name or "image"
        self.model = model
        self.channel_axis = channel_axis
        self.segment_kwargs = dict(segment_kwargs)
        self.timings: dict[str, float] = {}
        self.background = bool(background)
        self._lock = threading.Lock()
        self._pending: dict[str, Any] | None = None
        self._busy = False
        self._cache: OrderedDict[tuple, Any] = OrderedDict()
        if result is None:
            if model is None:
                raise ValueError("Viewer needs a model to segment the image, or result=")
            result = self._segment()
        self.result = result
        self._channel: int | None = None

        self.canvas = LabelCanvas(tools=["pan"], tool="pan", height=height)
        self.status = W.HTML()
        o = result.options
        cu = dict(
            continuous_update=False, layout=W.Layout(width="330px"), style={"description_width": "110px"}
        )
        self.cellprob = W.FloatSlider(
            value=o.cellprob_threshold,
            min=-6.0,
            max=6.0,
            step=0.1,
            description="cell prob. thr.",
            readout_format=".1f",
            **cu,
        )
        self.flow = W.FloatSlider(
            value=o.flow_threshold,
            min=0.0,
            max=3.0,
            step=0.05,
            description="flow thr. (0=off)",
            readout_format=".2f",
            **cu,
        )
        self.min_size = W.IntSlider(
            value=o.min_size, min=0, max=2000, step=5, description="min size (px)", **cu
        )
        self.count = W.HTML()
        for s in (self.cellprob, self.flow, self.min_size):
            s.observe(report_errors(self.status)(self._on_slider), "value")
        self.view = ViewControls(
            self.canvas, report_errors(self.status)(self._on_channel), channels_of(self.image, channel_axis)
        )
        self.save_path = W.Text(
            value=str(self._default_save_path()), description="save to", layout=W.Layout(width="420px")
        )
        self.save_button = W.Button(description="Save masks", icon="save", button_style="primary")
        self.save_button.on_click(report_errors(self.status)(lambda _b: self.save()))
        sliders = W.HBox([self.cellprob, self.flow, self.min_size], layout=W.Layout(flex_flow="row wrap"))
        self.widget = W.VBox(
            [
                sliders,
                self.view.box,
                self.canvas,
                W.HBox([self.count, self.status], layout=W.Layout(justify_content="space-between")),
                W.HBox([self.save_path, self.save_button]),
            ]
        )
        show_image(self.canvas, self.image, None, channel_axis)
        self._remember(result)
        self._show(result)

    # -- public ---------------------------------------------------------------------------
    @property
    def masks(self) -> np.ndarray:
        return self.result.masks

    @property
    def n_objects(self) -> int:
        return int(self.result.n_objects)

    def recompute(
        self,
        cellprob_threshold: float | None = None,
        flow_threshold: float | None = None,
        min_size: int | None = None,
    ) -> Any:
        """Re-run post-processing with new thresholds (moves the sliders too); returns the result."""
        changes = {
            k: v
            for k, v in dict(
                cellprob_threshold=cellprob_threshold, flow_threshold=flow_threshold, min_size=min_size
            ).items()
            if v is not None
        }
        self.wait()
        self._silent = True
        try:
            if cellprob_threshold is not None:
                self.cellprob.value = float(cellprob_threshold)
            if flow_threshold is not None:
                self.flow.value = float(flow_threshold)
            if min_size is not None:
                self.min_size.value = int(min_size)
        finally:
            self._silent = False
        return self._recompute(**changes)

    def set_model(self, model: Any, resegment: bool = True) -> Any:
        """Use another model (for instance a finetuned one) and segment the image again."""
        self.model = model
        if resegment:
            self.status.value = status_html(f"segmenting with {getattr(model, 'name', 'model')} …")
            self.wait()
            self._cache.clear()
            self.result = self._segment()
            self._remember(self.result)
            self._show(self.result)
        return self.result

    def wait(self, timeout: float | None = None) -> Any:
        """Wait until background updates are done; returns the result on screen."""
        end = None if timeout is None else time.monotonic() + timeout
        while True:
            with self._lock:
                if not self._busy:
                    return self.result
            if end is not None and time.monotonic() > end:
                raise TimeoutError("the viewer is still updating")
            time.sleep(0.005)

    def save(self, path: str | os.PathLike | None = None) -> Path:
        """Write the masks as ``<stem>_masks.tif`` (atomically)."""
        from ..outputs import save_masks

        target = Path(path or self.save_path.value or self._default_save_path())
        out = save_masks(target, self.result.masks)
        self.status.value = status_html(f"saved {out}", "ok")
        return Path(out)

    # -- internals ------------------------------------------------------------------------
    _silent = False

    def _default_save_path(self) -> Path:
        folder = self.path.parent if self.path is not None else Path(".")
        return folder / f"{self.name}_masks.tif"

    def _segment(self) -> Any:
        t0 = time.perf_counter()
        kw = dict(self.segment_kwargs)
        if hasattr(self, "result"):
            o = self.result.options
            kw.update(
                cellprob_threshold=o.cellprob_threshold, flow_threshold=o.flow_threshold, min_size=o.min_size
            )
        res = self.model.segment(self.image, channel_axis=self.channel_axis, **kw)
        self.timings["segment"] = time.perf_counter() - t0
        return res

    def _on_slider(self, _change: dict) -> None:
        if self._silent:
            return
        self._request(dict(cellprob_threshold=float(self.cellprob.value),
                           flow_threshold=float(self.flow.value), min_size=int(self.min_size.value)))

    def _request(self, changes: dict[str, Any]) -> None:
        if not self.background:
            self._recompute(**changes)
            return
        with self._lock:
            self._pending = changes
            start = not self._busy
            self._busy = True
        self.status.value = status_html("updating …", "warn")
        if start:
            threading.Thread(target=self._work, daemon=True, name="cpsam-viewer").start()

    def _work(self) -> None:
        while True:
            with self._lock:
                changes, self._pending = self._pending, None
                if changes is None:
                    self._busy = False
                    return
            try:
                self._recompute(**changes)
            except Exception as e:  # noqa: BLE001 - shown in the panel
                self.status.value = status_html(f"{type(e).__name__}: {e}", "error")

    @staticmethod
    def _key(options: Any) -> tuple:
        return (round(float(options.cellprob_threshold), 6), round(float(options.flow_threshold), 6),
                int(options.min_size), float(options.max_size_fraction), options.niter)

    def _remember(self, result: Any) -> None:
        self._cache[self._key(result.options)] = result
        self._cache.move_to_end(self._key(result.options))
        while len(self._cache) > self.CACHE_SIZE:
            self._cache.popitem(last=False)

    def _recompute(self, **changes: Any) -> Any:
        from dataclasses import replace

        t0 = time.perf_counter()
        key = self._key(replace(self.result.options, **changes))
        res = self._cache.get(key)
        if res is None:
            res = self.result.recompute(**changes)
            self._remember(res)
        self.timings["postprocess"] = time.perf_counter() - t0
        self.result = res
        self._show(res)
        return res

    def _on_channel(self, channel: int | None) -> None:
        self._channel = channel
        show_image(self.canvas, self.image, channel, self.channel_axis)

    def _show(self, res: Any) -> None:
        """Labels first (what the user waits for) with area and probability for hover, then
        the full per-object table (flow errors) unless a newer update is waiting."""
        t0 = time.perf_counter()
        self.canvas.set_labels(res.masks)
        self.count.value = f"<b>{res.n_objects}</b> objects"
        self.canvas.set_objects(cheap_objects(res.masks, res.cellprob))
        self.timings["send_labels"] = time.perf_counter() - t0
        pp = self.timings.get("postprocess")
        o = res.options
        self.status.value = status_html(
            f"cell prob. ≥ {o.cellprob_threshold:g}, flow error ≤ {o.flow_threshold:g}, "
            f"min size {o.min_size}" + (f" · post-processing {pp * 1000:.0f} ms" if pp else ""))
        if self._pending is not None:
            return
        t1 = time.perf_counter()
        try:
            objects = res.objects
        except Exception:  # noqa: BLE001 - hover details are optional
            return
        if self.result is res:
            self.canvas.set_objects({k: objects[k] for k in ("label", "area", "mean_cellprob", "flow_error")
                                     if k in objects})
        self.timings["objects"] = time.perf_counter() - t1
