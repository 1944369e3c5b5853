#!/usr/bin/env bash
# Server load test on loopback against the default bundle (bounded request counts):
#   1. N sequential `clipcap caption` CLI runs (the baseline) vs the server at concurrency 1..64,
#      with continuous batching on;
#   2. the same levels with continuous batching off (static micro-batches);
#   3. p50/p99 caption latency at concurrency 8 with and without a training job running.
# Prints markdown tables; JSON results go to $OUT_DIR (default .cache/bench).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
cargo build --bin clipcap
BIN=target/debug/clipcap
OUT_DIR="${OUT_DIR:-.cache/bench}"
mkdir -p "$OUT_DIR"
MODEL="${MODEL:-models/demo}"
LEVELS="${LEVELS:-1,4,16,64}"
REQUESTS="${REQUESTS:-64}"
IMAGES=()
for f in .cache/demo/synth/images/synth_00000{0,1,2,3,4,5,6,7}.*; do IMAGES+=(--image "$f"); done
PORT=18931
start() {
  "$BIN" serve --model "demo=$MODEL" --bind 127.0.0.1:$PORT --device cpu "$@" > "$OUT_DIR/server.log" 2>&1 &
  SERVER=$!
  for _ in $(seq 1 300); do curl -fs "http://127.0.0.1:$PORT/ready" >/dev/null 2>&1 && return; sleep 0.2; done
  echo "server did not start"; cat "$OUT_DIR/server.log"; exit 1
}
stop() { kill -TERM "$SERVER" 2>/dev/null; wait "$SERVER" || true; }
trap 'kill -TERM "${SERVER:-0}" 2>/dev/null || true' EXIT

if [ "${ONLY_TRAINING_PART:-0}" != 1 ]; then
echo "## continuous batching on (+ CLI baseline)"
start
"$BIN" bench-http --url "http://127.0.0.1:$PORT" "${IMAGES[@]}" --concurrency "$LEVELS" --requests "$REQUESTS" \
  --cli-baseline 8 --cli-model "$MODEL" --out "$OUT_DIR/continuous.json"
stop
echo "## continuous batching off"
start --no-continuous-batching
"$BIN" bench-http --url "http://127.0.0.1:$PORT" "${IMAGES[@]}" --concurrency "$LEVELS" --requests "$REQUESTS" \
  --out "$OUT_DIR/static.json"
stop
fi
if [ -f .cache/demo/data/meta.json ] && [ "${SKIP_TRAINING_PART:-0}" != 1 ]; then
  echo "## caption latency at concurrency 8, without and with a training job"
  rm -rf "$OUT_DIR/jobs" "$OUT_DIR/models"; mkdir -p "$OUT_DIR/data/demo"
  # A copy: the server refuses datasets that resolve outside its data root (symlinks too).
  cp .cache/demo/data/{embeddings.safetensors,captions.jsonl,meta.json} "$OUT_DIR/data/demo/"
  CLIPCAP_ADMIN_TOKEN=bench CLIPCAP_JOBS_DIR="$OUT_DIR/jobs" CLIPCAP_BUNDLES_DIR="$OUT_DIR/models" \
    start --data-root "$OUT_DIR/data"
  "$BIN" bench-http --url "http://127.0.0.1:$PORT" "${IMAGES[@]}" --concurrency 8 --requests 48 --out "$OUT_DIR/idle.json"
  curl -fs -X POST -H 'authorization: Bearer bench' -H 'content-type: application/json' \
    -d '{"dataset": "demo", "output": "bench-train", "epochs": 1, "batch_size": 64, "lr": 0.0001, "init_from_base": true}' \
    "http://127.0.0.1:$PORT/train"; echo
  sleep 5
  "$BIN" bench-http --url "http://127.0.0.1:$PORT" "${IMAGES[@]}" --concurrency 8 --requests 48 --out "$OUT_DIR/training.json"
  curl -fs -H 'authorization: Bearer bench' "http://127.0.0.1:$PORT/train" | head -c 400; echo
  stop
fi
