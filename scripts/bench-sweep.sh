#!/usr/bin/env bash
# Continuous batching against static micro-batches under open-loop load (#18), on loopback:
#   1. two servers on the default bundle, one per policy (the idle one waits on its queue);
#   2. each one's capacity with the mixed spec (config/bench/mixed.toml), closed loop at
#      concurrency 64;
#   3. Poisson arrivals at 20%..120% of the better capacity, both policies level by level in
#      alternating order (same seed: the same requests at every level and on both);
#   4. closed loop at concurrency 64 with uniform requests (the old benchmark's worst case).
# Writes $OUT_DIR/sweep.{json,md,svg} and closed64.json (default .cache/bench/sweep).
#   LOADS=0.2,0.5 REQUESTS=100 scripts/bench-sweep.sh   a shorter run
#   CLIPCAP_MAX_RUNNING_IMAGES=32 scripts/bench-sweep.sh  settings (CLIPCAP_*) for both servers
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
cargo build --bin clipcap
BIN=target/debug/clipcap
OUT_DIR="${OUT_DIR:-.cache/bench/sweep}"
MODEL="${MODEL:-models/demo}"
LOADS="${LOADS:-0.2,0.4,0.6,0.7,0.8,0.9,1.0,1.2}"
REQUESTS="${REQUESTS:-200}"
SPEC="${SPEC:-config/bench/mixed.toml}"
SEED="${SEED:-1}"
mkdir -p "$OUT_DIR/images"
[ -d "$MODEL" ] || { echo "no bundle at $MODEL (scripts/build-demo.sh builds models/demo)"; exit 1; }
# Images of several sizes (decode and resize cost differ), from the demo set or made up.
"$CLIPCAP_PYTHON" - "$OUT_DIR/images" <<'PY'
import glob, os, sys
from PIL import Image, ImageDraw
out = sys.argv[1]
src = sorted(glob.glob(".cache/demo/synth/images/*"))[:4]
sizes = [64, 224, 480, 1024]
for i, s in enumerate(sizes):
    for j in range(2):
        if src:
            im = Image.open(src[(2 * i + j) % len(src)]).convert("RGB").resize((s, s))
        else:
            im = Image.new("RGB", (s, s), (40 * i, 90, 200 - 40 * j))
            ImageDraw.Draw(im).ellipse((s // 4, s // 4, 3 * s // 4, 3 * s // 4), fill=(220, 30, 30))
        ext = "jpg" if j else "png"
        im.save(os.path.join(out, f"img{s}_{j}.{ext}"), quality=90)
PY
IMAGES=()
for f in "$OUT_DIR"/images/*; do IMAGES+=(--image "$f"); done
free_port() { "$CLIPCAP_PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
PC=$(free_port); PS=$(free_port)
"$BIN" serve --model "demo=$MODEL" --bind 127.0.0.1:$PC --device cpu > "$OUT_DIR/continuous.log" 2>&1 &
SC=$!
"$BIN" serve --model "demo=$MODEL" --bind 127.0.0.1:$PS --device cpu --no-continuous-batching \
  > "$OUT_DIR/static.log" 2>&1 &
SS=$!
trap 'kill -TERM $SC $SS 2>/dev/null || true' EXIT
for p in $PC $PS; do
  for _ in $(seq 1 300); do curl -fs "http://127.0.0.1:$p/ready" >/dev/null 2>&1 && break; sleep 0.2; done
  curl -fs "http://127.0.0.1:$p/ready" >/dev/null || { echo "server on $p did not start"; cat "$OUT_DIR"/*.log; exit 1; }
done
TARGETS=(--target "continuous=http://127.0.0.1:$PC" --target "static=http://127.0.0.1:$PS")
echo "## open loop, $SPEC, loads $LOADS of the measured capacity, $REQUESTS requests per level"
"$BIN" bench-http "${TARGETS[@]}" "${IMAGES[@]}" --spec "$SPEC" --load "$LOADS" --requests "$REQUESTS" \
  --warmup 20 --seed "$SEED" --duration-s "${DURATION_S:-120}" --out "$OUT_DIR/sweep.json" --plot "$OUT_DIR/sweep.svg" \
  | tee "$OUT_DIR/sweep.md"
echo "## closed loop, concurrency 64, uniform requests (model defaults, one image each)"
"$BIN" bench-http "${TARGETS[@]}" "${IMAGES[@]}" --concurrency 64 --requests 128 --warmup 8 \
  --out "$OUT_DIR/closed64.json" | tee -a "$OUT_DIR/sweep.md"
echo "## closed loop, concurrency 64, mixed requests"
"$BIN" bench-http "${TARGETS[@]}" "${IMAGES[@]}" --spec "$SPEC" --concurrency 64 --requests 200 --warmup 8 \
  --seed "$SEED" --out "$OUT_DIR/closed64-mixed.json" | tee -a "$OUT_DIR/sweep.md"
