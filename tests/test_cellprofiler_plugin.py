"""RunCellposeSAM inside real CellProfiler (cellprofiler-core), in-process: no mocks.

Models: until the shipped model exists these tests use synthetic model files built from the
``tiny`` preset (see cellprofiler_plugin/_testing.py): a *grid* model that segments any image
into a known grid of squares (exact counts, centres and filters), and a *random* one.
Synthetic images are SIZE x SIZE (64) pixels to keep CI fast. Switching the structural tests
to the shipped model is the one line ``MODEL = "default"`` below; the grid-specific
expectations are then skipped and the model-agnostic checks still run. The ground-truth
comparison runs with the shipped model whenever ``cpsam_toolkit/models/cpsam_small.pt``
exists.
"""

from __future__ import annotations

import importlib.util
import io
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import (
    assert_counts_close,
    dsb_fluorescence_val_stems,
    requires_trained_shipped_model,
)

if importlib.util.find_spec("cellprofiler_core") is None:
    pytest.skip(
        "cellprofiler-core is not installed; install it with pip install -e '.[cellprofiler]' "
        "(or bash scripts/install_cellprofiler_cli.sh)",
        allow_module_level=True,
    )

ROOT = Path(__file__).resolve().parents[1]
PLUGIN_DIR = ROOT / "cellprofiler_plugin"
SHIPPED = ROOT / "cpsam_toolkit" / "models" / "cpsam_small.pt"
DSB = "dsb2018_stage1_train_fixed"
DSB_STEMS = [  # 256 x 256 fluorescence nuclei (36, 16, 19 annotated), all in the shipped model's
    # validation split (cpsam_toolkit/models/shipped_split.json), so the ground-truth check is fair
    "003cee89357d9fe13516167fd67b609a164651b21934585648c740d2c3d86dc1",
    "03398329ced0c23b9ac3fac84dd53a87d9ffe4d9d10f1b5fe8df8fac12380776",
    "06350c7cc618be442c15706db7a68e91f313758d224de4608f9b960106d4f9ca",
]

#: "grid" (synthetic exact model) until the shipped model exists; then "default".
MODEL = "grid"
#: side of the synthetic test images: small keeps the 2-core CI fast (64 grid squares)
SIZE = 64

import cellprofiler_core.preferences as cpprefs  # noqa: E402

cpprefs.set_headless()  # before anything imports cellprofiler_core.modules (else: import wx)
cpprefs.set_plugin_directory(str(PLUGIN_DIR), globally=False)

import cellprofiler_core.modules  # noqa: E402,F401  (registers stock modules + the plugin)
from cellprofiler_core.constants.measurement import (  # noqa: E402
    COLTYPE_FLOAT,
    COLTYPE_INTEGER,
    IMAGE,
)
from cellprofiler_core.image import Image  # noqa: E402
from cellprofiler_core.measurement import Measurements  # noqa: E402
from cellprofiler_core.object import ObjectSet  # noqa: E402
from cellprofiler_core.pipeline import Pipeline  # noqa: E402
from cellprofiler_core.setting import ValidationError  # noqa: E402
from cellprofiler_core.utilities.core.modules import (  # noqa: E402
    get_module_class,
    get_module_names,
    instantiate_module,
)
from cellprofiler_core.workspace import Workspace  # noqa: E402

sys.path.insert(0, str(PLUGIN_DIR))
import _testing  # noqa: E402
import runcellposesam as rcs  # noqa: E402  (the same module object CellProfiler registered)

pytestmark = pytest.mark.cellprofiler


# ------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="session")
def model_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("cp_models")
    return {
        "grid": _testing.make_grid_model(d / "grid.pt"),
        "random": _testing.make_random_model(d / "random.pt"),
    }


def configure(module, model, model_files, **values):
    """Point ``module`` at ``model`` ("default", "grid", "random" or a path) and set settings."""
    if model == "default":
        module.model_choice.value = rcs.MODEL_DEFAULT
    else:
        path = Path(model_files[model]) if model in model_files else Path(model)
        module.model_choice.value = rcs.MODEL_CUSTOM
        module.model_directory.value = module.model_directory.static_join_string(
            rcs.ABSOLUTE_FOLDER_NAME, str(path.parent))
        module.model_file_name.value = path.name
    module.device.value = rcs.DEVICE_CPU
    for name, value in values.items():
        getattr(module, name).value = value
    return module


def new_module(**values):
    module = instantiate_module("RunCellposeSAM")
    module.set_module_num(1)
    module.x_name.value = "DNA"
    module.y_name.value = "Nuclei"
    for name, value in values.items():
        getattr(module, name).value = value
    return module


