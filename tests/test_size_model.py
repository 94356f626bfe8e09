"""diameter="auto": the shipped model's size model, on real images (validation images only)."""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest
from conftest import ROOT, SHIPPED_MODEL, load_pair

from cpsam_toolkit import load_model
from cpsam_toolkit.core.size import SizeModel, dark_background, fit_size_model
from cpsam_toolkit.metrics import average_precision
from cpsam_toolkit.settings import Settings

USI = "usiigaci_phase_contrast_cells"
DSB = "dsb2018_stage1_train_fixed"


def _val_stems(dataset_key: str) -> list[str]:
    split = json.loads((ROOT / "cpsam_toolkit" / "models" / "shipped_split_v2.json").read_text())
    return split["val"][dataset_key]


def _median_diameter(masks: np.ndarray) -> float:
    _, c = np.unique(masks[masks > 0], return_counts=True)
    return float(np.median(2 * np.sqrt(c / np.pi)))


@pytest.fixture(scope="module")
def shipped():
    return load_model(SHIPPED_MODEL)


def test_shipped_model_recommends_auto_and_carries_a_size_model(shipped):
    s = shipped.settings
    assert s.diameter == "auto" and s.sources["diameter"] == "model"
    assert "diameter=auto (model)" in s.describe()
    sm = shipped.size_model
    assert isinstance(sm, SizeModel) and sm.grow == "dark_background" and sm.target == 30.0
    assert SizeModel.from_dict(sm.to_dict()).to_dict() == sm.to_dict()


def test_estimates_the_size_of_unseen_cells_and_small_nuclei(shipped, data_dir, one_torch_thread):
    # validation images (held out from the fit): large phase-contrast cells and small nuclei
    big = _val_stems("usiigaci")[0]
    img, gt = load_pair(data_dir, USI, big)
    est = shipped.estimate_diameter(img)
    assert abs(np.log(est / _median_diameter(gt))) < np.log(1.3), (est, _median_diameter(gt))
    d = shipped.size_model.resize_diameter(est)
    assert d is not None and d > 30  # shrunk so cells are ~30 px

    small = next(s for s in _val_stems("dsb2018") if _median_diameter(load_pair(data_dir, DSB, s)[1]) < 20)
    img, gt = load_pair(data_dir, DSB, small)
    est = shipped.estimate_diameter(img)
    assert est < 30
    # small fluorescence nuclei (dark background) are enlarged to ~30 px, small nuclei in
    # tissue or on a bright background are not
    assert dark_background(img) and shipped.size_model.resize_diameter(est, dark=True) == pytest.approx(
        max(est, 6.0))
    assert shipped.size_model.resize_diameter(est, dark=False) is None


def test_auto_finds_more_phase_contrast_cells_than_no_resizing(shipped, data_dir, one_torch_thread, caplog):
    img, gt = load_pair(data_dir, USI, _val_stems("usiigaci")[0])
    img = img[:512, :512]
    gt = gt[:512, :512]
    with caplog.at_level(logging.INFO, logger="cpsam_toolkit"):
        auto = shipped.segment(img, augment=False)  # the model's own diameter="auto"
    assert "diameter=auto: objects about" in caplog.text and "resized by" in caplog.text
    none = shipped.segment(img, augment=False, diameter=None)
    ap_auto = average_precision([gt], [auto.masks], 0.5)[0][0, 0]
    ap_none = average_precision([gt], [none.masks], 0.5)[0][0, 0]
    assert auto.masks.shape == gt.shape
    assert ap_auto > ap_none + 0.05, (ap_auto, ap_none)


