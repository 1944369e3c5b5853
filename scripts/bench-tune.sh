#!/usr/bin/env bash
# One scheduling setting against its alternatives under the open-loop mix (#18): a server per
# value (continuous batching, the default bundle), loaded level by level in alternating order.
#   SETTING=max_running_images VALUES=16,32,64 LOADS=0.8,1.0 scripts/bench-tune.sh
# Writes $OUT_DIR/tune-$SETTING.{json,md,svg} (default .cache/bench/sweep).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
cargo build --bin clipcap
BIN=target/debug/clipcap
OUT_DIR="${OUT_DIR:-.cache/bench/sweep}"
MODEL="${MODEL:-models/demo}"
SETTING="${SETTING:-max_running_images}"
VALUES="${VALUES:-16,32,64}"
LOADS="${LOADS:-0.8,1.0}"
REQUESTS="${REQUESTS:-200}"
SPEC="${SPEC:-config/bench/mixed.toml}"
[ -d "$OUT_DIR/images" ] || { echo "run scripts/bench-sweep.sh first (it makes $OUT_DIR/images)"; exit 1; }
IMAGES=()
for f in "$OUT_DIR"/images/*; do IMAGES+=(--image "$f"); done
VAR="CLIPCAP_$(echo "$SETTING" | tr '[:lower:]' '[:upper:]')"
PIDS=()
TARGETS=()
trap 'kill -TERM "${PIDS[@]}" 2>/dev/null || true' EXIT
IFS=, read -ra VS <<< "$VALUES"
for v in "${VS[@]}"; do
  port=$("$CLIPCAP_PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  env "$VAR=$v" "$BIN" serve --model "demo=$MODEL" --bind "127.0.0.1:$port" --device cpu > "$OUT_DIR/tune-$v.log" 2>&1 &
  PIDS+=($!)
  for _ in $(seq 1 300); do curl -fs "http://127.0.0.1:$port/ready" >/dev/null 2>&1 && break; sleep 0.2; done
  TARGETS+=(--target "$SETTING:$v=http://127.0.0.1:$port")
done
"$BIN" bench-http "${TARGETS[@]}" "${IMAGES[@]}" --spec "$SPEC" --load "$LOADS" --requests "$REQUESTS" \
  --warmup 20 --seed "${SEED:-1}" --out "$OUT_DIR/tune-$SETTING.json" --plot "$OUT_DIR/tune-$SETTING.svg" \
  | tee "$OUT_DIR/tune-$SETTING.md"
