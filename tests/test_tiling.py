"""Tiling and blending agree with the reference's run_net on the same network."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from cpsam_toolkit import tiling
from cpsam_toolkit.network import CPSAMNet, get_config
from cpsam_toolkit.segment import CellposeSAM, InputOptions, NetOptions

core = pytest.importorskip("cellpose.core")


class _RefNet(torch.nn.Module):
    """Our tiny net behind the reference's (y, style) interface."""

    def __init__(self, net: CPSAMNet) -> None:
        super().__init__()
        self.net = net

    @property
    def device(self):
        return torch.device("cpu")

    @property
    def dtype(self):
        return torch.float32

    def forward(self, x):
        return self.net(x), torch.zeros(x.shape[0], 256)


@pytest.fixture(scope="module")
def model() -> CellposeSAM:
    torch.manual_seed(0)
    net = CPSAMNet(get_config("tiny"))
    with torch.no_grad():
        for p in net.parameters():
            if p.requires_grad:
                p.normal_(0, 0.2)
    return CellposeSAM(net, device="cpu", dtype="fp32")


@pytest.mark.parametrize("shape", [(200, 300), (256, 256), (250, 517), (600, 380)])
@pytest.mark.parametrize("augment", [False, True])
def test_tiling_matches_reference(model, shape, augment):
    rng = np.random.default_rng(1)
    img = rng.random((*shape, 2), dtype=np.float32)
    ref, _ = core.run_net(_RefNet(model.net), img[None], batch_size=8, augment=augment,
                          tile_overlap=0.1, bsize=256)
    (flows, cellprob), = list(model.iter_predict([img], InputOptions(normalize=False),
                                                 NetOptions(augment=augment)))
    ref = ref[0]
    np.testing.assert_allclose(flows, np.moveaxis(ref[..., :2], -1, 0), atol=2e-5)
    np.testing.assert_allclose(cellprob, ref[..., 2], atol=2e-5)


def test_cross_image_batching_gives_per_image_results(model):
    rng = np.random.default_rng(2)
    imgs = [rng.random(s, dtype=np.float32) for s in [(300, 300, 1), (64, 80, 3), (520, 260, 2)]]
    alone = [next(model.iter_predict([im], InputOptions(normalize=False))) for im in imgs]
    together = list(model.iter_predict(imgs, InputOptions(normalize=False), NetOptions(batch_size=5)))
    assert len(together) == 3
    for (fa, ca), (fb, cb), im in zip(alone, together, imgs):
        assert fa.shape == (2, *im.shape[:2]) and ca.shape == im.shape[:2]
        np.testing.assert_allclose(fa, fb, atol=1e-5)
        np.testing.assert_allclose(ca, cb, atol=1e-5)


def test_tile_counts_and_padding():
    # the reference's examples: 512 -> 528 padded, 3 tiles; 1024 -> 5; 2048 -> 10
    for length, n in [(512, 3), (1024, 5), (2048, 10), (100, 1)]:
        plan = tiling.TilePlan.for_shape((length, length))
        assert len(plan.ystarts) == n
        assert plan.padded_shape[0] >= 256
        assert plan.ystarts[-1] + 256 == plan.padded_shape[0]


def test_taper_mask_shape_and_range():
    m = tiling.taper_mask(256)
    assert m.shape == (256, 256)
    assert 0.06 < m[0, 128] < 0.08 and m[128, 128] > 0.99


def test_streaming_releases_images_in_order(model):
    rng = np.random.default_rng(3)
    seen = []

    def gen():
        for i in range(4):
            seen.append(i)
            yield rng.random((100, 120, 1), dtype=np.float32)

    out = model.iter_predict(gen(), InputOptions(normalize=False), NetOptions(batch_size=1))
    next(out)
    # with one tile per image and batch 1, the first result is ready before all are read
    assert len(seen) < 4


# ---------------------------------------------------------------- constant tiles run once


