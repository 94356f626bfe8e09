"""Blockwise segmentation of large images: exact stitching, global normalisation, agreement
with whole-image segmentation, Dask, atomic output. Mosaics are tiled from real DSB2018
images and their annotations."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile
from scipy import ndimage
from test_batch import client, torch_threads  # noqa: F401
from test_cli_segment import gradient_model  # noqa: F401

from cpsam_toolkit import blockwise, outputs, preprocess
from cpsam_toolkit.segment import InputOptions, MaskOptions, SegmentationResult

DSB = "dsb2018_stage1_train_fixed"


def mosaic(data_dir: Path, size: int, tile: int = 256, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A (size, size) float32 image tiled from ``tile``² crops of real fluorescence DSB2018
    images (grey), and the matching labels (unique ids across tiles)."""
    d = data_dir / DSB / "train"
    files = sorted(d.glob("*_img.tif"))
    order = np.random.default_rng(seed).permutation(len(files))
    img = np.zeros((size, size), np.float32)
    lab = np.zeros((size, size), np.uint32)
    n, k = 0, 0
    for ty in range(0, size, tile):
        for tx in range(0, size, tile):
            while True:
                f = files[order[k % len(files)]]
                k += 1
                im = tifffile.imread(f)
                im = im[..., :3].mean(-1) if im.ndim == 3 else im
                if min(im.shape[:2]) >= tile and np.median(im) < 100:  # dark background
                    break
            h, w = min(tile, size - ty), min(tile, size - tx)
            m = tifffile.imread(str(f).replace("_img.tif", "_masks.tif"))[:h, :w].astype(np.uint32)
            img[ty : ty + h, tx : tx + w] = im[:h, :w]
            m[m > 0] += n
            n = max(n, int(m.max()))
            lab[ty : ty + h, tx : tx + w] = m
    return img, lab


class LocalModel:
    """Stand-in model whose segmentation is purely local (connected components of x > 0.5),
    so blockwise stitching must reproduce the whole-image result exactly."""

    name, info = "local-threshold", {}

    def __init__(self, fail_after: int | None = None):
        self.fail_after = fail_after

    def iter_segment(self, images, inputs=None, net=None, masks=None, names=None, progress=False):
        for i, img in enumerate(images):
            if self.fail_after is not None and i >= self.fail_after:
                raise RuntimeError("simulated crash")
            x = np.asarray(img, np.float32)[..., 0]
            lab, _ = ndimage.label(x > 0.5)
            yield SegmentationResult(lab.astype(np.uint32), np.zeros((2, *x.shape), np.float32), x,
                                     MaskOptions())


def separated(lab: np.ndarray) -> np.ndarray:
    """Binary image of the labels with their borders removed (so components = objects)."""
    return ((lab > 0) & ~outputs.outlines(lab)).astype(np.float32) * 100


def same_partition(a: np.ndarray, b: np.ndarray) -> bool:
    """True if two label images have the same objects (up to renumbering)."""
    if not np.array_equal(a > 0, b > 0):
        return False
    fg = a > 0
    pairs = np.unique(np.stack([a[fg], b[fg]]), axis=1)
    return len(np.unique(pairs[0])) == len(np.unique(pairs[1])) == pairs.shape[1]


# --------------------------------------------------------------------------------------------
# planning and stitching (exact, with a local stand-in model)
# --------------------------------------------------------------------------------------------
def test_blocks_partition_the_image():
    blocks = blockwise.plan_blocks((1000, 777), 256, 40)
    cover = np.zeros((1000, 777), int)
    for b in blocks:
        y0, y1, x0, x1 = b.core
        cover[y0:y1, x0:x1] += 1
        cy0, cy1, cx0, cx1 = b.crop
        assert 0 <= cy0 <= y0 - min(40, y0) and cy1 == min(1000, y1 + 40)
        assert 0 <= cx0 and cx1 <= 777
    assert (cover == 1).all()
    assert len(blocks) == 4 * 4


def test_stitching_reproduces_whole_image_exactly(tmp_path, data_dir):
    _, lab = mosaic(data_dir, 2048)
    image = separated(lab)
    whole, n = ndimage.label(image > 50)
    res = blockwise.segment_blockwise(image, LocalModel(), tmp_path / "m.zarr", block_size=512, halo=64)
    got = res.read()
    assert res.n_objects == n == int(got.max())
    assert set(np.unique(got)) == set(range(n + 1))  # consecutive ids
    assert same_partition(whole, got)
    assert res.open().chunks == (512, 512)
    assert res.open().attrs["cpsam"]["n_objects"] == n


