#!/usr/bin/env bash
# Installs Debian's Chromium for the browser tests when it is missing. The tests drive this system
# browser through Playwright's executable_path; they never download a browser of their own.
set -euo pipefail
if command -v chromium >/dev/null 2>&1; then
    exit 0
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    SUDO="sudo"
fi
$SUDO apt-get update -q
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q chromium
chromium --version
