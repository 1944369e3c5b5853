#!/usr/bin/env bash
# Gathers what scripts/gpu-check.sh needs into .gpu/ (git-ignored; carry it with `.gpu`).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
cargo build --bin clipcap
mkdir -p .gpu/images
cp target/debug/clipcap .gpu/clipcap
strip .gpu/clipcap 2>/dev/null || true
for f in ../shared/seed/images/*.jpg; do [ -f "$f" ] && cp "$f" .gpu/images/; done
# Then: device run with carry [".gpu"] and command: bash scripts/gpu-check.sh .gpu "$OUT"
ls -la .gpu .gpu/images
du -sh .gpu
