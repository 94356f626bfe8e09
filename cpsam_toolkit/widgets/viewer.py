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
from ..outputs import save_masks
from ._base import (
    MASK_KEYS,
    Panel,
    ViewControls,
    channels_of,
    describe_settings,
    logit,
    model_recommended,
    repeat_command,
    report_errors,
    resolve_settings,
    safe_output_dir,
    segment_kwargs,
    show_image,
    sigmoid,
    status_html,
)
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
    out_dir : folder, optional
        Where Save writes ``<name>_masks.tif`` (default ``cpsam_outputs`` in the working
        directory, i.e. beside the notebook; never inside the installed package).
    **segment_kwargs
        ``model.segment`` arguments (``diameter``, ``flow_threshold`` ...). Settings not given
        are the model's recommended ones (``flow_threshold=0.8`` for the shipped model), else
        the library defaults; the panel shows each value with its source.

    Controls: the cell-probability threshold as a probability slider (the unit of the hover
    read-out) with its logit typed beside it (the unit of ``cellprob_threshold``), the flow
    threshold, and the minimum size on a log scale; every value can also be typed. Below the
    image: the settings with their sources, and the ``cpsam segment`` command and Python call
    that repeat the run.

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
        out_dir: str | os.PathLike | None = None,
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
        self.settings, self.sources = resolve_settings(model, segment_kwargs)
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
        self._sync_settings(result.options)
        self._channel: int | None = None

        self.canvas = LabelCanvas(tools=["pan"], tool="pan", height=height)
        self.status = W.HTML()
        o = result.options
        cu = dict(continuous_update=False)
        wide = dict(layout=W.Layout(width="300px"), style={"description_width": "120px"})
        typed = dict(layout=W.Layout(width="150px"), style={"description_width": "45px"},
                     continuous_update=False)
        # one unit on screen for the cell probability: a probability (as the hover shows), with
        # the logit (what cellprob_threshold means) typed beside it
        self.cellprob_p = W.FloatSlider(value=sigmoid(o.cellprob_threshold), min=0.01, max=0.99, step=0.01,
                                        description="cell probability ≥", readout_format=".2f", **cu, **wide)
        self.cellprob = W.FloatText(value=float(o.cellprob_threshold), description="logit", step=0.1, **typed)
        self.flow = W.FloatSlider(value=o.flow_threshold, min=0.0, max=3.0, step=0.05,
                                  description="flow error ≤", readout=False, **cu, **wide,
                                  tooltip="flow-error QC threshold; 0 turns the QC off")
        self.flow_text = W.BoundedFloatText(value=float(o.flow_threshold), min=0.0, max=1e6, step=0.05,
                                            description="", **{**typed, "layout": W.Layout(width="90px")})
        # sizes span decades (5 px debris to 5000 px cells): a log slider, exact value typed
        self.min_size_slider = W.FloatLogSlider(value=max(1, o.min_size), base=10, min=0, max=4, step=0.02,
                                                description="min size (px)", readout=False, **cu, **wide)
        self.min_size = W.BoundedIntText(value=int(o.min_size), min=0, max=10**9, description="",
                                         **{**typed, "layout": W.Layout(width="90px")})
        # slider -> typed value (which triggers the update); typed value -> slider (quietly)
        for slider, text, to_text, to_slider in (
            (self.cellprob_p, self.cellprob, lambda p: round(logit(p), 3), sigmoid),
            (self.flow, self.flow_text, float, float),
            (self.min_size_slider, self.min_size, lambda v: int(round(v)), float),
        ):
            slider.observe(self._mirror(text, to_text, None), "value")
            text.observe(self._mirror(slider, to_slider, to_text), "value")
        self.count = W.HTML()
        for w in (self.cellprob, self.flow_text, self.min_size):
            w.observe(report_errors(self.status)(self._on_slider), "value")
        self.view = ViewControls(
            self.canvas, report_errors(self.status)(self._on_channel), channels_of(self.image, channel_axis)
        )
        self.out_dir = safe_output_dir(out_dir)
        self.save_path = W.Text(value=str(self.out_dir), description="save to", placeholder="folder",
                                layout=W.Layout(width="420px"), style={"description_width": "55px"})
        self.save_button = W.Button(description="Save masks", icon="save", button_style="primary",
                                    tooltip="write <name>_masks.tif into the folder on the left")
        self.save_button.on_click(report_errors(self.status)(lambda _b: self.save()))
        self.settings_line = W.HTML()
        self.repeat = W.HTML()
        row = dict(layout=W.Layout(flex_flow="row wrap", align_items="center"))
        self.widget = W.VBox(
            [
                W.HBox([W.HBox([self.cellprob_p, self.cellprob]), W.HBox([self.flow, self.flow_text]),
                        W.HBox([self.min_size_slider, self.min_size])], **row),
                self.view.box,
                self.canvas,
                W.HBox([self.count, self.status], layout=W.Layout(justify_content="space-between")),
                self.settings_line,
                W.HBox([self.save_path, self.save_button]),
                self.repeat,
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
                self.flow_text.value = float(flow_threshold)
            if min_size is not None:
                self.min_size.value = int(min_size)
        finally:
            self._silent = False
        return self._recompute(**changes)

    def set_model(self, model: Any, resegment: bool = True) -> Any:
        """Use another model (for instance a finetuned one) and segment the image again (with
        the thresholds on screen)."""
        self.model = model
        for k, v in model_recommended(model).items():
            if self.sources.get(k) != "user":
                self.settings[k], self.sources[k] = v, "model"
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
        """Write the masks atomically: to ``path`` if it names a ``.tif`` file, else as
        ``<name>_masks.tif`` into the folder ``path`` (default: the "save to" folder)."""

        target = Path(path or self.save_path.value or self.out_dir)
        if target.suffix.lower() not in (".tif", ".tiff"):
            target = target / f"{self.name}_masks.tif"
        safe_output_dir(target.parent)
        target.parent.mkdir(parents=True, exist_ok=True)
        out = save_masks(target, self.result.masks)
        self.status.value = status_html(f"saved {out}", "ok")
        return Path(out)

    def repeat_command(self) -> tuple[str, str]:
        """The ``cpsam segment`` command and the Python call that repeat what is on screen."""
        image = self.path if self.path is not None else f"{self.name}.tif"
        return repeat_command(self.model, self.settings, self.sources, image,
                              self.save_path.value or "masks/")

    # -- internals ------------------------------------------------------------------------
    _silent = False

    _mirroring = False

    def _mirror(self, target: W.Widget, convert: Any, back: Any) -> Any:
        """Keep a slider and its typed value together: set ``target`` to ``convert(new)``
        (a slider is clamped to its range, and left alone when it already stands for the
        typed value: ``back(slider) == typed``)."""

        def on_change(change: dict) -> None:
            if self._mirroring or (back is not None and back(target.value) == change["new"]):
                return
            v = convert(change["new"])
            if back is not None:
                lo, hi = target.min, target.max
                if hasattr(target, "base"):  # log slider: min/max are exponents
                    lo, hi = target.base**lo, target.base**hi
                v = min(max(v, lo), hi)
            self._mirroring = back is not None  # a typed value is not rounded back by its slider
            try:
                target.value = v
            finally:
                self._mirroring = False

        return on_change

    @property
    def segment_kwargs(self) -> dict[str, Any]:
        """What ``model.segment`` gets: the recommended and the user's settings."""
        return segment_kwargs(self.model, self.settings, self.sources) if self.model is not None else {}

    def _sync_settings(self, options: Any) -> None:
        """Record the post-processing settings of ``options`` (the result on screen); a value
        that differs from the one recorded is the user's (a slider, or a given result)."""
        for k in MASK_KEYS:
            v = getattr(options, k, None)
            if self.settings.get(k) != v:
                self.settings[k], self.sources[k] = v, "user"

    def _show_settings(self) -> None:
        import html as _html

        self.settings_line.value = (
            "<span style='font-size:11px;opacity:0.85'>settings: "
            f"{_html.escape(describe_settings(self.settings, self.sources))}</span>")
        if self.model is None:
            self.repeat.value = ""
            return
        cli, py = self.repeat_command()
        self.repeat.value = (
            "<details style='font-size:11px'><summary>repeat this run (command line / Python)</summary>"
            f"<pre style='white-space:pre-wrap;margin:2px 0'>{_html.escape(cli)}</pre>"
            f"<pre style='white-space:pre-wrap;margin:2px 0'>{_html.escape(py)}</pre></details>")

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
                           flow_threshold=float(self.flow_text.value), min_size=int(self.min_size.value)))

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
        self._sync_settings(res.options)
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
            f"cell prob. ≥ {sigmoid(o.cellprob_threshold):.2f} (logit {o.cellprob_threshold:g}), "
            f"flow error ≤ {o.flow_threshold:g}, min size {o.min_size}"
            + (f" · resized: {d:.0f} px objects to 30 px" if (d := getattr(res, "diameter", None)) else "")
            + (f" · post-processing {pp * 1000:.0f} ms" if pp else ""))
        self._show_settings()
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
