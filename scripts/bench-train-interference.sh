#!/usr/bin/env bash
# Caption latency while a training job runs in the same server, by the training thread's CPU
# priority (`train_nice`): the CPU stand-in for #13's "training on its own CUDA stream". Each
# round starts a server per nice value (alternating), measures a caption burst with no job,
# starts a training job, waits for its first steps, measures the same burst again, and counts
# the training steps made during it. Needs the default bundle and its prepared data
# (scripts/build-demo.sh). Prints a markdown table; JSON goes to $OUT_DIR.
#   ROUNDS=2 NICES="0 10" CONCURRENCY=8 REQUESTS=48 scripts/bench-train-interference.sh
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
cargo build --offline --bin clipcap
BIN=target/debug/clipcap
OUT_DIR="${OUT_DIR:-.cache/bench/train-interference}"
MODEL="${MODEL:-models/demo}"
ROUNDS="${ROUNDS:-2}"
NICES="${NICES:-0 10}"
CONCURRENCY="${CONCURRENCY:-8}"
REQUESTS="${REQUESTS:-48}"
PORT=18937
[ -f .cache/demo/data/meta.json ] || { echo "no .cache/demo/data: run scripts/build-demo.sh"; exit 1; }
mkdir -p "$OUT_DIR/data/demo"
# A copy: the server refuses datasets that resolve outside its data root (symlinks too).
cp .cache/demo/data/{embeddings.safetensors,captions.jsonl,meta.json} "$OUT_DIR/data/demo/"
IMAGES=()
for f in .cache/demo/synth/images/synth_00000{0,1,2,3,4,5,6,7}.*; do IMAGES+=(--image "$f"); done
URL="http://127.0.0.1:$PORT"
AUTH=(-H 'authorization: Bearer bench')
trap 'kill -TERM "${SERVER:-0}" 2>/dev/null || true' EXIT
job_step() { curl -fs "${AUTH[@]}" "$URL/train/$1" | python3 -c 'import json,sys; print(json.load(sys.stdin)["step"])'; }

echo "CPU: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'), $(nproc) cores; $(date -u +%FT%TZ)"
for round in $(seq 1 "$ROUNDS"); do
  for nice in $NICES; do
    rm -rf "$OUT_DIR/jobs" "$OUT_DIR/models"
    CLIPCAP_ADMIN_TOKEN=bench CLIPCAP_JOBS_DIR="$OUT_DIR/jobs" CLIPCAP_BUNDLES_DIR="$OUT_DIR/models" \
      CLIPCAP_TRAIN_NICE="$nice" "$BIN" serve --model "demo=$MODEL" --bind "127.0.0.1:$PORT" --device cpu \
      --data-root "$OUT_DIR/data" > "$OUT_DIR/server.log" 2>&1 &
    SERVER=$!
    for _ in $(seq 1 300); do curl -fs "$URL/ready" >/dev/null 2>&1 && break; sleep 0.2; done
    tag="r$round-nice$nice"
    "$BIN" bench-http --url "$URL" "${IMAGES[@]}" --concurrency "$CONCURRENCY" --requests "$REQUESTS" \
      --warmup 4 --out "$OUT_DIR/$tag-idle.json" > /dev/null
    id=$(curl -fs -X POST "${AUTH[@]}" -H 'content-type: application/json' \
      -d '{"dataset": "demo", "output": "bench-train", "epochs": 50, "batch_size": 64, "lr": 0.0001, "init_from_base": true, "activate": false}' \
      "$URL/train" | python3 -c 'import json,sys; print(json.load(sys.stdin)["id"])')
    # The burst starts once the job is past its set-up and stepping.
    for _ in $(seq 1 600); do [ "$(job_step "$id")" -ge 3 ] && break; sleep 0.2; done
    s0=$(job_step "$id"); t0=$(date +%s.%N)
    "$BIN" bench-http --url "$URL" "${IMAGES[@]}" --concurrency "$CONCURRENCY" --requests "$REQUESTS" \
      --warmup 0 --out "$OUT_DIR/$tag-training.json" > /dev/null
    s1=$(job_step "$id"); t1=$(date +%s.%N)
    python3 -c "import json; json.dump({'steps': $s1 - $s0, 'seconds': $t1 - $t0}, open('$OUT_DIR/$tag-steps.json', 'w'))"
    curl -fs -X DELETE "${AUTH[@]}" "$URL/train/$id" > /dev/null
    kill -TERM "$SERVER"; wait "$SERVER" || true
  done
done
python3 - "$OUT_DIR" "$ROUNDS" "$NICES" <<'PY'
import json, sys
out, rounds, nices = sys.argv[1], int(sys.argv[2]), sys.argv[3].split()
def level(path):
    return json.load(open(path))["levels"][0]
print("| round | train_nice | no job: images/s | p50 / p99 ms | job running: images/s | p50 / p99 ms | p99 ratio | training steps/s during the burst |")
print("|---:|---:|---:|---:|---:|---:|---:|---:|")
for r in range(1, rounds + 1):
    for n in nices:
        tag = f"{out}/r{r}-nice{n}"
        idle, busy = level(f"{tag}-idle.json"), level(f"{tag}-training.json")
        steps = json.load(open(f"{tag}-steps.json"))
        print(f"| {r} | {n} | {idle['images_per_s']:.2f} | {idle['p50_ms']:.0f} / {idle['p99_ms']:.0f} | "
              f"{busy['images_per_s']:.2f} | {busy['p50_ms']:.0f} / {busy['p99_ms']:.0f} | "
              f"{busy['p99_ms'] / idle['p99_ms']:.2f}x | {steps['steps'] / steps['seconds']:.2f} |")
PY
