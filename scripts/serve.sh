#!/usr/bin/env bash
# Sets everything up (venv with torch, release build, default bundle) and serves the default
# bundle. Extra arguments go to `clipcap serve` (e.g. --bind 0.0.0.0:8080 --device cuda).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
cargo build --bin clipcap
[ -f models/demo/clipcap.json ] || bash scripts/build-demo.sh
exec target/debug/clipcap serve "$@"
