#!/usr/bin/env bash
# Install the headless CellProfiler command line (no GUI) into the current Python environment,
# for running RunCellposeSAM pipelines with `cellprofiler -c -r -p ...` and for the plugin's tests.
#
#   bash scripts/install_cellprofiler_cli.sh                        # `python` on PATH (your venv)
#   bash scripts/install_cellprofiler_cli.sh /path/to/venv/bin/python
#   PYTHON=/path/to/venv/bin/python bash scripts/install_cellprofiler_cli.sh
# Idempotent: re-running only checks (pip skips what is installed).
#
# What it installs (all from PyPI, pure wheels or manylinux wheels, no compiler, no Java):
#   cellprofiler-core-nightly==5.0.0.dev784   (pulls cellprofiler-library-nightly, centriole-nightly,
#                                              numpy<2, scipy<1.11, scikit-image, h5py, ...)
#   cellprofiler-nightly==5.0.0.dev784 --no-deps  (the `cellprofiler` command + the stock modules;
#                                              --no-deps skips wxPython and mysqlclient, which need
#                                              GTK / MySQL headers and are only for the GUI and
#                                              ExportToDatabase-to-MySQL)
#   rapidfuzz==3.14.6                         (the only non-GUI dependency of cellprofiler-nightly
#                                              that cellprofiler-core-nightly does not already pull;
#                                              FilterObjects, ClassifyObjects and FlagImage need it)
# pip then reports cellprofiler-nightly's GUI requirements (wxPython, mysqlclient, sentry-sdk,
# docutils==0.15.2, Jinja2) as missing: expected, they are not used headless.
set -euo pipefail

PY="${1:-${PYTHON:-$(command -v python || command -v python3)}}"
CP_VERSION="${CP_VERSION:-5.0.0.dev784}"
RAPIDFUZZ_VERSION="${RAPIDFUZZ_VERSION:-3.14.6}"

echo "Installing the headless CellProfiler ${CP_VERSION} CLI into ${PY}"
"$PY" -m pip install "cellprofiler-core-nightly==${CP_VERSION}" "rapidfuzz==${RAPIDFUZZ_VERSION}"
"$PY" -m pip install --no-deps "cellprofiler-nightly==${CP_VERSION}"

# check: the CLI starts and the modules used by the example pipeline (and FilterObjects) load
"$PY" -m cellprofiler --version
"$PY" - <<'PY'
import logging
logging.disable(logging.WARNING)  # ExportToDatabase logs that MySQL is absent: expected
import cellprofiler_core.preferences as prefs
prefs.set_headless()
import cellprofiler_core.modules  # noqa: F401  (registers the stock modules)
from cellprofiler_core.utilities.core.modules import get_module_names
need = {"NamesAndTypes", "IdentifyPrimaryObjects", "MeasureObjectSizeShape", "FilterObjects",
        "ExportToSpreadsheet", "CreateBatchFiles"}
missing = need - set(get_module_names())
if missing:
    raise SystemExit(f"CellProfiler modules failed to load: {sorted(missing)}")
print("headless CellProfiler OK:", len(get_module_names()), "modules")
PY
