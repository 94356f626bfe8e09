"""flows → masks: equivalence with the reference (cellpose 4.2) and the building blocks."""

from __future__ import annotations

import fastremap
import numpy as np
import pytest
import torch
from conftest import load_pair, stems
from scipy.optimize import linear_sum_assignment

from cpsam_toolkit import _jit, dynamics
from cpsam_toolkit.dynamics import (
    compute_masks,
    fill_holes_and_remove_small_masks,
    flow_errors,
    follow_flows,
    get_masks,
    remove_bad_flow_masks,
)
from cpsam_toolkit.flows import masks_to_flows

pytestmark = [
    pytest.mark.filterwarnings("ignore:Sparse invariant checks:UserWarning"),
    pytest.mark.usefixtures("one_torch_thread"),
]

ref_dyn = pytest.importorskip("cellpose.dynamics")
ref_utils = pytest.importorskip("cellpose.utils")
CPU = torch.device("cpu")


# ---------------------------------------------------------------- helpers


def ap_at_05(true: np.ndarray, pred: np.ndarray) -> float:
    """Average precision at IoU 0.5: TP / (TP + FP + FN), optimal one-to-one matching."""
    nt, np_ = int(true.max()), int(pred.max())
    if nt == 0 and np_ == 0:
        return 1.0
    overlap = np.zeros((nt + 1, np_ + 1), np.int64)
    np.add.at(overlap, (true.ravel(), pred.ravel()), 1)
    inter = overlap[1:, 1:]
    area_t, area_p = overlap.sum(1)[1:], overlap.sum(0)[1:]
    iou = inter / np.maximum(area_t[:, None] + area_p[None, :] - inter, 1)
    rows, cols = linear_sum_assignment(-iou)
    tp = int((iou[rows, cols] >= 0.5).sum())
    return tp / (nt + np_ - tp)


def reference_masks(flows, cellprob, *, flow_threshold=0.4, min_size=15, do_3D=False):
    masks = ref_dyn.compute_masks(flows, cellprob, niter=200, cellprob_threshold=0.0,
                                  flow_threshold=flow_threshold, do_3D=do_3D, device=CPU)
    return ref_utils.fill_holes_and_remove_small_masks(masks, min_size=min_size)


