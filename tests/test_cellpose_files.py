"""Cellpose's files: our ``_seg.npy`` against the reference package ``cellpose`` (the oracle),
its files read by us, and a pickle with a code payload refused without running it."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import tifffile
from conftest import DSB, stems

from cpsam_toolkit import cellpose_files as cf
from cpsam_toolkit.cli import main
from cpsam_toolkit.io import ImageReadError, imread

cpio = pytest.importorskip("cellpose.io", reason="the reference package cellpose is the oracle")


@pytest.fixture(scope="module")
def segmented(tmp_path_factory, data_dir):
    """Two real DSB images segmented by ``cpsam segment --save-npy`` with the shipped model."""
    src = tmp_path_factory.mktemp("imgs")
    names = stems(data_dir, DSB)[:2]
    for s in names:
        (src / f"{s}.tif").write_bytes((data_dir / DSB / "train" / f"{s}_img.tif").read_bytes())
    out = tmp_path_factory.mktemp("out")
    rc = main(["segment", str(src), "--out", str(out), "--model", "cpsam_toolkit_small",
               "--save-npy", "--save-flows", "--flow-threshold", "0.8", "--cellprob-threshold", "0",
               "--no-progress"])
    assert rc == 0
    return src, out, names


def test_our_seg_npy_opens_in_cellpose(segmented):
    src, out, names = segmented
    for s in names:
        ours = tifffile.imread(out / f"{s}_masks.tif")
        seg = out / f"{s}_seg.npy"
        # cellpose's own reader (what `cellpose --dir` and its training use for _seg.npy)
        theirs = cpio.imread(str(seg))
        np.testing.assert_array_equal(theirs, ours)
        assert ours.max() > 5  # the shipped model finds nuclei here
        # what the GUI reads (gui/io.py _load_seg): the same dict keys and flows layout as
        # cellpose.io.masks_flows_to_seg writes for the same masks and flows
        dat = np.load(seg, allow_pickle=True).item()
        assert dat["filename"] == str((src / f"{s}.tif").resolve())
        assert dat["flow_threshold"] == 0.8 and dat["cellprob_threshold"] == 0.0
        assert dat["cpsam_settings"]["flow_threshold"] == 0.8
        dP = tifffile.imread(out / f"{s}_dP.tif")
        cellprob = tifffile.imread(out / f"{s}_cellprob.tif")
        from cellpose import plot

        ref_base = out / "ref" / s
        ref_base.parent.mkdir(exist_ok=True)
        image = imread(src / f"{s}.tif")
        cpio.masks_flows_to_seg(image, ours, [plot.dx_to_circ(dP), dP, cellprob],
                                str(ref_base) + ".tif")
        ref = np.load(str(ref_base) + "_seg.npy", allow_pickle=True).item()
        assert set(ref) - {"chan_choose"} <= set(dat)
        for key in ("masks", "outlines", "ismanual"):
            assert dat[key].dtype == ref[key].dtype
            np.testing.assert_array_equal(dat[key], ref[key])
        assert len(dat["flows"]) == len(ref["flows"]) == 5
        for mine, theirs_f in zip(dat["flows"], ref["flows"], strict=True):
            mine, theirs_f = np.asarray(mine), np.asarray(theirs_f)
            assert mine.shape == theirs_f.shape and mine.dtype == theirs_f.dtype
        np.testing.assert_allclose(dat["flows"][4], ref["flows"][4])
        # and we read our own file back, through the restricted loader
        np.testing.assert_array_equal(cf.seg_masks(seg), ours)


def test_cellpose_written_seg_npy_read_by_us(tmp_path, data_dir):
    from cellpose import plot

    s = stems(data_dir, DSB)[0]
    masks = tifffile.imread(data_dir / DSB / "train" / f"{s}_masks.tif")
    image = tifffile.imread(data_dir / DSB / "train" / f"{s}_img.tif")
    rng = np.random.default_rng(0)
    dP = rng.normal(size=(2, *masks.shape)).astype(np.float32)
    cellprob = rng.normal(size=masks.shape).astype(np.float32)
    cpio.masks_flows_to_seg(image, masks, [plot.dx_to_circ(dP), dP, cellprob],
                            str(tmp_path / f"{s}.tif"))
    path = tmp_path / f"{s}_seg.npy"
    dat = cf.load_seg_npy(path)
    np.testing.assert_array_equal(dat["masks"], masks)
    np.testing.assert_allclose(dat["flows"][4][:2], dP)
    np.testing.assert_array_equal(imread(path), masks)  # what training and evaluation read

    # a GUI-saved file holds more kinds of plain values (lists of tuples, None, nested dicts)
    gui = {**dat, "manual_changes": [("add", 3), ("del", 1)], "restore": None, "model_path": 0,
           "normalize_params": {"lowhigh": None, "percentile": [1.0, 99.0]},
           "colors": rng.integers(0, 255, (int(masks.max()), 3))}
    np.save(tmp_path / "gui_seg.npy", gui)
    assert cf.load_seg_npy(tmp_path / "gui_seg.npy")["manual_changes"] == [("add", 3), ("del", 1)]


def test_evaluate_and_train_accept_cellpose_ground_truth(tmp_path, data_dir):
    """``cpsam evaluate --gt-suffix _seg.npy`` / ``_cp_masks.png`` and training ``_seg`` pairs."""
    import imageio.v3 as iio

    from cpsam_toolkit.training.data import TrainingSet

    names = stems(data_dir, DSB)[:2]
    gt, pred, png = tmp_path / "gt", tmp_path / "pred", tmp_path / "png"
    for d in (gt, pred, png):
        d.mkdir()
    for s in names:
        m = tifffile.imread(data_dir / DSB / "train" / f"{s}_masks.tif")
        cpio.masks_flows_to_seg(np.zeros(m.shape, np.uint8), m, [np.zeros((*m.shape, 3), np.uint8),
                                np.zeros((2, *m.shape), np.float32), np.zeros(m.shape, np.float32)],
                                str(gt / f"{s}.tif"))
        tifffile.imwrite(pred / f"{s}_masks.tif", m)
        iio.imwrite(png / f"{s}_cp_masks.png", m.astype(np.uint16))
        (gt / f"{s}.tif").write_bytes((data_dir / DSB / "train" / f"{s}_img.tif").read_bytes())
    for folder, suffix in ((gt, "_seg.npy"), (png, "_cp_masks.png")):
        out_json = tmp_path / f"eval{suffix}.json"
        rc = main(["evaluate", "--pred", str(pred), "--gt", str(folder), "--gt-suffix", suffix,
                   "--json", str(out_json)])
        assert rc == 0
        result = json.loads(out_json.read_text())
        assert len(result["images"]) == 2 and not result["errors"]
        for im in result["images"]:  # the same labels on both sides: perfect scores
            assert im["gt"].endswith(suffix) and im["ap"][0] == pytest.approx(1.0)
    ts = TrainingSet.build(gt, img_suffix="", mask_suffix="_seg")
    assert len(ts.samples) == 2 and ts.samples[0].masks.max() > 0


class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_code_payload_is_refused_without_running(tmp_path):
    marker = tmp_path / "pwned"
    bad = tmp_path / "evil_seg.npy"
    np.save(bad, {"masks": np.zeros((4, 4), np.uint16), "x": _Payload(marker)}, allow_pickle=True)
    with pytest.raises(cf.UnsafeFileError, match=r"posix\.system|os\.system"):
        cf.load_seg_npy(bad)
    with pytest.raises(ImageReadError, match="refused to load"):
        imread(bad)  # training and evaluation read labels through this
    assert not marker.exists()
    # not a cellpose file at all: a clear error, not a crash
    np.save(tmp_path / "list_seg.npy", np.array([[1, 2]], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match="not a cellpose _seg.npy"):
        cf.load_seg_npy(tmp_path / "list_seg.npy")
