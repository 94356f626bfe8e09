"""Widget logic without a browser: the canvas's messages go through the same handler the
JavaScript uses (``LabelCanvas._handle_custom_msg``, what ipywidgets calls for a comm message)."""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pytest
import tifffile

pytest.importorskip("ipywidgets")
pytest.importorskip("anywidget")

from cpsam_toolkit.widgets import LabelEditor, Stroke  # noqa: E402
from cpsam_toolkit.widgets.codec import (  # noqa: E402
    decode_labels,
    display_rgb,
    encode_labels,
    png_bytes,
)
from cpsam_toolkit.widgets.editor import stroke_mask  # noqa: E402


def browser_event(widget, content: dict) -> None:
    """Deliver ``content`` exactly as a comm message from the browser would arrive."""
    widget._handle_custom_msg(content, [])


def two_objects(shape=(64, 80)) -> np.ndarray:
    lab = np.zeros(shape, np.uint16)
    lab[5:20, 5:25] = 1
    lab[30:50, 40:70] = 3
    return lab


# ------------------------------------------------------------------------------ editor


@pytest.mark.parametrize("radius", [0, 0.5, 1.5, 3, 6.2])
def test_stroke_mask_is_the_set_of_pixels_within_radius_of_the_polyline(radius):
    rng = np.random.default_rng(int(radius * 10))
    shape = (40, 50)
    pts = rng.uniform([-5, -5], [45, 55], size=(5, 2))  # partly outside the image
    ys, xs, m = stroke_mask(shape, pts, radius)
    got = np.zeros(shape, bool)
    got[ys, xs] = m
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    p = np.stack([yy.ravel(), xx.ravel()], 1).astype(float)
    d = np.full(p.shape[0], np.inf)
    for a, b in zip(pts[:-1], pts[1:]):
        ab = b - a
        t = np.clip(((p - a) @ ab) / (ab @ ab), 0, 1)
        d = np.minimum(d, np.linalg.norm(p - (a + t[:, None] * ab), axis=1))
    want = (d <= max(radius, 0.5)).reshape(shape)
    assert np.array_equal(got, want)


def test_paint_erase_delete_fill_pick_and_new_label():
    ed = LabelEditor(two_objects())
    assert ed.n_objects == 2 and ed.next_label() == 4 and ed.label == 4
    # paint a new object with the next free id
    new = ed.new_label()
    n = ed.paint([(58, 5), (58, 30)], radius=2, label=new)
    assert n > 0 and set(np.unique(ed.labels[56:61, 5:31])) == {new}
    assert ed.labels[55, 5] == 0 and ed.labels[58, 33] == 0
    # protect other objects: a stroke across object 1 leaves it alone
    before = ed.labels.copy()
    ed.paint([(10, 0), (10, 30)], radius=1, label=new, overwrite=False)
    assert np.array_equal(ed.labels[before == 1], before[before == 1])
    # overwrite (default) cuts through it
    ed.paint([(10, 0), (10, 30)], radius=1, label=new)
    assert (ed.labels[9:12, 5:25] == new).all()
    # erase only background-izes the stroke
    ed.erase([(40, 45), (40, 60)], radius=1)
    assert (ed.labels[39:42, 45:61] == 0).all() and ed.labels[35, 50] == 3
    # delete by click
    assert ed.delete(35, 50) == 3 and not (ed.labels == 3).any()
    assert ed.delete(0, 79) == 0  # background: nothing
    # flood fill a hole inside an object
    ed.set_labels(two_objects())
    ed.erase([(12, 15)], radius=2)
    hole = ed.labels == 0
    assert ed.fill(12, 15, label=1) == int((hole[8:17, 10:20]).sum())
    assert (ed.labels[5:20, 5:25] == 1).all()
    # fill on an object relabels it; pick makes a label current
    ed.fill(40, 50, label=9)
    assert (ed.labels[30:50, 40:70] == 9).all()
    ed.label = 1
    assert ed.pick(40, 50) == 9 and ed.label == 9
    assert ed.pick(0, 79) == 0 and ed.label == 9
    # a Stroke object, and strokes entirely outside the image do nothing
    assert ed.paint(Stroke.of([(-50, -50), (-40, -40)], 2)) == 0
    assert ed.paint(Stroke.of([(1, 70)], 1.0, label=5)) == 5  # a radius-1 dot: 5 pixels


def test_undo_restores_every_state_and_redo_reapplies():
    ed = LabelEditor(two_objects())
    states = [ed.labels.copy()]
    events = [
        {"type": "paint", "points": [[58, 5], [58, 30], [45, 30]], "radius": 2.5, "label": 7},
        {"type": "erase", "points": [[12, 0], [12, 40]], "radius": 1},
        {"type": "delete", "y": 35, "x": 50},
        {"type": "fill", "y": 0, "x": 0, "label": 2},
        {"type": "paint", "points": [[30, 30]], "radius": 4, "label": 0},
    ]
    for e in events:
        out = ed.apply(e)
        assert out["type"] == e["type"] and out["changed"]
        states.append(ed.labels.copy())
    for k in range(len(events), 0, -1):
        assert ed.apply({"type": "undo"})["changed"] is True
        assert np.array_equal(ed.labels, states[k - 1])
    assert ed.undo() is False and not ed.dirty
    for k in range(1, len(events) + 1):
        assert ed.redo() is True
        assert np.array_equal(ed.labels, states[k])
    assert ed.redo() is False
    # a new edit after undo drops the redo history
    ed.undo()
    ed.paint([(1, 1)], 1, label=4)
    assert not ed.can_redo
    with pytest.raises(ValueError, match="unknown edit event"):
        ed.apply({"type": "lasso"})


