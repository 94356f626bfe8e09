"""Augmentations keep images, masks and flow targets consistent; degradations behave as named."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cpsam_toolkit.flows import masks_to_flows
from cpsam_toolkit.training import augment as A


def ellipses(shape=(200, 240), n=12, seed=0) -> np.ndarray:
    """Non-overlapping-ish random ellipses as a label image."""
    rng = np.random.default_rng(seed)
    m = np.zeros(shape, np.int32)
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    k = 0
    for _ in range(200):
        cy, cx = rng.uniform(20, shape[0] - 20), rng.uniform(20, shape[1] - 20)
        a, b, t = rng.uniform(8, 18), rng.uniform(5, 11), rng.uniform(0, np.pi)
        u = ((yy - cy) * np.cos(t) + (xx - cx) * np.sin(t)) / a
        v = (-(yy - cy) * np.sin(t) + (xx - cx) * np.cos(t)) / b
        inside = (u**2 + v**2) <= 1
        if (m[inside] > 0).any():
            continue
        k += 1
        m[inside] = k
        if k == n:
            break
    return m


def interior(masks: np.ndarray, margin: int = 2) -> np.ndarray:
    from scipy import ndimage

    keep = np.zeros(masks.shape, bool)
    for lab in np.unique(masks)[1:]:
        keep |= ndimage.binary_erosion(masks == lab, iterations=margin)
    return keep


def cosine(f1: np.ndarray, f2: np.ndarray, where: np.ndarray) -> float:
    a, b = f1[:, where], f2[:, where]
    num = (a * b).sum(0)
    den = np.linalg.norm(a, axis=0) * np.linalg.norm(b, axis=0) + 1e-8
    return float(np.mean(num / den))


@pytest.mark.parametrize(
    "angle,scale,flip",
    [(0.0, 1.0, True), (np.pi / 2, 1.0, False), (0.65, 1.3, True), (-2.2, 0.8, False)],
)
def test_warped_flows_point_to_the_same_centres(angle, scale, flip):
    masks = ellipses()
    flows = masks_to_flows(masks)
    img = (masks > 0).astype(np.float32)[None]
    aff = A.make_affine(masks.shape, 256, angle, scale, flip)
    _, m2, f2 = A.random_affine_crop(img, masks, flows, np.random.default_rng(0), aff=aff)
    ref = masks_to_flows(m2)
    inside = interior(m2)
    assert inside.sum() > 1000
    assert cosine(f2, ref, inside) > 0.95
    # negative control: resampling the components without rotating the vectors is wrong
    if angle != 0.0 or flip:
        naive = A.warp(flows, aff, order=1)
        assert cosine(naive, ref, inside) < 0.9


def test_flip_negates_dx_exactly():
    masks = ellipses(shape=(256, 256))
    flows = masks_to_flows(masks)
    aff = A.make_affine(masks.shape, 256, 0.0, 1.0, True)
    f2 = A.transform_flows(flows, aff)
    np.testing.assert_allclose(f2[0], flows[0][:, ::-1], atol=1e-5)
    np.testing.assert_allclose(f2[1], -flows[1][:, ::-1], atol=1e-5)
    m2 = A.warp(masks, aff, order=0)
    np.testing.assert_array_equal(m2, masks[:, ::-1])


def test_small_images_are_zero_padded_to_the_crop():
    masks = ellipses(shape=(100, 120), n=4)
    img = np.ones((1, 100, 120), np.float32)
    cfg = A.AugmentConfig.spatial_only((1.0, 1.0))
    x, f, m = A.augment_sample(img, masks, masks_to_flows(masks), np.random.default_rng(1), cfg)
    assert x.shape == (3, 256, 256) and f.shape == (2, 256, 256) and m.shape == (256, 256)
    assert 0.1 < (x[0] > 0.5).mean() < 0.3  # the 100x120 image sits inside a zero border
    assert np.all(x[1:] == 0)  # padded channels stay empty without intensity augmentation
    assert set(np.unique(m)) <= set(np.unique(masks))


def test_channel_handling_and_grayscale():
    rng = np.random.default_rng(0)
    one = A.pad_channels(rng.random((1, 64, 64)).astype(np.float32))
    assert one.shape == (3, 64, 64) and np.all(one[1:] == 0)
    g = A.to_grayscale(one)
    assert np.allclose(g[0], one[0]) and np.allclose(g[1], one[0]) and np.allclose(g[2], one[0])
    rgb = rng.random((3, 64, 64)).astype(np.float32)
    g = A.to_grayscale(rgb)
    assert np.allclose(g, rgb.mean(0, keepdims=True).repeat(3, 0))
    with pytest.raises(ValueError, match="channels"):
        A.pad_channels(rng.random((4, 8, 8)))
    # permutation moves a single channel to any slot; the others stay empty
    cfg = A.AugmentConfig(grayscale_p=0, invert_p=0, degrade_p=0, brightness_sd=0, contrast_range=(1, 1))
    slots = set()
    for s in range(30):
        out = A.intensity_augment(one, np.random.default_rng(s), cfg)
        assert out.shape == (3, 64, 64)
        nz = [c for c in range(3) if np.any(out[c] != 0)]
        assert len(nz) == 1
        slots.add(nz[0])
    assert slots == {0, 1, 2}


def test_same_seed_same_sample_and_different_seed_differs():
    masks = ellipses()
    flows = masks_to_flows(masks)
    img = np.random.default_rng(3).random((3, *masks.shape)).astype(np.float32)
    cfg = A.AugmentConfig()
    a = A.augment_sample(img, masks, flows, np.random.default_rng(7), cfg)
    b = A.augment_sample(img, masks, flows, np.random.default_rng(7), cfg)
    c = A.augment_sample(img, masks, flows, np.random.default_rng(8), cfg)
    for u, v in zip(a, b):
        np.testing.assert_array_equal(u, v)
    assert not np.array_equal(a[0], c[0])


def test_degradations_levels_and_types():
    rng = np.random.default_rng(0)
    img = np.zeros((64, 64), np.float32)
    img[16:48, 16:48] = 1.0
    # Poisson: many photons ~ clean, few photons noisy; mean preserved
    lo = A.poisson_noise(img, 1000.0, np.random.default_rng(0))
    hi = A.poisson_noise(img, 0.5, np.random.default_rng(0))
    assert np.abs(lo - img).mean() < np.abs(hi - img).mean()
    assert abs(hi.mean() - img.mean()) < 0.05
    # blur lowers the edge gradient, more with larger sigma
    g2, g8 = A.gaussian_blur(img, 2), A.gaussian_blur(img, 8)
    assert np.abs(np.diff(g8)).max() < np.abs(np.diff(g2)).max() < np.abs(np.diff(img)).max()
    # downsampling keeps the size and loses detail
    d = A.downsample(img, 5)
    assert d.shape == img.shape and np.abs(d - img).mean() > 0.01
    np.testing.assert_allclose(A.downsample(img, 1), A.gaussian_blur(img, 0.5), atol=1e-5)
    # anisotropic: only along the chosen axis
    stripes = np.tile((np.arange(64) % 8 < 4).astype(np.float32), (64, 1))  # varies along X only
    np.testing.assert_allclose(A.anisotropic_blur(stripes, 6, axis=0), stripes, atol=1e-5)
    assert np.abs(A.anisotropic_blur(stripes, 6, axis=1) - stripes).mean() > 0.1
    # (C,H,W) and torch tensors work the same way
    t = torch.from_numpy(np.stack([img, img]))
    out = A.gaussian_blur(t, 2)
    assert isinstance(out, torch.Tensor) and out.shape == (2, 64, 64)
    np.testing.assert_allclose(out[1].numpy(), g2, atol=1e-6)
    # renormalisation maps the 1st/99th percentiles to 0/1
    r = A.renormalize(rng.random((2, 50, 50)).astype(np.float32) * 7 + 3)
    assert abs(np.percentile(r[0], 1)) < 1e-5 and abs(np.percentile(r[1], 99) - 1) < 1e-5
    with pytest.raises(ValueError):
        A.degrade(np.stack([img] * 3), rng, kind="nope")
    for kind in A.DEGRADATIONS:
        out, k = A.degrade(np.stack([img, img, np.zeros_like(img)]), rng, kind=kind)
        assert k == kind and out.shape == (3, 64, 64) and np.all(out[2] == 0)
