#!/usr/bin/env bash
# Installs Debian's Chromium for the review page's browser test (Playwright drives it; never
# `playwright install`, which downloads from a CDN). Idempotent: an installed Chromium is kept.
set -euo pipefail
if command -v chromium >/dev/null 2>&1; then
  exit 0
fi
SUDO=""
[ "$(id -u)" = 0 ] || SUDO="sudo"
$SUDO apt-get update -qq
$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null
command -v chromium