def test_history_is_bounded_and_stores_only_changed_pixels():
    ed = LabelEditor(np.zeros((100, 100), np.uint16), max_history=3)
    for i in range(5):
        ed.paint([(10 * i + 5, 5), (10 * i + 5, 50)], 2, label=i + 1)
    assert len(ed._undo) == 3
    assert all(e.n_pixels < 300 for e in ed._undo)
    ed.paint([(5, 5), (5, 50)], 2, label=1)  # already label 1 there: nothing to record
    assert len(ed._undo) == 3


def test_uint16_labels_grow_past_65535():
    lab = np.zeros((20, 20), np.uint16)
    lab[0, 0] = 65535
    ed = LabelEditor(lab)
    new = ed.new_label()
    assert new == 65536
    ed.paint([(10, 10)], 1, label=new)
    assert ed.labels.dtype == np.uint32 and ed.labels[10, 10] == 65536


# ------------------------------------------------------------------------------ saving


def test_save_is_atomic_no_partial_file_on_failure(tmp_path, monkeypatch):
    ed = LabelEditor(two_objects())
    target = tmp_path / "img_masks.tif"
    real = tifffile.imwrite

    def failing(path, *a, **k):
        Path(path).write_bytes(b"II*\x00partial")  # half-written, then the disk "fails"
        raise OSError("disk full")

    monkeypatch.setattr(tifffile, "imwrite", failing)
    with pytest.raises(OSError, match="disk full"):
        ed.save(target)
    assert not target.exists() and list(tmp_path.iterdir()) == []
    assert ed.dirty is False or ed.version == 0  # nothing was saved

    monkeypatch.setattr(tifffile, "imwrite", real)
    ed.paint([(60, 2)], 1, label=5)
    ed.save(target)
    good = target.read_bytes()
    assert np.array_equal(tifffile.imread(target), ed.labels) and not ed.dirty

    ed.paint([(60, 70)], 1, label=6)
    monkeypatch.setattr(tifffile, "imwrite", failing)
    with pytest.raises(OSError):
        ed.save(target)
    assert target.read_bytes() == good  # the previous file is untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["img_masks.tif"]
    assert ed.dirty


# ------------------------------------------------------------------------------ codecs


def test_codecs_round_trip():
    import io

    from PIL import Image

    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (17, 23, 3), dtype=np.uint8)
    back = np.asarray(Image.open(io.BytesIO(png_bytes(rgb))))
    assert np.array_equal(back, rgb)
    grey = rng.integers(0, 256, (5, 7), dtype=np.uint8)
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(png_bytes(grey)))), grey)
    lab = rng.integers(0, 2**20, (31, 9)).astype(np.uint32)
    assert np.array_equal(decode_labels(encode_labels(lab), lab.shape), lab)
    img = rng.random((3, 16, 16)).astype(np.float32)  # channels first
    assert display_rgb(img).shape == (16, 16, 3)
    assert display_rgb(img, channel=1).shape == (16, 16, 3)
    with pytest.raises(ValueError, match="channel 5"):
        display_rgb(img, channel=5)


# ------------------------------------------------------------------------------ corrector


@pytest.fixture
def image_folder(tmp_path):
    d = tmp_path / "images"
    d.mkdir()
    rng = np.random.default_rng(1)
    for name in ("a", "b"):
        tifffile.imwrite(d / f"{name}.tif", rng.integers(0, 255, (48, 64), dtype=np.uint8))
    tifffile.imwrite(d / "a_masks.tif", two_objects((48, 64)))  # an earlier correction of "a"
    return d


