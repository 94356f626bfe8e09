"""RunCellposeSAM through the real headless ``cellprofiler`` command line.

Pipeline (cellprofiler_plugin/examples/segment_nuclei.cppipe): NamesAndTypes -> RunCellposeSAM
-> MeasureObjectSizeShape -> ExportToSpreadsheet, over a few real DSB 2018 nuclei images copied
from shared/data, then the same pipeline + CreateBatchFiles split into batches with
``--get-batch-commands-new``, whose CSV rows must equal the unsplit run's.

Skipped only when cellprofiler-core is missing; if cellprofiler-core is there but the
``cellprofiler`` package (the CLI) is not, the tests fail and say how to install it
(``bash scripts/install_cellprofiler_cli.sh``).
"""

from __future__ import annotations

import csv
import importlib.util
import io
import os
import re
import shlex
import shutil
import subprocess
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
        "and bash scripts/install_cellprofiler_cli.sh",
        allow_module_level=True,
    )

ROOT = Path(__file__).resolve().parents[1]
PLUGIN_DIR = ROOT / "cellprofiler_plugin"
EXAMPLE = PLUGIN_DIR / "examples" / "segment_nuclei.cppipe"
SHIPPED = ROOT / "cpsam_toolkit" / "models" / "cpsam_small.pt"
DSB = "dsb2018_stage1_train_fixed"
DSB_STEMS = [  # 256 x 256 fluorescence nuclei (36, 16, 19 annotated), all in the shipped model's
    # validation split (cpsam_toolkit/models/shipped_split.json), so the ground-truth check is fair
    "003cee89357d9fe13516167fd67b609a164651b21934585648c740d2c3d86dc1",
    "03398329ced0c23b9ac3fac84dd53a87d9ffe4d9d10f1b5fe8df8fac12380776",
    "06350c7cc618be442c15706db7a68e91f313758d224de4608f9b960106d4f9ca",
]

#: "grid" (synthetic exact model, see cellprofiler_plugin/_testing.py) until the shipped model
#: exists; then "default" (the example pipeline unchanged).
MODEL = "grid"
PREFIX = "Nuclei_"  # ExportToSpreadsheet's file-name prefix in the example pipeline
CLI_TIMEOUT = 900

import cellprofiler_core.preferences as cpprefs  # noqa: E402

cpprefs.set_headless()
cpprefs.set_plugin_directory(str(PLUGIN_DIR), globally=False)
import cellprofiler_core.modules  # noqa: E402,F401
from cellprofiler_core.pipeline import Pipeline  # noqa: E402
from cellprofiler_core.utilities.core.modules import instantiate_module  # noqa: E402

sys.path.insert(0, str(PLUGIN_DIR))
import _testing  # noqa: E402
import runcellposesam as rcs  # noqa: E402

pytestmark = pytest.mark.cellprofiler


# ------------------------------------------------------------------------------- helpers
@pytest.fixture(scope="module")
def cli():
    if importlib.util.find_spec("cellprofiler") is None:
        pytest.fail(
            "the headless CellProfiler CLI (package cellprofiler-nightly) is not installed in "
            f"{sys.executable}; install it with: bash scripts/install_cellprofiler_cli.sh")
    return [sys.executable, "-m", "cellprofiler"]


@pytest.fixture(scope="module")
def work(tmp_path_factory, data_dir):
    """A folder with images/ (3 DSB nuclei images) and the grid model file."""
    d = tmp_path_factory.mktemp("cp_cli")
    images = d / "images"
    images.mkdir()
    for stem in DSB_STEMS:
        shutil.copy(data_dir / DSB / "train" / f"{stem}_img.tif", images / f"{stem}.tif")
    _testing.make_grid_model(d / "grid.pt")
    return d