def test_auto_resolves_once_for_volumes_and_lists(shipped, data_dir, one_torch_thread, caplog):
    img, _ = load_pair(data_dir, USI, _val_stems("usiigaci")[0])
    crop = img[:320, :320]
    with caplog.at_level(logging.INFO, logger="cpsam_toolkit"):
        vol = shipped.segment(np.stack([crop] * 3), stitch_threshold=0.3, z_axis=0, augment=False)
    assert caplog.text.count("diameter=auto") == 1 and "middle plane" in caplog.text
    assert vol.masks.shape == (3, 320, 320) and vol.masks.max() > 0
    assert vol.diameter > 30  # the estimate the volume was resized from
    res = shipped.segment([crop, crop[:200, :200]], augment=False)
    assert [r.masks.shape for r in res] == [(320, 320), (200, 200)]
    assert all(r.diameter > 30 for r in res)
    assert res[0].recompute(flow_threshold=0.4).diameter == res[0].diameter
    assert shipped.segment(crop, augment=False, diameter=None).diameter is None
    # a list of volumes: one estimate per volume
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="cpsam_toolkit"):
        vols = shipped.segment([np.stack([crop] * 2), np.stack([crop[:200, :200]] * 2)],
                               stitch_threshold=0.3, z_axis=0, augment=False)
    assert caplog.text.count("diameter=auto") == 2 and all(v.diameter > 30 for v in vols)


def test_auto_needs_a_size_model(tiny_model):
    m = load_model(tiny_model)
    with pytest.raises(ValueError, match="has none; give the median object diameter in pixels"):
        m.segment(np.zeros((64, 64), np.float32), diameter="auto")


def test_a_model_without_size_model_ignores_a_recommended_auto(tiny_model, caplog):
    # e.g. a model finetuned from the shipped one: it inherits the thresholds, not the size model
    m = load_model(tiny_model)
    m.info["recommended_settings"] = {"diameter": "auto", "flow_threshold": 0.8}
    with caplog.at_level(logging.WARNING, logger="cpsam_toolkit"):
        s = m.settings
    assert s.diameter is None and s.sources["diameter"] == "default"
    assert s.flow_threshold == 0.8 and s.sources["flow_threshold"] == "model"
    assert "no size model" in caplog.text
    from cpsam_toolkit.widgets._base import model_recommended
    assert model_recommended(m) == {"flow_threshold": 0.8}


def test_settings_accept_auto_and_name_the_fix_otherwise():
    assert Settings(diameter="auto").diameter == "auto"
    with pytest.raises(ValueError, match="'auto' to estimate it"):
        Settings(diameter="big")


def test_size_model_resizing_rule_and_fit():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 4))
    d = np.exp(1.0 + x @ np.array([0.5, -0.2, 0.0, 0.1]))
    sm = fit_size_model(x, d, alpha=0.01)
    assert abs(np.log(sm.predict(x[0]) / d[0])) < 1e-3
    assert sm.grow == "never"
    assert sm.resize_diameter(20.0, dark=True) is None and sm.resize_diameter(60.0) == pytest.approx(60.0)
    grow = replace(sm, grow="always")
    assert grow.resize_diameter(15.0) == pytest.approx(15.0)
    assert grow.resize_diameter(2.0) == pytest.approx(6.0)  # at most 5x enlarged (max_scale)
    dark = replace(sm, grow="dark_background")
    assert dark.resize_diameter(15.0, dark=True) == pytest.approx(15.0)
    assert dark.resize_diameter(15.0, dark=False) is None
    assert dark.resize_diameter(45.0, dark=False) == pytest.approx(45.0)  # large: always shrunk
    assert SizeModel.from_dict(dark.to_dict()).grow == "dark_background"
    old = {k: v for k, v in sm.to_dict().items() if k not in ("grow", "max_scale")}  # session-9 files
    assert SizeModel.from_dict({**old, "shrink_only": True}).grow == "never"
    assert SizeModel.from_dict({**old, "shrink_only": False}).grow == "always"
    with pytest.raises(ValueError, match="unknown size model kind"):
        SizeModel.from_dict({"kind": "other"})
    with pytest.raises(ValueError, match="grow must be one of"):
        replace(sm, grow="sometimes")


