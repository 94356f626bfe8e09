"""3D segmentation (cpsam_toolkit.volume): axes, the three-view pipeline with an oracle
"network", anisotropy, streaming accumulation, plane stitching, 3D training slices, CLI."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile
from scipy.ndimage import gaussian_filter

from cpsam_toolkit import volume as V
from cpsam_toolkit.flows import masks_to_flows
from cpsam_toolkit.metrics import average_precision
from cpsam_toolkit.preprocess import ImageInputError


# --------------------------------------------------------------------------------------------
# helpers: synthetic volumes and fake networks
# --------------------------------------------------------------------------------------------
def blobs(shape=(40, 40, 40), n=8, rmin=5.0, rmax=8.0, seed=0) -> np.ndarray:
    """Non-touching random ellipsoids, labels 1..n on an isotropic grid."""
    rng = np.random.default_rng(seed)
    lab = np.zeros(shape, np.int32)
    grid = np.indices(shape, dtype=np.float32)
    placed: list[tuple[np.ndarray, float]] = []
    for _ in range(5000):
        if len(placed) == n:
            break
        r = np.minimum(rng.uniform(rmin, rmax, 3), (np.array(shape) - 4) / 2)
        c = np.array([rng.uniform(r[i] + 1, shape[i] - r[i] - 1) for i in range(3)])
        if any(np.linalg.norm(c - c2) < r.max() + r2 + 2 for c2, r2 in placed):
            continue
        inside = sum(((grid[i] - c[i]) / r[i]) ** 2 for i in range(3)) <= 1
        placed.append((c, float(r.max())))
        lab[inside] = len(placed)
    assert len(placed) == n
    return lab


def parse(name: str) -> tuple[str, int]:
    """("yx" | "zx" | "zy" | "plane", index) from the names the pipeline gives its slices."""
    parts = name.split()
    return (parts[-2] if parts[-2] == "plane" else parts[-3]), int(parts[-1])


class SliceOracle:
    """A "perfect 2D network with finite resolution" behind ``iter_predict``.

    For each slice it returns the 2D flows (x5) and +-6 logits of the ground-truth labels as
    they appear on that slice's grid (the labels resampled along Z, nearest, to the number of
    planes the pipeline uses), blurred by ``sigma`` slice pixels. The pipeline's geometry, not
    a model, decides the result. It also records the slices it was given.
    """

    def __init__(self, labels: np.ndarray, sigma: float = 0.0):
        self.labels = labels
        self.sigma = sigma
        self._cache: dict[int, np.ndarray] = {}
        self.calls: list[tuple[str, int, tuple[int, ...]]] = []
        self.pulled = self.yielded = self.max_ahead = 0

    def _lab(self, nz: int) -> np.ndarray:
        if nz not in self._cache:
            self._cache[nz] = V.resample_z(self.labels, nz, order=0)
        return self._cache[nz]

    def iter_predict(self, images, inputs=None, net=None, names=None, progress=False):
        nz_yx = sum(1 for n in names if parse(n)[0] == "yx")
        for name, img in zip(names, images):
            self.pulled += 1
            self.max_ahead = max(self.max_ahead, self.pulled - self.yielded)
            view, i = parse(name)
            self.calls.append((view, i, img.shape))
            if view == "yx":
                m = self._lab(nz_yx)[i]
            elif view == "zx":
                m = self._lab(img.shape[0])[:, i]
            elif view == "zy":
                m = self._lab(img.shape[0])[:, :, i]
            else:  # plane (stitching mode)
                m = self._lab(self.labels.shape[0])[i]
            f = masks_to_flows(m) * 5
            p = np.where(m > 0, 6.0, -6.0).astype(np.float32)
            if self.sigma:
                f = np.stack([gaussian_filter(c, self.sigma) for c in f])
                p = gaussian_filter(p, self.sigma)
            self.yielded += 1
            yield f, p


class ShapeModel:
    """Records the slices' shapes and returns zeros (for axis/shape tests)."""

    def __init__(self):
        self.shapes: list[tuple[str, tuple[int, ...]]] = []

    def iter_predict(self, images, inputs=None, net=None, names=None, progress=False):
        for name, img in zip(names, images):
            self.shapes.append((parse(name)[0], img.shape))
            yield np.zeros((2, *img.shape[:2]), np.float32), np.full(img.shape[:2], -1, np.float32)


