"""Input handling: channel axes, dtypes, normalisation, and clear errors."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import load_pair

from cpsam_toolkit.preprocess import ImageInputError, normalize, prepare_image, to_channels_last

transforms = pytest.importorskip("cellpose.transforms")


@pytest.mark.parametrize(
    "stem,dataset",
    [
        ("set10", "usiigaci_phase_contrast_cells"),
        ("train_10_000", "consep_patches256"),
    ],
)
def test_normalize_matches_reference(data_dir, stem, dataset):
    img, _ = load_pair(data_dir, dataset, stem)
    x = to_channels_last(img)
    ours = normalize(x)
    ref = transforms.normalize_img(x.astype(np.float32), axis=-1)
    np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-5)


def test_constant_channel_becomes_zero_not_nan():
    img = np.zeros((64, 64, 3), np.uint16)
    img[..., 0] = np.arange(64)[:, None]
    img[..., 1] = 7
    out = normalize(img)
    assert np.isfinite(out).all()
    assert (out[..., 1] == 0).all() and (out[..., 2] == 0).all()
    assert out[..., 0].max() > 0.9


@pytest.mark.parametrize(
    "shape,axis,expected",
    [
        ((50, 60), None, (50, 60, 1)),
        ((50, 60, 3), None, (50, 60, 3)),
        ((3, 50, 60), None, (50, 60, 3)),
        ((2, 50, 60), None, (50, 60, 2)),
        ((50, 2, 60), 1, (50, 60, 2)),
    ],
)
def test_channel_axis(shape, axis, expected):
    img = np.random.default_rng(0).random(shape)
    assert to_channels_last(img, channel_axis=axis).shape == expected


def test_rgba_uses_first_three_channels_with_warning():
    img = np.random.default_rng(0).random((50, 60, 4))
    with pytest.warns(UserWarning, match="using the first 3"):
        out = to_channels_last(img)
    np.testing.assert_array_equal(out, img[..., :3])


def test_channels_selection_order():
    img = np.stack([np.full((8, 8), v) for v in range(5)], axis=-1)
    out = to_channels_last(img, channels=[4, 0])
    assert out.shape == (8, 8, 2) and out[0, 0, 0] == 4 and out[0, 0, 1] == 0


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.int32, np.int64, np.float16, np.float64, bool])
def test_dtypes_accepted(dtype):
    img = (np.random.default_rng(0).random((40, 40)) * 100).astype(dtype)
    out = prepare_image(img)
    assert out.dtype == np.float32 and out.shape == (40, 40, 1) and np.isfinite(out).all()


@pytest.mark.parametrize(
    "img,match",
    [
        (np.zeros((0, 10)), "too small"),
        (np.zeros((1, 1)), "too small"),
        (np.zeros(10), "2 or 3 dimensions"),
        (np.zeros((2, 3, 40, 40)), "not a 2D image"),
        (np.zeros((40, 40, 40)), "cannot tell the channel axis"),
        (np.array([[np.nan, 1.0], [1.0, 1.0]]), "NaN/Inf"),
        (np.array([["a", "b"], ["c", "d"]]), "unsupported dtype"),
    ],
)
def test_bad_inputs_have_clear_errors(img, match):
    with pytest.raises(ImageInputError, match=match):
        prepare_image(img, name="x.tif")


def test_channel_axis_out_of_range_named():
    with pytest.raises(ImageInputError, match="x.tif: channel_axis=5"):
        prepare_image(np.zeros((3, 20, 20)), channel_axis=5, name="x.tif")


def test_invert():
    img = np.linspace(0, 1, 100).reshape(10, 10)
    a = prepare_image(img)
    b = prepare_image(img, invert=True)
    np.testing.assert_allclose(a + b, 1, atol=1e-6)


def test_tile_norm_evens_out_illumination():
    yy, xx = np.mgrid[:300, :300]
    background = 3 * xx / 299.0  # uneven illumination: an additive ramp
    spots = ((yy % 30 < 10) & (xx % 30 < 10)).astype(float)
    img = background + spots
    out = prepare_image(img, tile_norm_blocksize=60)[..., 0]
    left, right = out[:, :60][spots[:, :60] > 0].mean(), out[:, -60:][spots[:, -60:] > 0].mean()
    glob = prepare_image(img)[..., 0]
    gl, gr = glob[:, :60][spots[:, :60] > 0].mean(), glob[:, -60:][spots[:, -60:] > 0].mean()
    assert abs(left - right) < abs(gl - gr) / 3