def build_pipeline(path: Path, model, *, batch=False, **settings) -> Path:
    """The example pipeline with RunCellposeSAM pointed at ``model`` (+ CreateBatchFiles)."""
    pipeline = Pipeline()
    pipeline.load(str(EXAMPLE))
    seg = next(m for m in pipeline.modules() if m.module_name == "RunCellposeSAM")
    if model != "default":
        model = Path(model)
        seg.model_choice.value = rcs.MODEL_CUSTOM
        seg.model_directory.value = seg.model_directory.static_join_string(
            rcs.ABSOLUTE_FOLDER_NAME, str(model.parent))
        seg.model_file_name.value = model.name
    seg.device.value = rcs.DEVICE_CPU
    for name, value in settings.items():
        getattr(seg, name).value = value
    if batch:
        cbf = instantiate_module("CreateBatchFiles")
        cbf.set_module_num(len(pipeline.modules()) + 1)
        pipeline.add_module(cbf)
    f = io.StringIO()
    pipeline.dump(f)
    path.write_text(f.getvalue())
    return path


def run_cli(cli, args, cwd):
    cmd = cli + [str(a) for a in args]
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=CLI_TIMEOUT)
    log = f"$ {shlex.join(cmd)}\n--- stdout\n{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-6000:]}"
    return proc, log


def headless(cli, pipeline, out: Path, cwd, *extra):
    out.mkdir(parents=True, exist_ok=True)
    done = out / "done.txt"
    proc, log = run_cli(cli, ["-c", "-r", "-p", pipeline, *extra, "-o", out,
                              "--plugins-directory", PLUGIN_DIR,
                              "-e", "imageio_reader",  # offline: no Bio-Formats download
                              "-L", "WARNING", "-d", done], cwd)
    assert proc.returncode == 0, log
    assert done.read_text().strip() == "Complete", log
    return log


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def model_path(work):
    return "default" if MODEL == "default" else work / "grid.pt"


@pytest.fixture(scope="module")
def unsplit_run(cli, work):
    pipeline = build_pipeline(work / "segment.cppipe", model_path(work))
    out = work / "out"
    headless(cli, pipeline, out, work, "-i", work / "images")
    return out


# ------------------------------------------------------------------------------- tests
def test_headless_run_exports_one_row_per_image(unsplit_run, work):
    images = read_csv(unsplit_run / f"{PREFIX}Image.csv")
    objects = read_csv(unsplit_run / f"{PREFIX}Nuclei.csv")
    assert len(images) == len(DSB_STEMS)
    assert sorted(r["FileName_DNA"] for r in images) == sorted(f"{s}.tif" for s in DSB_STEMS)
    # per-image model columns
    for r in images:
        assert r["CellposeSAM_Model_Nuclei"]
        assert "sha256" in r["CellposeSAM_ModelVersion_Nuclei"]
        assert r["CellposeSAM_BlockSize_Nuclei"] == "0"  # 256 x 256: segmented whole
        # the stand-in grid model has no size model and no diameter is set: never resized
        # (the shipped model's estimates: test_cellprofiler_plugin's diameter measurement test)
        assert float(r["CellposeSAM_Diameter_Nuclei"]) == 0
    # object rows match the counts, numbered 1..N per image
    per_image: dict[str, list[dict]] = {}
    for r in objects:
        per_image.setdefault(r["ImageNumber"], []).append(r)
    for r in images:
        rows = per_image.get(r["ImageNumber"], [])
        count = float(r["Count_Nuclei"])
        assert len(rows) == count, r["FileName_DNA"]
        assert sorted(int(o["ObjectNumber"]) for o in rows) == list(range(1, len(rows) + 1))
        if MODEL == "grid":
            assert count == _testing.expected_grid((256, 256), remove_border=True)[0]
        else:
            assert count > 0
    # MeasureObjectSizeShape measured the plugin's objects; confidence columns exported
    assert objects, "no object rows exported"
    for o in objects:
        assert float(o["AreaShape_Area"]) >= 15  # the minimum size in the example pipeline
        assert abs(float(o["AreaShape_Center_X"]) - float(o["Location_Center_X"])) < 1e-6
        assert 0.0 <= float(o["CellposeSAM_MeanCellProb"]) <= 1.0
        assert np.isfinite(float(o["CellposeSAM_FlowError"]))
    experiment = read_csv(unsplit_run / f"{PREFIX}Experiment.csv")
    assert experiment  # ExportToSpreadsheet wrote the experiment table too


