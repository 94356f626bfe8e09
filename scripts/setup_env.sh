#!/usr/bin/env bash
# Create (or update) the project's virtual environment with everything the main job and the
# tests need. Idempotent: a second run only installs what changed.
#   usage: scripts/setup_env.sh [VENV_DIR]     (default .venv)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${1:-.venv}"
PYTHON="${PYTHON:-python3.11}"
command -v "$PYTHON" >/dev/null 2>&1 || PYTHON=python3

if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating $VENV with $($PYTHON --version)"
  "$PYTHON" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip
fi
PIP="$VENV/bin/python -m pip"

echo "[setup] installing cpsam-toolkit with extras dev, cellprofiler, jupyter, distributed, omezarr"
$PIP install -q -e ".[dev,cellprofiler,jupyter,distributed,omezarr]"

# the headless `cellprofiler` CLI (GUI-less): see cellprofiler_plugin/README.md
if [ -f scripts/install_cellprofiler_cli.sh ]; then
  bash scripts/install_cellprofiler_cli.sh "$VENV/bin/python"
fi

# a real browser for the Jupyter end-to-end test (Debian chromium; optional elsewhere)
if [ -f scripts/install_browser.sh ]; then
  bash scripts/install_browser.sh || echo "[setup] browser not installed: browser tests will be skipped"
fi
touch "$VENV/.installed"
echo "[setup] done: $VENV"
