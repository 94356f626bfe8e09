"""Panoptic (class) head: initialisation, class targets, augmentation, majority vote, checkpoints,
training on real CoNSeP patches."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from cpsam_toolkit import panoptic as P
from cpsam_toolkit.network import CPSAMNet, get_config
from cpsam_toolkit.network.checkpoints import load_checkpoint, save_checkpoint
from cpsam_toolkit.training.augment import AugmentConfig, augment_sample

CONSEP = Path(__file__).resolve().parents[2] / "shared" / "data" / "consep_patches256" / "train"
NAMES = ("epithelial", "inflammatory", "miscellaneous", "spindle_shaped")
needs_consep = pytest.mark.skipif(not CONSEP.is_dir(), reason="shared CoNSeP patches not available")


def _tiny(seed: int = 0) -> CPSAMNet:
    torch.manual_seed(seed)
    return CPSAMNet(get_config("tiny")).eval()


# ----------------------------------------------------------------------------- network


def test_init_rule_weights_and_outputs():
    base = _tiny()
    before = {k: v.clone() for k, v in base.state_dict().items()}
    net = P.make_panoptic(base, ["a", "b", "c"]).eval()
    p2 = base.cfg.patch**2
    assert net.cfg.nout == 3 + 1 + 3
    assert net.cfg.class_names == ("background", "a", "b", "c")
    assert P.object_classes(net) == ("a", "b", "c") and P.is_panoptic(net) and not P.is_panoptic(base)
    w, b = net.out.weight.detach(), net.out.bias.detach()
    cw, cb = base.out.weight.detach()[-p2:], base.out.bias.detach()[-p2:]
    torch.testing.assert_close(w[:p2], -0.5 * cw)
    torch.testing.assert_close(b[:p2], -0.5 * cb)
    for k in (1, 2, 3):
        torch.testing.assert_close(w[k * p2 : (k + 1) * p2], 0.5 * cw)
        torch.testing.assert_close(b[k * p2 : (k + 1) * p2], 0.5 * cb)
    torch.testing.assert_close(w[-3 * p2 :], base.out.weight.detach())  # flows + cellprob kept
    torch.testing.assert_close(b[-3 * p2 :], base.out.bias.detach())
    for k, v in base.state_dict().items():  # the base network is not modified
        assert torch.equal(v, before[k]), k
    x = torch.rand(2, 3, 256, 256, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        yb, yp = base(x), net(x)
    assert yp.shape == (2, 7, 256, 256)
    torch.testing.assert_close(yp[:, -3:], yb, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(yp[:, 0], -0.5 * yb[:, -1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(yp[:, 2], 0.5 * yb[:, -1], atol=1e-5, rtol=1e-5)


def test_make_panoptic_from_preset_and_bad_names():
    net = P.make_panoptic("tiny", ["x"])
    assert net.cfg.nout == 5 and net.cfg.width == get_config("tiny").width
    again = P.make_panoptic(net, ["p", "q"])  # re-headed from a panoptic net: flows kept
    torch.testing.assert_close(again.out.weight[-3 * 64 :], net.out.weight[-3 * 64 :])
    with pytest.raises(ValueError, match="reserved"):
        P.make_panoptic("tiny", ["background", "x"])
    with pytest.raises(ValueError, match="unique"):
        P.make_panoptic("tiny", ["x", "x"])
    with pytest.raises(ValueError, match="empty"):
        P.make_panoptic("tiny", [])
    with pytest.raises(TypeError):
        P.make_panoptic("tiny", "x")


# ----------------------------------------------------------------------------- targets


def test_class_targets_and_clear_errors(tmp_path):
    masks = np.array([[0, 1, 1], [2, 2, 0], [0, 3, 3]], np.uint16)
    t = P.class_target(masks, {"1": "b", "2": "a", "3": "b", "9": "a"}, ["a", "b"], "x.json")
    np.testing.assert_array_equal(t, [[0, 2, 2], [1, 1, 0], [0, 2, 2]])
    assert t.dtype == np.uint8
    with pytest.raises(P.ClassFileError, match=r"x_classes\.json.*no class.*\[3\]"):
        P.class_target(masks, {"1": "a", "2": "a"}, ["a", "b"], "x_classes.json")
    with pytest.raises(P.ClassFileError, match=r"x_classes\.json.*'tumour'.*not among"):
        P.class_target(masks, {"1": "a", "2": "a", "3": "tumour"}, ["a", "b"], "x_classes.json")

    bad = tmp_path / "bad_classes.json"
    bad.write_text("{not json")
    with pytest.raises(P.ClassFileError, match="bad_classes.json.*not valid JSON"):
        P.read_classes(bad)
    bad.write_text(json.dumps({"one": "a"}))
    with pytest.raises(P.ClassFileError, match="bad_classes.json.*'one' is not an instance id"):
        P.read_classes(bad)
    with pytest.raises(P.ClassFileError, match="nothere_classes.json.*not found"):
        P.read_classes(tmp_path / "nothere_classes.json")


def test_load_panoptic_folder_errors_name_the_file(tmp_path):
    import tifffile

    img = np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8)
    m = np.zeros((32, 32), np.uint16)
    m[2:8, 2:8], m[10:20, 10:20] = 5, 7  # non-consecutive ids: renumbered by validation
    tifffile.imwrite(tmp_path / "s1_img.tif", img)
    tifffile.imwrite(tmp_path / "s1_masks.tif", m)
    with pytest.raises(P.ClassFileError, match=r"s1_classes\.json.*not found"):
        P.load_panoptic(tmp_path)
    (tmp_path / "s1_classes.json").write_text(json.dumps({"5": "a"}))
    with pytest.raises(P.ClassFileError, match=r"s1_classes\.json.*\[7\]"):
        P.load_panoptic(tmp_path)
    (tmp_path / "s1_classes.json").write_text(json.dumps({"5": "a", "7": "weird"}))
    with pytest.raises(P.ClassFileError, match=r"s1_classes\.json.*'weird'"):
        P.load_panoptic(tmp_path, ["a", "b"])
    (tmp_path / "s1_classes.json").write_text(json.dumps({"5": "b", "7": "a"}))
    pd = P.load_panoptic(tmp_path, ["a", "b"])
    cm = pd.class_map(0)
    assert set(np.unique(cm)) == {0, 1, 2}
    assert (cm[2:8, 2:8] == 2).all() and (cm[10:20, 10:20] == 1).all()
    np.testing.assert_array_equal(pd.pixel_counts(), [32 * 32 - 136, 100, 36])
    w = pd.class_weights()  # inverse frequency: rarer class, larger weight
    tifffile.imwrite(tmp_path / "s2_img.tif", img)  # a label image that is not instance ids
    tifffile.imwrite(tmp_path / "s2_masks.tif", np.full((32, 32), 0.5, np.float32))
    (tmp_path / "s2_classes.json").write_text("{}")
    with pytest.raises(P.LabelError, match=r"s2_masks\.tif"):
        P.load_panoptic(tmp_path, ["a", "b"])
    assert w[2] > w[1] > w[0]
    np.testing.assert_allclose((w * pd.pixel_counts()).sum() / pd.pixel_counts().sum(), 1.0, rtol=1e-6)


# ----------------------------------------------------------------------------- augmentation


@needs_consep
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_augmentation_carries_class_maps(seed):
    from cpsam_toolkit.flows import masks_to_flows
    from cpsam_toolkit.io import imread
    from cpsam_toolkit.training.data import prepare_image

    stem = CONSEP / "train_13_003"
    m = imread(f"{stem}_masks.tif").astype(np.int32)
    cls = P.read_classes(f"{stem}_classes.json")
    cmap = P.class_target(m, cls, NAMES)
    img = prepare_image(imread(f"{stem}_img.tif"), m.shape)
    flows = masks_to_flows(m)
    cfg = AugmentConfig(scale_range=(0.5, 2.0))  # rotation, flip, zoom, crop + intensity
    i1, f1, m1, c1 = P.augment_with_classes(img, m, flows, cmap, np.random.default_rng(seed), cfg)
    i2, f2, m2 = augment_sample(img, m, flows, np.random.default_rng(seed), cfg)
    np.testing.assert_array_equal(i1, i2)  # same random draws as the plain augmentation
    np.testing.assert_array_equal(m1, m2)
    np.testing.assert_array_equal(f1, f2)
    assert c1.dtype == cmap.dtype and set(np.unique(c1)) <= set(np.unique(cmap))  # integral classes
    lut = P.class_lut(m, cls, NAMES)
    np.testing.assert_array_equal(c1, lut[m1])  # aligned: each pixel has its object's class
    assert ((c1 > 0) == (m1 > 0)).all()
    # the training hook derives its targets the same way from the label crop
    loss = P.ClassLoss([lut], np.ones(5))
    np.testing.assert_array_equal(loss.targets([0], [m1])[0], c1)


# ----------------------------------------------------------------------------- inference


def test_majority_vote_and_background_removal():
    masks = np.zeros((10, 10), np.uint16)
    masks[0:3, 0:3] = 1  # 9 px: 6 class 2, 3 class 1 -> class 2
    masks[0:3, 5:8] = 2  # 9 px: 5 background -> removed
    masks[5:7, 0:4] = 3  # 8 px: 4 background, 4 class 1 (tie) -> removed
    masks[6:10, 6:10] = 4  # 16 px: 10 class 3 -> class 3, becomes label 2
    pc = np.zeros((10, 10), np.uint8)
    pc[0:3, 0:3] = 2
    pc[0, 0:3] = 1
    pc[0:3, 5:8] = 3
    pc[0:2, 5:8] = 0
    pc[1, 7] = 0
    pc[5:7, 0:2] = 1
    pc[6:10, 6:10] = 1
    pc[6:10, 6:8] = 3
    pc[6, 8:10] = 3
    out, ids, frac, removed = P.assign_classes(masks, pc, 4)
    assert removed == 2 and out.dtype == masks.dtype
    np.testing.assert_array_equal(ids, [2, 3])
    np.testing.assert_allclose(frac, [6 / 9, 10 / 16])
    expect = np.zeros_like(masks)
    expect[masks == 1], expect[masks == 4] = 1, 2
    np.testing.assert_array_equal(out, expect)

    res = P.PanopticResult(out, np.zeros((2, 10, 10), np.float32), np.zeros((10, 10), np.float32),
                           class_names=("background", "a", "b", "c"), pixel_classes=pc,
                           class_ids=ids, class_fraction=frac, n_removed=removed)
    assert res.classes == ["b", "c"] and res.class_dict == {1: "b", 2: "c"}
    ci = res.class_image
    assert (ci[masks == 1] == 2).all() and (ci[masks == 4] == 3).all() and (ci[out == 0] == 0).all()
    np.testing.assert_array_equal(res.objects["class_id"], [2, 3])
    empty, ids0, _, r0 = P.assign_classes(np.zeros((4, 4), np.uint16), np.ones((4, 4), np.uint8))
    assert ids0.size == 0 and r0 == 0 and not empty.any()


def test_split_by_class_keeps_label_order_and_drops_unknown():
    lab = np.zeros((2, 6, 6), np.uint16)  # 3D: objects may span planes
    lab[:, 0:2, 0:2] = 1
    lab[0, 4:6, 0:2] = 2
    lab[1, 0:2, 4:6] = 3
    lab[:, 4:6, 4:6] = 4
    lab[0, 3, 3] = 5
    ids = np.array([2, 1, 2, np.nan, 0])  # object 4 unknown (NaN), 5 unknown (0)
    a, b, c = P.split_by_class(lab, ids, 3)
    assert a.dtype == np.int32 and a.shape == lab.shape
    np.testing.assert_array_equal(a, np.where(lab == 2, 1, 0))
    np.testing.assert_array_equal(b, np.select([lab == 1, lab == 3], [1, 2], 0))
    assert not c.any()  # a class with no objects gives an empty set
    assert not ((a > 0) | (b > 0))[np.isin(lab, [4, 5])].any()
    with pytest.raises(ValueError, match="2 class ids for 5 objects"):
        P.split_by_class(lab, ids[:2], 3)
    assert P.class_object_names("Nuclei", ["epithelial", "spindle shaped"]) == [
        "Nuclei_epithelial", "Nuclei_spindle_shaped"]


def test_panoptic_result_from_maps_and_json_roundtrip(tmp_path):
    from cpsam_toolkit.flows import masks_to_flows

    gt = np.zeros((64, 64), np.uint16)
    gt[5:20, 5:20], gt[30:50, 30:50], gt[40:60, 2:20] = 1, 2, 3
    flows = 5 * masks_to_flows(gt)
    cellprob = np.where(gt > 0, 6.0, -6.0).astype(np.float32)
    logits = np.zeros((3, 64, 64), np.float32)
    logits[0] = 1.0
    logits[1][(gt == 1) | (gt == 2)] = 5.0
    logits[2][gt == 3] = 5.0
    logits[0][gt == 2] = 9.0  # object 2: background-majority -> removed
    res = P.panoptic_result(flows, cellprob, logits, ("background", "x", "y"))
    assert res.n_objects == 2 and res.n_removed == 1 and sorted(res.classes) == ["x", "y"]
    again = res.recompute(min_size=300)  # post-processing only; object 1 (225 px) dropped
    assert isinstance(again, P.PanopticResult) and again.classes == ["y"]
    path = P.save_classes_json(tmp_path / "im_classes.json", res)
    back = P.read_classes(path)
    assert back == res.class_dict
    gt_classes = {1: "x", 2: "x", 3: "y"}
    ev = P.evaluate_panoptic([gt], [gt_classes], [res.masks], [back])
    assert ev["per_class"]["y"]["ap"] == [1.0] and ev["per_class"]["x"]["ap"] == [0.5]
    assert ev["class_mean"]["ap"] == [0.75] and ev["classification_accuracy"] == 1.0


# ----------------------------------------------------------------------------- checkpoints


def test_checkpoint_roundtrip_keeps_class_names(tmp_path):
    import cpsam_toolkit as cp

    net = P.make_panoptic(_tiny(), NAMES)
    path = tmp_path / "pan.pt"
    save_checkpoint(net, path, {"note": "t"}, half=True)
    back, meta = load_checkpoint(path)
    assert back.cfg.class_names == ("background", *NAMES) and back.cfg.nout == 8
    assert P.object_classes(back) == NAMES
    assert P.model_class_names(path) == NAMES
    assert P.model_class_names(tmp_path / "missing.pt") == ()
    plain = tmp_path / "plain.pt"
    save_checkpoint(_tiny(), plain)
    assert P.model_class_names(plain) == ()
    model = cp.load_model(path, device="cpu")
    img = np.random.default_rng(0).random((64, 80, 3)).astype(np.float32)
    res = P.segment_panoptic(model, img)
    assert isinstance(res, P.PanopticResult)
    assert res.class_names == ("background", *NAMES) and res.pixel_classes.shape == (64, 80)
    assert len(res.classes) == res.n_objects
    with pytest.raises(ValueError, match="no class maps"):
        P.segment_panoptic(cp.load_model(plain, device="cpu"), img)


# ----------------------------------------------------------------------------- training


@needs_consep
def test_few_steps_lower_the_class_loss(tmp_path):
    from cpsam_toolkit.training import Recipe

    stems = ["train_13_003", "train_17_005", "train_18_002", "train_10_007"]
    pairs = [(CONSEP / f"{s}_img.tif", CONSEP / f"{s}_masks.tif") for s in stems]
    net = P.make_panoptic(_tiny(), NAMES)
    data = P.load_panoptic(pairs, NAMES)
    loss = P.ClassLoss(data.luts, data.class_weights())

    def class_loss() -> float:
        net.eval()
        x = torch.from_numpy(np.stack([s.image.astype(np.float32) for s in data.data.samples]))
        with torch.no_grad():
            y = net(x)
        t = torch.from_numpy(loss.targets(range(4), [s.masks for s in data.data.samples]))
        return float(loss.loss(y, t))

    before = class_loss()
    p2 = net.cfg.patch**2
    rows = net.out.weight.detach()[: 5 * p2].reshape(5, p2, -1)
    assert torch.equal(rows[1], rows[4])  # all class maps start equal (0.5 x cellprob readout)
    rec = Recipe(name="t", lr=1e-2, epochs=4, batch_size=2, weight_decay=0.0, layer_drop=0.0,
                 warmup_epochs=0, schedule="constant", min_nimg_per_epoch=4, min_masks=1,
                 augment=AugmentConfig.spatial_only((1.0, 1.0)))
    res = P.train_panoptic(net, data, recipe=rec, run_dir=tmp_path / "run", seed=0,
                           device="cpu", progress=False, val_ap=False)
    after = class_loss()
    assert len(res.class_loss) == 8  # 4 epochs x 2 steps, the class term ran at every step
    assert after < before - 0.1, (before, after)
    rows = net.out.weight.detach()[: 5 * p2].reshape(5, p2, -1)
    # only the class loss reaches the class readout: the class maps have become different
    assert not torch.allclose(rows[1], rows[4], atol=1e-3)
    back, meta = load_checkpoint(tmp_path / "run" / "last.pt")
    assert back.cfg.class_names == ("background", *NAMES)
    assert meta["class_names"] == list(NAMES) and len(meta["class_weights"]) == 5


# ----------------------------------------------------------------------------- hooks


def _grid_panoptic_model(path: Path, winner: int = 2) -> Path:
    """The CellProfiler tests' exact grid model with class maps a, b, c (``winner`` wins)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "_cp_testing", Path(__file__).resolve().parents[1] / "cellprofiler_plugin" / "_testing.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.make_grid_panoptic_model(path, winner=winner)