def test_create_batch_files_batches_match_unsplit_run(cli, work, unsplit_run):
    pipeline = build_pipeline(work / "batch.cppipe", model_path(work), batch=True)
    outbatch = work / "outbatch"
    outbatch.mkdir()
    # CreateBatchFiles stops the run after writing Batch_data.h5; CellProfiler 5.0.0.dev784
    # then reports the status "Failure" (exit code 255) although nothing failed
    proc, log = run_cli(cli, ["-c", "-r", "-p", pipeline, "-i", work / "images", "-o", outbatch,
                              "--plugins-directory", PLUGIN_DIR, "-e", "imageio_reader",
                              "-L", "WARNING", "-d", outbatch / "done.txt"], work)
    batch_file = outbatch / "Batch_data.h5"
    assert batch_file.is_file(), log
    assert "Error" not in proc.stdout and "RunCellposeSAM" not in proc.stderr, log

    proc, log = run_cli(cli, ["--get-batch-commands-new", batch_file, "--images-per-batch", 2],
                        work)
    assert proc.returncode == 0, log
    commands = [ln for ln in proc.stdout.splitlines() if "-p" in ln and ".h5" in ln]
    ranges = [tuple(map(int, m.groups())) for m in
              (re.search(r"-f\s+(\d+)\s+-l\s+(\d+)", c) for c in commands) if m]
    assert ranges == [(1, 2), (3, 3)], log

    image_rows, object_rows = [], []
    for i, (first, last) in enumerate(ranges):
        out = outbatch / f"batch{i}"
        headless(cli, batch_file, out, work, "-f", first, "-l", last)
        image_rows += read_csv(out / f"{PREFIX}Image.csv")
        object_rows += read_csv(out / f"{PREFIX}Nuclei.csv")

    # CellProfiler's own per-run bookkeeping differs by design: timings, and each batch run is
    # its own group (Group_Index / Group_Length count within the batch)
    def comparable(rows):
        skip = ("ExecutionTime_", "Group_Index", "Group_Length")
        keep = [{k: v for k, v in r.items() if not k.startswith(skip)} for r in rows]
        return sorted(keep, key=lambda r: (int(r["ImageNumber"]), int(r.get("ObjectNumber", 0))))

    def differences(got, want):
        assert len(got) == len(want), (len(got), len(want))
        return sorted({k for a, b in zip(got, want) for k in a.keys() | b.keys()
                       if a.get(k) != b.get(k)})

    unsplit_images = comparable(read_csv(unsplit_run / f"{PREFIX}Image.csv"))
    assert differences(comparable(image_rows), unsplit_images) == []
    unsplit_objects = comparable(read_csv(unsplit_run / f"{PREFIX}Nuclei.csv"))
    assert differences(comparable(object_rows), unsplit_objects) == []


def test_failure_fails_the_run_and_names_the_image(cli, work, tmp_path):
    """A broken custom model stops the headless run with a non-Complete status and an error
    naming the image; nothing is silently skipped."""
    bad = tmp_path / "broken.pt"
    bad.write_bytes(b"not a model")
    pipeline = build_pipeline(tmp_path / "bad.cppipe", bad)
    out = tmp_path / "out"
    out.mkdir()
    proc, log = run_cli(cli, ["-c", "-r", "-p", pipeline, "-i", work / "images", "-o", out,
                              "--plugins-directory", PLUGIN_DIR, "-e", "imageio_reader",
                              "-L", "WARNING", "-d", out / "done.txt"], tmp_path)
    status = (out / "done.txt").read_text().strip() if (out / "done.txt").exists() else ""
    assert proc.returncode != 0 or status != "Complete", log
    assert "RunCellposeSAM failed on image 'DNA'" in proc.stdout + proc.stderr, log
    assert "broken.pt" in proc.stdout + proc.stderr, log


@requires_trained_shipped_model
def test_shipped_model_exported_counts_close_to_ground_truth(cli, work, data_dir, tmp_path):
    """A headless run over the 40 held-out DSB fluorescence images with the shipped model at the
    module's default settings (the model's recommended ones), border objects kept as the
    annotations count them: the exported counts are close to the annotations."""
    images = tmp_path / "gt_images"
    images.mkdir()
    stems = dsb_fluorescence_val_stems(data_dir)
    for stem in stems:
        shutil.copy(data_dir / DSB / "train" / f"{stem}_img.tif", images / f"{stem}.tif")
    pipeline = build_pipeline(work / "gt.cppipe", "default", remove_border=False)
    out = work / "out_gt"
    headless(cli, pipeline, out, work, "-i", images)
    rows = {r["FileName_DNA"]: float(r["Count_Nuclei"]) for r in read_csv(out / f"{PREFIX}Image.csv")}
    assert_counts_close({s: rows[f"{s}.tif"] for s in stems}, data_dir)