@pytest.fixture(scope="module")
def tiny():
    import torch

    from cpsam_toolkit.network.config import get_config
    from cpsam_toolkit.network.model import CPSAMNet
    from cpsam_toolkit.segment import CellposeSAM

    torch.manual_seed(0)
    return CellposeSAM(CPSAMNet(get_config("tiny")), device="cpu", dtype="fp32", name="tiny")


# --------------------------------------------------------------------------------------------
# axes
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "layout, z_axis, channel_axis",
    [("ZYX", 0, None), ("YXZ", 2, None), ("ZCYX", 0, 1), ("ZYXC", 0, -1), ("CZYX", 1, 0)],
)
def test_to_zyxc_layouts(layout, z_axis, channel_axis):
    rng = np.random.default_rng(0)
    zyxc = rng.random((4, 6, 7, 2 if "C" in layout else 1)).astype(np.float32)
    src = zyxc if "C" in layout else zyxc[..., 0]
    order = {"Z": 0, "Y": 1, "X": 2, "C": 3}
    arr = np.transpose(src, [order[a] for a in layout])
    out = V.to_zyxc(arr, z_axis, channel_axis)
    np.testing.assert_array_equal(out, zyxc)


@pytest.mark.parametrize(
    "shape, z_axis, channel_axis, out_shape",
    [((5, 12, 14), 0, None, (5, 12, 14)), ((5, 2, 12, 14), 0, 1, (5, 12, 14)),
     ((5, 12, 14, 3), 0, 3, (5, 12, 14)), ((12, 14, 5), 2, None, (5, 12, 14))],
)
def test_segment_volume_shapes(shape, z_axis, channel_axis, out_shape):
    m = ShapeModel()
    vol = np.random.default_rng(0).random(shape).astype(np.float32)
    res = V.segment_volume(m, vol, z_axis=z_axis, channel_axis=channel_axis)
    assert res.masks.shape == out_shape
    assert res.flows.shape == (3, *out_shape) and res.flows.dtype == np.float32
    assert res.cellprob.shape == out_shape
    nz, ny, nx = out_shape
    nch = 1 if len(shape) == 3 else shape[channel_axis]
    views = [v for v, _ in m.shapes]
    assert views == ["yx"] * nz + ["zx"] * ny + ["zy"] * nx
    assert {s for v, s in m.shapes if v == "yx"} == {(ny, nx, nch)}
    assert {s for v, s in m.shapes if v == "zx"} == {(nz, nx, nch)}
    assert {s for v, s in m.shapes if v == "zy"} == {(nz, ny, nch)}
    assert res.n_objects == 0


def test_anisotropy_resamples_the_network_slices():
    m = ShapeModel()
    vol = np.random.default_rng(0).random((5, 12, 14)).astype(np.float32)
    res = V.segment_volume(m, vol, anisotropy=2.5)
    nz_net = 12  # round(5 * 2.5)
    assert sum(v == "yx" for v, _ in m.shapes) == nz_net
    assert {s for v, s in m.shapes if v == "zx"} == {(nz_net, 14, 1)}
    assert res.masks.shape == res.cellprob.shape == (5, 12, 14)
    assert res.info["nz_net"] == nz_net


def test_errors_name_the_fix(tiny):
    vol = np.zeros((6, 20, 22), np.float32)
    with pytest.raises(ImageInputError, match="z_axis="):
        tiny.segment(vol, do_3d=True)
    with pytest.raises(ImageInputError, match="channel_axis="):
        tiny.segment(np.zeros((6, 2, 20, 22), np.float32), do_3d=True, z_axis=0)
    with pytest.raises(ImageInputError, match="channel_axis=.*3-D"):
        tiny.segment(vol, do_3d=True, z_axis=0, channel_axis=1)
    with pytest.raises(ImageInputError, match="3 dimensions"):
        tiny.segment(np.zeros((20, 22), np.float32), do_3d=True, z_axis=0)
    with pytest.raises(ValueError, match="do_3d=True"):
        tiny.segment(vol, z_axis=0)
    with pytest.raises(ValueError, match="not both"):
        tiny.segment(vol, do_3d=True, z_axis=0, stitch_threshold=0.5)
    with pytest.raises(ImageInputError, match="z_axis=3 is out of range"):
        V.segment_volume(ShapeModel(), vol, z_axis=3)
    with pytest.raises(ImageInputError, match="both 0"):
        V.to_zyxc(np.zeros((6, 2, 20, 22)), 0, 0)
    with pytest.raises(ValueError, match="anisotropy"):
        V.segment_volume(ShapeModel(), vol, anisotropy=0)
    with pytest.raises(ValueError, match="flow3d_smooth"):
        V.segment_volume(ShapeModel(), vol, flow3d_smooth=(1, 2))


