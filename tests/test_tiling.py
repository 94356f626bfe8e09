"""Tiling and blending agree with the reference's run_net on the same network."""

from __future__ import annotations

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
