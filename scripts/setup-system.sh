#!/usr/bin/env bash
# System packages the tests need beyond Rust and Python: Chromium (browser test), Java
# (pycocoevalcap's PTB tokenizer and METEOR; javac for scripts/make_ptb_tables.py's probe),
# and playwright-core from npm. Skips what is there.
set -euo pipefail
cd "$(dirname "$0")/.."
need=()
command -v chromium >/dev/null 2>&1 || need+=(chromium)
command -v java >/dev/null 2>&1 && command -v javac >/dev/null 2>&1 || need+=(default-jdk-headless)
command -v node >/dev/null 2>&1 || need+=(nodejs npm)
if [ ${#need[@]} -gt 0 ]; then
  echo "setup: installing ${need[*]}" >&2
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq >&2
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}" >&2
fi
if [ ! -d tests/browser/node_modules/playwright-core ]; then
  echo "setup: installing playwright-core (npm)" >&2
  (cd tests/browser && npm install --silent --no-audit --no-fund >&2)
fi
