"""End-to-end: same weights give the same flows and masks as the reference CellposeModel."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import load_pair

import cpsam_toolkit as cp
from cpsam_toolkit.metrics import average_precision
from cpsam_toolkit.network import CPSAMNet, get_config
from cpsam_toolkit.network.checkpoints import load_checkpoint, save_checkpoint
from cpsam_toolkit.segment import CellposeSAM, InputOptions, run_with_oom_fallback

models = pytest.importorskip("cellpose.models")

DSB = "dsb2018_stage1_train_fixed"
DSB_STEM = "0a7d30b252359a10fd298b638b90cb9ada3acced4e0c0e5a3692013f432ee4e9"


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """A reference CellposeModel (fp32, CPU) whose network we set per test."""
    stub = tmp_path_factory.mktemp("ref") / "stub.pt"
    torch.save({"W2": torch.eye(192).reshape(192, 3, 8, 8)}, stub)  # reference loads strict=False
    return models.CellposeModel(gpu=False, pretrained_model=str(stub), use_bfloat16=False)


@pytest.fixture(scope="module")
def pair(reference, tmp_path_factory):
    """(reference, ours) sharing random 2-block ViT-L weights."""
    net = reference.net
    net.encoder.blocks = net.encoder.blocks[:2]
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if "rel_pos" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    path = tmp_path_factory.mktemp("w") / "two_blocks.pt"
    torch.save(net.state_dict(), path)
    ours, _ = load_checkpoint(path)
    return reference, CellposeSAM(ours, device="cpu", dtype="fp32", name="two_blocks")


class BlobNet(torch.nn.Module):
    """A deterministic stand-in network for bright blobs (nuclei): flows ascend the smoothed
    intensity towards blob centres, cellprob is the intensity. Random ViT weights give noise
    flows with no masks; this gives real objects, so mask assembly is compared end to end."""

    def __init__(self) -> None:
        super().__init__()
        self.cfg = get_config("tiny")
        r = torch.arange(-12, 13, dtype=torch.float32)
        g1 = torch.exp(-(r**2) / (2 * 4.0**2))
        self.register_buffer("kernel", (g1[:, None] * g1[None, :] / g1.sum() ** 2)[None, None])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = F.conv2d(x.mean(1, keepdim=True), self.kernel, padding=12)
        p = F.pad(s, (1, 1, 1, 1), mode="replicate")
        gy = p[..., 2:, 1:-1] - p[..., :-2, 1:-1]
        gx = p[..., 1:-1, 2:] - p[..., 1:-1, :-2]
        norm = torch.sqrt(gy**2 + gx**2) + 1e-6
        cellprob = (x.mean(1, keepdim=True) - 0.25) * 12
        return torch.cat([5 * gy / norm, 5 * gx / norm, cellprob], 1)


class _AsReference(torch.nn.Module):
    """The reference's network interface: returns (y, style) and has .device/.dtype."""

    def __init__(self, net: torch.nn.Module) -> None:
        super().__init__()
        self.inner = net
        self.device = torch.device("cpu")
        self.dtype = torch.float32

    def forward(self, x):
        return self.inner(x), torch.zeros(x.shape[0], 256)


@pytest.fixture(scope="module")
def blob_pair(reference):
    return reference, _AsReference(BlobNet()), CellposeSAM(BlobNet(), device="cpu", dtype="fp32")


def test_same_masks_as_reference_end_to_end(blob_pair, data_dir, monkeypatch):
    ref, ref_net, ours = blob_pair
    monkeypatch.setattr(ref, "net", ref_net)
    img, gt = load_pair(data_dir, DSB, DSB_STEM)
    rmasks, rflows, _ = ref.eval(img, channel_axis=-1)
    res = ours.segment(img, channel_axis=-1)
    np.testing.assert_allclose(res.flows, rflows[1], atol=1e-4)
    n_ref = int(rmasks.max())
    assert n_ref >= 0.5 * gt.max(), "the stand-in network should find most nuclei"
    ap = average_precision(rmasks, res.masks, thresholds=[0.5])[0][0]
    assert ap >= 0.99
    assert abs(int(res.masks.max()) - n_ref) <= max(1, round(0.01 * n_ref))


def test_same_weights_same_network_outputs_as_reference(pair, data_dir):
    ref, ours = pair
    img, _ = load_pair(data_dir, DSB, DSB_STEM)
    img = img[:300, :300]
    _, rflows, _ = ref.eval(img, channel_axis=-1, batch_size=8, compute_masks=False)
    res = next(ours.iter_predict([img], InputOptions(channel_axis=-1)))
    np.testing.assert_allclose(res[0], rflows[1], atol=1e-3)
    np.testing.assert_allclose(res[1], rflows[2], atol=1e-3)


def test_list_input_equals_single_images(blob_pair, data_dir):
    ours = blob_pair[2]
    img, _ = load_pair(data_dir, DSB, DSB_STEM)
    crops = [img[:200, :300], img[50:330, 20:200]]
    together = ours.segment(crops, channel_axis=-1, batch_size=3)
    for crop, r in zip(crops, together):
        alone = ours.segment(crop, channel_axis=-1)
        np.testing.assert_array_equal(alone.masks, r.masks)


