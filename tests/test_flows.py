"""masks → flows: agreement with the reference (cellpose 4.2) and geometric properties."""

from __future__ import annotations

import fastremap
import numpy as np
import pytest
import torch
from conftest import load_pair, stems

from cpsam_toolkit import _jit, flows
from cpsam_toolkit.flows import (
    diffusion_heat,
    diffusion_iterations,
    labels_to_training_targets,
    masks_to_flows,
    object_centres,
)

ref_dyn = pytest.importorskip("cellpose.dynamics")
CPU = torch.device("cpu")
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _angles(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Angle (degrees) between vector fields over the first axis; 0 where both are zero."""
    a = a.reshape(a.shape[0], -1).astype(np.float64)
    b = b.reshape(b.shape[0], -1).astype(np.float64)
    na, nb = np.linalg.norm(a, axis=0), np.linalg.norm(b, axis=0)
    cos = np.where((na == 0) & (nb == 0), 1.0, (a * b).sum(0) / np.maximum(na * nb, 1e-300))
    return np.degrees(np.arccos(np.clip(cos, -1, 1)))


def _agreement(ours: np.ndarray, ref: np.ndarray, masks: np.ndarray) -> dict[str, float]:
    fg = masks > 0
    ang = _angles(ours[:, fg], ref[:, fg])
    return {
        "mean_cos": float(np.cos(np.radians(ang)).mean()),
        "p99_deg": float(np.percentile(ang, 99)),
        "frac_over_1deg": float((ang > 1).mean()),
    }


def _crop(masks: np.ndarray, size: int = 256, y0: int = 0, x0: int = 0) -> np.ndarray:
    out = np.ascontiguousarray(masks[y0 : y0 + size, x0 : x0 + size]).astype(np.uint32)
    return fastremap.renumber(out, in_place=True)[0].astype(np.uint16)


def _stem(data_dir, dataset: str, prefix: str) -> str:
    return next(s for s in stems(data_dir, dataset) if s.startswith(prefix))


@pytest.fixture(scope="module")
def real_masks(data_dir) -> dict[str, np.ndarray]:
    dsb = load_pair(data_dir, "dsb2018_stage1_train_fixed",
                    _stem(data_dir, "dsb2018_stage1_train_fixed", "07fb37aafa66"))[1]
    usi = load_pair(data_dir, "usiigaci_phase_contrast_cells", "set10")[1]
    consep = load_pair(data_dir, "consep_patches256", "train_10_000")[1]
    return {
        "dsb_nuclei": _crop(dsb, 384),
        "usiigaci_phase": _crop(usi, 256, 300, 300),
        "consep_touching": _crop(consep, 256),
    }


@pytest.mark.parametrize("name", ["dsb_nuclei", "usiigaci_phase", "consep_touching"])
def test_matches_reference_on_real_labels(real_masks, name):
    masks = real_masks[name]
    ref, _ = ref_dyn.masks_to_flows_gpu(masks, device=CPU)
    ours = masks_to_flows(masks, device="cpu")
    assert ours.dtype == np.float32 and ours.shape == (2, *masks.shape)
    assert not ours[:, masks == 0].any()
    stats = _agreement(ours, ref, masks)
    # measured (2 CPU, torch 2.14): mean_cos ≥ 0.99999, p99 < 1e-4 deg, ≤ 0.02 % of pixels
    # over 1 deg (pixels whose exact gradient is 0 and whose direction is rounding noise)
    assert stats["mean_cos"] > 0.9999, stats
    assert stats["p99_deg"] < 0.01, stats
    assert stats["frac_over_1deg"] < 1e-3, stats


def test_3d_matches_reference(data_dir):
    masks = load_pair(data_dir, "qcanet_mouse_embryo_3d", "8_cell_stage")[1]
    ref = ref_dyn.masks_to_flows_gpu_3d(masks, device=CPU)
    ours = masks_to_flows(masks, device="cpu")
    assert ours.shape == (3, *masks.shape)
    stats = _agreement(ours, ref, masks)
    assert stats["mean_cos"] > 0.99999 and stats["p99_deg"] < 0.01, stats


@pytest.mark.skipif(not _jit.ready(flows._diffuse_jit[2]), reason="numba is not available")
@pytest.mark.parametrize("name", ["dsb_nuclei", "usiigaci_phase", "consep_touching", "embryo_3d"])
def test_compiled_diffusion_gives_the_same_bits(real_masks, data_dir, monkeypatch, name):
    # the per-object numba kernels repeat the batched NumPy loop's float32 operations in order
    if name == "embryo_3d":
        masks = load_pair(data_dir, "qcanet_mouse_embryo_3d", "8_cell_stage")[1]
    else:
        masks = real_masks[name].astype(np.int32)  # another label dtype than the other tests
    compiled = diffusion_heat(masks, device="cpu")
    monkeypatch.setattr(flows, "_diffuse_jit", {})
    batched = diffusion_heat(masks, device="cpu")
    assert compiled.dtype == torch.float32 and compiled.shape == batched.shape
    assert torch.equal(compiled, batched)
    inner = (slice(1, -1),) * masks.ndim
    assert not compiled[inner][torch.from_numpy(masks == 0)].any()
    assert compiled.sum() > 0


def test_touching_objects_use_the_shared_heat_image():
    # at an edge shared by two objects the central difference reads the other object's heat
    masks = np.zeros((20, 30), np.uint16)
    masks[3:15, 3:12] = 1
    masks[3:15, 12:26] = 2
    masks[15:18, 5:9] = 3
    ref, _ = ref_dyn.masks_to_flows_gpu(masks, device=CPU)
    ours = masks_to_flows(masks, device="cpu")
    np.testing.assert_allclose(ours, ref, atol=1e-4)


def test_centres_match_reference_including_concave_objects():
    masks = np.zeros((40, 40), np.uint16)
    yy, xx = np.mgrid[:40, :40]
    ring = ((yy - 12) ** 2 + (xx - 12) ** 2 <= 81) & ((yy - 12) ** 2 + (xx - 12) ** 2 >= 25)
    masks[ring] = 1
    masks[ring & (xx > 14)] = 0  # a "C": its mean lies in the gap
    masks[25:35, 20:24] = 2
    masks[26:28, 30:39] = 3  # mean x = 34.0, y = 26.5 -> rounds half to even
    masks = fastremap.renumber(masks, in_place=True)[0]
    from scipy.ndimage import find_objects

    slices = find_objects(masks)
    ref_centres, _ = ref_dyn.get_centers(masks, slices)
    labels = np.arange(1, masks.max() + 1)
    starts = np.array([[s.start for s in sl] for sl in slices])
    ours = object_centres(masks, labels, starts)
    np.testing.assert_array_equal(ours, ref_centres)
    assert masks[tuple(ours[0])] == 1


def test_rotation_equivariance():
    # objects symmetric about a pixel, or with means that are not half-integers, so that the
    # centre rule commutes with the rotation
    rng = np.random.default_rng(3)
    masks = np.zeros((96, 128), np.uint16)
    yy, xx = np.mgrid[:96, :128]
    label = 0
    for cy, cx in [(15, 20), (20, 60), (25, 100), (60, 25), (65, 70), (70, 105)]:
        ay, ax = rng.integers(5, 12, 2)
        label += 1
        masks[((yy - cy) / ay) ** 2 + ((xx - cx) / ax) ** 2 <= 1] = label
    masks[40:44, 40:55] = label + 1  # a bar next to an L, both with non-half means
    masks[84:92, 50:53] = label + 2
    masks[89:92, 53:60] = label + 2
    flows = masks_to_flows(masks, device="cpu")
    rot = masks_to_flows(np.rot90(masks), device="cpu")
    # np.rot90: new[i, j] = old[j, W-1-i], so (dY, dX) -> (-dX, dY)
    expected = np.stack([-np.rot90(flows[1]), np.rot90(flows[0])])
    ang = _angles(rot[:, np.rot90(masks) > 0], expected[:, np.rot90(masks) > 0])
    assert np.percentile(ang, 99.9) < 0.01 and (ang > 1).mean() < 1e-3, np.sort(ang)[-5:]


@pytest.mark.parametrize("big", [300, 3_000_000_000])
def test_labels_need_not_be_consecutive(big):
    masks = np.zeros((30, 30), np.uint32)
    masks[2:10, 2:12] = 7
    masks[15:25, 5:20] = big
    renum = fastremap.renumber(masks.copy(), in_place=True)[0]
    flows = masks_to_flows(masks, device="cpu")
    assert np.abs(flows[:, masks > 0]).sum(0).min() > 0.99
    np.testing.assert_array_equal(flows, masks_to_flows(renum, device="cpu"))


def test_empty_tiny_and_bad_inputs():
    assert not masks_to_flows(np.zeros((8, 9), np.uint16)).any()
    one = np.zeros((5, 5), np.int32)
    one[2, 2] = 1
    assert not masks_to_flows(one, device="cpu").any()  # a lone pixel has no gradient
    with pytest.raises(ValueError, match="integer labels"):
        masks_to_flows(np.zeros((4, 4), np.float32))
    with pytest.raises(ValueError, match="2D"):
        masks_to_flows(np.zeros(4, np.uint16))


def test_diffusion_iterations_follow_the_reference_rule():
    starts = np.array([[0, 0], [10, 10]])
    stops = np.array([[5, 7], [30, 12]])
    assert diffusion_iterations(starts, stops) == 2 * max(5 + 7 + 2, 20 + 2 + 2)
    starts3 = np.zeros((1, 3), int)
    assert diffusion_iterations(starts3, np.array([[2, 3, 4]])) == 6 * (2 + 3 + 4 + 3)
    assert diffusion_iterations(np.zeros((0, 2), int), np.zeros((0, 2), int)) == 0


def test_training_targets():
    masks = np.zeros((20, 20), np.uint16)
    masks[3:12, 4:15] = 1
    masks[13:19, 2:8] = 2
    target = labels_to_training_targets(masks, device="cpu")
    assert target.shape == (3, 20, 20) and target.dtype == np.float32
    np.testing.assert_array_equal(target[0], masks > 0)
    np.testing.assert_array_equal(target[1:], masks_to_flows(masks, device="cpu"))