def network_like(masks: np.ndarray, noise: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Flows 5x the masks' flows and cellprob +-4 logits, plus Gaussian noise."""
    rng = np.random.default_rng(seed)
    mu = masks_to_flows(masks, device="cpu")
    flows = (5 * mu + noise * rng.standard_normal(mu.shape)).astype(np.float32)
    cellprob = (np.where(masks > 0, 4.0, -4.0) + noise * rng.standard_normal(masks.shape))
    return flows, cellprob.astype(np.float32)


def disks(shape=(256, 256), n=25, rmin=6, rmax=14, seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    masks = np.zeros(shape, np.uint16)
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    placed: list[tuple[float, float, float]] = []
    while len(placed) < n:
        r = rng.uniform(rmin, rmax)
        cy, cx = rng.uniform(r, shape[0] - r), rng.uniform(r, shape[1] - r)
        if all((cy - a) ** 2 + (cx - b) ** 2 > (r + c + 1) ** 2 for a, b, c in placed):
            placed.append((cy, cx, r))
            masks[(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] = len(placed)
    return masks


def crop(masks: np.ndarray, size: int, y0: int = 0, x0: int = 0) -> np.ndarray:
    out = np.ascontiguousarray(masks[y0 : y0 + size, x0 : x0 + size]).astype(np.uint32)
    return fastremap.renumber(out, in_place=True)[0].astype(np.uint16)


def raster_ordered(masks: np.ndarray) -> bool:
    labels = masks.ravel()[np.sort(np.unique(masks.ravel(), return_index=True)[1])]
    labels = labels[labels > 0]
    return bool(np.array_equal(labels, np.arange(1, len(labels) + 1)))


@pytest.fixture(scope="module")
def real_cases(data_dir) -> dict[str, np.ndarray]:
    dataset = "dsb2018_stage1_train_fixed"
    stem = next(s for s in stems(data_dir, dataset) if s.startswith("07fb37aafa66"))
    dsb = load_pair(data_dir, dataset, stem)[1]
    usi = load_pair(data_dir, "usiigaci_phase_contrast_cells", "set10")[1]
    return {"dsb_nuclei": crop(dsb, 320, 100, 200), "usiigaci_phase": crop(usi, 256, 300, 300),
            "synthetic_disks": disks()}


# ---------------------------------------------------------------- equivalence


@pytest.mark.parametrize("noise", [0.0, 1.0])
@pytest.mark.parametrize("name", ["dsb_nuclei", "usiigaci_phase", "synthetic_disks"])
def test_compute_masks_matches_reference(real_cases, name, noise):
    gt = real_cases[name]
    flows, cellprob = network_like(gt, noise, seed=1)
    ref = reference_masks(flows, cellprob)
    ours = compute_masks(flows, cellprob, device="cpu")
    assert ours.dtype == np.uint16 and ours.shape == gt.shape
    assert ref.max() > 5
    assert ap_at_05(ref, ours) >= 0.99
    assert abs(int(ours.max()) - int(ref.max())) <= 0.01 * ref.max()
    # in practice they are identical, label for label
    assert np.mean(ours == ref) > 0.999
    assert raster_ordered(ours)
    assert ap_at_05(gt, ours) > 0.8  # and they are good masks


def test_quality_control_removes_the_same_masks(real_cases):
    gt = real_cases["synthetic_disks"]
    flows, cellprob = network_like(gt, 0.3, seed=2)
    rng = np.random.default_rng(5)
    flows[:, :128, :128] = 5 * rng.standard_normal((2, 128, 128))  # garbage flows
    no_qc = compute_masks(flows, cellprob, flow_threshold=0.0, device="cpu")
    ours = compute_masks(flows, cellprob, device="cpu")
    ref = reference_masks(flows, cellprob)
    assert ours.max() < no_qc.max()  # the QC did something here
    np.testing.assert_array_equal(ours, ref)


def test_follow_flows_is_bit_exact(real_cases):
    gt = real_cases["dsb_nuclei"]
    flows, cellprob = network_like(gt, 1.0, seed=3)
    fg = cellprob > 0
    inds = np.nonzero(fg)
    step = flows * fg / 5.0
    ref = ref_dyn.follow_flows(step, inds, niter=200, device=CPU).int()
    merged = follow_flows(step, inds, niter=200, device="cpu")
    plain = follow_flows(step, inds, niter=200, device="cpu", dedupe=False)
    assert merged.dtype == torch.int32 and merged.shape == (2, len(inds[0]))
    assert torch.equal(merged, ref) and torch.equal(plain, ref)


@pytest.mark.parametrize("compiled", [True, False])
def test_follow_flows_in_chunks_with_or_without_numba_is_bit_exact(real_cases, monkeypatch, compiled):
    # CPU tracking runs in chunks of points (merges stay within a chunk) with numba kernels for
    # the update and the merge; neither may change a bit
    gt = real_cases["usiigaci_phase"]
    flows, cellprob = network_like(gt, 1.0, seed=4)
    fg = cellprob > 0
    inds = np.nonzero(fg)
    step = flows * fg / 5.0
    ref = ref_dyn.follow_flows(step, inds, niter=200, device=CPU).int()
    monkeypatch.setattr(dynamics, "_CPU_CHUNK", 3000)
    if not compiled:
        monkeypatch.setattr(dynamics, "_add_clip", None)
        monkeypatch.setattr(dynamics, "_dedupe_cpu", None)
    elif not _jit.ready(dynamics._add_clip):
        pytest.skip("numba is not available")
    assert torch.equal(follow_flows(step, inds, niter=200, device="cpu"), ref)


@pytest.mark.skipif(not _jit.ready(dynamics._dedupe_cpu), reason="numba is not available")
def test_compiled_merge_is_exact():
    rng = np.random.default_rng(0)
    pos = rng.integers(-3, 4, (2, 5000)).astype(np.float32) / 4  # many exact duplicates
    pos[:, :3] = [[0.0, -0.0, 0.0], [0.5, 0.5, 0.5]]  # -0.0 differs in bits: kept apart
    remap, kept = dynamics._dedupe_cpu(pos)
    merged = pos[:, kept]
    assert len(kept) == len(np.unique(pos.view(np.uint32), axis=1).T)
    np.testing.assert_array_equal(merged[:, remap].view(np.uint32), pos.view(np.uint32))
    assert remap[0] == remap[2] != remap[1]


def test_3d_matches_reference(data_dir):
    gt = load_pair(data_dir, "qcanet_mouse_embryo_3d", "8_cell_stage")[1]
    rng = np.random.default_rng(0)
    # 3D network flows are the sum of 2 views per axis (about 10x unit vectors)
    flows = (10 * masks_to_flows(gt, device="cpu")
             + 0.5 * rng.standard_normal((3, *gt.shape))).astype(np.float32)
    cellprob = np.where(gt > 0, 6.0, -6.0).astype(np.float32)
    ref = reference_masks(flows, cellprob, do_3D=True)
    ours = compute_masks(flows, cellprob, device="cpu")
    np.testing.assert_array_equal(ours, ref)
    assert ap_at_05(gt, ours) == 1.0


def test_3d_synthetic_balls():
    zz, yy, xx = np.mgrid[:20, :40, :40]
    gt = np.zeros((20, 40, 40), np.uint16)
    for i, (cz, cy, cx, r) in enumerate([(10, 10, 10, 6), (9, 28, 12, 7), (10, 20, 30, 8)]):
        gt[(zz - cz) ** 2 + (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] = i + 1
    flows = 10 * masks_to_flows(gt, device="cpu")
    cellprob = np.where(gt > 0, 6.0, -6.0)
    ours = compute_masks(flows, cellprob, device="cpu")
    assert ours.shape == gt.shape and ours.max() == 3
    assert ap_at_05(gt, ours) == 1.0


# ---------------------------------------------------------------- edge cases


def test_nothing_above_threshold_gives_zeros():
    flows = np.zeros((2, 32, 40), np.float32)
    out = compute_masks(flows, np.full((32, 40), -3.0, np.float32), device="cpu")
    assert out.shape == (32, 40) and out.dtype == np.uint16 and not out.any()
    out3 = compute_masks(np.zeros((3, 4, 8, 8)), np.zeros((4, 8, 8)), device="cpu")
    assert out3.shape == (4, 8, 8) and not out3.any()


def test_no_seeds_gives_zeros():
    # every pixel stays where it is: one pixel per histogram bin, so no bin has > 10 pixels
    out = compute_masks(np.zeros((2, 32, 32), np.float32), np.ones((32, 32), np.float32),
                        device="cpu")
    assert out.dtype == np.uint16 and not out.any()


def test_shape_errors():
    with pytest.raises(ValueError, match="differ"):
        compute_masks(np.zeros((2, 8, 8)), np.zeros((8, 9)))
    with pytest.raises(ValueError, match="must be"):
        compute_masks(np.zeros((3, 8, 8)), np.zeros((8, 8)))


def test_more_than_65535_masks_switch_to_uint32():
    # 265 x 265 seed bins 3 apart, 11 pixels converging on each
    side = 265
    grid = np.stack(np.meshgrid(np.arange(side) * 3, np.arange(side) * 3, indexing="ij"))
    p_final = np.repeat(grid.reshape(2, -1), 11, axis=1)
    shape = (1000, 1000)
    inds = np.unravel_index(np.arange(p_final.shape[1]), shape)
    masks = get_masks(torch.from_numpy(p_final), inds, shape, max_size_fraction=0.4)
    assert masks.dtype == np.uint32 and masks.max() == side * side
    assert raster_ordered(masks)
    kept = fill_holes_and_remove_small_masks(masks, min_size=11)
    assert kept.dtype == np.uint32 and kept.max() == side * side
    assert fill_holes_and_remove_small_masks(masks, min_size=12).dtype == np.uint16


def test_get_masks_removes_too_big_masks():
    shape = (40, 40)
    inds = np.nonzero(np.ones(shape, bool))
    p_final = np.zeros((2, 1600), np.int64)
    p_final[:, :1000] = 10  # 1000 pixels converge on (10, 10): 62 % of the image
    p_final[:, 1000:] = 30
    masks = get_masks(p_final, inds, shape, max_size_fraction=0.4)
    assert masks.max() == 1 and (masks == 1).sum() == 600
    assert get_masks(p_final, inds, shape, max_size_fraction=0.7).max() == 2


# ---------------------------------------------------------------- QC and holes


def test_flow_errors_index_by_label():
    gt = disks((96, 96), n=4, seed=4)
    mu = masks_to_flows(gt, device="cpu")
    flows = 5 * mu
    flows[:, gt == 2] *= -1  # reversed flows: error (2 mu)^2 = 4
    err = flow_errors(gt, flows, device="cpu")
    assert err.shape == (4,)
    np.testing.assert_allclose(err[[0, 2, 3]], 0, atol=1e-10)
    assert err[1] == pytest.approx(4.0, rel=1e-6)
    ref_err, _ = ref_dyn.flow_error(gt, flows, device=CPU)
    np.testing.assert_allclose(err, ref_err, atol=1e-6)
    cleaned = remove_bad_flow_masks(gt, flows, threshold=0.4, device="cpu")
    assert cleaned.max() == 3 and not cleaned[gt == 2].any()


def test_fill_holes_and_small_masks_match_reference():
    masks = np.zeros((60, 60), np.uint16)
    yy, xx = np.mgrid[:60, :60]
    d2 = (yy - 20) ** 2 + (xx - 20) ** 2
    masks[(d2 <= 144) & (d2 >= 16)] = 3  # ring with a hole ...
    masks[19:22, 19:22] = 1  # ... holding a small mask, which the fill covers
    masks[40:50, 40:45] = 2
    masks[45:48, 41:44] = 0  # an enclosed hole
    masks[5:8, 50:53] = 4  # 9 px: too small
    masks[52:58, 5:12] = 7
    for min_size in (15, 5):
        ref = ref_utils.fill_holes_and_remove_small_masks(masks.copy(), min_size=min_size)
        ours = fill_holes_and_remove_small_masks(masks, min_size=min_size)
        np.testing.assert_array_equal(ours, ref)
    out = fill_holes_and_remove_small_masks(masks, min_size=15)
    assert out.max() == 3 and (out == out[20, 20]).sum() == (d2 <= 144).sum()


def test_fill_holes_matches_reference_on_random_labels():
    from scipy import ndimage

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:48, :48]
    nested = 0
    for _ in range(60):
        field = ndimage.gaussian_filter(rng.random((48, 48)), rng.uniform(0.5, 2))
        labels = ndimage.label(field > np.quantile(field, rng.uniform(0.3, 0.7)))[0]
        labels = labels.astype(np.uint16)
        cy, cx = rng.integers(8, 40, 2)
        d2 = (yy - cy) ** 2 + (xx - cx) ** 2
        labels[(d2 <= 49) & (d2 >= 9)] = labels.max() + 1  # a ring ...
        if rng.random() < 0.5:  # ... sometimes with a mask in its hole
            labels[cy - 1 : cy + 1, cx - 1 : cx + 1] = labels.max() + 1
            nested += 1
        perm = np.concatenate([[0], rng.permutation(int(labels.max())) + 1]).astype(np.uint16)
        labels = perm[labels]
        for min_size in (15, 3):
            ref = ref_utils.fill_holes_and_remove_small_masks(labels.copy(), min_size=min_size)
            np.testing.assert_array_equal(fill_holes_and_remove_small_masks(labels, min_size), ref)
    assert nested > 10


# ---------------------------------------------------------------- staged results and threads


@pytest.mark.parametrize("name", ["dsb_nuclei", "usiigaci_phase"])
def test_staged_masks_equal_compute_masks_and_carry_the_qc_errors(real_cases, name):
    """segment()/recompute() go through staged_masks: same labels as compute_masks, and the
    per-object flow error is the one the QC compared with the threshold."""
    from cpsam_toolkit.segment import MaskOptions, SegmentationResult, staged_masks, tracked_masks

    flows, cellprob = network_like(real_cases[name], noise=2.0, seed=3)
    stages: dict = {}
    for opts in (MaskOptions(), MaskOptions(flow_threshold=0.2), MaskOptions(cellprob_threshold=1.0),
                 MaskOptions(min_size=60), MaskOptions(flow_threshold=0)):
        masks, qc = staged_masks(flows, cellprob, opts, stages)
        ref = compute_masks(flows, cellprob, cellprob_threshold=opts.cellprob_threshold,
                            flow_threshold=opts.flow_threshold, min_size=opts.min_size)
        assert np.array_equal(masks, ref), opts
        if opts.flow_threshold == 0:
            assert qc is None
            continue
        raw = tracked_masks(flows, cellprob, opts)
        err = flow_errors(raw, flows)
        assert len(qc) == masks.max() and np.all(qc <= opts.flow_threshold)
        for label in range(1, int(masks.max()) + 1):  # the tracked mask each object came from
            src = np.bincount(raw[masks == label]).argmax()
            assert qc[label - 1] == err[src - 1]
        table = SegmentationResult(masks, flows, cellprob, opts, _qc=qc).objects
        assert np.array_equal(table["flow_error"], qc)
    # a result without QC errors computes them from its own masks
    plain = SegmentationResult(ref, flows, cellprob).objects["flow_error"]
    assert np.allclose(plain, flow_errors(ref, flows), equal_nan=True)


def test_one_cpu_thread_is_restored():
    from cpsam_toolkit.device import one_cpu_thread

    n = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with one_cpu_thread():
            assert torch.get_num_threads() == 1
        assert torch.get_num_threads() == 2
        with pytest.raises(ValueError), one_cpu_thread():  # restored after an error too
            raise ValueError
        assert torch.get_num_threads() == 2
        compute_masks(*network_like(disks((64, 64), n=3, rmin=5, rmax=8), noise=0.0, seed=0))
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(n)