def test_recompute_equals_fresh_run(blob_pair, data_dir):
    ours = blob_pair[2]
    img, _ = load_pair(data_dir, DSB, DSB_STEM)
    img = img[:256, :256]
    base = ours.segment(img, channel_axis=-1)
    fresh = ours.segment(img, channel_axis=-1, cellprob_threshold=1.0, flow_threshold=0.8)
    again = base.recompute(cellprob_threshold=1.0, flow_threshold=0.8)
    assert base.n_objects > 0 and again.n_objects > 0
    np.testing.assert_array_equal(fresh.masks, again.masks)
    assert again.options.cellprob_threshold == 1.0


def test_object_table(blob_pair, data_dir):
    ours = blob_pair[2]
    img, _ = load_pair(data_dir, DSB, DSB_STEM)
    res = ours.segment(img[:256, :256], channel_axis=-1)
    t = res.objects
    n = res.n_objects
    assert n > 0 and all(len(v) == n for v in t.values())
    lab = 3 if n >= 3 else 1
    yy, xx = np.nonzero(res.masks == lab)
    assert t["area"][lab - 1] == len(yy)
    assert t["centroid_y"][lab - 1] == pytest.approx(yy.mean())
    assert t["centroid_x"][lab - 1] == pytest.approx(xx.mean())
    assert np.all((t["mean_cellprob"] > 0) & (t["mean_cellprob"] <= 1))
    assert np.all(np.isfinite(t["flow_error"]) & (t["flow_error"] >= 0))


def test_diameter_resizes_and_maps_back(blob_pair, data_dir):
    ours = blob_pair[2]
    img, _ = load_pair(data_dir, DSB, DSB_STEM)
    res = ours.segment(img[:200, :240], channel_axis=-1, diameter=60)
    assert res.masks.shape == (200, 240) and res.flows.shape == (2, 200, 240)
    with pytest.raises(ValueError, match="diameter"):
        ours.segment(img[:200, :240], channel_axis=-1, diameter=-5)


def test_oom_fallback_halves_batches():
    calls = []

    def fn(x):
        calls.append(len(x))
        if len(x) > 2:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return x * 2

    x = np.arange(7, dtype=np.float32)[:, None]
    with pytest.warns(UserWarning, match="batch_size=2"):
        y, used = run_with_oom_fallback(fn, x, 8)
    np.testing.assert_array_equal(y, x * 2)
    assert used == 2 and calls[:2] == [7, 4]

    def never(x):
        raise RuntimeError("out of memory")

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(MemoryError, match="single tile"):
            run_with_oom_fallback(never, x, 4)

    def other(x):
        raise RuntimeError("shape mismatch")

    with pytest.raises(RuntimeError, match="shape mismatch"):
        run_with_oom_fallback(other, x, 4)


def test_load_model_by_path_and_default_choice(tmp_path, monkeypatch):
    path = tmp_path / "tiny.pt"
    save_checkpoint(CPSAMNet(get_config("tiny")), path, meta={"note": "test"})
    m = cp.load_model(path, device="cpu")
    assert m.name == "tiny.pt" and m.info["format"] == "cpsam-toolkit"
    assert m.net.cfg.width == get_config("tiny").width

    from cpsam_toolkit.segment import default_model_name

    monkeypatch.setenv("CPSAM_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("CELLPOSE_LOCAL_MODELS_PATH", raising=False)
    assert default_model_name() == "cpsam_toolkit_small"
    (tmp_path / "home" / ".cellpose" / "models").mkdir(parents=True)
    (tmp_path / "home" / ".cellpose" / "models" / "cpsam").write_bytes(b"x")
    assert default_model_name() == "cpsam"
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "cpsam_v2").write_bytes(b"x")
    assert default_model_name() == "cpsam_v2"


def test_device_and_dtype_errors():
    net = CPSAMNet(get_config("tiny"))
    with pytest.raises(ValueError, match="unknown dtype"):
        CellposeSAM(net, device="cpu", dtype="int8")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            CellposeSAM(net, device="cuda")
    m = CellposeSAM(net, device="cpu", dtype="bf16")
    out = m.segment(np.random.default_rng(0).random((64, 64)))
    assert out.flows.dtype == np.float32


def test_net_rejects_wrong_tile_shape():
    net = CPSAMNet(get_config("tiny"))
    with pytest.raises(ValueError, match="tile the image first"):
        net(torch.zeros(1, 3, 100, 100))


def test_staged_recompute_equals_compute_masks(blob_pair, data_dir):
    from cpsam_toolkit import dynamics

    ours = blob_pair[2]
    img, _ = load_pair(data_dir, DSB, DSB_STEM)
    base = ours.segment(img[:300, :300], channel_axis=-1)
    settings = [(0.0, 0.2, 15), (0.0, 0.8, 40), (0.0, 0.0, 0), (-1.0, 0.4, 15), (0.0, 0.4, 15)]
    for cp_thr, flow_thr, min_size in settings:
        r = base.recompute(cellprob_threshold=cp_thr, flow_threshold=flow_thr, min_size=min_size)
        fresh = dynamics.compute_masks(base.flows, base.cellprob, cellprob_threshold=cp_thr,
                                       flow_threshold=flow_thr, min_size=min_size)
        np.testing.assert_array_equal(r.masks, fresh)
    assert len(base._stages) == 2  # tracked once per cellprob threshold