def test_segment_do_3d_with_the_real_network(tiny):
    """The full path through CellposeSAM.segment: real tiling, channels, 4-D input."""
    vol = np.random.default_rng(0).random((2, 2, 4, 5)).astype(np.float32)
    both = tiny.segment([vol, vol[::-1]], do_3d=True, z_axis=0, channel_axis=1, anisotropy=1.5,
                        min_size=-1)
    assert len(both) == 2 and all(isinstance(r, V.VolumeResult) for r in both)
    res = both[0]
    assert res.masks.shape == res.cellprob.shape == (2, 4, 5) and res.flows.shape == (3, 2, 4, 5)
    assert np.isfinite(res.flows).all() and np.isfinite(res.cellprob).all()
    assert res.info["nz_net"] == 3


# --------------------------------------------------------------------------------------------
# the 3D pipeline on synthetic volumes
# --------------------------------------------------------------------------------------------
def test_oracle_pipeline_recovers_objects():
    lab = blobs((32, 36, 36), n=6, rmin=5, rmax=7, seed=1)
    img = (lab > 0).astype(np.float32)
    res = V.segment_volume(SliceOracle(lab), img, z_axis=0)
    ap = average_precision(lab, res.masks, [0.5, 0.75])[0]
    assert ap[0] >= 0.9 and ap[1] >= 0.75, ap
    # recompute: post-processing only
    assert np.array_equal(res.recompute().masks, res.masks)
    again = res.recompute(niter=400, flow3d_smooth=1.0)
    assert average_precision(lab, again.masks, 0.5)[0][0] >= 0.9
    obj = res.objects
    assert len(obj["label"]) == res.n_objects and (obj["mean_cellprob"] > 0.9).all()


def test_anisotropy_gives_fewer_broken_objects():
    """Objects 4x thinner in Z: resampling by the anisotropy lets a resolution-limited 2D
    "network" see them in the ZX/ZY slices; ignoring it loses or breaks them."""
    iso = blobs((48, 44, 44), n=6, rmin=6, rmax=8, seed=2)
    gt = V.resample_z(iso, 12, order=0)  # 4x fewer planes: what the microscope records
    img = (gt > 0).astype(np.float32)
    good = V.segment_volume(SliceOracle(iso, sigma=3.0), img, anisotropy=4.0)
    bad = V.segment_volume(SliceOracle(iso, sigma=3.0), img, anisotropy=1.0)
    ap_good = average_precision(gt, good.masks, 0.5)[0][0]
    ap_bad = average_precision(gt, bad.masks, 0.5)[0][0]
    assert ap_good >= 0.9, ap_good
    assert ap_bad <= ap_good - 0.3, (ap_good, ap_bad)
    # tracking on the resampled grid (masks back by nearest neighbour) agrees
    other = good.recompute(dynamics_grid="network")
    assert average_precision(gt, other.masks, 0.5)[0][0] >= 0.9


