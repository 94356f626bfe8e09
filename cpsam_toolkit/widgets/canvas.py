"""``LabelCanvas``: an anywidget <canvas> showing an image with a label overlay.

Drawing, zoom (wheel), pan (drag with the pan tool, middle/right button or space), hover
read-out and brush previews all happen in the browser; Python sends the image once as PNG and
the labels as zlib-compressed uint32 after each change. Edits come back as compact events
(``{"type": "paint", "points": [[y, x], ...], "radius": r, "label": l}`` and the like, see
:meth:`cpsam_toolkit.widgets.editor.LabelEditor.apply`), delivered to the callbacks registered
with :meth:`LabelCanvas.on_edit`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import anywidget
import numpy as np
import traitlets as t

from .codec import encode_labels, object_columns, png_bytes

TOOLS = ("pan", "brush", "eraser", "fill", "delete", "pick")
OVERLAYS = ("outlines", "filled", "none")
#: the browser side: an ES module and its styles, loaded by path (shipped as package data)
CANVAS_JS = Path(__file__).with_name("canvas.js")
CANVAS_CSS = Path(__file__).with_name("canvas.css")


class LabelCanvas(anywidget.AnyWidget):
    """The canvas widget (use :meth:`set_image`, :meth:`set_labels`, :meth:`set_objects`;
    ``brightness``, ``contrast`` and ``gamma`` change the display only)."""

    _esm = CANVAS_JS
    _css = CANVAS_CSS

    image_png = t.Bytes(b"").tag(sync=True)
    labels_z = t.Bytes(b"").tag(sync=True)
    shape = t.List(t.Int(), [0, 0]).tag(sync=True)
    objects = t.Dict().tag(sync=True)
    colors = t.Dict().tag(sync=True)
    overlay = t.Enum(OVERLAYS, "outlines").tag(sync=True)
    opacity = t.Float(0.8).tag(sync=True)
    tool = t.Unicode("pan").tag(sync=True)
    tools = t.List(t.Unicode(), ["pan"]).tag(sync=True)
    brush_radius = t.Int(3).tag(sync=True)
    label_id = t.Int(1).tag(sync=True)
    height = t.Int(480).tag(sync=True)
    render_count = t.Int(0).tag(sync=True)
    #: display levels, applied in the browser: brightness added (-1..1, 0 = as is), contrast
    #: multiplied around mid-grey (1 = as is), then gamma (output = level ** gamma; < 1 brightens
    #: dark parts)
    brightness = t.Float(0.0).tag(sync=True)
    contrast = t.Float(1.0).tag(sync=True)
    gamma = t.Float(1.0).tag(sync=True)

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._edit_callbacks: list[Callable[[dict[str, Any]], Any]] = []
        self.on_msg(self._on_custom_msg)

    # -- Python → browser -----------------------------------------------------------------
    def set_image(self, rgb: np.ndarray) -> None:
        """Show a (Y, X, 3) uint8 image (see :func:`cpsam_toolkit.widgets.codec.display_rgb`)."""
        rgb = np.asarray(rgb)
        shape = [int(rgb.shape[0]), int(rgb.shape[1])]
        with self.hold_sync():
            if shape != list(self.shape):
                self.shape = shape
                self.labels_z = b""
            self.image_png = png_bytes(rgb)

    def set_labels(self, labels: np.ndarray | None) -> None:
        """Show a (Y, X) label image as overlay (None clears it)."""
        if labels is None:
            self.labels_z = b""
            return
        labels = np.asarray(labels)
        if list(labels.shape) != list(self.shape):
            raise ValueError(f"labels {labels.shape} do not match the image {tuple(self.shape)}")
        self.labels_z = encode_labels(labels)

    def set_objects(self, objects: Mapping[str, Any] | None) -> None:
        """Per-object columns (``label`` plus any of ``area``, ``mean_cellprob``,
        ``flow_error`` ...) shown when the mouse is over an object."""
        self.objects = object_columns(objects) if objects else {}

    def reset_view(self) -> None:
        """Fit the image into the view again (zoom and pan are reset)."""
        self.send({"type": "reset_view"})

    # -- browser → Python -----------------------------------------------------------------
    def on_edit(self, callback: Callable[[dict[str, Any]], Any], remove: bool = False) -> None:
        """Register ``callback(event)`` for edit events sent by the browser."""
        if remove:
            self._edit_callbacks.remove(callback)
        else:
            self._edit_callbacks.append(callback)

    def _on_custom_msg(self, _widget: Any, content: Any, _buffers: Any) -> None:
        if not isinstance(content, dict) or "type" not in content:
            return
        for cb in list(self._edit_callbacks):
            cb(dict(content))
