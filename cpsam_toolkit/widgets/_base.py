"""Shared pieces of the panels: display, status line, view controls (overlay, brightness,
contrast, gamma), the model's recommended settings with their sources, the command that repeats
a run, figure → PNG."""

from __future__ import annotations

import html
import inspect
import io as _io
import math
import os
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import ipywidgets as W
import numpy as np

from .. import outputs
from ..settings import SETTING_NAMES, Settings
from .canvas import LabelCanvas
from .codec import display_rgb, n_channels


class Panel:
    """A Python object that displays as its ``widget`` (an ipywidgets box)."""

    widget: W.Widget

    def _repr_mimebundle_(self, **kwargs: Any):
        return self.widget._repr_mimebundle_(**kwargs)

    def display(self) -> None:
        from IPython.display import display

        display(self.widget)


def status_html(text: str, kind: str = "info") -> str:
    colour = {"info": "inherit", "ok": "#1a7f37", "warn": "#9a6700", "error": "#cf222e"}[kind]
    return f'<span style="color:{colour}">{text}</span>'


def report_errors(status: W.HTML) -> Callable:
    """Decorator for widget callbacks: show an exception in ``status`` instead of losing it in
    the kernel log (callbacks run outside any cell)."""

    def deco(fn: Callable) -> Callable:
        def wrapper(*args: Any, **kwargs: Any):
            try:
                return fn(*args, **kwargs)
            except Exception as e:  # noqa: BLE001 - shown to the user
                status.value = status_html(
                    f"{html.escape(e.__class__.__name__)}: {html.escape(str(e))}", "error"
                )
                traceback.print_exc()
                return None

        return wrapper

    return deco


#: post-processing settings a panel exposes (the rest go to ``model.segment`` unchanged)
MASK_KEYS = ("cellprob_threshold", "flow_threshold", "min_size", "max_size_fraction", "niter")


def model_recommended(model: Any) -> dict[str, Any]:
    """The settings the model file recommends (``info["recommended_settings"]``, e.g. the
    shipped model's ``flow_threshold=0.8``); ``{}`` when it recommends none.

    The ONE place the widgets read them: a :class:`~cpsam_toolkit.segment.CellposeSAM`'s
    ``settings`` fields with source "model" (which drops a ``diameter="auto"`` the model cannot
    honour); the raw ``info`` entry for other model objects.
    """
    s = getattr(model, "settings", None)
    if isinstance(s, Settings):
        return {k: v for k, (v, src) in s.non_default().items() if src == "model"}
    info = getattr(model, "info", None) or {}
    return dict(info.get("recommended_settings") or {})


def default_settings() -> dict[str, Any]:
    """The library defaults of every segmentation setting (:class:`cpsam_toolkit.settings.Settings`)."""
    return Settings().values()


def resolve_settings(model: Any, user: dict[str, Any] | None = None) -> tuple[dict[str, Any], dict[str, str]]:
    """``(values, sources)``: library defaults, then the model's recommended settings, then
    ``user`` values, validated as a :class:`cpsam_toolkit.settings.Settings` (a bad value raises
    ``ValueError`` naming the setting and the fix); ``sources[name]`` is ``"default"``,
    ``"model"`` or ``"user"``. Other ``segment`` keywords in ``user`` pass through as "user"."""

    user = dict(user or {})
    s = Settings.from_model(model_recommended(model) if model is not None else {})
    s = s.replace(**{k: v for k, v in user.items() if k in SETTING_NAMES})
    values, sources = s.values(), dict(s.sources)
    for k, v in user.items():
        if k not in SETTING_NAMES:
            values[k], sources[k] = v, "user"
    return values, sources


def segment_kwargs(model: Any, values: dict[str, Any], sources: dict[str, str]) -> dict[str, Any]:
    """The non-default settings as keywords of ``model.segment``."""
    params = inspect.signature(model.segment).parameters
    return {k: v for k, v in values.items() if sources.get(k) != "default" and k in params}


