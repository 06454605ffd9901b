#!/usr/bin/env bash
# Install headless Chromium (Debian's `chromium` package) for the report's browser test
# (tests/test_report.py). Idempotent: does nothing when /usr/bin/chromium already exists.
# Needs root (or sudo) and the Debian package mirror; on failure the browser test skips with the reason.
#   bash scripts/install_chromium.sh
set -euo pipefail
if [ -x /usr/bin/chromium ]; then
  exit 0
fi
SUDO=""
if [ "$(id -u)" != 0 ]; then
  command -v sudo >/dev/null 2>&1 || { echo "install_chromium: need root or sudo" >&2; exit 1; }
  SUDO="sudo -n"
fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends chromium >/dev/null
/usr/bin/chromium --version
