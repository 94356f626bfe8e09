"""Property tests (hypothesis, small examples): masks -> flows -> masks round trip, dynamics on
arbitrary flow fields, and metric invariants not already in tests/test_metrics.py (which has
perfect-2D, swap, relabel-invariance and agreement with the reference)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cpsam_toolkit import metrics as M
from cpsam_toolkit.dynamics import compute_masks
from cpsam_toolkit.flows import masks_to_flows

SETTINGS = settings(max_examples=25, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
TH = np.array([0.1, 0.3, 0.5, 0.6, 0.75, 0.9, 0.95])


@st.composite
def separated_objects(draw, shape=(64, 64), max_objects=6):
    """Label image of non-overlapping rectangles and disks, each >= 5 px across, 2 px apart."""
    m = np.zeros(shape, np.int32)
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    n = draw(st.integers(0, max_objects))
    lb = 0
    for _ in range(n):
        kind = draw(st.sampled_from(["rect", "disk"]))
        if kind == "rect":
            h, w = draw(st.integers(5, 16)), draw(st.integers(5, 16))
            y0 = draw(st.integers(0, shape[0] - h))
            x0 = draw(st.integers(0, shape[1] - w))
            obj = (yy >= y0) & (yy < y0 + h) & (xx >= x0) & (xx < x0 + w)
        else:
            r = draw(st.integers(3, 8))
            cy = draw(st.integers(r, shape[0] - 1 - r))
            cx = draw(st.integers(r, shape[1] - 1 - r))
            obj = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
        # keep a 2-pixel gap to every object already placed (no touching, no overlap)
        grown = np.zeros_like(obj)
        ys, xs = np.nonzero(obj)
        grown[max(ys.min() - 2, 0): ys.max() + 3, max(xs.min() - 2, 0): xs.max() + 3] = True
        if (m[grown] > 0).any():
            continue
        lb += 1
        m[obj] = lb
    return m


@SETTINGS
@given(separated_objects())
def test_masks_flows_masks_round_trip(m):
    flows = masks_to_flows(m, device="cpu")
    assert flows.shape == (2, *m.shape) and flows.dtype == np.float32
    assert np.isfinite(flows).all()
    norm = np.sqrt((flows**2).sum(0))
    assert np.all(norm[m == 0] == 0) and np.all(norm <= 1 + 1e-4)
    cellprob = np.where(m > 0, 4.0, -4.0).astype(np.float32)
    out = compute_masks(5 * flows, cellprob, min_size=0, device="cpu")
    assert out.dtype == np.uint16 and out.shape == m.shape
    n = int(m.max())
    if n == 0:
        assert out.max() == 0
        return
    ap, tp, fp, fn = M.average_precision(m, out, [0.5])
    assert ap[0] >= 0.9, (ap, tp, fp, fn)


@st.composite
def flow_fields(draw):
    h = draw(st.integers(2, 40))
    w = draw(st.integers(2, 40))
    seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    scale = draw(st.sampled_from([0.0, 0.5, 5.0, 50.0]))
    kind = draw(st.sampled_from(["noise", "sink", "source", "constant"]))
    yy, xx = np.mgrid[:h, :w].astype(np.float32)
    if kind == "noise":
        flows = rng.normal(size=(2, h, w)).astype(np.float32)
    elif kind in ("sink", "source"):
        sign = 1 if kind == "sink" else -1
        cy, cx = rng.uniform(0, h), rng.uniform(0, w)
        flows = sign * np.stack([cy - yy, cx - xx])
    else:
        flows = np.ones((2, h, w), np.float32) * rng.normal(size=(2, 1, 1)).astype(np.float32)
    cellprob = rng.normal(size=(h, w)).astype(np.float32) * draw(st.sampled_from([1.0, 5.0]))
    return (scale * flows).astype(np.float32), cellprob


@SETTINGS
@given(flow_fields(), st.sampled_from([0.0, 0.4, 3.0]), st.sampled_from([0, 15]),
       st.sampled_from([-1.0, 0.0, 2.0]))
def test_dynamics_on_random_flows_never_crashes_and_labels_are_consecutive(
        ff, flow_threshold, min_size, cellprob_threshold):
    flows, cellprob = ff
    out = compute_masks(flows, cellprob, niter=50, flow_threshold=flow_threshold,
                        min_size=min_size, cellprob_threshold=cellprob_threshold,
                        max_size_fraction=1.0, device="cpu")
    assert out.shape == cellprob.shape and out.dtype == np.uint16
    labels = np.unique(out)
    labels = labels[labels > 0]
    np.testing.assert_array_equal(labels, np.arange(1, len(labels) + 1))
    if min_size:
        sizes = np.bincount(out.ravel())[1:]
        assert (sizes >= min_size).all()


# ---------------------------------------------------------------------------------- metrics
@st.composite
def label_volumes(draw, shape=(4, 10, 12)):
    m = np.zeros(shape, np.int32)
    for lb in range(1, draw(st.integers(0, 5)) + 1):
        z0, y0, x0 = (draw(st.integers(0, s - 1)) for s in shape)
        d, h, w = draw(st.integers(1, 3)), draw(st.integers(1, 6)), draw(st.integers(1, 6))
        m[z0: z0 + d, y0: y0 + h, x0: x0 + w] = lb * draw(st.sampled_from([1, 7]))
    return m


@st.composite
def label_images(draw, shape=(20, 24)):
    m = np.zeros(shape, np.int32)
    for lb in range(1, draw(st.integers(0, 7)) + 1):
        y0, x0 = draw(st.integers(0, shape[0] - 2)), draw(st.integers(0, shape[1] - 2))
        h, w = draw(st.integers(1, 9)), draw(st.integers(1, 9))
        m[y0: y0 + h, x0: x0 + w] = lb
    return m


@SETTINGS
@given(label_volumes())
def test_3d_perfect_prediction(m):
    s = M.matching(m, m, TH)
    assert np.all(s.ap == 1) and np.all(s.error_rate == 0) and np.all(s.fp == 0) and np.all(s.fn == 0)
    ap, tp, fp, fn = M.average_precision(m, m, TH)
    assert np.all(ap == 1) and np.all(fp == 0) and np.all(fn == 0)


@SETTINGS
@given(st.one_of(st.tuples(label_images(), label_images()), st.tuples(label_volumes(), label_volumes())))
def test_counts_and_monotonicity_in_the_threshold(pair):
    a, b = pair
    s = M.matching(a, b, TH)
    n_true, n_pred = len(np.unique(a[a > 0])), len(np.unique(b[b > 0]))
    assert s.n_true == n_true and s.n_pred == n_pred
    assert np.all(s.tp >= 0) and np.all(s.fp >= 0) and np.all(s.fn >= 0)
    assert np.all(s.tp + s.fn == n_true) and np.all(s.tp + s.fp == n_pred)
    # a stricter IoU threshold can only lose matches
    assert np.all(np.diff(s.tp) <= 0)
    sc = s.scores()
    for key in ("ap", "precision", "recall", "f1", "pq", "sq"):
        v = sc[key][~np.isnan(sc[key])]
        assert np.all((v >= 0) & (v <= 1 + 1e-12)), key
    for key in ("ap", "precision", "recall", "f1"):  # fixed denominators: follow tp down
        v = sc[key][~np.isnan(sc[key])]
        assert np.all(np.diff(v) <= 1e-12), key
    er = sc["error_rate"]
    er = er[~np.isnan(er)]
    assert np.all(er >= 0) and np.all(np.diff(er) >= -1e-12)
    assert np.all(s.sum_iou <= s.tp + 1e-9) and np.all(s.sum_iou >= TH * s.tp - 1e-9)
    ap, tp, _, _ = M.average_precision(a, b, TH)
    np.testing.assert_array_equal(tp, s.tp)
    assert np.all(np.diff(ap) <= 1e-12)


@SETTINGS
@given(label_images(), label_images())
def test_list_input_pools_counts(a, b):
    ap, tp, fp, fn = M.average_precision([a, b], [b, a], TH)
    assert ap.shape == (2, len(TH))
    np.testing.assert_array_equal(tp[0], tp[1])  # swap symmetry per image in a list
    np.testing.assert_array_equal(fp[0], fn[1])


@pytest.mark.parametrize("shape", [(6, 7), (3, 6, 7)])
def test_empty_vs_empty_is_perfect_in_2d_and_3d(shape):
    z = np.zeros(shape, np.int32)
    s = M.matching(z, z, TH)
    assert np.all(s.ap == 1) and np.all(s.error_rate == 0)
