#!/usr/bin/env bash
# `clipcap batch` against the server's best images/s: the same machine, bundle, images and
# decoding options, interleaved (batch, server, batch, server, ...), ratios from one run.
#   scripts/bench-batch.sh
#   MODEL=DIR IMAGES=32 ROUNDS=2 LEVELS=8,32 QUERY=max_tokens=16 scripts/bench-batch.sh
# Default bundle: GPT-2-small-shaped random weights with a ViT-B/32-shaped tower (made once).
# Prints a markdown table; the JSON of each run goes to $OUT_DIR (default .cache/bench).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
cargo build --bin clipcap
BIN=target/debug/clipcap
OUT_DIR="${OUT_DIR:-.cache/bench}"
MODEL="${MODEL:-$OUT_DIR/small}"
N="${IMAGES:-32}"
ROUNDS="${ROUNDS:-2}"
LEVELS="${LEVELS:-8,32}"
MAX_TOKENS="${MAX_TOKENS:-16}"
mkdir -p "$OUT_DIR"
if [ ! -f "$MODEL/clipcap.json" ]; then
  "$CLIPCAP_PYTHON" scripts/make_test_bundle.py --out "$MODEL" --size small --encoder vit-b32 >&2
fi
IMGS="$OUT_DIR/batch-images-$N"
if [ ! -d "$IMGS/images" ]; then
  "$BIN" synth --out "$IMGS" --images "$N" --seed 11 >&2
fi
mapfile -t FILES < <(find "$IMGS/images" -type f | sort)
IMAGE_ARGS=()
for f in "${FILES[@]}"; do IMAGE_ARGS+=(--image "$f"); done
PORT="$("$CLIPCAP_PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
SERVER=0
trap 'kill -TERM "$SERVER" 2>/dev/null || true' EXIT

echo "# clipcap batch vs server: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(nproc) threads"
echo "bundle $MODEL, ${#FILES[@]} images, beam 5 (the bundle's default), max_tokens $MAX_TOKENS; server levels $LEVELS, ${#FILES[@]} requests each"
echo
echo "| round | batch images/s | server best images/s (concurrency) | batch / server |"
echo "|---|---|---|---|"
for r in $(seq 1 "$ROUNDS"); do
  rm -f "$OUT_DIR/batch-out.jsonl"
  "$BIN" batch --model "$MODEL" --device cpu --quiet --input "$IMGS/images" \
    --output "$OUT_DIR/batch-out.jsonl" --max-tokens "$MAX_TOKENS" > "$OUT_DIR/batch-summary-$r.json"
  BATCH=$("$CLIPCAP_PYTHON" -c 'import json,sys; print(json.load(open(sys.argv[1]))["images_per_s"])' "$OUT_DIR/batch-summary-$r.json")
  "$BIN" serve --model "m=$MODEL" --bind "127.0.0.1:$PORT" --device cpu > "$OUT_DIR/batch-server.log" 2>&1 &
  SERVER=$!
  for _ in $(seq 1 600); do curl -fs "http://127.0.0.1:$PORT/ready" >/dev/null 2>&1 && break; sleep 0.2; done
  "$BIN" bench-http --url "http://127.0.0.1:$PORT" "${IMAGE_ARGS[@]}" --concurrency "$LEVELS" \
    --requests "${#FILES[@]}" --query "max_tokens=$MAX_TOKENS" --out "$OUT_DIR/batch-server-$r.json" > /dev/null
  kill -TERM "$SERVER"; wait "$SERVER" || true
  "$CLIPCAP_PYTHON" - "$OUT_DIR/batch-server-$r.json" "$BATCH" "$r" <<'PY'
import json, sys
levels = json.load(open(sys.argv[1]))["levels"]
best = max(levels, key=lambda l: l["images_per_s"])
batch = float(sys.argv[2])
print(f"| {sys.argv[3]} | {batch:.2f} | {best['images_per_s']:.2f} ({best['concurrency']}) | {batch / best['images_per_s']:.2f} |")
PY
done