def make_workspace(module, images: dict):
    pipeline = Pipeline()
    pipeline.add_module(module)
    m = Measurements()
    for name, img in images.items():
        m.add(name, img if isinstance(img, Image) else Image(img, convert=False))
    object_set = ObjectSet()
    return Workspace(pipeline, module, m, object_set, m, None)


def features(m, object_name):
    try:
        return set(m.get_feature_names(object_name))
    except KeyError:
        return set()


def dsb_image(data_dir, stem):
    import tifffile

    img = tifffile.imread(data_dir / DSB / "train" / f"{stem}_img.tif")
    masks = tifffile.imread(data_dir / DSB / "train" / f"{stem}_masks.tif")
    gray = img[..., 0] if img.ndim == 3 else img  # grey images are stored as 3 equal channels
    return gray.astype(np.float32) / 255.0, masks


def run_module(module, images):
    ws = make_workspace(module, images)
    module.run(ws)
    return ws


# ------------------------------------------------------------------------------- discovery
def test_discovered_from_plugin_directory():
    assert "RunCellposeSAM" in get_module_names()
    cls = get_module_class("RunCellposeSAM")
    assert cls.__module__ == "runcellposesam" and cls is rcs.RunCellposeSAM
    assert cls.category == "Object Processing"
    # 4.2.x finds the class by file stem == lower(class name); 5.x by module_name
    assert Path(rcs.__file__).stem == cls.__name__.lower() == cls.module_name.lower()
    from cellprofiler_core.module.image_segmentation import ImageSegmentation

    assert issubclass(cls, ImageSegmentation)


def test_plugin_import_is_light():
    """Instantiating the module (CellProfiler does it at discovery) must not need torch."""
    import subprocess

    code = (
        "import sys, cellprofiler_core.preferences as p; p.set_headless(); "
        f"sys.path.insert(0, {str(PLUGIN_DIR)!r}); import runcellposesam as r; "
        "r.RunCellposeSAM(); print('torch' in sys.modules, 'cpsam_toolkit' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False", "False"]


# ------------------------------------------------------------------------------- objects
def test_objects_counts_centres(model_files, data_dir):
    img, _ = dsb_image(data_dir, DSB_STEMS[0])
    img = img[:128, :128]  # a crop keeps the run short (the grid model finds 256 squares)
    module = configure(new_module(), MODEL, model_files, min_size=15, remove_border=True)
    ws = run_module(module, {"DNA": img})
    m = ws.measurements
    objs = ws.object_set.get_objects("Nuclei")
    seg = objs.segmented
    n = int(seg.max())
    assert n > 0
    # labels 1..N consecutive, Count and per-object measurements consistent
    assert set(np.unique(seg)) == set(range(n + 1))
    assert m.get_current_image_measurement("Count_Nuclei") == n
    np.testing.assert_array_equal(m.get_current_measurement("Nuclei", "Number_Object_Number"),
                                  np.arange(1, n + 1))
    import scipy.ndimage as ndi

    centres = np.array(ndi.center_of_mass(np.ones_like(seg), seg, np.arange(1, n + 1)))
    np.testing.assert_allclose(m.get_current_measurement("Nuclei", "Location_Center_Y"),
                               centres[:, 0], atol=1e-6)
    np.testing.assert_allclose(m.get_current_measurement("Nuclei", "Location_Center_X"),
                               centres[:, 1], atol=1e-6)
    np.testing.assert_array_equal(m.get_current_measurement("Nuclei", "Location_Center_Z"),
                                  np.zeros(n))
    # IdentifyPrimaryObjects-style label matrices and parent image
    assert objs.parent_image is ws.image_set.get_image("DNA")
    assert objs.has_unedited_segmented() and objs.has_small_removed_segmented()
    uned, small = objs.unedited_segmented, objs.small_removed_segmented
    areas_small = np.bincount(small.ravel())[1:]
    assert areas_small[areas_small > 0].min() >= 15
    assert ((seg > 0) <= (small > 0)).all() and ((small > 0) <= (uned > 0)).all()
    edges = np.concatenate([seg[0], seg[-1], seg[:, 0], seg[:, -1]])
    assert not edges.any(), "objects touching the border must be removed"
    # confidence measurements: one value per object, probabilities in 0..1
    p = m.get_current_measurement("Nuclei", rcs.M_MEAN_CELLPROB)
    fe = m.get_current_measurement("Nuclei", rcs.M_FLOW_ERROR)
    assert p.shape == fe.shape == (n,)
    assert np.all((p >= 0) & (p <= 1)) and np.all(np.isfinite(fe))
    assert m.get_current_image_measurement("CellposeSAM_Model_Nuclei")
    assert "sha256" in m.get_current_image_measurement("CellposeSAM_ModelVersion_Nuclei")
    if MODEL == "grid":
        count, exp_centres = _testing.expected_grid(seg.shape, remove_border=True)
        assert n == count
        got = np.stack([m.get_current_measurement("Nuclei", "Location_Center_Y"),
                        m.get_current_measurement("Nuclei", "Location_Center_X")], 1)
        np.testing.assert_allclose(got[np.lexsort(got.T[::-1])],
                                   exp_centres[np.lexsort(exp_centres.T[::-1])], atol=1e-6)
        assert int(uned.max()) == _testing.expected_grid(seg.shape, remove_border=False)[0]
        assert np.all(p > 0.99)


