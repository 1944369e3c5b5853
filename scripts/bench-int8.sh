#!/usr/bin/env bash
# int8 beside f32 on the CPU, on the GPT-2-small / ViT-B/32-shaped random bundle (made once,
# with its int8 encoder): the encoder's images/s and embedding cosine, the captions of the
# sample photos in both dtypes, and decoding's images/s alone and batched. f32 and int8 runs
# alternate; ratios come from one run.
#   scripts/bench-int8.sh
#   PHOTOS=DIR ROUNDS=2 SERVER_LEVELS=1,4,16,64 SERVER_REQUESTS=64 SERVER_TOKENS=16 scripts/bench-int8.sh
# Then the server in f32 and in int8 at each concurrency level (bench-http).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
cargo build --offline --bin clipcap >&2
BIN=target/debug/clipcap
OUT_DIR="${OUT_DIR:-.cache/bench}"
MODEL="${MODEL:-$OUT_DIR/small-int8}"
PHOTOS="${PHOTOS:-../shared/seed/images}"
ROUNDS="${ROUNDS:-2}"
SERVER_LEVELS="${SERVER_LEVELS:-1,4,16,64}"
SERVER_REQUESTS="${SERVER_REQUESTS:-64}"
SERVER_TOKENS="${SERVER_TOKENS:-16}"
mkdir -p "$OUT_DIR"
if [ ! -f "$MODEL/clipcap.json" ]; then
  "$CLIPCAP_PYTHON" scripts/make_test_bundle.py --out "$MODEL" --size small --encoder vit-b32 --int8-encoder >&2
fi
echo "# int8 vs f32: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(nproc) threads, bundle $MODEL"

echo "## encoder (clipcap bench-encode, $PHOTOS)"
"$BIN" bench-encode --model "$MODEL" --batch 1,16 --repeat 3 "$PHOTOS" | tee "$OUT_DIR/int8-encode.jsonl"

echo "## captions of the photos, beam 5"
for d in f32 int8; do
  "$BIN" caption --model "$MODEL" --dtype "$d" --json "$PHOTOS" >"$OUT_DIR/int8-captions-$d.jsonl"
done
"$CLIPCAP_PYTHON" - "$OUT_DIR/int8-captions-f32.jsonl" "$OUT_DIR/int8-captions-int8.jsonl" <<'PY'
import json, sys
f32, int8 = ([json.loads(l) for l in open(p)] for p in sys.argv[1:3])
same = sum(a["captions"][0]["text"] == b["captions"][0]["text"] for a, b in zip(f32, int8))
# Tokens in common at the start: how far the two captions run together before they part.
def common(a, b):
    a, b = a.split(), b.split()
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n / max(len(a), 1)
prefix = [common(a["captions"][0]["text"], b["captions"][0]["text"]) for a, b in zip(f32, int8)]
print(json.dumps({"photos": len(f32), "identical_captions": same,
                  "mean_shared_leading_words": round(sum(prefix) / len(prefix), 3)}))
PY

echo "## decoding (clipcap bench-decode, beam 5: 2 images one at a time, 16 in one batch)"
for r in $(seq 1 "$ROUNDS"); do
  for d in f32 int8; do
    "$BIN" bench-decode --model "$MODEL" --images 2 --batch 1 --dtype "$d"
    "$BIN" bench-decode --model "$MODEL" --images 16 --batch 16 --dtype "$d"
  done
done | tee "$OUT_DIR/int8-decode.jsonl"

echo "## the server, f32 then int8 (bench-http, 16 synthetic images, max_tokens=$SERVER_TOKENS, $SERVER_REQUESTS requests per level)"
IMGS="$OUT_DIR/int8-images"
[ -d "$IMGS/images" ] || "$BIN" synth --out "$IMGS" --images 16 --seed 5 >&2
IMAGE_ARGS=()
while IFS= read -r f; do IMAGE_ARGS+=(--image "$f"); done < <(find "$IMGS/images" -type f | sort)
PORT="$("$CLIPCAP_PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
SERVER=0
trap 'kill -TERM "$SERVER" 2>/dev/null || true' EXIT
for d in f32 int8; do
  "$BIN" serve --model "m=$MODEL" --bind "127.0.0.1:$PORT" --device cpu --dtype "$d" >"$OUT_DIR/int8-server-$d.log" 2>&1 &
  SERVER=$!
  for _ in $(seq 1 600); do curl -fs "http://127.0.0.1:$PORT/ready" >/dev/null 2>&1 && break; sleep 0.2; done
  echo "### $d"
  "$BIN" bench-http --url "http://127.0.0.1:$PORT" "${IMAGE_ARGS[@]}" --concurrency "$SERVER_LEVELS" \
    --requests "$SERVER_REQUESTS" --query "max_tokens=$SERVER_TOKENS" --out "$OUT_DIR/int8-server-$d.json"
  kill -TERM "$SERVER"; wait "$SERVER" || true
done
