"""``cpsam doctor``: what this Python environment has, what is missing, and how to fix it.

Each check returns a :class:`Check` with a status (``ok``, ``warn``: works but limited,
``fail``: something will not work) and, when not ok, the fix. The CellProfiler check loads the
RunCellposeSAM module with the real ``cellprofiler_core`` in a child process, exactly as
CellProfiler does from its plugins folder. Nothing is downloaded or changed.
"""

from __future__ import annotations

import importlib.util
import platform
import subprocess
import sys
from dataclasses import dataclass
from typing import Any

from .cellprofiler import headless_command, plugins_directory
from .network import registry


@dataclass
class Check:
    """One finding: ``name``, ``status`` (ok / warn / fail), what was found, and the fix."""

    name: str
    status: str
    found: str
    fix: str = ""

    def line(self) -> str:
        mark = {"ok": "ok  ", "warn": "WARN", "fail": "FAIL"}[self.status]
        text = f"[{mark}] {self.name}: {self.found}"
        return text + (f"\n       fix: {self.fix}" if self.fix else "")


def _dist_version(name: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return None


def _requirement(dist: str, package: str) -> str | None:
    """The version specifier ``dist`` declares for ``package`` (e.g. ``<2``), if any."""
    from importlib.metadata import PackageNotFoundError, requires

    try:
        reqs = requires(dist) or []
    except PackageNotFoundError:
        return None
    for r in reqs:
        if ";" in r and "extra ==" in r:
            continue
        name = r.split(";")[0].strip()
        for i, ch in enumerate(name):
            if ch in "<>=!~[ (":
                if name[:i].strip().lower().replace("_", "-") == package:
                    spec = name[i:].strip().strip("()")
                    return spec.split("]")[-1].strip() or None
                break
    return None


def _satisfies(version: str, spec: str | None) -> bool | None:
    if not spec:
        return None
    try:
        from packaging.specifiers import SpecifierSet
        from packaging.version import Version
    except ImportError:  # pragma: no cover - packaging ships with pip/setuptools
        return None
    return Version(version) in SpecifierSet(spec)


def _cellprofiler_dist() -> str | None:
    for d in ("cellprofiler-core-nightly", "cellprofiler-core"):
        if _dist_version(d):
            return d
    return None


def check_python() -> Check:
    v = platform.python_version()
    dist = _cellprofiler_dist()
    if dist is None:
        return Check("Python", "ok", f"{v} ({sys.executable})")
    from importlib.metadata import metadata

    spec = metadata(dist).get("Requires-Python")
    ok = _satisfies(v, spec)
    if ok is False:
        return Check("Python", "fail", f"{v}, but {dist} needs Python {spec}",
                     f"use a Python {spec} environment for CellProfiler and cpsam-toolkit")
    return Check("Python", "ok", f"{v} ({sys.executable}); {dist} needs {spec or 'any'}")


def check_numpy() -> Check:
    import numpy

    v = numpy.__version__
    ours = _satisfies(v, _requirement("cpsam-toolkit", "numpy") or "<2")
    dist = _cellprofiler_dist()
    cp_spec = _requirement(dist, "numpy") if dist else None
    if ours is False or _satisfies(v, cp_spec) is False:
        need = cp_spec or "<2"
        return Check("numpy", "fail", f"{v}; CellProfiler and cpsam-toolkit need numpy {need}",
                     f"pip install 'numpy{need}' in this environment")
    return Check("numpy", "ok", v + (f" (CellProfiler needs {cp_spec})" if cp_spec else ""))


def check_torch() -> tuple[Check, Check]:
    """(torch and its device, GPU memory)."""
    try:
        import torch
    except ImportError:
        fail = Check("torch", "fail", "not installed",
                     "pip install torch (for an NVIDIA GPU: the CUDA build, see pytorch.org)")
        return fail, Check("GPU memory", "warn", "unknown (no torch)")
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name(0)
        free, total = torch.cuda.mem_get_info(0)
        dev = Check("torch", "ok", f"{torch.__version__}, CUDA {torch.version.cuda}, "
                    f"{torch.cuda.device_count()} GPU(s): {name}")
        gib = 1024**3
        status = "ok" if free >= 4 * gib else "warn"
        mem = Check("GPU memory", status, f"{free / gib:.1f} GiB free of {total / gib:.1f} GiB",
                    "" if status == "ok" else
                    "Cellpose-SAM (ViT-L) wants about 4 GiB: close other GPU programs or use a "
                    "smaller batch size (--batch-size 2; CellProfiler: 'Batch size')")
        return dev, mem
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        return (Check("torch", "ok", f"{torch.__version__}, Apple GPU (mps)"),
                Check("GPU memory", "ok", "shared with the system (mps)"))
    cuda_build = torch.version.cuda
    fix = ("no GPU visible to this CUDA build: check the driver (nvidia-smi)" if cuda_build else
           "CPU works (slower); for an NVIDIA GPU install torch's CUDA build (see pytorch.org)")
    return (Check("torch", "warn", f"{torch.__version__}, CPU only", fix),
            Check("GPU memory", "warn", "no GPU", ""))


def check_weights() -> Check:
    rows = {r["name"]: r for r in registry.list_models()}
    have = [n for n in registry.PUBLISHED_DEFAULTS if rows.get(n, {}).get("path")]
    if have:
        return Check("model weights", "ok", ", ".join(f"{n} ({rows[n]['path']})" for n in have))
    shipped = rows.get(registry.DEFAULT_MODEL, {}).get("path")
    found = "no published model cached" + (f"; shipped small model at {shipped}" if shipped
                                          else "; the shipped model is missing too")
    return Check("model weights", "warn" if shipped else "fail", found,
                 f"cpsam models download {registry.PUBLISHED_DEFAULTS[0]} (about 1.2 GB, into "
                 f"{registry.cache_dir()}; set CPSAM_HOME to change), or copy the file there")


_PLUGIN_PROBE = r"""
import logging, sys
logging.disable(logging.WARNING)
import cellprofiler_core.preferences as prefs
prefs.set_headless()
prefs.set_plugin_directory(sys.argv[1], globally=False)
import cellprofiler_core.modules  # noqa: F401
from cellprofiler_core.utilities.core.modules import get_module_names, instantiate_module
if "RunCellposeSAM" not in get_module_names():
    sys.exit("RunCellposeSAM was not found in " + sys.argv[1])
m = instantiate_module("RunCellposeSAM")
print("RunCellposeSAM", m.variable_revision_number)
"""


def check_cellprofiler(timeout: float = 300.0) -> list[Check]:
    try:
        folder = plugins_directory()
    except FileNotFoundError as e:
        return [Check("CellProfiler module file", "fail", str(e),
                      "pip install --force-reinstall cpsam-toolkit")]
    out = [Check("CellProfiler module file", "ok", str(folder / "runcellposesam.py"))]
    if importlib.util.find_spec("cellprofiler_core") is None:
        out.append(Check("cellprofiler_core", "warn", f"not installed in {sys.executable}",
                         "the module runs inside CellProfiler's Python: install cpsam-toolkit "
                         "there (pip install cpsam-toolkit), or install CellProfiler here "
                         "(pip install 'cpsam-toolkit[cellprofiler]')"))
        return out
    try:
        proc = subprocess.run([sys.executable, "-c", _PLUGIN_PROBE, str(folder)],
                              capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        out.append(Check("CellProfiler loads the module", "fail",
                         f"no answer within {timeout:.0f} s", "run `cpsam doctor` again"))
        return out
    if proc.returncode == 0:
        out.append(Check("CellProfiler loads the module", "ok",
                         f"{proc.stdout.strip()} (revision) with --plugins-directory {folder}"))
    else:
        tail = (proc.stderr.strip() or proc.stdout.strip()).splitlines()[-3:]
        out.append(Check("CellProfiler loads the module", "fail", " | ".join(tail),
                         "see the error; `cpsam cellprofiler` prints the folder to use"))
    if importlib.util.find_spec("cellprofiler") is None:
        out.append(Check("cellprofiler command", "warn", "not installed (GUI-less runs need it)",
                         "bash scripts/install_cellprofiler_cli.sh (a git checkout), or "
                         "pip install cellprofiler"))
    else:
        out.append(Check("cellprofiler command", "ok", headless_command(folder)))
    return out


def run_checks(cellprofiler: bool = True) -> list[Check]:
    """All checks, in the order they are printed."""
    checks = [check_python(), check_numpy(), *check_torch(), check_weights()]
    if cellprofiler:
        checks += check_cellprofiler()
    return checks


def summary(checks: list[Check]) -> dict[str, Any]:
    return {s: sum(c.status == s for c in checks) for s in ("ok", "warn", "fail")}
