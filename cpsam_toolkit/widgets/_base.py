"""Shared pieces of the panels: display, status line, view controls, figure → PNG."""

from __future__ import annotations

import html
import io as _io
import os
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import ipywidgets as W
import numpy as np

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


class ViewControls:
    """Overlay mode, opacity, display channel and reset-view controls of a canvas."""

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
        self.box = W.HBox(
            [self.overlay, self.opacity, self.channel, self.reset],
            layout=W.Layout(flex_flow="row wrap", align_items="center"),
        )

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