def test_constant_tile_key():
    t = np.zeros((2, 8, 8), np.float32)
    t[1] = 0.5
    assert tiling.constant_tile_key(t) == tiling.constant_tile_key(t.copy())
    assert tiling.constant_tile_key(t) != tiling.constant_tile_key(t[:1])  # channel count counts
    u = t.copy()
    u[0, 3, 4] = 1e-9
    assert tiling.constant_tile_key(u) is None
    u[:] = np.nan
    assert tiling.constant_tile_key(u) is None


def test_constant_tiles_reuse_outputs_within_and_across_batches():
    rng = np.random.default_rng(4)
    seen = []

    def predict(x):  # deterministic, tile-wise
        seen.append(len(x))
        return np.stack([x.sum(1) * 2, np.cos(x[:, 0]), x.max(1)], 1)

    x = np.zeros((6, 2, 16, 16), np.float32)
    x[1] = rng.random((2, 16, 16))
    x[3] = 0.25
    x[5, 1] = 3.0
    cache: dict = {}
    y = tiling._predict_skipping(predict, x, cache)
    np.testing.assert_array_equal(y, predict(x))
    assert seen[0] == 4  # tiles 0, 2, 4 are equal (zeros): run once
    seen.clear()
    y2 = tiling._predict_skipping(predict, x[[0, 3, 5]], cache)  # all cached
    assert seen == []
    np.testing.assert_array_equal(y2, y[[0, 3, 5]])


def test_blank_tiles_skipped_give_the_same_output(data_dir):
    # a real image on a blank canvas (a stitched plate, a padded field): the trained network's
    # output with constant tiles run once equals the plain run bit for bit
    from conftest import SHIPPED_MODEL, load_pair, stems

    import cpsam_toolkit as cp

    if not SHIPPED_MODEL.exists():
        pytest.skip("the shipped model is not committed")
    model = cp.load_model(SHIPPED_MODEL, device="cpu", dtype="fp32")
    dsb = "dsb2018_stage1_train_fixed"
    img = load_pair(data_dir, dsb, next(s for s in stems(data_dir, dsb) if s.startswith("07fb37")))[0]
    img = (img if img.ndim == 2 else img[..., 0])[:96, :96].astype(np.float32)
    lo, hi = np.percentile(img, [1, 99])
    x = np.zeros((300, 800, 1), np.float32)
    x[:96, :96, 0] = (img - lo) / (hi - lo)  # normalised nuclei on an empty background
    tiles = []

    def counting(t):
        tiles.append(len(t))
        return model.predict_tiles(t)

    skipped = next(tiling.run_tiled(counting, [x]))
    plain = next(tiling.run_tiled(model.predict_tiles, [x], skip_constant=False))
    n = len(tiling.TilePlan.for_shape(x.shape[:2]))
    assert n == 8 and sum(tiles) == 3  # 2 tiles hold the nuclei, 6 are blank: 1 run
    np.testing.assert_array_equal(skipped, plain)


# ---------------------------------------------------------------- memory over many runs


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="needs Linux /proc")
def test_segmenting_100_images_in_a_loop_does_not_grow_memory(tiny_model, data_dir):
    # a notebook loop: one model, 100 small real images, results dropped; after a warm-up
    # (allocator pools, compiled kernels) the resident memory must stay flat
    import gc

    from conftest import load_pair, stems

    import cpsam_toolkit as cp

    model = cp.load_model(tiny_model, device="cpu")
    dsb = "dsb2018_stage1_train_fixed"
    imgs = []
    for stem in stems(data_dir, dsb)[:10]:
        im = load_pair(data_dir, dsb, stem)[0]
        imgs.append((im if im.ndim == 2 else im[..., 0])[:128, :128])
    for i in range(10):
        model.segment(imgs[i % 10])
    gc.collect()
    start = _rss_mb()
    peaks = []
    for i in range(100):
        res = model.segment(imgs[i % 10])
        del res
        if i % 20 == 19:
            gc.collect()
            peaks.append(_rss_mb())
    growth = peaks[-1] - start
    # MB; measured: 1.9 MB when the results are dropped, 17 MB when the loop keeps them
    assert growth < 10, (start, peaks)