def test_dark_background_tells_fluorescence_from_brightfield_phase_and_tissue(data_dir):
    from importlib.resources import files

    import tifffile

    examples = files("cpsam_toolkit") / "examples"
    kinds = {n: dark_background(tifffile.imread(examples / f"{n}_img.tif"))
             for n in ("nuclei_fluorescence", "nuclei_histology", "nuclei_he", "cells_phase_contrast")}
    assert kinds == {"nuclei_fluorescence": True, "nuclei_histology": False, "nuclei_he": False,
                     "cells_phase_contrast": False}
    img = tifffile.imread(examples / "nuclei_fluorescence_img.tif")
    assert dark_background(img.astype(np.float32) / 255) and not dark_background(255 - img)  # any scale
    assert not dark_background(np.zeros((64, 64), np.uint8))  # blank: no background to judge


def test_cli_diameter_auto(tmp_path, data_dir):
    img, _ = load_pair(data_dir, USI, _val_stems("usiigaci")[0])
    import tifffile

    tifffile.imwrite(tmp_path / "cells.tif", img[:256, :256])
    out = subprocess.run([sys.executable, "-m", "cpsam_toolkit", "segment", str(tmp_path / "cells.tif"),
                          "--out", str(tmp_path / "out"), "--model", str(SHIPPED_MODEL),
                          "--diameter", "auto", "--no-augment", "--summary"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "diameter=auto" in out.stdout + out.stderr
    import csv

    with open(tmp_path / "out" / "summary.csv") as f:
        (row,) = list(csv.DictReader(f))
    assert float(row["diameter"]) > 30  # the estimate the image was resized from
    bad = subprocess.run([sys.executable, "-m", "cpsam_toolkit", "segment", str(tmp_path / "cells.tif"),
                          "--out", str(tmp_path / "bad"), "--diameter", "huge"],
                         capture_output=True, text=True)
    assert bad.returncode != 0 and "expected a diameter in pixels or 'auto'" in bad.stderr


def test_fit_script_dry_run_writes_a_size_model(tmp_path, data_dir):
    model = tmp_path / "small.pt"
    shutil.copy(SHIPPED_MODEL, model)
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "fit_size_model.py"), "--model", str(model),
                          "--data", str(data_dir), "--limit", "2", "--threads", "1", "--write",
                          "--recommend"],
                         capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr
    assert "validation usiigaci: median |log error|" in out.stdout
    m = load_model(model)
    assert m.size_model is not None and m.settings.diameter == "auto"


def test_blockwise_resolves_auto_once_on_the_centre(shipped, data_dir, tmp_path, one_torch_thread, caplog):
    from cpsam_toolkit.blockwise import segment_blockwise

    img, gt = load_pair(data_dir, USI, _val_stems("usiigaci")[0])
    img = img[:512, :512]
    with caplog.at_level(logging.INFO, logger="cpsam_toolkit"):
        res = segment_blockwise(img, shipped, tmp_path / "m.zarr", block_size=256, halo=96,
                                settings=shipped.settings.replace(augment=False))
    assert caplog.text.count("diameter=auto") == 1 and "centre" in caplog.text
    whole = shipped.segment(img, augment=False)
    assert res.n_objects > 0 and abs(res.n_objects - whole.n_objects) <= max(3, 0.2 * whole.n_objects)


def test_viewer_says_when_the_image_was_resized(shipped, data_dir, tmp_path, one_torch_thread):
    from cpsam_toolkit.widgets import Viewer

    img, _ = load_pair(data_dir, USI, _val_stems("usiigaci")[0])
    viewer = Viewer(img[:256, :256], shipped, out_dir=tmp_path, augment=False)
    assert viewer.result.diameter > 30
    assert f"resized: {viewer.result.diameter:.0f} px objects to 30 px" in viewer.status.value
    d = viewer.result.diameter
    assert viewer.recompute(flow_threshold=0.4).diameter == d  # post-processing only: same resizing