def test_corrector_strokes_from_the_browser_change_the_labels(image_folder):
    from cpsam_toolkit.widgets import Corrector

    c = Corrector(image_folder)
    assert [s["name"] for s in c.states()] == ["a", "b"]  # a_masks.tif is not an image
    assert c.state(0) == "corrected" and np.array_equal(c.labels, two_objects((48, 64)))
    start = c.labels.copy()
    browser_event(c.canvas, {"type": "paint", "points": [[40, 2], [40, 30]], "radius": 2, "label": 5})
    assert (c.labels[38:43, 4:29] == 5).all() and c.state(0) == "edited"
    # the canvas received the new labels
    assert np.array_equal(decode_labels(c.canvas.labels_z, tuple(c.canvas.shape)), c.labels)
    assert c.label_id.value == 5 and "3 objects" in c.status.value
    # the protect checkbox applies to browser strokes
    c.protect.value = True
    browser_event(c.canvas, {"type": "paint", "points": [[10, 0], [10, 40]], "radius": 1, "label": 5})
    assert (c.labels[5:20, 5:25] == 1).all()
    c.protect.value = False
    browser_event(c.canvas, {"type": "delete", "y": 40, "x": 50})
    assert not (c.labels == 3).any()
    browser_event(c.canvas, {"type": "new_label"})
    assert c.label_id.value == 6 == c.canvas.label_id
    browser_event(c.canvas, {"type": "fill", "y": 0, "x": 63, "label": 6})
    assert c.labels[0, 63] == 6
    browser_event(c.canvas, {"type": "pick", "y": 10, "x": 10})
    assert c.label_id.value == 1
    # undo everything from the browser (ctrl+z) and with the button, redo once
    for _ in range(4):
        browser_event(c.canvas, {"type": "undo"})
    c.undo_button.click()
    assert np.array_equal(c.labels, start) and c.undo_button.disabled
    browser_event(c.canvas, {"type": "redo"})
    assert (c.labels[38:43, 4:29] == 5).all() and not c.redo_button.disabled
    # a bad message is reported in the panel, not raised into the kernel's comm handler
    browser_event(c.canvas, {"type": "lasso"})
    assert "unknown edit event" in c.status.value
    browser_event(c.canvas, {"no": "type"})  # ignored


def test_corrector_save_browse_and_resume(image_folder, tmp_path):
    from cpsam_toolkit.widgets import Corrector

    out = tmp_path / "corrected"
    c = Corrector(sorted(image_folder.glob("[ab].tif")), out_dir=out)
    assert c.state(0) == "predicted" and c.labels.max() == 0  # no model, no saved masks in out/
    assert c.state(1) == "not opened"
    c.handle_event({"type": "paint", "points": [[20, 20], [20, 40]], "radius": 3, "label": 2})
    c.save_button.click()
    saved = tifffile.imread(out / "a_masks.tif")
    assert np.array_equal(saved, c.labels) and saved.dtype == np.uint16
    assert c.state(0) == "corrected" and "saved" in c.status.value
    assert c.browser.options[0][0].startswith("✓")
    c.next_button.click()
    assert c.index == 1 and c.browser.value == 1
    c.handle_event({"type": "paint", "points": [[5, 5]], "radius": 2, "label": 1})
    assert c.browser.options[1][0].startswith("✎")
    c.browser.value = 0  # browsing back keeps unsaved edits of image b in memory
    c.open(1)
    assert c.labels[5, 5] == 1 and c.state(1) == "edited"
    assert [Path(m).name for _, m in c.corrected()] == ["a_masks.tif"]
    # a new session resumes from the saved file
    c2 = Corrector(sorted(image_folder.glob("[ab].tif")), out_dir=out)
    assert np.array_equal(c2.labels, saved) and c2.state(0) == "corrected"


def test_corrector_in_memory_images_need_an_output_folder(tmp_path):
    from cpsam_toolkit.widgets import Corrector

    img = np.zeros((30, 40), np.uint8)
    with pytest.raises(ValueError, match="out_dir"):
        Corrector([img])
    c = Corrector([img, img + 1], out_dir=tmp_path, names=["x", "y"])
    assert c.items[1].mask_path == tmp_path / "y_masks.tif"
    c.handle_event({"type": "paint", "points": [[3, 3]], "radius": 1, "label": 1})
    assert c.save() == tmp_path / "x_masks.tif"
    (image, masks), = c.corrected()
    assert isinstance(image, np.ndarray) and masks == tmp_path / "x_masks.tif"


def test_corrector_starts_from_the_model_prediction(tmp_path):
    from cpsam_toolkit.widgets import Corrector

    pred = two_objects((30, 40))

    class Model:
        name = "fake"
        calls = 0

        def segment(self, image, channel_axis=None, **kw):
            Model.calls += 1
            return FakeResult.make(pred)

    c = Corrector([np.zeros((30, 40), np.uint8)], Model(), out_dir=tmp_path, names=["p"])
    assert np.array_equal(c.labels, pred) and Model.calls == 1
    c.handle_event({"type": "delete", "y": 10, "x": 10})
    c.revert_button.click()
    assert np.array_equal(c.labels, pred) and Model.calls == 1  # cached prediction
    c.handle_event({"type": "undo"})
    assert not (c.labels == 1).any()


# ------------------------------------------------------------------------------ viewer


@dataclass(frozen=True)
class Opts:
    flow_threshold: float = 0.4
    cellprob_threshold: float = 0.0
    min_size: int = 15
    max_size_fraction: float = 0.4
    niter: int | None = None