def test_tiff_source_channels_first_odd_shape(tmp_path, data_dir):
    _, lab = mosaic(data_dir, 2048)
    lab = lab[:2000, :1900]
    image = separated(lab).astype(np.uint16)
    tifffile.imwrite(tmp_path / "chw.tif", np.stack([image, np.zeros_like(image), image // 2]),
                     tile=(256, 256), compression="zlib", photometric="minisblack")
    whole, n = ndimage.label(image > 50)
    res = blockwise.segment_blockwise(tmp_path / "chw.tif", LocalModel(), tmp_path / "m.zarr",
                                      block_size=300, halo=40, input_options=InputOptions(channels=(0,)))
    assert res.shape == (2000, 1900) and res.n_blocks == 7 * 7
    assert res.n_objects == n and same_partition(whole, res.read())


def test_duplicates_across_a_border_are_merged(tmp_path):
    """A cell whose centroid lands in different cores in the two blocks' segmentations is kept
    by both; the stitcher must merge the two copies into one object."""
    image = np.zeros((400, 400), np.float32)
    image[100:140, 180:221] = 100  # centroid x = 200: the border between cores at 200

    class Shifty(LocalModel):
        def iter_segment(self, images, *a, **k):
            for x, res in zip(self._src, super().iter_segment(images, *a, **k), strict=False):
                m = res.masks
                if x.index == (0, 0):  # this block sees the cell 2 px narrower on the right
                    m = m.copy()
                    m[:, 219 - x.crop[2] :] = 0
                elif x.index == (0, 1):  # this one 2 px narrower on the left
                    m = m.copy()
                    m[:, : 182 - x.crop[2]] = 0
                yield SegmentationResult(m, res.flows, res.cellprob, res.options)

    model = Shifty()
    model._src = blockwise.plan_blocks((400, 400), 200, 64)
    res = blockwise.segment_blockwise(image, model, tmp_path / "m.zarr", block_size=200, halo=64)
    got = res.read()
    assert res.n_objects == 1 and res.n_merged == 1
    assert (got[100:140, 182:219] == 1).all()


def test_failure_leaves_no_output(tmp_path):
    image = np.zeros((600, 600), np.float32)
    with pytest.raises(RuntimeError, match="simulated"):
        blockwise.segment_blockwise(image, LocalModel(fail_after=2), tmp_path / "m.zarr",
                                    block_size=200, halo=32)
    assert list(tmp_path.iterdir()) == []
    res = blockwise.segment_blockwise(image, LocalModel(), tmp_path / "m.zarr", block_size=200)
    with pytest.raises(FileExistsError):
        blockwise.segment_blockwise(image, LocalModel(), tmp_path / "m.zarr", block_size=200)
    image[10:230, 10:230] = 1  # more than 1 % of the pixels, so the 99th percentile is 1
    res = blockwise.segment_blockwise(image, LocalModel(), tmp_path / "m.zarr", block_size=200,
                                      overwrite=True)
    assert res.n_objects == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.zarr"]


# --------------------------------------------------------------------------------------------
# global normalisation
# --------------------------------------------------------------------------------------------
def test_blocks_get_the_whole_image_normalisation(tmp_path, data_dir):
    """Above 224³ pixels the percentiles come from a strided subsample; a lazily read TIFF in
    bands must give exactly the values (and network inputs) of whole-image normalisation."""
    img, _ = mosaic(data_dir, 3584)
    img = (img[:3400, :3390] * 50).astype(np.uint16)  # > 224**3 pixels
    assert img.size > blockwise.SUBSAMPLE_ABOVE
    tifffile.imwrite(tmp_path / "big.tif", img, tile=(512, 512), compression="zlib")
    opts = InputOptions(percentiles=(1.0, 99.5), invert=True)
    whole = preprocess.prepare_image(img, percentiles=opts.percentiles, invert=True)
    src = blockwise.open_source(tmp_path / "big.tif")
    lowhigh = blockwise.global_lowhigh(src, opts)
    assert lowhigh == preprocess.percentile_lowhigh(img[::15, ::15, None].astype(np.float32), 1.0, 99.5)
    for b in blockwise.plan_blocks(src.shape2d, 1024, 64)[::5]:
        y0, y1, x0, x1 = b.crop
        crop = blockwise.prepare_crop(src, b, opts, lowhigh)
        assert np.array_equal(crop, whole[y0:y1, x0:x1]), b
    # small image: percentiles of every pixel
    small = blockwise.open_source(img[:1000, :1000])
    assert blockwise.global_lowhigh(small, opts) == preprocess.percentile_lowhigh(
        img[:1000, :1000, None], 1.0, 99.5)


# --------------------------------------------------------------------------------------------
# the real pipeline (tiling, network, dynamics) blockwise vs whole image
# --------------------------------------------------------------------------------------------
def blockwise_vs_whole(data_dir, model, size: int, block: int, tmp_path: Path):
    from cpsam_toolkit.metrics import average_precision

    img, lab = mosaic(data_dir, size)
    whole = model.segment(img)
    res = blockwise.segment_blockwise(img, model, tmp_path / "m.zarr", block_size=block, halo=64)
    got = res.read()
    ap = average_precision(whole.masks.astype(np.uint32), got, [0.5, 0.75])[0]
    ap_gt_whole = average_precision(lab, whole.masks.astype(np.uint32), [0.5])[0][0]
    ap_gt_block = average_precision(lab, got, [0.5])[0][0]
    print(f"\n{size}^2, blocks {block}: whole {whole.n_objects} objects, blockwise {res.n_objects} "
          f"({res.n_merged} merged); AP(whole, blockwise) @0.5 {ap[0]:.4f} @0.75 {ap[1]:.4f}; "
          f"AP vs labels: whole {ap_gt_whole:.3f}, blockwise {ap_gt_block:.3f}")
    return ap, whole, res, ap_gt_whole, ap_gt_block


def test_blockwise_matches_whole_image_1024(tmp_path, data_dir, gradient_model):  # noqa: F811
    ap, whole, res, ap_w, ap_b = blockwise_vs_whole(data_dir, gradient_model, 1024, 384, tmp_path)
    assert whole.n_objects > 200  # a real segmentation, not an empty one
    assert ap_w > 0.15  # it finds nuclei (a crude stand-in, not a trained model)
    assert ap[0] >= 0.98
    assert abs(ap_w - ap_b) < 0.02


@pytest.mark.slow
def test_blockwise_matches_whole_image_4096(tmp_path, data_dir, gradient_model):  # noqa: F811
    ap, whole, res, _, _ = blockwise_vs_whole(data_dir, gradient_model, 4096, 1024, tmp_path)
    assert whole.n_objects > 3000
    assert ap[0] >= 0.98


def test_dask_blockwise_equals_serial(tmp_path, data_dir, gradient_model, tiny_model, client):  # noqa: F811
    from cpsam_toolkit.segment import load_model

    img, _ = mosaic(data_dir, 768)
    tifffile.imwrite(tmp_path / "img.tif", img, tile=(256, 256))
    with torch_threads(1):
        serial = blockwise.segment_blockwise(img, gradient_model, tmp_path / "s.zarr",
                                             block_size=256, halo=48)
    # in-memory input and a model object without a file: both are shipped to the workers
    dist = blockwise.segment_blockwise(img, gradient_model, tmp_path / "d.zarr",
                                       block_size=256, halo=48, client=client, blocks_per_task=3)
    assert serial.n_objects > 100
    assert dist.n_objects == serial.n_objects
    assert np.array_equal(dist.read(), serial.read())
    # a TIFF path and a weights file: the workers read and load them themselves
    fast = MaskOptions(cellprob_threshold=8.0)
    with torch_threads(1):
        a = blockwise.segment_blockwise(tmp_path / "img.tif", load_model(tiny_model), tmp_path / "a.zarr",
                                        block_size=384, halo=48, mask_options=fast)
    b = blockwise.segment_blockwise(tmp_path / "img.tif", load_model(tiny_model), tmp_path / "b.zarr",
                                    block_size=384, halo=48, mask_options=fast, client=client)
    assert np.array_equal(a.read(), b.read())


def test_cli_blockwise(tmp_path, data_dir, tiny_model, capsys):
    from cpsam_toolkit.cli import main

    img, _ = mosaic(data_dir, 512)
    tifffile.imwrite(tmp_path / "slide.tif", (img * 10).astype(np.uint16), tile=(256, 256))
    args = ["segment", str(tmp_path / "slide.tif"), "--out", str(tmp_path / "out"), "--model",
            str(tiny_model), "--blockwise", "--block-size", "256", "--halo", "32", "--no-progress",
            "--cellprob-threshold", "8"]
    assert main(args) == 0
    out = tmp_path / "out" / "slide_masks.zarr"
    import zarr

    z = zarr.open_array(str(out), mode="r")
    assert z.shape == (512, 512) and z.dtype == np.uint32
    assert "1 segmented" in capsys.readouterr().out
    assert main(args) == 0
    assert "1 skipped" in capsys.readouterr().out


@pytest.mark.parametrize("augment", [False, True])
def test_block_network_outputs_are_the_whole_image_outputs(data_dir, tiny_model, augment):
    """Each crop is computed from the whole image's tile grid: bit-identical outputs on CPU."""
    from cpsam_toolkit.segment import NetOptions, load_model

    img, _ = mosaic(data_dir, 768)
    img = img[:700, :650]
    model = load_model(tiny_model)
    net = NetOptions(batch_size=5, augment=augment)
    with torch_threads(1):
        flows, cellprob = next(model.iter_predict([img], InputOptions(), net))
        whole = np.concatenate([flows, cellprob[None]])
        src = blockwise.open_source(img)
        settings = blockwise._Settings(InputOptions(), InputOptions(channel_axis=2, normalize=False),
                                       net, MaskOptions())
        blocks = blockwise.plan_blocks(src.shape2d, 256, 40)
        out = list(blockwise._aligned_outputs(model, src, blocks, settings,
                                              blockwise.global_lowhigh(src, InputOptions())))
    assert [b for b, _ in out] == blocks
    for b, y in out:
        y0, y1, x0, x1 = b.crop
        assert np.array_equal(y, whole[:, y0:y1, x0:x1]), b


@pytest.mark.parametrize("augment", [False, True])
def test_blocks_run_each_tile_of_the_whole_grid_once(data_dir, gradient_model, augment):  # noqa: F811
    """Blocks share their overlapping tiles: the network sees exactly the whole image's tiles,
    in full batches across blocks, the kept outputs stay bounded (about one band of tiles
    across the image) and none is left at the end; the outputs are the whole image's."""
    from cpsam_toolkit import tiling
    from cpsam_toolkit.modes import blocks as bm
    from cpsam_toolkit.segment import NetOptions

    img, _ = mosaic(data_dir, 2048)
    img = img[:2000, :1900]
    net = NetOptions(batch_size=8, augment=augment)
    with torch_threads(1):
        flows, cellprob = next(gradient_model.iter_predict([img], InputOptions(), net))
        whole = np.concatenate([flows, cellprob[None]])
        src = blockwise.open_source(img)
        lowhigh = blockwise.global_lowhigh(src, InputOptions())
        calls: list[int] = []

        def counting(tiles: np.ndarray) -> np.ndarray:
            calls.append(len(tiles))
            return gradient_model.predict_tiles(tiles)

        plan_blocks = bm.plan_blocks(src.shape2d, 384, 64)
        cache = bm.TileCache()
        out = list(bm.aligned_outputs(
            counting, src.shape2d, lambda box: blockwise._region(src, box, InputOptions(), lowhigh),
            plan_blocks, net, 256, cache))
    plan = tiling.TilePlan.for_shape(src.shape2d, 256, net.tile_overlap, augment)
    per_block = [{k for k, _, _ in bm.block_tiles(plan, b.crop)} for b in plan_blocks]
    assert sum(map(len, per_block)) > 2.5 * len(plan)  # blocks overlap: most tiles are shared
    assert sum(calls) == len(plan)  # ... yet each tile ran once, as for the whole image
    assert set(calls[:-1]) == {8}  # full batches across blocks
    assert len(cache) == 0 and cache.nbytes == 0
    # kept at most: the tiles shared by two block rows, by two neighbouring blocks, and the
    # tiles of the blocks in flight (a batch's worth of blocks)
    nby, nbx = 1 + max(b.index[0] for b in plan_blocks), 1 + max(b.index[1] for b in plan_blocks)
    rows = [set().union(*per_block[r * nbx : (r + 1) * nbx]) for r in range(nby)]
    band = max(len(rows[r] & rows[r + 1]) for r in range(nby - 1))
    side = max(len(per_block[i] & per_block[i + 1]) for i in range(len(plan_blocks) - 1))
    assert 0 < cache.peak_tiles <= band + side + 2 * max(map(len, per_block))
    assert cache.peak_tiles < len(plan) / 2
    assert cache.peak_bytes < cache.peak_tiles * 3 * 256 * 256 * 4  # trimmed to what is needed
    assert [b for b, _ in out] == plan_blocks
    for b, y in out:
        y0, y1, x0, x1 = b.crop
        assert np.array_equal(y, whole[:, y0:y1, x0:x1]), b