def test_panoptic_model_split_by_class_exports_class_objects(cli, work, tmp_path):
    """A panoptic model with 'Save one object set per class?': the real CLI exports the class
    object sets (counts, parents) next to the main objects."""
    model = _testing.make_grid_panoptic_model(tmp_path / "pan.pt", winner=2)  # class "b" wins
    pipeline = build_pipeline(tmp_path / "pan.cppipe", model, split_by_class=True)
    out = tmp_path / "out"
    headless(cli, pipeline, out, work, "-i", work / "images")
    images = read_csv(out / f"{PREFIX}Image.csv")
    nuclei = read_csv(out / f"{PREFIX}Nuclei.csv")
    class_b = read_csv(out / f"{PREFIX}Nuclei_b.csv")
    assert len(images) == len(DSB_STEMS)
    n = _testing.expected_grid((256, 256), remove_border=True)[0]
    for r in images:
        assert float(r["Count_Nuclei"]) == float(r["Count_Nuclei_b"]) == n
        assert float(r["Count_Nuclei_a"]) == float(r["Count_Nuclei_c"]) == 0
    assert len(class_b) == len(nuclei) == n * len(DSB_STEMS)
    assert all(float(o["CellposeSAM_ClassNumber"]) == 2 and float(o["CellposeSAM_Class_b"]) == 1
               and float(o["Children_Nuclei_b_Count"]) == 1 for o in nuclei)
    # each class object is its parent: same number, same centre
    for o in class_b:
        assert int(o["Parent_Nuclei"]) == int(o["ObjectNumber"])
    by_key = {(o["ImageNumber"], o["ObjectNumber"]): o for o in nuclei}
    for o in class_b:
        parent = by_key[(o["ImageNumber"], o["Parent_Nuclei"])]
        assert float(o["Location_Center_X"]) == pytest.approx(float(parent["Location_Center_X"]))


def test_ram_per_worker_segments_large_images_in_blocks(cli, work, data_dir, tmp_path):
    """'RAM per worker' saved in the pipeline file reaches the library in a real headless run:
    a 768 x 768 mosaic of real DSB2018 images is segmented in 512-px blocks (the grid model's
    exact objects all the same), a 256 x 256 image whole; the repeat command carries the budget."""
    import json

    import tifffile
    from test_blockwise import mosaic

    images = tmp_path / "images"
    images.mkdir()
    tifffile.imwrite(images / "mosaic.tif", mosaic(data_dir, 768)[0].astype(np.uint8))
    shutil.copy(work / "images" / f"{DSB_STEMS[0]}.tif", images / "small.tif")
    pipeline = build_pipeline(tmp_path / "ram.cppipe", work / "grid.pt", host_memory="1MB")
    out = tmp_path / "out"
    headless(cli, pipeline, out, work, "-i", images)
    rows = {r["FileName_DNA"]: r for r in read_csv(out / f"{PREFIX}Image.csv")}
    assert rows["mosaic.tif"]["CellposeSAM_BlockSize_Nuclei"] == "512"
    assert rows["small.tif"]["CellposeSAM_BlockSize_Nuclei"] == "0"
    for name, shape in (("mosaic.tif", (768, 768)), ("small.tif", (256, 256))):
        assert float(rows[name]["Count_Nuclei"]) == _testing.expected_grid(shape, remove_border=True)[0]
    record = json.loads(rows["mosaic.tif"]["CellposeSAM_Settings_Nuclei"])
    assert "--host-memory 1MB" in record["cli"]


def test_cli_help_lists_plugin_flag(cli):
    proc, log = run_cli(cli, ["--help"], ROOT)
    assert proc.returncode == 0 and "--plugins-directory" in proc.stdout, log
    assert os.path.isdir(PLUGIN_DIR)