def describe_settings(values: dict[str, Any], sources: dict[str, str], keys: tuple[str, ...] = MASK_KEYS,
                      extra: bool = True) -> str:
    """``"flow_threshold 0.8 (model) · min_size 15 (default) …"``: ``keys`` always, other settings
    only where they are not defaults (``extra``)."""
    more = [k for k in values if k not in keys and sources.get(k) != "default"] if extra else []
    names = list(keys) + more
    return " · ".join(f"{k} {_short(values.get(k))} ({sources.get(k, 'default')})" for k in names)


def _short(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "none" if v is None else str(v)


#: ``cpsam segment`` options whose name is not ``--<setting with dashes>``
def repeat_command(
    model: Any,
    values: dict[str, Any],
    sources: dict[str, str],
    image: str | os.PathLike | None = None,
    out: str | os.PathLike = "masks/",
) -> tuple[str, str]:
    """``(cli, python)``: the ``cpsam segment`` command and the Python call that repeat a run
    with these settings (:func:`cpsam_toolkit.outputs.repeat_command`, given the values that are
    not library defaults, the model's recommended ones included, so the command does not depend
    on them)."""
    given = {k: v for k, v in values.items() if sources.get(k) != "default" and v is not None}
    rc = outputs.repeat_command(given, model, inputs=str(image) if image is not None else "IMAGE.tif",
                                out=str(out))
    return rc.cli, rc.python


def logit(p: float) -> float:
    """Probability → logit (the unit of ``cellprob_threshold``)."""
    p = min(max(float(p), 1e-6), 1 - 1e-6)
    return math.log(p / (1 - p))


def sigmoid(x: float) -> float:
    """Logit → probability (the unit of the hover read-out)."""
    return 1.0 / (1.0 + math.exp(-float(x)))


def safe_output_dir(folder: str | os.PathLike | None, default: str = "cpsam_outputs") -> Path:
    """Where a panel writes files: ``folder``, or ``default`` in the working directory (beside
    the notebook). Never inside the installed package (its examples folder, say)."""
    pkg = Path(__file__).resolve().parents[1]
    target = Path(folder) if folder is not None else Path(default)
    try:
        Path(target).resolve().relative_to(pkg)
    except ValueError:
        return target
    raise ValueError(f"{target} is inside the installed cpsam_toolkit package: choose another folder "
                     f"(for instance {Path.cwd() / default})")


class ViewControls:
    """Overlay mode, opacity, display channel, reset-view and display levels (brightness,
    contrast, gamma; the browser applies them, no data goes back to the kernel) of a canvas."""

    def __init__(
        self, canvas: LabelCanvas, on_channel: Callable[[int | None], None] | None = None, channels: int = 1
    ) -> None:
        self.canvas = canvas
        self.overlay = W.ToggleButtons(
            options=[("outlines", "outlines"), ("filled", "filled"), ("none", "none")],
            value=canvas.overlay,
            description="overlay",
            style={"button_width": "88px"},
        )
        self.opacity = W.FloatSlider(
            value=canvas.opacity,
            min=0.0,
            max=1.0,
            step=0.05,
            description="opacity",
            readout_format=".2f",
            layout=W.Layout(width="260px"),
        )
        W.link((self.overlay, "value"), (canvas, "overlay"))
        W.link((self.opacity, "value"), (canvas, "opacity"))
        self.channel = W.Dropdown(description="channel", layout=W.Layout(width="200px"))
        self._on_channel = on_channel
        self._quiet = False
        self.set_channels(channels)
        self.channel.observe(self._channel_changed, "value")
        self.reset = W.Button(
            description="fit view",
            icon="expand",
            layout=W.Layout(width="90px"),
            tooltip="reset zoom and pan (or double-click the image)",
        )
        self.reset.on_click(lambda _b: canvas.reset_view())
        lv = dict(layout=W.Layout(width="230px"), style={"description_width": "70px"}, readout_format=".2f")
        self.brightness = W.FloatSlider(value=canvas.brightness, min=-1.0, max=1.0, step=0.02,
                                        description="brightness", **lv)
        self.contrast = W.FloatLogSlider(value=canvas.contrast, base=10, min=-1, max=1, step=0.02,
                                         description="contrast", **lv)
        self.gamma = W.FloatLogSlider(value=canvas.gamma, base=10, min=-1, max=1, step=0.02,
                                      description="gamma", **lv)
        for name in ("brightness", "contrast", "gamma"):
            W.link((getattr(self, name), "value"), (canvas, name))
        self.reset_levels = W.Button(description="reset levels", icon="adjust",
                                     layout=W.Layout(width="130px"),
                                     tooltip="brightness 0, contrast 1, gamma 1")
        self.reset_levels.on_click(lambda _b: self.set_levels(0.0, 1.0, 1.0))
        row = dict(layout=W.Layout(flex_flow="row wrap", align_items="center"))
        self.box = W.VBox([
            W.HBox([self.overlay, self.opacity, self.channel, self.reset], **row),
            W.HBox([self.brightness, self.contrast, self.gamma, self.reset_levels], **row),
        ])

    def set_levels(self, brightness: float | None = None, contrast: float | None = None,
                   gamma: float | None = None) -> None:
        """Display levels: brightness (-1..1, 0 = as is), contrast (0.1..10, 1 = as is), gamma
        (0.1..10, 1 = as is; below 1 brightens dark parts)."""
        for name, v in (("brightness", brightness), ("contrast", contrast), ("gamma", gamma)):
            if v is not None:
                getattr(self, name).value = float(v)

    def set_channels(self, n: int) -> None:
        opts: list[tuple[str, int | None]] = [("all" if n > 1 else "grey", None)]
        if n > 1:
            opts += [(f"channel {c}", c) for c in range(n)]
        self._quiet = True
        try:
            self.channel.options = opts
            self.channel.value = None
        finally:
            self._quiet = False
        self.channel.layout.display = "" if n > 1 else "none"

    def _channel_changed(self, change: dict) -> None:
        if self._on_channel is not None and not self._quiet:
            self._on_channel(change["new"])


def show_image(
    canvas: LabelCanvas,
    image: np.ndarray | None,
    channel: int | None = None,
    channel_axis: int | None = None,
    shape: tuple[int, int] | None = None,
) -> None:
    """Send an image (or a black one of ``shape``) to the canvas."""
    if image is None:
        canvas.set_image(np.zeros((*shape, 3), np.uint8))  # type: ignore[misc]
    else:
        canvas.set_image(display_rgb(image, channel, channel_axis))


def channels_of(image: np.ndarray | None, channel_axis: int | None = None) -> int:
    return 1 if image is None else n_channels(image, channel_axis)


def figure_png(fig: Any, dpi: int = 100) -> bytes:
    """A matplotlib ``Figure`` as PNG bytes (Agg; no pyplot state, safe in a thread)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buf = _io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return buf.getvalue()


def stem_of(path: str | os.PathLike) -> str:
    return Path(path).stem


def fmt(v: Any, digits: int = 3) -> str:
    if v is None:
        return "–"
    if isinstance(v, (float, np.floating)):
        return "–" if not np.isfinite(v) else f"{float(v):.{digits}f}"
    return html.escape(str(v))


def html_table(
    rows: list[dict[str, Any]],
    columns: list[tuple[str, str]],
    max_rows: int = 200,
    highlight: Callable[[dict[str, Any]], bool] | None = None,
) -> str:
    """A small HTML table: ``columns`` is ``[(key, header), ...]``."""
    head = "".join(f"<th style='text-align:right;padding:2px 8px'>{html.escape(h)}</th>" for _, h in columns)
    body = []
    for r in rows[:max_rows]:
        style = " style='background:rgba(255,200,0,0.15)'" if highlight and highlight(r) else ""
        cells = "".join(
            f"<td style='text-align:right;padding:2px 8px'>{fmt(r.get(k))}</td>" for k, _ in columns
        )
        body.append(f"<tr{style}>{cells}</tr>")
    more = f"<div>… {len(rows) - max_rows} more rows</div>" if len(rows) > max_rows else ""
    return (
        f"<table style='border-collapse:collapse;font-size:12px'><thead><tr>{head}</tr></thead>"
        f"<tbody>{''.join(body)}</tbody></table>{more}"
    )
