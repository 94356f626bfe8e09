#!/usr/bin/env bash
# Install a headless-capable Chromium for the Jupyter end-to-end test (tests/test_browser.py).
# Playwright's own browser download needs the internet; Debian's chromium package comes from
# the ordinary apt mirror instead, and the test launches it via executable_path=/usr/bin/chromium.
# Idempotent: does nothing when /usr/bin/chromium already runs.
#   usage: scripts/install_browser.sh
set -euo pipefail
CHROMIUM="${CPSAM_CHROMIUM:-/usr/bin/chromium}"

if [ -x "$CHROMIUM" ] && "$CHROMIUM" --headless --no-sandbox --version >/dev/null 2>&1; then
  echo "[browser] $("$CHROMIUM" --version 2>/dev/null) already installed at $CHROMIUM"
  exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "[browser] apt-get not available: install chromium yourself (or set CPSAM_CHROMIUM); browser tests will be skipped" >&2
  exit 1
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null 2>&1; then SUDO="sudo"; else
    echo "[browser] need root (or sudo) to apt-get install chromium; browser tests will be skipped" >&2
    exit 1
  fi
fi
echo "[browser] installing Debian chromium with apt-get"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends chromium fonts-dejavu-core >/dev/null
"$CHROMIUM" --headless --no-sandbox --version
