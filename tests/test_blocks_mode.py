"""Blocks mode: above a host-memory budget the default path segments an image in blocks by
itself (library, CLI), with the whole image's network outputs and nearly the same masks.
Images are mosaics of real DSB2018 nuclei and their annotations."""

from __future__ import annotations

import logging

import fastremap
import numpy as np
import pytest
from test_blockwise import mosaic
from test_cli_segment import gradient_model  # noqa: F401

from cpsam_toolkit.metrics import average_precision
from cpsam_toolkit.modes import blocks
from cpsam_toolkit.settings import Settings


def test_estimate_and_plan():
    # the measured figure of the issue: a 10240^2 image whole peaks at about 8.5 GB
    est = blocks.estimate_whole_image_bytes((10240, 10240))
    assert 8.0e9 < est < 9.0e9
    # resizing to the network scale (small cells) costs memory at the network scale
    plain, resized = (blocks.estimate_whole_image_bytes((2048, 2048), diameter=d) for d in (None, 15))
    assert resized - blocks.FIXED_BYTES == pytest.approx(4 * (plain - blocks.FIXED_BYTES), rel=1e-6)
    assert blocks.choose_blocks((10240, 10240), None) is None  # no budget: whole
    assert blocks.choose_blocks((10240, 10240), int(16e9)) is None  # fits
    plan = blocks.choose_blocks((10240, 10240), int(4e9))
    assert plan is not None and plan.budget == int(4e9) and plan.estimate == est
    assert plan.block_size % 256 == 0 and 512 <= plan.block_size <= 4096 and plan.halo == 64
    # a block's own whole-image estimate fits in the budget with the result arrays
    crop = plan.block_size + 2 * plan.halo
    held = blocks.RESULT_BYTES_PER_PIXEL * 10240**2 + blocks.CACHE_BYTES_PER_COLUMN * 10240
    assert blocks.estimate_whole_image_bytes((crop, crop)) + held < plan.budget
    assert "host_memory" in plan.describe("slide.tif") and "slide.tif" in plan.describe("slide.tif")
    assert blocks.choose_blocks((4096, 4096), int(1e9), diameter=40).halo == 80  # 2 diameters
    assert blocks.choose_blocks((400, 9000), 1) is None  # too thin to cut: whole


def test_host_memory_setting():
    assert Settings(host_memory="8GB").host_memory == "8GB"
    assert blocks.host_memory_budget("8GB") == 8_000_000_000
    assert blocks.host_memory_budget("unlimited") is None
    auto = blocks.host_memory_budget(None)
    assert 0 < auto <= blocks.AUTO_MAX
    with pytest.raises(ValueError, match="host_memory.*unlimited"):
        Settings(host_memory="lots")


def test_over_budget_images_go_in_blocks(data_dir, gradient_model, caplog):  # noqa: F811
    img, lab = mosaic(data_dir, 1024)
    small, _ = mosaic(data_dir, 256, seed=1)
    whole = gradient_model.segment(img, host_memory="unlimited")
    with caplog.at_level(logging.WARNING, logger="cpsam_toolkit"):
        # 1 MB: the large image goes in blocks of 512 px; the small one fits (too small to cut)
        res = gradient_model.segment([small, img, small], host_memory="1MB")
    assert [r.masks.shape for r in res] == [(256, 256), (1024, 1024), (256, 256)]
    said = [r.getMessage() for r in caplog.records if "in blocks" in r.getMessage()]
    assert len(said) == 1 and "image 1" in said[0] and "host memory budget" in said[0]
    got = res[1]
    # the network outputs are the whole image's, block cores pasted together
    np.testing.assert_allclose(got.flows, whole.flows, atol=1e-5)
    np.testing.assert_allclose(got.cellprob, whole.cellprob, atol=1e-5)
    # masks: the same objects up to tracking near crop edges
    ap = average_precision(whole.masks.astype(np.uint32), got.masks.astype(np.uint32), [0.5])[0][0]
    assert whole.n_objects > 200 and ap >= 0.98
    assert got.masks.dtype == np.uint16 and got.n_objects == len(np.unique(got.masks)) - 1
    ap_gt = [average_precision(lab, r.masks.astype(np.uint32), [0.5])[0][0] for r in (whole, got)]
    assert abs(ap_gt[0] - ap_gt[1]) < 0.02
    # the small images are exactly what they are alone
    alone = gradient_model.segment(small)
    assert np.array_equal(res[0].masks, alone.masks) and np.array_equal(res[2].masks, alone.masks)
    # the object table works on a blocks result
    assert len(got.objects["area"]) == got.n_objects


def test_plan_blocks_says_in_advance_what_segment_does(data_dir, gradient_model):  # noqa: F811
    """The adapters' hook (the CellProfiler module reports the block size it gets)."""
    img, _ = mosaic(data_dir, 1024)
    plan, fixed = gradient_model.plan_blocks(img, gradient_model.settings.replace(host_memory="1MB"))
    assert plan is not None and plan.block_size == 512 and fixed.host_memory == "1000000B"
    assert gradient_model.plan_blocks(img)[0] is None  # the automatic budget: a 1024^2 image fits
    auto = gradient_model.plan_blocks(img)[1].host_memory
    assert auto.endswith("B") and int(auto[:-1]) == blocks.host_memory_budget(auto)
    free, fixed = gradient_model.plan_blocks(img, gradient_model.settings.replace(host_memory="unlimited"))
    assert free is None and fixed.host_memory == "unlimited"
    # tile_norm_blocksize always runs whole, whatever the budget
    tiled = gradient_model.settings.replace(host_memory="1MB", tile_norm_blocksize=128)
    assert gradient_model.plan_blocks(img, tiled)[0] is None


def test_blocks_with_resizing(data_dir, gradient_model):  # noqa: F811
    img, _ = mosaic(data_dir, 1024)
    whole = gradient_model.segment(img, diameter=20, host_memory="unlimited")
    got = gradient_model.segment(img, diameter=20, host_memory="1MB")
    ap = average_precision(whole.masks.astype(np.uint32), got.masks.astype(np.uint32), [0.5])[0][0]
    assert whole.n_objects > 100 and ap >= 0.9


def test_keep_core_objects_keeps_the_objects_centred_in_the_core(data_dir):
    """Against scipy's centroids, on real annotations cut as a block's crop."""
    from scipy import ndimage

    _, lab = mosaic(data_dir, 1024)
    b = blocks.plan_blocks((1024, 1024), 384, 64)[4]  # the middle block: halo on every side
    y0, y1, x0, x1 = b.crop
    crop = fastremap.renumber(lab[y0:y1, x0:x1].astype(np.uint32))[0]
    kept, k = blocks.keep_core_objects(crop, b)
    ids = np.arange(1, int(crop.max()) + 1)
    cy, cx = np.floor(np.array(ndimage.center_of_mass(crop > 0, crop, ids))).T
    inside = ((cy + y0 >= b.core[0]) & (cy + y0 < b.core[1])
              & (cx + x0 >= b.core[2]) & (cx + x0 < b.core[3]))
    assert 50 < k == inside.sum() < len(ids)
    assert kept.dtype == np.uint32 and set(np.unique(kept)) == set(range(k + 1))
    assert np.array_equal(kept > 0, np.isin(crop, ids[inside]))  # whole objects, kept or not