@dataclass
class FakeResult:
    """Duck-typed SegmentationResult: masks = connected cellprob > threshold, size-filtered."""

    masks: np.ndarray
    flows: np.ndarray
    cellprob: np.ndarray
    options: Opts = Opts()
    calls: list | None = None

    @classmethod
    def make(cls, masks):
        cp = np.where(masks > 0, 3.0, -3.0).astype(np.float32)
        return cls(masks, np.zeros((2, *masks.shape), np.float32), cp, Opts(), [])

    @property
    def n_objects(self):
        return int(self.masks.max())

    @property
    def objects(self):
        from cpsam_toolkit.widgets.codec import cheap_objects

        o = cheap_objects(self.masks, self.cellprob)
        o["flow_error"] = np.zeros(len(o["label"]))
        return o

    def recompute(self, **changes):
        from scipy import ndimage

        self.calls.append(changes)
        opts = replace(self.options, **changes)
        lab, n = ndimage.label(self.cellprob > opts.cellprob_threshold)
        area = np.bincount(lab.ravel())
        keep = area >= opts.min_size
        keep[0] = False
        lab = np.where(keep[lab], lab, 0)
        return FakeResult(lab.astype(np.uint16), self.flows, self.cellprob, opts, self.calls)


def _blob_result():
    y, x = np.mgrid[:64, :64]
    cp = (4 - 0.05 * ((y - 20) ** 2 + (x - 20) ** 2) ** 0.5 * 3).astype(np.float32)
    cp[40:44, 40:44] = 2.5  # a small object of 16 px
    masks = ((cp > 0) * 1).astype(np.uint16)
    return FakeResult(masks, np.zeros((2, 64, 64), np.float32), cp, Opts(), [])


def test_viewer_sliders_rerun_only_postprocessing():
    from cpsam_toolkit.widgets import Viewer

    res = _blob_result()
    v = Viewer(np.zeros((64, 64), np.float32), result=res, background=False)
    assert v.n_objects == 1 and "1</b> objects" in v.count.value
    v.min_size.value = 10
    assert res.calls[-1] == {"cellprob_threshold": 0.0, "flow_threshold": 0.4, "min_size": 10}
    assert v.n_objects == 2 and v.result.options.min_size == 10
    assert np.array_equal(decode_labels(v.canvas.labels_z, (64, 64)), v.result.masks)
    v.cellprob.value = 3.0
    assert res.calls[-1]["cellprob_threshold"] == 3.0 and v.result.masks.sum() < res.masks.sum()
    assert set(v.canvas.objects) == {"label", "area", "mean_cellprob", "flow_error"}
    # going back to a setting seen before is served from the cache
    n = len(res.calls)
    v.cellprob.value = 0.0
    assert len(res.calls) == n and v.n_objects == 2
    # programmatic recompute moves the sliders without a second recompute
    v.recompute(cellprob_threshold=1.5, min_size=0)
    assert len(res.calls) == n + 1 and v.cellprob.value == 1.5 and v.min_size.value == 0


def test_viewer_overhead_on_a_1024_image_is_small():
    """What the widget adds to a slider move (labels to the browser, hover table) on 1024 x 1024
    with ~650 objects; the post-processing itself is the library's (timed separately)."""
    import time

    from cpsam_toolkit.widgets import Viewer

    yy, xx = np.mgrid[:1024, :1024]
    cp = (3 - 0.4 * np.hypot((yy % 40) - 20, (xx % 40) - 20)).astype(np.float32)
    res = FakeResult((cp > 0).astype(np.uint16), np.zeros((2, 1024, 1024), np.float32), cp, Opts(), [])
    v = Viewer(np.zeros((1024, 1024), np.uint16), result=res, background=False)
    t0 = time.perf_counter()
    v.min_size.value = 20
    total = time.perf_counter() - t0
    assert v.n_objects == 676
    widget = v.timings["send_labels"] + v.timings["objects"]
    assert widget < 0.5, v.timings  # typically ~0.05 s
    assert total < 2.0, (total, v.timings)


def test_viewer_background_updates_coalesce(monkeypatch):
    from cpsam_toolkit.widgets import Viewer

    res = _blob_result()
    entered, gate = threading.Event(), threading.Event()
    real = FakeResult.recompute

    def slow(self, **changes):
        entered.set()
        gate.wait(10)
        return real(self, **changes)

    monkeypatch.setattr(FakeResult, "recompute", slow)
    v = Viewer(np.zeros((64, 64), np.float32), result=res)
    v.min_size.value = 5
    assert entered.wait(10)  # the worker runs it; the kernel is free meanwhile
    for m in (10, 20, 30):  # the rest of a drag: the middle values are superseded
        v.min_size.value = m
    assert "updating" in v.status.value
    gate.set()
    v.wait(10)
    assert [c["min_size"] for c in res.calls] == [5, 30]
    assert v.result.options.min_size == 30 and "min size 30" in v.status.value


