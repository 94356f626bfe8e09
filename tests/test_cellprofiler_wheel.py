"""The installable CellProfiler module: a wheel built from this checkout, installed into a fresh
venv, gives a plugin that the real headless ``cellprofiler`` runs, found through
``cpsam cellprofiler``; ``cpsam doctor`` reports on the environment.

One end-to-end test (wheel build, venv, one headless CellProfiler run on two real DSB images
with the shipped model); it needs cellprofiler-core and the cellprofiler CLI
(``bash scripts/install_cellprofiler_cli.sh``) like tests/test_cellprofiler_cli.py.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
from conftest import DSB

from cpsam_toolkit.cli import main

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "cellprofiler_plugin" / "examples" / "segment_nuclei.cppipe"
STEMS = ("003cee89357d9fe13516167fd67b609a164651b21934585648c740d2c3d86dc1",
         "03398329ced0c23b9ac3fac84dd53a87d9ffe4d9d10f1b5fe8df8fac12380776")


def test_cellprofiler_command_prints_and_installs(tmp_path, capsys):
    assert main(["cellprofiler"]) == 0
    out = capsys.readouterr().out
    assert "--plugins-directory" in out and "runcellposesam.py" in out
    assert main(["cellprofiler", "--install", str(tmp_path / "plugins"), "--path-only"]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "plugins")
    copied = (tmp_path / "plugins" / "runcellposesam.py").read_bytes()
    assert copied == (ROOT / "cellprofiler_plugin" / "runcellposesam.py").read_bytes()


def test_doctor_reports_each_check(capsys):
    rc = main(["doctor", "--no-cellprofiler", "--json"])
    report = json.loads(capsys.readouterr().out)
    names = [c["name"] for c in report["checks"]]
    assert names == ["Python", "numpy", "torch", "GPU memory", "model weights"]
    assert rc == (1 if report["fail"] else 0)
    for c in report["checks"]:
        assert c["status"] in ("ok", "warn", "fail")
        assert c["status"] == "ok" or c["fix"] or c["name"] == "GPU memory"
    weights = next(c for c in report["checks"] if c["name"] == "model weights")
    assert "cpsam models download cpsam_v2" in weights["fix"] or weights["status"] == "ok"


@pytest.mark.cellprofiler
def test_wheel_plugin_runs_in_headless_cellprofiler(tmp_path, data_dir):
    if importlib.util.find_spec("cellprofiler") is None:
        pytest.fail("the headless CellProfiler CLI is not installed; run "
                    "bash scripts/install_cellprofiler_cli.sh")
    # 1. build a wheel from a copy of the checkout (the plugin is a link there: the wheel must
    #    hold the file itself)
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, symlinks=True, ignore=shutil.ignore_patterns(
        ".git", ".venv", "build", "*.egg-info", "notebooks", "benchmarks", "__pycache__",
        ".pytest_cache", ".ruff_cache", "out", "runs"))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(OMP_NUM_THREADS="1", CPSAM_OFFLINE="1")
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(src), "--no-deps",
                    "--no-build-isolation", "--no-index", "-q", "-w", str(wheels)],
                   check=True, env=env, cwd=tmp_path, timeout=600)
    wheel = next(wheels.glob("cpsam_toolkit-*.whl"))

    # 2. a fresh venv (its dependencies, torch and CellProfiler, come from this environment's
    #    site-packages through a .pth line; cpsam-toolkit itself only from the wheel)
    venv = tmp_path / "venv"
    subprocess.run([sys._base_executable, "-m", "venv", "--without-pip", str(venv)], check=True,
                   timeout=300)
    py = venv / "bin" / "python"
    site = Path(subprocess.check_output(
        [py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], text=True).strip())
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(py), "install", "--no-deps",
                    "--no-index", "-q", str(wheel)], check=True, env=env, timeout=600)
    where = subprocess.check_output([py, "-c", "import cpsam_toolkit; print(cpsam_toolkit.__file__)"],
                                    text=True, env=env, cwd=tmp_path).strip()
    assert where.startswith(str(site)), where

    # 3. `cpsam cellprofiler` of the installed wheel names the plugins folder
    folder = Path(subprocess.check_output([venv / "bin" / "cpsam", "cellprofiler", "--path-only"],
                                          text=True, env=env, cwd=tmp_path).strip())
    assert folder == site / "cpsam_toolkit" / "cellprofiler"
    plugin = folder / "runcellposesam.py"
    assert plugin.is_file() and not plugin.is_symlink()

    # 4. the real headless CellProfiler runs the example pipeline with that folder
    images = tmp_path / "images"
    images.mkdir()
    for s in STEMS:
        shutil.copy(data_dir / DSB / "train" / f"{s}_img.tif", images / f"{s}.tif")
    out = tmp_path / "out"
    out.mkdir()
    proc = subprocess.run([py, "-m", "cellprofiler", "-c", "-r", "-p", str(EXAMPLE), "-i",
                           str(images), "-o", str(out), "--plugins-directory", str(folder),
                           "-e", "imageio_reader", "-L", "WARNING", "-d", str(out / "done.txt")],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=900)
    log = f"{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    assert proc.returncode == 0 and (out / "done.txt").read_text().strip() == "Complete", log
    with open(out / "Nuclei_Image.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2, log
    for r in rows:
        assert float(r["Count_Nuclei"]) > 0
        # how to repeat the run: model, full SHA-256 of the weights, settings, CLI command
        rec = json.loads(r["CellposeSAM_Settings_Nuclei"])
        assert rec["model"] == "cpsam_toolkit_small"
        shipped = site / "cpsam_toolkit" / "models" / "cpsam_small.pt"
        import hashlib

        assert rec["sha256"] == hashlib.sha256(shipped.read_bytes()).hexdigest()
        assert rec["settings"]["flow_threshold"] == pytest.approx(
            float(rec["cli"].split("--flow-threshold ")[1].split()[0]))
        assert rec["cli"].startswith("cpsam segment IMAGES --out OUT --model cpsam_toolkit_small")


@pytest.mark.cellprofiler
def test_doctor_loads_the_module_with_cellprofiler_core(tmp_path, monkeypatch):
    if importlib.util.find_spec("cellprofiler_core") is None:
        pytest.skip("cellprofiler-core is not installed")
    from cpsam_toolkit import doctor
    from cpsam_toolkit.doctor import check_cellprofiler

    checks = {c.name: c for c in check_cellprofiler()}
    loads = checks["CellProfiler loads the module"]
    assert loads.status == "ok" and "RunCellposeSAM" in loads.found, loads.line()
    # a module file that CellProfiler cannot load: the check fails and shows the error
    broken = tmp_path / "plugins"
    broken.mkdir()
    (broken / "runcellposesam.py").write_text("import cellprofiler_core\nraise ImportError('boom')\n")
    monkeypatch.setattr(doctor, "plugins_directory", lambda: broken)
    checks = {c.name: c for c in check_cellprofiler()}
    bad = checks["CellProfiler loads the module"]
    assert bad.status == "fail" and bad.fix, bad.line()