def test_mean_and_sum_combinations():
    lab = blobs((16, 24, 24), n=2, rmin=3, rmax=4, seed=3)
    mean = V.segment_volume(SliceOracle(lab), lab > 0, combine="mean")
    total = V.segment_volume(SliceOracle(lab), lab > 0, combine="sum")
    np.testing.assert_allclose(total.flows, 2 * mean.flows, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(total.cellprob, 3 * mean.cellprob, rtol=1e-5, atol=1e-5)
    assert np.abs(mean.flows[:, lab > 0]).max() <= 5.0 + 1e-4
    with pytest.raises(ValueError, match="combine"):
        V.segment_volume(SliceOracle(lab), lab > 0, combine="max")


# --------------------------------------------------------------------------------------------
# memory: streaming accumulation
# --------------------------------------------------------------------------------------------
def test_accumulator_matches_dense_combination_in_any_order():
    rng = np.random.default_rng(0)
    nz, ny, nx, nz_net = 5, 7, 6, 13
    yx = rng.standard_normal((3, nz_net, ny, nx)).astype(np.float32)  # [dY, dX, cp] per plane
    zx = rng.standard_normal((3, nz_net, ny, nx)).astype(np.float32)  # [dZ, dX, cp]
    zy = rng.standard_normal((3, nz_net, ny, nx)).astype(np.float32)  # [dZ, dY, cp]
    items = [("yx", k) for k in range(nz_net)] + [("zx", y) for y in range(ny)]
    items += [("zy", x) for x in range(nx)]
    acc = V.FlowAccumulator((nz, ny, nx), nz_net)
    for j in rng.permutation(len(items)):
        v, i = items[j]
        out = yx[:, i] if v == "yx" else zx[:, :, i] if v == "zx" else zy[:, :, :, i]
        acc.add(v, i, out[:2], out[2])
    assert acc.complete
    flows, cp = acc.result()
    dense = np.stack([(zx[0] + zy[0]) / 2, (yx[0] + zy[1]) / 2, (yx[1] + zx[1]) / 2])
    np.testing.assert_allclose(flows, V.resample_z(dense, nz, axis=1), atol=1e-5)
    np.testing.assert_allclose(cp, V.resample_z((yx[2] + zx[2] + zy[2]) / 3, nz), atol=1e-5)
    assert flows.dtype == cp.dtype == np.float32


def test_accumulator_refuses_missing_or_repeated_slices():
    acc = V.FlowAccumulator((2, 3, 4))
    acc.add("yx", 0, np.zeros((2, 3, 4)), np.zeros((3, 4)))
    with pytest.raises(ValueError, match="twice"):
        acc.add("yx", 0, np.zeros((2, 3, 4)), np.zeros((3, 4)))
    with pytest.raises(RuntimeError, match="missing"):
        acc.result()


def test_slices_are_streamed_not_stored(tiny):
    """Slices are cut lazily and each output is folded in as it arrives: with the oracle one
    slice is in flight at a time; through the real tiler at most a batch or so."""
    lab = blobs((12, 24, 24), n=2, rmin=3, rmax=4, seed=4)
    o = SliceOracle(lab)
    V.segment_volume(o, lab > 0, anisotropy=1.5)
    assert o.max_ahead == 1 and o.pulled == 18 + 24 + 24

    made = []
    import cpsam_toolkit.modes.volume as VM

    real = VM._slices

    def counting(vol, nz_net):
        for item in real(vol, nz_net):
            made.append(item[0])
            yield item

    done = []
    inner = tiny.iter_predict

    class Spy:
        def iter_predict(self, *a, **k):
            for out in inner(*a, **k):
                done.append(len(made))
                yield out

    mp = pytest.MonkeyPatch()
    mp.setattr(VM, "_slices", counting)  # the mode module (cpsam_toolkit.volume re-exports it)
    try:
        V.segment_volume(Spy(), np.random.default_rng(0).random((3, 4, 5)), batch_size=2, min_size=-1)
    finally:
        mp.undo()
    assert len(made) == len(done) == 3 + 4 + 5
    ahead = max(n - i for i, n in enumerate(done, start=1))
    assert ahead <= 3, ahead


# --------------------------------------------------------------------------------------------
# stitching
# --------------------------------------------------------------------------------------------
def columns(shape=(12, 40, 40), seed=0) -> np.ndarray:
    """Touching objects made of discs whose centre and radius drift slowly from plane to plane."""
    rng = np.random.default_rng(seed)
    lab = np.zeros(shape, np.int32)
    yy, xx = np.indices(shape[1:])
    k = 0
    for cy in (10, 20, 30):
        for cx in (10, 20, 30):
            k += 1
            z0, z1 = sorted(rng.choice(shape[0] + 1, 2, replace=False))
            if z1 - z0 < 2:
                z1 = min(shape[0], z0 + 3)
            y, x, r = cy, cx, rng.uniform(4, 5.5)
            for z in range(z0, z1):
                y, x = y + rng.uniform(-0.7, 0.7), x + rng.uniform(-0.7, 0.7)
                r = float(np.clip(r + rng.uniform(-0.5, 0.5), 3.5, 6))
                disc = (yy - y) ** 2 + (xx - x) ** 2 <= r * r
                lab[z][disc & (lab[z] == 0)] = k
    return lab


def test_stitch_planes_recovers_3d_ids():
    lab = columns(seed=5)
    rng = np.random.default_rng(0)
    planes = []
    for z in range(lab.shape[0]):  # each plane labelled independently, ids shuffled
        ids = np.unique(lab[z])
        ids = ids[ids > 0]
        lut = np.zeros(lab.max() + 1, np.int32)
        lut[ids] = rng.permutation(len(ids)) + 1 + 100 * z
        planes.append(lut[lab[z]])
    out = V.stitch_planes(planes, 0.25)
    assert out.shape == lab.shape and out.dtype == np.uint16
    assert out.max() == lab.max() and set(np.unique(out)) == set(range(lab.max() + 1))
    # one stitched id per true object and vice versa
    pairs = {(int(a), int(b)) for a, b in zip(lab.ravel(), out.ravel()) if a}
    assert len(pairs) == lab.max() == len({b for _, b in pairs})
    np.testing.assert_array_equal(V.stitch_planes(np.asarray(planes), 0.25), out)


def test_stitch_planes_rules():
    z = np.zeros((4, 10, 10), np.int32)
    z[0, 2:6, 2:6] = 1
    z[1, 2:6, 2:6] = 7          # same place: joined
    z[2, 2:6, 2:4] = 3          # split in two halves: the bigger overlap keeps the id ...
    z[2, 2:6, 4:5] = 4          # ... the smaller gets a new one
    z[3, 7:9, 7:9] = 5          # no overlap: new object
    out = V.stitch_planes(z, 0.25)
    assert out[0, 3, 3] == out[1, 3, 3] == out[2, 3, 2] == 1
    assert out[2, 3, 4] not in (0, 1)
    assert out[3, 8, 8] not in (0, 1, out[2, 3, 4])
    # below the threshold a moved object becomes a new one
    moved = np.zeros((2, 10, 10), np.int32)
    moved[0, 0:4, 0:4] = 1
    moved[1, 2:6, 2:6] = 1  # IoU 4/28
    assert V.stitch_planes(moved, 0.25).max() == 2
    assert V.stitch_planes(moved, 0.1).max() == 1
    # an empty plane breaks objects
    gap = np.zeros((3, 6, 6), np.int32)
    gap[0, 1:4, 1:4] = gap[2, 1:4, 1:4] = 2
    assert V.stitch_planes(gap, 0.5).max() == 2
    with pytest.raises(ValueError, match="iou_threshold"):
        V.stitch_planes(gap, 0)


def test_stitch_mode_through_segment():
    lab = columns(seed=6)
    o = SliceOracle(lab)
    res = V.segment_3d(o, (lab > 0).astype(np.float32), stitch_threshold=0.3, z_axis=0, min_size=-1)
    assert res.flows.shape == (2, *lab.shape) and res.options.stitch_threshold == 0.3
    assert [c[0] for c in o.calls] == ["plane"] * 12
    assert average_precision(lab, res.masks, 0.5)[0][0] >= 0.9


# --------------------------------------------------------------------------------------------
# training slices
# --------------------------------------------------------------------------------------------
def test_slices_from_volume_orientation():
    nz, ny, nx = 4, 6, 7
    zz, yy, xx = np.indices((nz, ny, nx))
    img = (1000 * zz + 10 * yy + xx / 10).astype(np.float32)
    lab = (1 + xx // 3 + 3 * yy // 3).astype(np.int32)
    lab[:, 0, 0] = 0
    pairs = V.slices_from_volume(img, lab, anisotropy=2.0, min_masks=0)
    assert len(pairs) == 8 + ny + nx
    up_img, up_lab = V.resample_z(img, 8), V.resample_z(lab, 8, order=0)
    for k in range(8):
        np.testing.assert_allclose(pairs[k][0], up_img[k])
    for y in range(ny):
        im, m = pairs[8 + y]
        assert im.shape == m.shape == (8, nx)
        np.testing.assert_allclose(im, up_img[:, y, :])
        np.testing.assert_array_equal(m > 0, up_lab[:, y, :] > 0)
    for x in range(nx):
        im, m = pairs[8 + ny + x]
        assert im.shape == (8, ny)
        np.testing.assert_allclose(im, up_img[:, :, x])
    # labels are relabelled 1..N per slice, same partition
    m = pairs[8 + 2][1]
    ref = up_lab[:, 2, :]
    assert m.dtype == np.int32 and set(np.unique(m)) | {0} == set(range(m.max() + 1))
    assert len({(a, b) for a, b in zip(m.ravel(), ref.ravel())}) == len(np.unique(m))
    # channels, z_axis, subsets
    img_c = np.stack([img, img], axis=-1).transpose(1, 2, 0, 3)  # (Y, X, Z, C)
    sub = V.slices_from_volume(img_c, lab.transpose(1, 2, 0), z_axis=2, channel_axis=3,
                               views=["zx"], n_per_view=3, margin=1)
    assert len(sub) == 3 and sub[0][0].shape == (4, nx, 2)
    np.testing.assert_allclose(sub[0][0][..., 1], img[:, 1, :])


def test_slices_from_volume_feed_training():
    from cpsam_toolkit.training.data import TrainingSet

    lab = blobs((10, 24, 24), n=3, rmin=3, rmax=5, seed=7)
    img = gaussian_filter((lab > 0).astype(np.float32), 1) + 0.05
    pairs = V.slices_from_volume(img, lab, anisotropy=2.0, min_masks=1)
    assert pairs and all(int(m.max()) >= 1 for _, m in pairs)
    ts = TrainingSet.build(pairs)
    assert len(ts) == len(pairs)
    assert ts.samples[0].image.shape[1:] == pairs[0][1].shape


# --------------------------------------------------------------------------------------------
# command line
# --------------------------------------------------------------------------------------------
def test_cli_do_3d(tmp_path: Path, tiny):
    from cpsam_toolkit.cli import main
    from cpsam_toolkit.network.checkpoints import save_checkpoint

    save_checkpoint(tiny.net, tmp_path / "tiny.pt")
    vol = (np.random.default_rng(0).random((3, 5, 6)) * 1000).astype(np.uint16)
    tifffile.imwrite(tmp_path / "vol.tif", vol, photometric="minisblack")
    out = tmp_path / "out"
    rc = main(["segment", str(tmp_path / "vol.tif"), "--out", str(out), "--model",
               str(tmp_path / "tiny.pt"), "--do-3d", "--z-axis", "0", "--anisotropy", "0.7",
               "--save-flows", "--no-progress"])
    assert rc == 0
    masks = tifffile.imread(out / "vol_masks.tif")
    assert masks.shape == vol.shape
    assert tifffile.imread(out / "vol_dP.tif").shape == (3, *vol.shape)
    rc = main(["segment", str(tmp_path / "vol.tif"), "--out", str(tmp_path / "o2"), "--model",
               str(tmp_path / "tiny.pt"), "--do-3d", "--no-progress"])
    assert rc == 2  # no --z-axis: a usage error


# --------------------------------------------------------------------------------------------
# agreement with the reference's run_3D
# --------------------------------------------------------------------------------------------
def test_views_match_reference_run_3d(tiny):
    """``combine="sum"`` on an isotropic volume equals cellpose 4.2 ``core.run_3D`` on the same
    network: same slice orientations, same flow components, same sums."""
    import torch

    core = pytest.importorskip("cellpose.core")
    from cpsam_toolkit.network.config import get_config
    from cpsam_toolkit.network.model import CPSAMNet
    from cpsam_toolkit.segment import CellposeSAM

    torch.manual_seed(0)
    net = CPSAMNet(get_config("tiny"))
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0, 0.2)  # random but not near-constant outputs
    model = CellposeSAM(net, device="cpu", dtype="fp32")

    class RefNet(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = net
            self.device, self.dtype = torch.device("cpu"), torch.float32

        def forward(self, x):
            return self.net(x), torch.zeros(x.shape[0], 256)

    vol = np.random.default_rng(2).random((3, 7, 9, 1)).astype(np.float32)
    ref, _ = core.run_3D(RefNet(), vol, batch_size=8, augment=False, tile_overlap=0.1, bsize=256)
    flows, cellprob = V.predict_volume(model, vol, combine="sum")
    np.testing.assert_allclose(flows, np.moveaxis(ref[..., :3], -1, 0), atol=1e-4)
    np.testing.assert_allclose(cellprob, ref[..., 3], atol=1e-4)
