"""Every notebook in notebooks/ runs top to bottom in a real kernel (nbclient), on the CPU.

They run in a temporary folder (their ``outputs/`` go there) with the shipped model (or the tiny
stand-in of :func:`cpsam_toolkit.widgets.demo.notebook_model` while it is absent). Notebooks are
also checked to be committed with outputs cleared.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
from pathlib import Path

import pytest
from conftest import shipped_recommended_flow_threshold

from cpsam_toolkit.widgets.demo import shipped_model_available

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")
pytest.importorskip("ipywidgets")
pytest.importorskip("anywidget")

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
#: seconds per notebook (shared CPUs under load; the notebooks take about a minute alone)
TIMEOUT = int(os.environ.get("CPSAM_NOTEBOOK_TIMEOUT", "900"))


WIDGET_NOTEBOOKS = ["01_segment", "02_correct_and_finetune", "03_evaluate"]


def test_the_widget_notebooks_exist():
    names = [p.stem for p in NOTEBOOKS]
    assert set(WIDGET_NOTEBOOKS) <= set(names), names


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_is_committed_without_outputs(path):
    nb = json.loads(path.read_text())
    for cell in nb["cells"]:
        if cell["cell_type"] == "code":
            assert cell.get("outputs") == [] and cell.get("execution_count") is None, path.name
    assert nb["metadata"]["kernelspec"]["name"] == "python3"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs_top_to_bottom(path, tmp_path, monkeypatch):
    pytest.importorskip("cpsam_toolkit.dynamics", reason="cpsam_toolkit.dynamics is not in this checkout yet")
    nb = nbformat.read(path, as_version=4)
    # the kernel imports this checkout's package, and finds the shared data from the temp folder
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    monkeypatch.setenv("CPSAM_DATA", os.environ.get("CPSAM_DATA", str(ROOT.parent / "shared" / "data")))
    client = nbclient.NotebookClient(
        nb,
        timeout=TIMEOUT,
        kernel_name="python3",
        resources={"metadata": {"path": str(tmp_path)}},
        allow_errors=False,
    )
    t0 = time.time()
    client.execute()  # raises CellExecutionError with the traceback on any failing cell
    elapsed = time.time() - t0
    print(f"{path.name}: {elapsed:.0f} s", file=sys.stderr)
    widget_views = [
        o
        for c in nb.cells
        if c.cell_type == "code"
        for o in c.get("outputs", [])
        if "application/vnd.jupyter.widget-view+json" in o.get("data", {})
    ]
    if path.stem in WIDGET_NOTEBOOKS:
        assert widget_views, f"{path.name} displayed no widget"
    text = "\n".join(
        o.get("text", "")
        if o.get("output_type") == "stream"
        else str(o.get("data", {}).get("text/plain", ""))
        for c in nb.cells
        if c.cell_type == "code"
        for o in c.get("outputs", [])
    )
    out = tmp_path / "outputs"
    # no notebook writes into the package (its examples folder, say)
    pkg = ROOT / "cpsam_toolkit"
    written = [p for p in pkg.rglob("*") if p.is_file() and p.stat().st_mtime > t0
               and p.suffix in (".tif", ".tiff", ".pt", ".png", ".json", ".csv", ".zip")]
    assert not written, written
    if path.stem == "01_segment":
        assert "objects; post-processing" in text
        assert list(out.glob("*_masks.tif"))
        if shipped_model_available():  # the viewer uses the model's recommended setting, and says so
            ft = f"{shipped_recommended_flow_threshold():g}"
            assert f"'flow_threshold': '{ft} (model)'" in text, text
            assert "cpsam segment " in text and f"--flow-threshold {ft}" in text
    elif path.stem == "02_correct_and_finetune":
        assert len(list((out / "02" / "corrected").glob("*_masks.tif"))) == 8
        assert "('bf_08275a5b', 'corrected')" in text and "base  (starting model)" in text
        assert "outline filled" in text
        # the corrector opens on an image with predicted cells
        n_pred = int(re.search(r"bf_\w+: (\d+) predicted objects", text).group(1))
        if shipped_model_available():
            assert n_pred > 0, text
            # the finetune demo shows a gain on its held-out images, and saves the best epoch
            m = re.search(r"starting model ([\d.]+) -> finetuned ([\d.]+) \(epoch (\d+)\)", text)
            assert m, text
            print(m.group(0), file=sys.stderr)
            assert float(m.group(2)) > float(m.group(1)) + 0.05, m.group(0)
            assert f"saved epoch {m.group(3)} to" in text
            assert (out / "02" / "finetuned.pt").stat().st_size > 0
    elif path.stem == "03_evaluate":
        assert len(list((out / "03" / "predictions").glob("*_masks.tif"))) == 4
        assert "AP@0.5" in text and "examples" in text
    elif path.stem == "05_3d":
        # real-data 3D run: the 8-cell QCANet embryo (8 nuclei, anisotropy 2.18) in 3D and by
        # 2D + stitching. The shipped model was never trained on 3D data and its AP here moves a
        # lot between checkpoints (0.78 at epoch 260, 0.23 at 520), so only the object count is
        # held to a range; benchmarks/compare_3d.py compares the pipeline with the reference's
        rows = {m.group(1).strip(): (int(m.group(2)), float(m.group(3)))
                for m in re.finditer(r"^(.+?) objects +(\d+) \| AP@0\.5 ([\d.]+)", text, re.M)}
        assert "3D, anisotropy 2.18" in rows and any(k.startswith("2D + stitching") for k in rows), rows
        if shipped_model_available():
            assert 4 <= rows["3D, anisotropy 2.18"][0] <= 16, rows
