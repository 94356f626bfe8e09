"""``Corrector``: fix predicted masks by hand and save them as training labels.

A small image browser (corrected / edited / predicted state per image) around a
:class:`~cpsam_toolkit.widgets.canvas.LabelCanvas` with brush, eraser, flood fill, delete
object, pick label and new label tools, undo/redo and an atomic Save of ``<stem>_masks.tif``.
Every edit is a compact event applied by :class:`~cpsam_toolkit.widgets.editor.LabelEditor`;
the same events can be sent from Python (:meth:`Corrector.handle_event`) or applied to
``corrector.editor`` directly, so a correction can be scripted.
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

from ..evaluate import load_labels
from ..io import find_images, imread
from ..preprocess import to_channels_last
from ._base import (
    Panel,
    ViewControls,
    channels_of,
    describe_settings,
    report_errors,
    resolve_settings,
    safe_output_dir,
    segment_kwargs,
    show_image,
    status_html,
)
from .canvas import LabelCanvas
from .codec import cheap_objects
from .editor import LabelEditor

#: state of an image in the browser
CORRECTED, EDITED, PREDICTED, NEW = "corrected", "edited", "predicted", "not opened"
_MARK = {CORRECTED: "✓", EDITED: "✎", PREDICTED: "•", NEW: " "}
#: the browser's legend of those marks
LEGEND = "✓ saved · ✎ unsaved edits · • opened, not saved"

TOOL_BUTTONS = [
    ("pan", "pan"),
    ("brush", "brush"),
    ("eraser", "eraser"),
    ("fill", "fill"),
    ("delete", "delete"),
    ("pick", "pick"),
]
TOOL_TIPS = [
    "drag to pan, wheel to zoom (h)",
    "paint the current label (b; [ and ] change the radius)",
    "erase to background (e)",
    "flood-fill the region under the click with the current label (f)",
    "click an object to delete it (d)",
    "click an object to make its label current (i)",
]


@dataclass
class ImageItem:
    """One image of the browser."""

    name: str
    path: Path | None
    mask_path: Path
    image: np.ndarray | None = None  # for in-memory images

    def load(self) -> np.ndarray:
        return self.image if self.image is not None else imread(self.path)  # type: ignore[arg-type]


class Corrector(Panel):
    """Correct masks image by image.

    Parameters
    ----------
    images : folder, glob, path, list of paths, or list of arrays
        The images to correct (folders skip ``*_masks.tif`` and other outputs).
    model : CellposeSAM, optional
        Predicts the starting masks of images without a saved mask file (no model: start empty).
    out_dir : folder, optional
        Where ``<stem>_masks.tif`` are saved (default: next to each image, or
        ``cpsam_outputs/corrected`` in the working directory for images inside the installed
        package; required for arrays). An existing mask file there is loaded instead of
        predicting, so corrections resume. The panel's "save to" box changes it.
    names : list of str, optional
        Names (stems) of in-memory images.
    channel_axis : int, optional
        Of the images, for the model and the display.
    height : int
        Canvas height in CSS pixels.
    segment_kwargs : dict, optional
        ``model.segment`` arguments; by default the model's recommended settings are used
        (the panel shows each value with its source: model / user / default).
    start : int
        The image shown first.
    fill_closed : bool
        A brush stroke that ends where it started is filled (draw an outline, get the object).
    """

    def __init__(
        self,
        images: Any,
        model: Any = None,
        out_dir: str | os.PathLike | None = None,
        *,
        names: Sequence[str] | None = None,
        channel_axis: int | None = None,
        height: int = 520,
        segment_kwargs: dict[str, Any] | None = None,
        start: int = 0,
        fill_closed: bool = True,
    ) -> None:
        self.model = model
        self.out_dir = safe_output_dir(out_dir) if out_dir is not None else None
        self.channel_axis = channel_axis
        self.settings, self.sources = resolve_settings(model, segment_kwargs)
        self.items = self._items(images, names)
        if not self.items:
            raise ValueError("Corrector: no images given")
        self._editors: dict[int, LabelEditor] = {}
        self._results: dict[int, Any] = {}
        self._images: dict[int, np.ndarray] = {}
        self._saved: set[int] = set()
        self.index = -1

        # filled labels while editing: a painted stroke shows as what it is, an area
        self.canvas = LabelCanvas(tools=[t for t, _ in TOOL_BUTTONS], tool="brush", height=height,
                                  overlay="filled", opacity=0.45)
        self.status = W.HTML()
        guard = report_errors(self.status)
        self.browser = W.Select(
            options=[], rows=min(8, max(3, len(self.items))), layout=W.Layout(width="240px")
        )
        self.prev_button = W.Button(
            icon="arrow-left", tooltip="previous image", layout=W.Layout(width="40px")
        )
        self.next_button = W.Button(icon="arrow-right", tooltip="next image", layout=W.Layout(width="40px"))
        self.tools = W.ToggleButtons(
            options=TOOL_BUTTONS, value="brush", tooltips=TOOL_TIPS, style={"button_width": "62px"}
        )
        W.link((self.tools, "value"), (self.canvas, "tool"))
        self.label_id = W.BoundedIntText(
            value=1,
            min=0,
            max=2**32 - 1,
            description="label",
            layout=W.Layout(width="160px"),
            style={"description_width": "40px"},
        )
        W.link((self.label_id, "value"), (self.canvas, "label_id"))
        self.new_button = W.Button(
            description="new", icon="plus", tooltip="next free label id (n)", layout=W.Layout(width="70px")
        )
        self.radius = W.IntSlider(
            value=self.canvas.brush_radius,
            min=0,
            max=50,
            description="radius",
            layout=W.Layout(width="230px"),
            style={"description_width": "45px"},
        )
        W.link((self.radius, "value"), (self.canvas, "brush_radius"))
        self.protect = W.Checkbox(
            value=False, description="protect other objects", indent=False, layout=W.Layout(width="170px")
        )
        self.fill_closed = W.Checkbox(
            value=bool(fill_closed), description="fill closed outlines", indent=False,
            layout=W.Layout(width="160px"), tooltip="a brush stroke that ends where it started is filled",
        )
        self.undo_button = W.Button(icon="undo", tooltip="undo (ctrl+z)", layout=W.Layout(width="40px"))
        self.redo_button = W.Button(
            icon="repeat", tooltip="redo (ctrl+shift+z)", layout=W.Layout(width="40px")
        )
        self.save_button = W.Button(
            description="Save",
            icon="save",
            button_style="primary",
            tooltip="write <stem>_masks.tif (atomically)",
        )
        self.revert_button = W.Button(
            description="revert", icon="history", tooltip="replace this image's masks by the model's "
            "prediction (undoable)", layout=W.Layout(width="90px")
        )
        self.save_dir = W.Text(value="", description="save to", placeholder="next to each image",
                               layout=W.Layout(width="420px"), style={"description_width": "55px"},
                               continuous_update=False)
        self.settings_line = W.HTML()
        self.view = ViewControls(self.canvas, guard(self._on_channel), 1)

        self.browser.observe(guard(self._on_browse), "value")
        self.prev_button.on_click(guard(lambda _b: self.previous()))
        self.next_button.on_click(guard(lambda _b: self.next()))
        self.new_button.on_click(guard(lambda _b: self.handle_event({"type": "new_label"})))
        self.undo_button.on_click(guard(lambda _b: self.handle_event({"type": "undo"})))
        self.redo_button.on_click(guard(lambda _b: self.handle_event({"type": "redo"})))
        self.save_button.on_click(guard(lambda _b: self.save()))
        self.revert_button.on_click(guard(lambda _b: self.revert()))
        self.label_id.observe(self._on_label_id, "value")
        self.canvas.on_edit(guard(self.handle_event))
        self.save_dir.observe(guard(self._on_save_dir), "value")
        if self.out_dir is not None:
            self.save_dir.value = str(self.out_dir)

        tool_row = W.HBox(
            [self.tools, self.label_id, self.new_button, self.radius, self.protect, self.fill_closed],
            layout=W.Layout(flex_flow="row wrap", align_items="center"),
        )
        action_row = W.HBox(
            [self.undo_button, self.redo_button, self.save_button, self.revert_button, self.save_dir],
            layout=W.Layout(flex_flow="row wrap", align_items="center"),
        )
        left = W.VBox(
            [
                W.HTML("<b>images</b>"),
                self.browser,
                W.HBox([self.prev_button, self.next_button]),
                W.HTML(f"<div style='font-size:11px;line-height:1.3'>{LEGEND.replace(' · ', '<br>')}</div>"),
            ],
            layout=W.Layout(width="250px"),
        )
        right = W.VBox([tool_row, self.view.box, self.canvas, self.status, action_row, self.settings_line],
                       layout=W.Layout(flex="1"))
        self.widget = W.HBox([left, right])
        self._show_settings()
        self.open(int(start))

    # -- images ---------------------------------------------------------------------------
    def _items(self, images: Any, names: Sequence[str] | None) -> list[ImageItem]:
        if isinstance(images, np.ndarray):
            images = [images]  # one image (a stack would be ambiguous with channels)
        if not isinstance(images, (str, os.PathLike)):
            images = list(images)
        if isinstance(images, (str, os.PathLike)) or all(isinstance(i, (str, os.PathLike)) for i in images):
            paths = find_images(images)
            if names is not None:
                raise ValueError("names= is for in-memory images; files are named by their stem")
            return [ImageItem(p.stem, p, self._mask_path(p.stem, p.parent)) for p in paths]
        arrays = list(images)
        if self.out_dir is None:
            raise ValueError("Corrector: give out_dir= for in-memory images (where masks are saved)")
        names = list(names) if names is not None else [f"image_{i:03d}" for i in range(len(arrays))]
        if len(names) != len(arrays):
            raise ValueError(f"{len(names)} names for {len(arrays)} images")
        return [ImageItem(n, None, self._mask_path(n, None), np.asarray(a)) for n, a in zip(names, arrays)]

    def _mask_path(self, stem: str, folder: Path | None) -> Path:
        if self.out_dir is not None:
            return self.out_dir / f"{stem}_masks.tif"
        try:  # next to the image, unless that is inside the installed package
            base = safe_output_dir(folder)
        except ValueError:
            base = Path("cpsam_outputs") / "corrected"
        return Path(base) / f"{stem}_masks.tif"

    def set_out_dir(self, folder: str | os.PathLike | None) -> None:
        """Save masks to ``folder`` from now on (None: next to each image)."""
        self.out_dir = safe_output_dir(folder) if folder else None
        if self.out_dir is None and any(it.path is None for it in self.items):
            raise ValueError("in-memory images need a folder to save to")
        for it in self.items:
            it.mask_path = self._mask_path(it.name, it.path.parent if it.path is not None else None)
        if str(self.save_dir.value) != str(folder or ""):
            self.save_dir.value = str(folder or "")
        if self.index >= 0:
            self._refresh_browser()
            self._refresh()

    def state(self, i: int) -> str:
        """``corrected`` (saved, unchanged since), ``edited`` (unsaved changes), ``predicted``
        (opened, not saved) or ``not opened``."""
        ed = self._editors.get(i)
        if ed is not None and ed.dirty:
            return EDITED
        if i in self._saved or self.items[i].mask_path.exists():
            return CORRECTED
        return PREDICTED if ed is not None else NEW

    def states(self) -> list[dict[str, Any]]:
        """Name, state and mask file of every image."""
        return [
            {"name": it.name, "state": self.state(i), "masks": str(it.mask_path)}
            for i, it in enumerate(self.items)
        ]

    def corrected(self) -> list[tuple[Path | np.ndarray, Path]]:
        """``(image, mask file)`` of every image whose corrected masks are saved (image as a
        path, or the array for in-memory images) — ready for :func:`cpsam_toolkit.training.train`."""
        out = []
        for i, it in enumerate(self.items):
            if self.state(i) == CORRECTED:
                out.append((it.path if it.path is not None else it.load(), it.mask_path))
        return out

    @property
    def editor(self) -> LabelEditor:
        """The editor of the open image."""
        return self._editors[self.index]

    @property
    def labels(self) -> np.ndarray:
        return self.editor.labels

    @property
    def current(self) -> ImageItem:
        return self.items[self.index]

    def image(self, i: int | None = None) -> np.ndarray:
        i = self.index if i is None else i
        if i not in self._images:
            self._images[i] = self.items[i].load()
        return self._images[i]

    def open(self, i: int) -> LabelEditor:
        """Show image ``i`` (its saved masks if any, else the model's prediction)."""
        if not 0 <= i < len(self.items):
            raise IndexError(f"image {i} does not exist ({len(self.items)} images)")
        self.index = i
        img = self.image(i)
        if i not in self._editors:
            self._editors[i] = LabelEditor(self._starting_labels(i, img))
        ed = self._editors[i]
        self.view.set_channels(channels_of(img, self.channel_axis))
        show_image(self.canvas, img, None, self.channel_axis)
        self.label_id.value = ed.label
        self._refresh_browser()
        self._refresh()
        return ed

    def next(self) -> None:
        self.open(min(self.index + 1, len(self.items) - 1))

    def previous(self) -> None:
        self.open(max(self.index - 1, 0))

    def _starting_labels(self, i: int, img: np.ndarray) -> np.ndarray:
        it = self.items[i]
        if it.mask_path.exists():
            lab = np.squeeze(load_labels(it.mask_path))
            self._saved.add(i)
            return lab
        res = self.prediction(i)
        return (
            res.masks
            if res is not None
            else np.zeros(img.shape[:2] if img.ndim == 2 else _yx_shape(img, self.channel_axis), np.uint32)
        )

    def prediction(self, i: int | None = None) -> Any:
        """The model's result for image ``i`` (computed once), or None without a model."""
        i = self.index if i is None else i
        if i not in self._results and self.model is not None:
            self.status.value = status_html(f"segmenting {html.escape(self.items[i].name)} …")
            self._results[i] = self.model.segment(
                self.image(i), channel_axis=self.channel_axis, **self.segment_kwargs
            )
            self._refresh_status()
        return self._results.get(i)

    @property
    def segment_kwargs(self) -> dict[str, Any]:
        """What ``model.segment`` gets: the model's recommended and the user's settings."""
        return segment_kwargs(self.model, self.settings, self.sources) if self.model is not None else {}

    def set_model(self, model: Any) -> None:
        """Use another model for images not opened yet (and for :meth:`revert`); its
        recommended settings replace the old model's (the user's stay)."""
        user = {k: v for k, v in self.settings.items() if self.sources.get(k) == "user"}
        self.model = model
        self.settings, self.sources = resolve_settings(model, user)
        self._results.clear()
        self._show_settings()

    # -- editing --------------------------------------------------------------------------
    def handle_event(self, event: dict[str, Any]) -> dict[str, Any]:
        """Apply one canvas event (the message the browser sends) to the open image."""
        event = dict(event)
        if event.get("type") == "paint":
            event.setdefault("overwrite", not self.protect.value)
            event.setdefault("fill_closed", bool(self.fill_closed.value))
        out = self.editor.apply(event)
        self.label_id.value = self.editor.label
        self._refresh()
        if out["type"] in ("paint", "erase", "delete", "fill", "undo", "redo"):
            self._refresh_browser()
        return out

    def revert(self) -> None:
        """Replace the masks of the open image by the model's prediction (undoable)."""
        res = self.prediction()
        if res is None:
            raise RuntimeError("no model to predict masks with")
        self.editor.set_labels(res.masks, kind="revert")
        self._refresh()
        self._refresh_browser()

    def save(self, i: int | None = None) -> Path:
        """Write the masks of image ``i`` (default the open one) to ``<stem>_masks.tif``,
        atomically: on failure no partial file is left and an existing file is unchanged."""
        i = self.index if i is None else i
        ed = self._editors[i]
        path = ed.save(self.items[i].mask_path)
        self._saved.add(i)
        self._refresh_browser()
        self.status.value = status_html(
            f"{html.escape(self.items[i].name)}: saved {html.escape(str(path))}", "ok")
        return path

    # -- view -----------------------------------------------------------------------------
    def _on_label_id(self, change: dict) -> None:
        if self.index in self._editors:
            self.editor.label = int(change["new"])

    _browsing_quietly = False

    def _on_browse(self, change: dict) -> None:
        if self._browsing_quietly:  # the list is being redrawn (new marks), not clicked
            return
        if change["new"] is not None and change["new"] != self.index:
            self.open(int(change["new"]))

    def _on_save_dir(self, change: dict) -> None:
        if str(change["new"]) != str(self.out_dir or ""):
            self.set_out_dir(change["new"] or None)

    def _show_settings(self) -> None:
        if self.model is None:
            self.settings_line.value = ""
            return
        self.settings_line.value = (
            f"<span style='font-size:11px;opacity:0.8'>predictions by {html.escape(str(self.model.name))}: "
            f"{html.escape(describe_settings(self.settings, self.sources))}</span>")

    def _on_channel(self, channel: int | None) -> None:
        show_image(self.canvas, self.image(), channel, self.channel_axis)

    def _refresh_browser(self) -> None:
        opts = [(f"{_MARK[self.state(i)]} {it.name}", i) for i, it in enumerate(self.items)]
        self._browsing_quietly = True  # new options reset the selection: not a user's choice
        try:
            if list(self.browser.options) != opts:
                self.browser.options = opts
            if self.browser.value != self.index:
                self.browser.value = self.index
        finally:
            self._browsing_quietly = False

    def _refresh(self) -> None:
        ed = self.editor
        self.canvas.set_labels(ed.labels)
        res = self._results.get(self.index)
        cp = res.cellprob if res is not None else None
        self.canvas.set_objects(cheap_objects(ed.labels, cp))
        self.undo_button.disabled = not ed.can_undo
        self.redo_button.disabled = not ed.can_redo
        self._refresh_status()

    def _refresh_status(self) -> None:
        """One line that always names the image on screen."""
        if self.index < 0 or self.index not in self._editors:
            return
        ed = self.editor
        st = self.state(self.index)
        self.status.value = status_html(
            f"<b>{html.escape(self.current.name)}</b> (image {self.index + 1}/{len(self.items)}) · "
            f"{ed.n_objects} objects · next free id {ed.next_label()} · {st}"
            + (" (unsaved)" if ed.dirty and st != EDITED else ""),
            "warn" if ed.dirty else "info",
        )


def _yx_shape(img: np.ndarray, channel_axis: int | None) -> tuple[int, int]:
    return to_channels_last(img, channel_axis=channel_axis).shape[:2]  # type: ignore[return-value]