@pytest.mark.skipif(MODEL != "grid", reason="exact counts need the grid model")
def test_diameter_resizes_before_segmenting(model_files):
    """Diameter 60 halves the image for the network (objects ~30 px): the grid model then finds
    the 64 x 64 grid, and the masks come back at the input's size."""
    img = np.random.default_rng(0).random((128, 128)).astype(np.float32)
    counts = {}
    for d in (0.0, 60.0):
        module = configure(new_module(), "grid", model_files, min_size=0, remove_border=False,
                           diameter=d)
        seg = run_module(module, {"DNA": img}).object_set.get_objects("Nuclei").segmented
        assert seg.shape == img.shape
        counts[d] = int(seg.max())
    assert counts[0.0] == _testing.expected_grid((128, 128), remove_border=False)[0]
    assert counts[60.0] == _testing.expected_grid((64, 64), remove_border=False)[0]


@pytest.mark.skipif(MODEL != "grid", reason="exact filter counts need the grid model")
def test_size_and_border_filters_grid(model_files):
    img = np.random.default_rng(0).random((SIZE, SIZE)).astype(np.float32)
    p = _testing.grid_patch()
    square = (p - 1) ** 2
    total = _testing.expected_grid((SIZE, SIZE), remove_border=False)[0]
    inner = _testing.expected_grid((SIZE, SIZE), remove_border=True)[0]

    ws = run_module(configure(new_module(), "grid", model_files, min_size=0,
                              remove_border=False), {"DNA": img})
    assert ws.measurements.get_current_image_measurement("Count_Nuclei") == total

    ws = run_module(configure(new_module(), "grid", model_files, min_size=square + 1,
                              remove_border=True), {"DNA": img})
    objs = ws.object_set.get_objects("Nuclei")
    assert ws.measurements.get_current_image_measurement("Count_Nuclei") == 0
    assert objs.unedited_segmented.max() == total  # the unedited matrix keeps everything
    assert objs.small_removed_segmented.max() == 0

    # a mask: objects overlapping masked-out pixels count as touching the border
    mask = np.ones((SIZE, SIZE), bool)
    mask[:, : SIZE // 2] = False
    ws = run_module(configure(new_module(), "grid", model_files, min_size=0,
                              remove_border=True), {"DNA": Image(img, mask=mask)})
    n = ws.measurements.get_current_image_measurement("Count_Nuclei")
    rows = SIZE // p - 1  # rows of squares left after removing the bottom (border) row
    assert n == inner - rows * ((SIZE // 2) // p)


def test_zero_objects_on_blank_image(model_files):
    model = MODEL if MODEL != "grid" else "random"  # the grid model finds squares everywhere
    module = configure(new_module(), model, model_files)
    ws = run_module(module, {"DNA": np.zeros((SIZE, SIZE), np.float32)})
    m = ws.measurements
    assert m.get_current_image_measurement("Count_Nuclei") == 0
    assert ws.object_set.get_objects("Nuclei").segmented.max() == 0
    for feature in ("Location_Center_X", "Location_Center_Y", "Number_Object_Number",
                    rcs.M_MEAN_CELLPROB, rcs.M_FLOW_ERROR):
        assert len(m.get_current_measurement("Nuclei", feature)) == 0
    assert m.get_current_image_measurement("CellposeSAM_Model_Nuclei")


# ------------------------------------------------------------------------ declared == produced
@pytest.mark.parametrize("confidence", [True, False])
def test_declared_columns_equal_produced(model_files, confidence):
    img = np.random.default_rng(1).random((SIZE, SIZE)).astype(np.float32)
    module = configure(new_module(), MODEL, model_files, wants_confidence=confidence,
                       save_probabilities=True)
    ws = run_module(module, {"DNA": img})
    m = ws.measurements
    declared = {(o, f) for o, f, *_ in module.get_measurement_columns(ws.pipeline)}
    produced = {(IMAGE, f) for f in features(m, IMAGE)} | {
        ("Nuclei", f) for f in features(m, "Nuclei")}
    assert declared == produced
    types = {(o, f): t for o, f, t, *_ in module.get_measurement_columns(ws.pipeline)}
    assert types[(IMAGE, "Count_Nuclei")] == COLTYPE_INTEGER
    assert types[(IMAGE, "CellposeSAM_Model_Nuclei")].startswith("varchar")
    if confidence:
        assert types[("Nuclei", rcs.M_MEAN_CELLPROB)] == COLTYPE_FLOAT
    # categories / measurements agree with the columns (what the measurement pickers list)
    for obj, feature in declared:
        category, rest = feature.split("_", 1)
        assert category in module.get_categories(ws.pipeline, obj), feature
        names = module.get_measurements(ws.pipeline, obj, category)
        assert any(rest == name or rest.startswith(name + "_") for name in names), feature
    # the probability image: sigmoid of the logits, same size, 0..1
    prob = ws.image_set.get_image(module.probabilities_name.value).pixel_data
    assert prob.shape == img.shape and prob.min() >= 0 and prob.max() <= 1


def _pipeline_with_inject(model_files, image, **values):
    from cellprofiler_core.modules.injectimage import InjectImage

    pipeline = Pipeline()
    inject = InjectImage("DNA", [image])
    inject.set_module_num(1)
    pipeline.add_module(inject)
    module = configure(new_module(), MODEL, model_files, **values)
    module.set_module_num(2)
    pipeline.add_module(module)
    errors = []
    pipeline.add_listener(lambda p, e: errors.append(e) if "Exception" in type(e).__name__
                          else None)
    return pipeline, module, errors


def test_pipeline_runs_reuse_the_cached_model(model_files):
    """Two Pipeline.run()s and a third module instance in one process load the model once."""
    image = np.random.default_rng(2).random((SIZE, SIZE)).astype(np.float32)
    pipeline, module, errors = _pipeline_with_inject(model_files, image)
    from cpsam_toolkit import model_cache

    rcs.clear_model_cache()
    before = model_cache.model_loads()
    m1 = pipeline.run()
    m2 = pipeline.run()
    ws = run_module(configure(new_module(), MODEL, model_files), {"DNA": image})
    assert not errors, [getattr(e, "error", e) for e in errors]
    assert model_cache.model_loads() - before == 1  # one load, shared by both runs and modules
    c1 = m1.get_measurement(IMAGE, "Count_Nuclei", 1)
    c2 = m2.get_measurement(IMAGE, "Count_Nuclei", 1)
    assert c1 == c2 == ws.measurements.get_current_image_measurement("Count_Nuclei")
    module.post_run(None)  # releases cached GPU blocks; must be harmless on CPU


def test_pipeline_run_failure_is_reported_not_printed(tmp_path, model_files):
    """In Pipeline.run (what the CLI uses) a failure reaches the listeners as a RunException
    naming the image, and the run stops."""
    image = np.zeros((64, 64), np.float32)
    pipeline, module, errors = _pipeline_with_inject(model_files, image)
    configure(module, str(tmp_path / "gone.pt"), {})
    pipeline.run()
    assert errors, "the failure must reach the pipeline listeners"
    err = getattr(errors[0], "error", errors[0])
    assert isinstance(err, rcs.CellposeSAMError)
    assert "gone.pt" in str(err) and "'DNA'" in str(err)


# ------------------------------------------------------------------------ channels / 3D
def test_additional_channels(model_files):
    rng = np.random.default_rng(3)
    a, b, c = (rng.random((SIZE, SIZE)).astype(np.float32) for _ in range(3))
    module = configure(new_module(), MODEL, model_files, use_channel2=True,
                       use_channel3=True)
    module.channel2_name.value = "Membrane"
    module.channel3_name.value = "Other"
    ws = run_module(module, {"DNA": a, "Membrane": b, "Other": c})
    assert ws.object_set.get_objects("Nuclei").segmented.shape == (SIZE, SIZE)
    # colour input with 3 channels + another channel is more than Cellpose-SAM takes
    module = configure(new_module(), MODEL, model_files, use_channel2=True)
    module.channel2_name.value = "Membrane"
    rgb = rng.random((SIZE, SIZE, 3)).astype(np.float32)
    with pytest.raises(rcs.CellposeSAMError, match="at most 3 channels"):
        run_module(module, {"DNA": rgb, "Membrane": b})
    # colour input alone works
    ws = run_module(configure(new_module(), MODEL, model_files), {"DNA": rgb})
    assert ws.object_set.get_objects("Nuclei").segmented.shape == (SIZE, SIZE)


def test_channel_size_mismatch_names_the_image(model_files):
    module = configure(new_module(), MODEL, model_files, use_channel2=True)
    module.channel2_name.value = "Membrane"
    with pytest.raises(rcs.CellposeSAMError) as e:
        run_module(module, {"DNA": np.zeros((SIZE, SIZE), np.float32),
                            "Membrane": np.zeros((128, 128), np.float32)})
    assert "'DNA'" in str(e.value) and "'Membrane'" in str(e.value)
    assert "image set 1" in str(e.value)


def test_volume_plane_by_plane_and_3d(model_files):
    vol = np.random.default_rng(4).random((2, SIZE, SIZE)).astype(np.float32)
    module = configure(new_module(), MODEL, model_files, remove_border=False)
    ws = run_module(module, {"DNA": Image(vol, dimensions=3, convert=False)})
    seg = ws.object_set.get_objects("Nuclei").segmented
    assert seg.shape == vol.shape
    m = ws.measurements
    n = int(seg.max())
    assert m.get_current_image_measurement("Count_Nuclei") == n
    # planes are segmented separately: no object spans two planes
    assert not (set(np.unique(seg[0])) - {0}) & (set(np.unique(seg[1])) - {0})
    z = m.get_current_measurement("Nuclei", "Location_Center_Z")
    assert len(z) == n and set(np.unique(z)) <= {0.0, 1.0}
    if MODEL == "grid":
        assert n == 2 * _testing.expected_grid((SIZE, SIZE), remove_border=False)[0]

    module = configure(new_module(), MODEL, model_files, do_3d=True, anisotropy=2.0)
    import inspect

    import cpsam_toolkit

    model_cls = cpsam_toolkit.CellposeSAM
    if "do_3d" in inspect.signature(model_cls.segment).parameters:
        ws = run_module(module, {"DNA": Image(vol, dimensions=3, convert=False)})
        assert ws.object_set.get_objects("Nuclei").segmented.shape == vol.shape
    else:  # the library says 3D is not there yet: a clear error, naming the image
        with pytest.raises(rcs.CellposeSAMError, match="cannot segment in 3D yet.*'Segment"):
            run_module(module, {"DNA": Image(vol, dimensions=3, convert=False)})
    # 3D mode on a 2D image
    with pytest.raises(rcs.CellposeSAMError, match="image is 2D"):
        run_module(module, {"DNA": vol[0]})


# ------------------------------------------------------------------------ failures
def test_missing_custom_model_fails_with_image_named(tmp_path):
    module = configure(new_module(), str(tmp_path / "nope.pt"), {})
    with pytest.raises(rcs.CellposeSAMError) as e:
        run_module(module, {"DNA": np.zeros((64, 64), np.float32)})
    msg = str(e.value)
    assert "nope.pt" in msg and "does not exist" in msg and "'DNA'" in msg


def test_corrupt_model_fails_with_image_named(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a model")
    module = configure(new_module(), str(bad), {})
    with pytest.raises(rcs.CellposeSAMError, match=r"image 'DNA'.*bad\.pt"):
        run_module(module, {"DNA": np.zeros((64, 64), np.float32)})


def test_out_of_memory_falls_back_to_smaller_batches(model_files, caplog):
    """The library's one OOM policy serves the module: the cached model halves its batch on
    CUDA out-of-memory, remembers the size that fit, and loses no image."""
    import torch

    model, _ = rcs.get_model(str(model_files[MODEL if MODEL != "default" else "grid"]), "cpu")
    real = model._forward
    sizes = []

    def oom_above_two(x):  # the real network, out of GPU memory for batches above 2 tiles
        sizes.append(len(x))
        if len(x) > 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB")
        return real(x)

    model._forward, model._chunk = oom_above_two, None
    try:
        img = np.random.default_rng(0).random((600, 600)).astype(np.float32)
        with pytest.warns(UserWarning, match="out of memory"):
            res = model.segment(img, batch_size=8, min_size=0)
        assert res.masks.shape == img.shape and max(sizes) == 8 and model._chunk == 2
        sizes.clear()
        model.segment(img, batch_size=8, min_size=0)
        assert max(sizes) == 2  # later images start from the batch size that fit
    finally:
        del model._forward
        model._chunk = None


# ------------------------------------------------------------------------ validation
def _validation_message(module, pipeline=None):
    pipeline = pipeline or Pipeline()
    with pytest.raises(ValidationError) as e:
        module.validate_module(pipeline)
    return str(e.value.message)


def test_validate_module_messages(tmp_path, model_files):
    module = configure(new_module(), "grid", model_files)
    module.validate_module(Pipeline())  # valid as configured

    missing = configure(new_module(), str(tmp_path / "missing.pt"), {})
    msg = _validation_message(missing)
    assert "missing.pt" in msg and "does not exist" in msg

    msg = _validation_message(configure(new_module(), "grid", model_files,
                                        cellprob_threshold=9.0))
    assert "between -6 and 6" in msg
    msg = _validation_message(configure(new_module(), "grid", model_files,
                                        flow_threshold=-0.1))
    assert "flow threshold" in msg.lower()
    msg = _validation_message(configure(new_module(), "grid", model_files, min_size=-2))
    assert "cannot be negative" in msg
    msg = _validation_message(configure(new_module(), "grid", model_files, diameter=-5.0))
    assert "diameter" in msg and "0 (no resizing)" in msg

    dup = configure(new_module(), "grid", model_files, use_channel2=True)
    dup.channel2_name.value = "DNA"
    assert "selected twice" in _validation_message(dup)

    three_d = configure(new_module(), "grid", model_files, do_3d=True)
    assert "Process as 3D" in _validation_message(three_d)

    for name, setting in (("gpu_memory", "GPU memory per worker"), ("host_memory", "RAM per worker")):
        msg = _validation_message(configure(new_module(), "grid", model_files, **{name: "lots"}))
        assert setting in msg and "'6GB'" in msg and "'lots'" in msg
        assert ("unlimited" in msg) == (name == "host_memory")
        for good in ("6GB", " 512 MiB ", ""):
            configure(new_module(), "grid", model_files, **{name: good}).validate_module(Pipeline())
    configure(new_module(), "grid", model_files, host_memory="Unlimited").validate_module(Pipeline())
    with pytest.raises(rcs.CellposeSAMError, match="RAM per worker"):  # a run checks it too
        run_module(configure(new_module(), "grid", model_files, host_memory="lots"),
                   {"DNA": np.zeros((SIZE, SIZE), np.float32)})


def test_validate_gpu_without_gpu(model_files):
    import torch

    if torch.cuda.is_available() or torch.backends.mps.is_available():
        pytest.skip("this machine has a GPU")
    module = configure(new_module(), "grid", model_files)
    module.device.value = rcs.DEVICE_GPU
    assert "no usable GPU" in _validation_message(module)
    with pytest.raises(rcs.CellposeSAMError, match="GPU"):
        run_module(module, {"DNA": np.zeros((64, 64), np.float32)})


def test_headless_pipeline_test_valid(model_files):
    """Pipeline.test_valid() (what a CLI wrapper can call) reports the module's problem."""
    pipeline, module, _ = _pipeline_with_inject(model_files, np.zeros((SIZE, SIZE), np.float32),
                                                cellprob_threshold=-7.0)
    with pytest.raises(ValidationError, match="between -6 and 6"):
        pipeline.test_valid()
    module.cellprob_threshold.value = 0.0
    pipeline.test_valid()


# ------------------------------------------------------------------------ settings files
def _non_default_module(tmp_path):
    module = new_module()
    values = {
        "use_channel2": True, "use_channel3": True, "model_choice": rcs.MODEL_CUSTOM,
        "model_file_name": "my model.pt", "device": rcs.DEVICE_GPU, "batch_size": 3,
        "flow_threshold": 0.7, "cellprob_threshold": -1.5, "min_size": 40,
        "remove_border": False, "do_3d": True, "anisotropy": 2.5, "save_probabilities": True,
        "probabilities_name": "NucProb", "wants_confidence": False, "split_by_class": True,
        "diameter": 17.5, "gpu_memory": "6GB", "host_memory": "unlimited",
    }
    for name, value in values.items():
        getattr(module, name).value = value
    module.channel2_name.value = "Membrane"
    module.channel3_name.value = "Actin"
    module.model_directory.value = module.model_directory.static_join_string(
        rcs.ABSOLUTE_FOLDER_NAME, str(tmp_path))
    return module


def _dump(pipeline) -> str:
    f = io.StringIO()
    pipeline.dump(f)
    return f.getvalue()


def _load(text) -> Pipeline:
    pipeline = Pipeline()
    errors = []
    pipeline.add_listener(lambda p, e: errors.append(e) if "Exception" in type(e).__name__
                          else None)
    pipeline.load(io.StringIO(text))
    assert not errors, [getattr(e, "error", e) for e in errors]
    return pipeline


def test_settings_round_trip(tmp_path):
    module = _non_default_module(tmp_path)
    pipeline = Pipeline()
    pipeline.add_module(module)
    text = _dump(pipeline)
    assert "RunCellposeSAM:[" in text and "variable_revision_number:5" in text
    loaded = _load(text).modules()[0]
    assert isinstance(loaded, rcs.RunCellposeSAM)
    assert [s.value_text for s in loaded.settings()] == [s.value_text for s in module.settings()]
    assert loaded.model_spec() == str(tmp_path / "my model.pt")


# settings each old revision lacks (added at the end, with the value an upgrade gives them)
_MEMORY = ["GPU memory per worker", "RAM per worker"]  # revision 5
_ADDED_AFTER = {1: ["Measure per-object confidence?", "Save one object set per class?",
                    "Typical object diameter", "Use the model's recommended settings?", *_MEMORY],
                2: ["Save one object set per class?", "Typical object diameter",
                    "Use the model's recommended settings?", *_MEMORY],
                3: ["Use the model's recommended settings?", *_MEMORY],
                4: _MEMORY}


@pytest.mark.parametrize("revision", [1, 2, 3, 4])
def test_upgrade_from_older_revisions(tmp_path, revision):
    module = _non_default_module(tmp_path)
    module.wants_confidence.value = True  # what revision 1 always did
    module.split_by_class.value = False  # what revisions 1 and 2 did
    module.diameter.value = 0.0  # no resizing, as revisions 1 and 2 did
    module.use_model_settings.value = False  # revisions 1 to 3 used the module's own values
    module.gpu_memory.value = module.host_memory.value = ""  # revisions 1 to 4: automatic
    pipeline = Pipeline()
    pipeline.add_module(module)
    text = _dump(pipeline)
    old = text.replace("variable_revision_number:5", f"variable_revision_number:{revision}")
    lines = [ln for ln in old.splitlines() if not any(t in ln for t in _ADDED_AFTER[revision])]
    assert len(lines) == len(old.splitlines()) - len(_ADDED_AFTER[revision])
    loaded = _load("\n".join(lines) + "\n").modules()[0]
    assert loaded.wants_confidence.value is True and loaded.split_by_class.value is False
    assert loaded.diameter.value == 0.0
    assert loaded.gpu_memory.value == loaded.host_memory.value == ""
    assert loaded.library_settings(None, None).host_memory is None  # automatic: library default
    assert [s.value_text for s in loaded.settings()] == [s.value_text for s in module.settings()]

    with pytest.raises(ValueError, match="newer than this plugin"):
        loaded.upgrade_settings(["x"] * 20, 99, "RunCellposeSAM")


def test_example_pipeline_loads():
    pipeline = _load((PLUGIN_DIR / "examples" / "segment_nuclei.cppipe").read_text())
    names = [m.module_name for m in pipeline.modules()]
    assert names[-3:] == ["RunCellposeSAM", "MeasureObjectSizeShape", "ExportToSpreadsheet"]
    seg = pipeline.modules()[names.index("RunCellposeSAM")]
    assert seg.model_choice.value == rcs.MODEL_DEFAULT
    assert (seg.x_name.value, seg.y_name.value) == ("DNA", "Nuclei")


def test_create_batch_maps_model_folder(tmp_path):
    module = _non_default_module(tmp_path)
    module.prepare_to_create_batch(None, lambda p, **kw: p.replace(str(tmp_path), "/cluster/models"))
    assert module.model_spec() == "/cluster/models/my model.pt"


# ------------------------------------------------------------------------ memory budgets
def test_ram_per_worker_segments_in_blocks(data_dir):
    """'RAM per worker' below what the whole image needs: the library segments the real image
    (a 768 x 768 mosaic of DSB2018 nuclei) in blocks, the image measurement says so, and the
    objects are nearly those of the whole image."""
    import json

    from test_blockwise import mosaic

    img, _ = mosaic(data_dir, 768)
    img /= img.max()
    counts, settings = {}, {}
    for ram in ("unlimited", "1MB"):  # the model's thresholds, without its augmentation (fast)
        module = configure(new_module(), "default", {}, use_model_settings=False, host_memory=ram,
                           flow_threshold=0.8, cellprob_threshold=-0.5)
        m = run_module(module, {"DNA": img}).measurements
        counts[ram] = m.get_current_image_measurement("Count_Nuclei")
        settings[ram] = json.loads(m.get_current_image_measurement("CellposeSAM_Settings_Nuclei"))
        block = m.get_current_image_measurement("CellposeSAM_BlockSize_Nuclei")
        assert block == (0 if ram == "unlimited" else 512), ram
    assert counts["unlimited"] > 100
    assert abs(counts["1MB"] - counts["unlimited"]) <= 0.03 * counts["unlimited"], counts
    assert settings["1MB"]["settings"]["host_memory"] == "1MB"  # the repeat command has it
    assert "--host-memory 1MB" in settings["1MB"]["cli"]


def test_diameter_measurement_reports_the_resizing(data_dir):
    """The shipped model's diameter 'auto' at the module's defaults: the bundled phase-contrast
    cells (40-70 px) are estimated above 30 px and the image measurement gives the estimate;
    a diameter set by the user is reported as it is; 0 when the image is not resized."""
    from importlib.resources import files

    import tifffile

    img = tifffile.imread(files("cpsam_toolkit") / "examples" / "cells_phase_contrast_img.tif")
    img = (img / img.max()).astype(np.float32)
    feature = "CellposeSAM_Diameter_Nuclei"
    m = run_module(configure(new_module(), "default", {}), {"DNA": img}).measurements
    assert m.get_current_image_measurement(feature) > 30
    m = run_module(configure(new_module(), "default", {}, diameter=40.0, use_model_settings=False),
                   {"DNA": img}).measurements
    assert m.get_current_image_measurement(feature) == 40.0
    m = run_module(configure(new_module(), "default", {}, use_model_settings=False),
                   {"DNA": img}).measurements
    assert m.get_current_image_measurement(feature) == 0.0


# ------------------------------------------------------------------------ display (GUI)
class _Figure:
    """Stand-in for the GUI's CPFigure (wxPython is not installed headless): records calls."""

    def __init__(self):
        self.calls = []

    def __getattr__(self, name):
        def record(*args, **kwargs):
            self.calls.append(name)
            return name

        return record


def test_display_data_and_display(model_files):
    module = configure(new_module(), MODEL, model_files)
    module.show_window = True
    ws = make_workspace(module, {"DNA": np.random.default_rng(5).random((SIZE, SIZE))
                                 .astype(np.float32)})
    module.run(ws)
    d = ws.display_data
    assert d.y_data.shape == (SIZE, SIZE) and d.dimensions == 2
    assert dict(d.statistics)["Objects found"] == str(int(d.y_data.max()))
    assert dict(d.statistics)["Segmented in blocks"] == "no"  # a small image fits any budget
    fig = _Figure()
    module.display(ws, fig)
    assert "subplot_imshow_labels" in fig.calls and "subplot_table" in fig.calls
    assert "subplot_imshow_grayscale" in fig.calls


# ------------------------------------------------------------------------ shipped model
@requires_trained_shipped_model
def test_shipped_model_counts_close_to_ground_truth(data_dir):
    """The shipped model at the module's default settings (so with the model's own recommended
    settings) on the 40 held-out DSB fluorescence images: counts close to the annotations. Only
    border objects are kept, as the annotations count them (the module discards them by default)."""
    module = configure(new_module(), "default", {}, remove_border=False)
    counts = {}
    for stem in dsb_fluorescence_val_stems(data_dir):
        img, _ = dsb_image(data_dir, stem)
        ws = run_module(module, {"DNA": img})
        counts[stem] = ws.measurements.get_current_image_measurement("Count_Nuclei")
        assert ws.measurements.get_current_image_measurement(
            "CellposeSAM_Model_Nuclei") == rcs.shipped_model_name()
    assert_counts_close(counts, data_dir)


def test_env_has_no_gui():
    """The tests run headless: wx must not have been imported by anything."""
    assert "wx" not in sys.modules


def test_model_recommended_settings_are_used_unless_switched_off():
    """At the module's defaults the model's recommended values win; with the switch off (how
    older pipelines load) the module's own values are used."""
    model, _ = rcs.get_model(rcs.shipped_model_name(), "cpu")
    rec = (model.info.get("recommended_settings") or {}).get("flow_threshold")
    module = new_module()
    s = module.library_settings(model, None)
    if rec is not None:
        assert s.flow_threshold == rec and s.sources["flow_threshold"] == "model"
    assert s.min_size == 0 and s.batch_size == module.batch_size.value  # sizes filtered here
    module.use_model_settings.value = False
    s = module.library_settings(model, -1)
    assert s.flow_threshold == module.flow_threshold.value and s.sources["flow_threshold"] != "model"
    assert s.channel_axis == -1
    assert (s.gpu_memory, s.host_memory) == (None, None)  # empty: the library's automatic budgets
    module.gpu_memory.value, module.host_memory.value = " 6GB", "unlimited"
    s = module.library_settings(model, None)
    assert (s.gpu_memory, s.host_memory, s.gpu_memory_bytes) == ("6GB", "unlimited", 6_000_000_000)