def test_cli_segment_writes_classes_json(tmp_path):
    import tifffile

    from cpsam_toolkit.cli import main

    model = _grid_panoptic_model(tmp_path / "pan.pt")
    plate = tmp_path / "plate"
    plate.mkdir()
    img = np.random.default_rng(0).random((128, 128)).astype(np.float32)
    tifffile.imwrite(plate / "well_a1.tif", img)
    out = tmp_path / "out"
    assert main(["segment", str(plate), "--out", str(out), "--model", str(model), "--no-progress"]) == 0
    masks = tifffile.imread(out / "well_a1_masks.tif")
    classes = P.read_classes(out / "well_a1_classes.json")
    assert masks.max() > 0
    assert set(classes) == set(range(1, int(masks.max()) + 1))
    assert set(classes.values()) == {"b"}
    # the evaluator reads the class files: predictions scored against themselves, per class
    import shutil

    gt = tmp_path / "gt"
    gt.mkdir()
    shutil.copy(out / "well_a1_masks.tif", gt / "well_a1_masks.tif")
    shutil.copy(out / "well_a1_classes.json", gt / "well_a1_classes.json")
    report = tmp_path / "eval.json"
    assert main(["evaluate", "--pred", str(out), "--gt", str(gt), "--per-class", "--thresholds", "0.5",
                 "--json", str(report)]) == 0
    assert '"b"' in report.read_text() and "class_mean_per_image" in report.read_text()


