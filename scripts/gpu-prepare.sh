#!/usr/bin/env bash
# Gathers what scripts/gpu-check.sh needs into .gpu/ (git-ignored; carry it with `.gpu`).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
cargo build --bin clipcap
mkdir -p .gpu/images
cp target/debug/clipcap .gpu/clipcap
strip .gpu/clipcap 2>/dev/null || true
[ -f .gpu/bundle-small/clipcap.json ] || "$CLIPCAP_PYTHON" scripts/make_test_bundle.py --out .gpu/bundle-small --size small --seed 0 >/dev/null
for f in ../shared/seed/images/*.jpg; do [ -f "$f" ] && cp "$f" .gpu/images/; done
ls -la .gpu .gpu/images
du -sh .gpu
