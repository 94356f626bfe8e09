"""The redesigned core and modes: the model's recommended settings are used, results filter
masks and table together, plane-by-plane volumes, the memory budget and the CLI's report."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import cpsam_toolkit as cp
from cpsam_toolkit.cli import main
from cpsam_toolkit.core.postprocess import object_table, touching_border
from cpsam_toolkit.network import CPSAMNet, get_config
from cpsam_toolkit.network.checkpoints import save_checkpoint
from cpsam_toolkit.settings import Settings
from cpsam_toolkit.volume import segment_planes


@pytest.fixture(scope="module")
def recommending_model(tmp_path_factory):
    """A tiny random network whose file recommends flow_threshold 0.8 and min_size 5."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("m") / "rec.pt"
    save_checkpoint(CPSAMNet(get_config("tiny")), path,
                    meta={"recommended_settings": {"flow_threshold": 0.8, "min_size": 5}})
    return path


def blobs(n: int = 6, size: int = 96, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    img = np.zeros((size, size), np.float32)
    for cy, cx in rng.integers(10, size - 10, (n, 2)):
        img += np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / 30.0)
    return img


def test_model_settings_are_used_unless_overridden(recommending_model):
    model = cp.load_model(recommending_model, device="cpu")
    assert model.settings.flow_threshold == 0.8 and model.settings.sources["flow_threshold"] == "model"
    img = blobs()
    res = model.segment(img)
    assert res.options.flow_threshold == 0.8 and res.options.min_size == 5
    res = model.segment(img, flow_threshold=0.4)  # a keyword wins over the model
    assert res.options.flow_threshold == 0.4 and res.options.min_size == 5
    res = model.segment(img, Settings(cellprob_threshold=-1.0))  # an explicit Settings is used as is
    assert res.options.flow_threshold == 0.4 and res.options.cellprob_threshold == -1.0


def test_select_filters_masks_and_table_together():
    masks = np.zeros((20, 20), np.uint16)
    masks[0:4, 0:4], masks[8:12, 8:14], masks[15:17, 15:17] = 1, 2, 3
    cellprob = np.zeros((20, 20), np.float32)
    res = cp.SegmentationResult(masks, np.zeros((2, 20, 20), np.float32), cellprob)
    assert list(touching_border(masks)) == [True, False, False]
    small = res.select(res.objects["area"] >= 5)
    assert small.n_objects == 2 and list(small.objects["label"]) == [1, 2]
    assert list(small.objects["area"]) == [16, 24]
    np.testing.assert_array_equal(small.masks == 2, masks == 2)
    np.testing.assert_array_equal(small.objects["centroid_x"],
                                  object_table(small.masks, None, cellprob)["centroid_x"])
    inner = res.select(~touching_border(masks))
    assert list(inner.objects["area"]) == [24, 4]


def test_planes_match_2d_segmentation_with_offsets(recommending_model):
    model = cp.load_model(recommending_model, device="cpu")
    vol = np.stack([blobs(seed=1), blobs(seed=2), np.zeros((96, 96), np.float32)])
    res = segment_planes(model, vol, model.settings.replace(flow_threshold=0.0, min_size=0))
    assert res.info["mode"] == "planes" and res.masks.shape == vol.shape
    offset = 0
    for z in range(3):
        one = model.segment(vol[z], flow_threshold=0.0, min_size=0)
        np.testing.assert_array_equal(res.masks[z], np.where(one.masks > 0, one.masks + offset, 0))
        offset += one.n_objects
    assert len(res.objects["label"]) == offset == res.n_objects
    assert "flow_error" in res.objects and "centroid_z" in res.objects


def test_memory_budget_is_a_no_op_on_the_cpu(recommending_model):
    model = cp.load_model(recommending_model, device="cpu")
    assert model.batch_for_memory("6GB", 8) == 8
    with pytest.raises(ValueError, match="gpu_memory"):
        model.segment(blobs(), gpu_memory="lots")


def test_cli_says_which_values_came_from_the_model(tmp_path, recommending_model, capsys):
    import tifffile

    tifffile.imwrite(tmp_path / "a.tif", (blobs() * 255).astype(np.uint8))
    out = tmp_path / "out"
    assert main(["segment", str(tmp_path / "a.tif"), "--out", str(out), "--model",
                 str(recommending_model), "--no-progress", "--min-size", "7"]) == 0
    err = capsys.readouterr().err
    assert "flow_threshold=0.8 (model)" in err and "min_size=7 (user)" in err
    run = json.loads((out / "run.json").read_text())
    s = Settings.from_dict(run["segmentation_settings"])
    assert s.flow_threshold == 0.8 and s.sources["flow_threshold"] == "model"
    assert s.min_size == 7 and s.sources["min_size"] == "user"