@pytest.mark.parametrize("split", [False, True], ids=["measurements", "split by class"])
def test_cellprofiler_module_adds_class_measurements(tmp_path, split):
    pytest.importorskip("cellprofiler_core")
    import sys

    import cellprofiler_core.preferences as cpprefs

    plugin_dir = Path(__file__).resolve().parents[1] / "cellprofiler_plugin"
    cpprefs.set_headless()
    cpprefs.set_plugin_directory(str(plugin_dir), globally=False)
    import cellprofiler_core.modules  # noqa: F401
    from cellprofiler_core.constants.measurement import IMAGE
    from cellprofiler_core.image import Image
    from cellprofiler_core.measurement import Measurements
    from cellprofiler_core.object import ObjectSet
    from cellprofiler_core.pipeline import Pipeline
    from cellprofiler_core.utilities.core.modules import instantiate_module
    from cellprofiler_core.workspace import Workspace

    sys.path.insert(0, str(plugin_dir))
    import runcellposesam as rcs

    model = _grid_panoptic_model(tmp_path / "pan_cp.pt", winner=3)
    module = instantiate_module("RunCellposeSAM")
    module.set_module_num(1)
    module.x_name.value, module.y_name.value = "DNA", "Nuclei"
    module.model_choice.value = rcs.MODEL_CUSTOM
    module.model_directory.value = module.model_directory.static_join_string(
        rcs.ABSOLUTE_FOLDER_NAME, str(model.parent))
    module.model_file_name.value = model.name
    module.device.value = rcs.DEVICE_CPU
    module.split_by_class.value = split
    pipeline = Pipeline()
    pipeline.add_module(module)
    m = Measurements()
    m.add("DNA", Image(np.random.default_rng(1).random((64, 64)).astype(np.float32), convert=False))
    ws = Workspace(pipeline, module, m, ObjectSet(), m, None)
    module.run(ws)
    declared = {(o, f) for o, f, *_ in module.get_measurement_columns(pipeline)}
    produced = {(o, f) for o in m.get_object_names() for f in m.get_feature_names(o)}
    assert declared == produced
    feats = ["CellposeSAM_ClassNumber", "CellposeSAM_Class_a", "CellposeSAM_Class_b", "CellposeSAM_Class_c"]
    assert {("Nuclei", f) for f in feats} <= declared
    assert "Class_c" in module.get_measurements(pipeline, "Nuclei", "CellposeSAM")
    n = int(ws.object_set.get_objects("Nuclei").segmented.max())
    assert n > 0
    np.testing.assert_array_equal(m.get_current_measurement("Nuclei", feats[0]), np.full(n, 3.0))
    np.testing.assert_array_equal(m.get_current_measurement("Nuclei", feats[3]), np.ones(n))
    np.testing.assert_array_equal(m.get_current_measurement("Nuclei", feats[1]), np.zeros(n))
    if not split:
        assert module.other_providers("objectgroup") == []
        assert not {"Nuclei_a", "Nuclei_b", "Nuclei_c"} & set(ws.object_set.get_object_names())
        return
    # one object set per class, children of Nuclei; class c has every object, a and b none
    names = ["Nuclei_a", "Nuclei_b", "Nuclei_c"]
    assert module.other_providers("objectgroup") == names
    assert set(names) <= set(ws.object_set.get_object_names())
    np.testing.assert_array_equal(ws.object_set.get_objects("Nuclei_c").segmented,
                                  ws.object_set.get_objects("Nuclei").segmented)
    assert not ws.object_set.get_objects("Nuclei_a").segmented.any()
    assert m.get_current_measurement(IMAGE, "Count_Nuclei_c") == n
    assert m.get_current_measurement(IMAGE, "Count_Nuclei_a") == 0
    np.testing.assert_array_equal(m.get_current_measurement("Nuclei_c", "Parent_Nuclei"),
                                  np.arange(1, n + 1))
    np.testing.assert_array_equal(m.get_current_measurement("Nuclei", "Children_Nuclei_c_Count"),
                                  np.ones(n))
    np.testing.assert_array_equal(m.get_current_measurement("Nuclei", "Children_Nuclei_b_Count"),
                                  np.zeros(n))
    assert "Nuclei_b" in module.get_measurements(pipeline, IMAGE, "Count")
    assert module.get_measurements(pipeline, "Nuclei_a", "Parent") == ["Nuclei"]
    assert "Nuclei_c_Count" in module.get_measurements(pipeline, "Nuclei", "Children")
    # a later module can pick the class objects (CellProfiler asks other_providers)
    measure = instantiate_module("MeasureObjectSizeShape")
    measure.set_module_num(2)
    pipeline.add_module(measure)
    sub = measure.objects_list
    assert set(names) <= {c[0] for c in sub.get_choices(pipeline)}  # (name, module, num, ...)