def test_viewer_with_a_real_result_and_save(tmp_path):
    pytest.importorskip("cpsam_toolkit.dynamics")
    from cpsam_toolkit.flows import masks_to_flows
    from cpsam_toolkit.segment import MaskOptions, SegmentationResult, masks_from_flows
    from cpsam_toolkit.widgets import Viewer

    lab = np.zeros((96, 96), np.uint16)
    yy, xx = np.mgrid[:96, :96]
    for k, (cy, cx, r) in enumerate([(25, 25, 12), (60, 65, 15), (80, 20, 4)], 1):
        lab[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = k
    flows = (masks_to_flows(lab) * 5).astype(np.float32)
    cp = np.where(lab > 0, 3.0, -3.0).astype(np.float32)
    res = SegmentationResult(masks_from_flows(flows, cp, MaskOptions()), flows, cp, MaskOptions())
    assert res.n_objects == 3
    v = Viewer(lab.astype(np.float32), result=res, background=False)
    v.min_size.value = 100  # the r=4 object (~50 px) goes
    assert v.n_objects == 2 and v.result.options.min_size == 100
    assert v.result.flows is flows  # post-processing only: the same cached flows
    assert "flow_error" in v.canvas.objects
    out = v.save(tmp_path / "x_masks.tif")
    assert np.array_equal(tifffile.imread(out), v.result.masks)


# ------------------------------------------------------------------------------ evaluator


def test_evaluator_tables_and_fp_fn_overlay(tmp_path):
    from cpsam_toolkit.widgets import Evaluator
    from cpsam_toolkit.widgets.evaluator import FN_COLOR, FP_COLOR, TP_COLOR, object_status

    gt_dir, pred_dir = tmp_path / "gt", tmp_path / "pred"
    gt_dir.mkdir()
    pred_dir.mkdir()
    gt = np.zeros((40, 50), np.uint16)
    gt[2:12, 2:12] = 1  # found
    gt[20:30, 30:45] = 2  # missed: a false negative
    pred = np.zeros_like(gt)
    pred[2:12, 3:12] = 4  # IoU 0.9
    pred[30:38, 2:10] = 5  # nothing there: a false positive
    tifffile.imwrite(gt_dir / "bad_masks.tif", gt)
    tifffile.imwrite(pred_dir / "bad_masks.tif", pred)
    tifffile.imwrite(gt_dir / "good_masks.tif", gt)
    tifffile.imwrite(pred_dir / "good_masks.tif", gt)
    tifffile.imwrite(gt_dir / "good_img.tif", np.full((40, 50), 100, np.uint8))
    tifffile.imwrite(pred_dir / "orphan_masks.tif", gt)

    st = object_status(gt, pred, 0.5)
    assert st["tp_pred"].tolist() == [4] and st["fp_pred"].tolist() == [5]
    assert st["fn_true"].tolist() == [2] and st["best_iou"][0] == pytest.approx(0.9)

    ev = Evaluator(pred_dir=pred_dir, gt_dir=gt_dir)
    rows = {r["name"]: r for r in ev.rows()}
    assert rows["bad"]["ap50"] == pytest.approx(1 / 3) and rows["good"]["ap50"] == 1.0
    assert rows["bad"]["error_rate50"] == pytest.approx(1.0)  # (1 FP + 1 FN) / 2 true
    assert rows["bad"]["ap90"] == pytest.approx(1 / 3) and rows["bad"]["fn50"] == 1
    assert [ev.images[i].name for i in ev.worst_first()] == ["bad", "good"]
    assert ev.errors and "orphan" in ev.errors[0][0]
    assert ev.plot.value[:4] == b"\x89PNG" and "AP@0.5" in ev.table_html.value
    # the worst image is shown first, TP/FP coloured, FN outlined in the image
    assert ev.browser.value == ev.worst_first()[0]
    assert ev.canvas.colors == {"4": TP_COLOR, "5": FP_COLOR}
    rgb, info = ev.overlay(ev.browser.value)
    assert (rgb[20, 30:45] == FN_COLOR).all() and (rgb[25, 35] != FN_COLOR).any()
    assert list(info["objects"]["match"]) == ["TP", "FP"]
    ev.show_fn.value = False
    rgb2, _ = ev.overlay(ev.browser.value, show_fn=False)
    assert not (rgb2 == FN_COLOR).all(axis=-1).any()
    # a stricter IoU turns the 0.9 match into... still a match; 0.95 does not exist on the grid
    ev.iou.value = 0.9
    assert "TP 1" in ev.detail.value
    assert ev.summary()["gt"]["n_images"] == 2  # grouped by the ground-truth folder


def test_evaluator_with_a_model(tmp_path):
    from cpsam_toolkit.widgets import Evaluator

    gt = two_objects((40, 50))

    class Model:
        name = "fake"

        def segment(self, image, channel_axis=None, **kw):
            return FakeResult.make(gt if image.mean() > 0 else np.zeros_like(gt))

    d = tmp_path / "test"
    d.mkdir()
    tifffile.imwrite(d / "one_img.tif", np.full((40, 50), 7, np.uint8))
    tifffile.imwrite(d / "one_masks.tif", gt)
    tifffile.imwrite(d / "two_img.tif", np.zeros((40, 50), np.uint8))
    tifffile.imwrite(d / "two_masks.tif", gt)
    ev = Evaluator(Model(), d, out_dir=tmp_path / "preds")
    assert [ev.images[i].name for i in ev.worst_first()] == ["two", "one"]
    assert (tmp_path / "preds" / "one_masks.tif").exists()
    again = Evaluator(pred_dir=tmp_path / "preds", gt_dir=d)
    assert [r["ap50"] for r in again.rows()] == [r["ap50"] for r in ev.rows()]


# ------------------------------------------------------------------------------ finetuner


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    pytest.importorskip("cpsam_toolkit.dynamics")
    import torch

    from cpsam_toolkit.network.checkpoints import save_checkpoint
    from cpsam_toolkit.network.config import get_config
    from cpsam_toolkit.network.model import CPSAMNet
    from cpsam_toolkit.segment import load_model

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("model") / "tiny.pt"
    save_checkpoint(CPSAMNet(get_config("tiny")), path)
    return load_model(path, device="cpu")


def _pairs(n=3, size=64):
    rng = np.random.default_rng(0)
    out = []
    for _ in range(n):
        lab = np.zeros((size, size), np.uint16)
        yy, xx = np.mgrid[:size, :size]
        for k in range(1, 5):
            cy, cx = rng.integers(10, size - 10, 2)
            lab[(yy - cy) ** 2 + (xx - cx) ** 2 < 36] = k
        img = (lab > 0).astype(np.float32) + rng.normal(0, 0.1, lab.shape).astype(np.float32)
        out.append((img, lab))
    return out


def test_finetuner_trains_in_the_background_and_saves(tiny_model, tmp_path):
    from cpsam_toolkit.widgets import Finetuner, Viewer

    img0 = _pairs(1)[0][0]
    viewer = Viewer(img0, tiny_model)
    ft = Finetuner(tiny_model, _pairs(3), names=["a", "b", "c"], epochs=2, viewer=viewer)
    assert ft.split() == (["a", "b"], ["c"])
    ft.set_split(train=["a", "b"], val=["c"])
    before = {k: v.clone() for k, v in tiny_model.net.state_dict().items()}
    ft.start_button.click()
    assert ft.running or ft.result is not None
    assert ft.start_button.disabled or ft.result is not None
    result = ft.wait(600)
    assert result.epochs_done == 2 and not result.stopped
    epochs = [h["epoch"] for h in ft.history]
    assert epochs == [-1, 0, 1]  # base validation, then each epoch (the train callback)
    assert ft.progress.value == 2 == ft.progress.max and ft.progress.bar_style == "success"
    assert ft.plot.value[:4] == b"\x89PNG" and "comparison" in ft.comparison.value
    assert [r["model"] for r in ft.comparison_table()] == ["base", "final", "best"]
    # the base model is untouched
    assert all(torch_equal(v, tiny_model.net.state_dict()[k]) for k, v in before.items())
    # an untrained tiny network does not beat itself: the panel says so and offers no model
    assert ft.improved is False and ft.model is None
    assert "did NOT improve" in ft.comparison.value and "no finetuned model is offered" in ft.comparison.value
    assert ft.save_button.disabled and ft.use_button.disabled
    with pytest.raises(RuntimeError, match="nothing better to save"):
        ft.save(tmp_path / "ft.pt")
    # the working folder keeps only the chosen weights, and goes away with close()
    work = ft._run_dir
    assert [p.name for p in work.iterdir()] == ["finetuned.pt"]
    ft.close()
    assert not work.exists()
    with pytest.raises(ValueError, match="both in training and validation"):
        ft.set_split(train=["a", "c"], val=["c"])
        ft.start()


def test_finetuner_without_validation_saves_the_last_epoch(tiny_model, tmp_path):
    from cpsam_toolkit.segment import load_model
    from cpsam_toolkit.widgets import Finetuner, Viewer

    viewer = Viewer(_pairs(1)[0][0], tiny_model, background=False)
    ft = Finetuner(tiny_model, _pairs(2), names=["a", "b"], epochs=2, viewer=viewer)
    ft.set_split(train=["a", "b"], val=[])
    ft.start(wait=True)
    assert ft.improved is None and ft.model is not None and "finetuned" in ft.model.name
    assert ft.saved_epoch == 2 and ft.save_button.description == "Save model (epoch 2, not validated)"
    saved = ft.save(tmp_path / "ft.pt")
    assert load_model(saved).net.cfg == tiny_model.net.cfg and "saved epoch 2" in ft.status.value
    ft.use_button.click()
    assert viewer.model is ft.model


def test_finetuner_stop(tiny_model):
    from cpsam_toolkit.widgets import Finetuner

    ft = Finetuner(tiny_model, _pairs(2), epochs=50)
    ft.set_split(train=["pair 0", "pair 1"], val=[])

    stopped_at = []

    def stop_after_first(row):
        if row.get("epoch", -1) >= 0 and not stopped_at:
            stopped_at.append(row["epoch"])
            ft.stop()

    orig = ft._on_epoch
    ft._on_epoch = lambda row: (orig(row), stop_after_first(row))
    ft.start()
    result = ft.wait(600)
    assert result.stopped and result.epochs_done < 50
    assert ft.progress.bar_style == "warning" and ft.stop_button.disabled


def torch_equal(a, b) -> bool:
    import torch

    return bool(torch.equal(a, b))


def test_panels_display_as_their_widget():
    from cpsam_toolkit.widgets import Viewer

    v = Viewer(np.zeros((64, 64), np.float32), result=_blob_result(), background=False)
    bundle = v._repr_mimebundle_()
    assert "application/vnd.jupyter.widget-view+json" in bundle
    assert bundle["application/vnd.jupyter.widget-view+json"]["model_id"] == v.widget.model_id


def test_notebook_helpers_find_examples_and_a_model():
    from cpsam_toolkit.widgets import demo

    imgs = demo.example_images()
    assert imgs and all(demo.example_masks(p).exists() for p in imgs)
    assert os.fspath(demo.example_dir()).endswith("examples")


# ------------------------------------------------------------------------------ issue 23


def test_a_closed_outline_fills_itself_and_an_open_stroke_does_not():
    from cpsam_toolkit.widgets import Corrector
    from cpsam_toolkit.widgets.editor import is_closed_outline

    t = np.linspace(0, 2 * np.pi, 40)
    ring = np.c_[50 + 20 * np.sin(t), 50 + 20 * np.cos(t)]
    assert is_closed_outline(ring, 1) and not is_closed_outline(ring[:25], 1)
    c = Corrector([np.zeros((100, 100), np.uint8)], out_dir=".", names=["x"])
    assert c.canvas.overlay == "filled" and c.fill_closed.value  # edits show as areas
    browser_event(c.canvas, {"type": "paint", "points": ring.round(2).tolist(), "radius": 1, "label": 4})
    assert c.labels[50, 50] == 4 and 1250 < (c.labels == 4).sum() < 1450  # ~ pi * 21^2, one object
    browser_event(c.canvas, {"type": "undo"})  # one undo step removes outline and fill
    assert c.labels.max() == 0
    browser_event(c.canvas, {"type": "paint", "points": ring[:25].round(2).tolist(), "radius": 1, "label": 4})
    assert c.labels[50, 50] == 0  # an open stroke is just a stroke
    c.fill_closed.value = False
    browser_event(c.canvas, {"type": "undo"})
    browser_event(c.canvas, {"type": "paint", "points": ring.round(2).tolist(), "radius": 1, "label": 4})
    assert c.labels[50, 50] == 0


def test_corrector_status_names_the_image_and_saves_to_the_chosen_folder(image_folder, tmp_path):
    from cpsam_toolkit.widgets import Corrector

    c = Corrector(sorted(image_folder.glob("[ab].tif")), out_dir=tmp_path / "one")
    assert "<b>a</b>" in c.status.value
    c.next()
    assert "<b>b</b>" in c.status.value and c.browser.value == 1
    c.save_dir.value = str(tmp_path / "two")  # typed into the "save to" box
    c.handle_event({"type": "paint", "points": [[5, 5]], "radius": 2, "label": 1})
    assert c.save() == tmp_path / "two" / "b_masks.tif" and (tmp_path / "two" / "b_masks.tif").exists()
    assert "b: saved" in c.status.value
    assert c.revert_button.description == "revert"  # fits its button; the tooltip says the rest


class _RecommendingModel:
    """Segments like a model whose file recommends flow_threshold=0.8."""

    name = "cpsam_toolkit_small"
    info = {"path": "/x/cpsam_small.pt", "recommended_settings": {"flow_threshold": 0.8}}

    def __init__(self):
        self.calls = []

    def segment(self, image, channel_axis=None, flow_threshold=0.4, cellprob_threshold=0.0, min_size=15,
                diameter=None):
        self.calls.append(dict(flow_threshold=flow_threshold, cellprob_threshold=cellprob_threshold,
                               min_size=min_size, diameter=diameter))
        res = _blob_result()
        res.options = Opts(flow_threshold=flow_threshold, cellprob_threshold=cellprob_threshold,
                           min_size=min_size)
        return res


def test_widgets_use_the_models_recommended_settings_and_show_their_sources(tmp_path):
    from cpsam_toolkit.widgets import Corrector, Viewer

    m = _RecommendingModel()
    v = Viewer(np.zeros((64, 64), np.float32), m, background=False, out_dir=tmp_path)
    assert m.calls[-1]["flow_threshold"] == 0.8 and v.result.options.flow_threshold == 0.8
    assert v.flow.value == 0.8 and v.sources["flow_threshold"] == "model"
    assert "flow_threshold 0.8 (model)" in v.settings_line.value
    assert "cellprob_threshold 0 (default)" in v.settings_line.value
    cli, py = v.repeat_command()
    assert cli.startswith("cpsam segment ") and "--model cpsam_toolkit_small --flow-threshold 0.8" in cli
    assert "flow_threshold=0.8" in py and "load_model('cpsam_toolkit_small')" in py
    v.min_size.value = 40  # the user's value from now on
    assert v.sources["min_size"] == "user" and "--min-size 40" in v.repeat_command()[0]
    # a value given by the caller is the user's
    v2 = Viewer(np.zeros((64, 64), np.float32), m, background=False, flow_threshold=0.5, diameter=17.0)
    assert m.calls[-1]["flow_threshold"] == 0.5 and m.calls[-1]["diameter"] == 17.0
    assert v2.sources["flow_threshold"] == "user" and "--diameter 17" in v2.repeat_command()[0]
    c = Corrector([np.zeros((64, 64), np.uint8)], m, out_dir=tmp_path, names=["x"])
    assert m.calls[-1]["flow_threshold"] == 0.8 and "flow_threshold 0.8 (model)" in c.settings_line.value
    with pytest.raises(ValueError, match="setting flow_threshold=-1 is invalid"):  # validated as Settings
        Viewer(np.zeros((64, 64), np.float32), m, flow_threshold=-1)


def test_viewer_probability_slider_with_typed_logit_and_log_size_slider():
    from cpsam_toolkit.widgets import Viewer
    from cpsam_toolkit.widgets._base import logit

    res = _blob_result()
    v = Viewer(np.zeros((64, 64), np.float32), result=res, background=False)
    assert v.cellprob_p.value == pytest.approx(0.5) and v.cellprob.value == 0.0
    v.cellprob_p.value = 0.3  # the slider is a probability; the logit follows and is used
    assert v.cellprob.value == pytest.approx(logit(0.3), abs=1e-3)
    assert res.calls[-1]["cellprob_threshold"] == pytest.approx(-0.847, abs=1e-3) and len(res.calls) == 1
    v.cellprob.value = 2.0  # a typed logit moves the slider, one update
    assert v.cellprob_p.value == pytest.approx(0.8808, abs=1e-3) and len(res.calls) == 2
    assert "cell prob. ≥ 0.88 (logit 2)" in v.status.value
    v.cellprob.value = -9.0  # beyond the slider: the typed value stands, the slider stops at its end
    assert v.result.options.cellprob_threshold == -9.0 and v.cellprob_p.value == 0.01
    v.min_size_slider.value = 10 ** 2.5  # a log slider: 316 px
    assert v.min_size.value == 316 and v.result.options.min_size == 316
    v.min_size.value = 0  # typed: below the slider's 1 px
    assert v.result.options.min_size == 0 and v.min_size.value == 0


def test_viewer_saves_into_the_chosen_folder_never_into_the_package(tmp_path, monkeypatch):
    import cpsam_toolkit
    from cpsam_toolkit.widgets import Viewer

    monkeypatch.chdir(tmp_path)
    v = Viewer(np.zeros((64, 64), np.float32), result=_blob_result(), background=False, name="blob")
    assert v.save_path.value == "cpsam_outputs"  # default: beside the notebook
    assert v.save() == Path("cpsam_outputs") / "blob_masks.tif" and (tmp_path / "cpsam_outputs").is_dir()
    v.save_path.value = str(tmp_path / "mine")
    v.save_button.click()
    assert (tmp_path / "mine" / "blob_masks.tif").exists()
    pkg_examples = Path(cpsam_toolkit.__file__).parent / "examples"
    with pytest.raises(ValueError, match="inside the installed cpsam_toolkit package"):
        v.save(pkg_examples)
    with pytest.raises(ValueError, match="inside the installed"):
        Viewer(np.zeros((64, 64), np.float32), result=_blob_result(), out_dir=pkg_examples)
    # a corrector on images inside the package saves beside the notebook instead
    from cpsam_toolkit.widgets import Corrector
    from cpsam_toolkit.widgets.demo import example_images

    c = Corrector(example_images()[:1])
    assert c.items[0].mask_path.parent == Path("cpsam_outputs") / "corrected"


def test_brightness_contrast_gamma_controls_drive_every_canvas():
    from cpsam_toolkit.widgets import Corrector, Viewer

    v = Viewer(np.zeros((64, 64), np.float32), result=_blob_result(), background=False)
    c = Corrector([np.zeros((30, 40), np.uint8)], out_dir=".", names=["x"])
    for panel in (v, c):
        panel.view.contrast.value = 3.0
        panel.view.set_levels(brightness=0.2, gamma=0.5)
        assert (panel.canvas.brightness, panel.canvas.contrast, panel.canvas.gamma) == (0.2, 3.0, 0.5)
        panel.view.reset_levels.click()
        assert (panel.canvas.brightness, panel.canvas.contrast, panel.canvas.gamma) == (0.0, 1.0, 1.0)


def test_canvas_javascript_is_a_file_that_ships_and_parses():
    import shutil
    import subprocess

    from cpsam_toolkit.widgets.canvas import CANVAS_CSS, CANVAS_JS, LabelCanvas

    assert CANVAS_JS.suffix == ".js" and CANVAS_JS.is_file() and CANVAS_CSS.is_file()
    assert "export default { render }" in LabelCanvas()._esm  # anywidget read the file
    pyproject = (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text()
    shipped = next(line for line in pyproject.splitlines() if line.startswith("cpsam_toolkit = ["))
    assert '"widgets/*.js"' in shipped and '"widgets/*.css"' in shipped  # package data
    if shutil.which("node"):
        r = subprocess.run(["node", "--check", str(CANVAS_JS)], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
