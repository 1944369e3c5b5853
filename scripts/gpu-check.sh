#!/usr/bin/env bash
# One prepared check for a CUDA machine that has torch 2.11.0 but no Rust: the binary is built
# here and carried with a small bundle. Checks CPU vs CUDA captions (f32 must match token for
# token; f16/bf16 agreement is reported) and times decoding at batch 1/16/64 in f32/f16/bf16.
#
# Prepare (CPU machine):  scripts/gpu-prepare.sh      -> .gpu/ (stripped binary, images)
# Run (GPU machine):      bash scripts/gpu-check.sh [.gpu] [OUTDIR]
set -uo pipefail
G="${1:-.gpu}"
OUT="${2:-${OUT:-/tmp/clipcap-gpu-check}}"
mkdir -p "$OUT"
PY="${CLIPCAP_PYTHON:-$(command -v python3)}"
[ -x /opt/torch/.venv/bin/python ] && PY=/opt/torch/.venv/bin/python
TORCH_LIB="$("$PY" -c 'import torch, os; print(os.path.join(os.path.dirname(torch.__file__), "lib"))')"
export LD_LIBRARY_PATH="$TORCH_LIB${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
BIN="$G/clipcap"
chmod +x "$BIN"
status=0
"$BIN" info | tee "$OUT/info.txt"
# GPT-2-small-shaped random bundle (~500 MB): made there, too big to carry.
B="$OUT/../clipcap-bundle-small"
[ -f "$B/clipcap.json" ] || "$PY" scripts/make_test_bundle.py --out "$B" --size small --seed 0 >/dev/null || status=1
IMAGES=("$G"/images/*)
# Correctness: the same captions on CPU and CUDA.
for spec in cpu:f32 cuda:f32 cuda:f16 cuda:bf16; do
  dev=${spec%%:*}; dt=${spec##*:}
  "$BIN" caption --model "$B" --device "$dev" --dtype "$dt" --json --max-tokens 30 "${IMAGES[@]}" \
    > "$OUT/captions-$dev-$dt.jsonl" 2> "$OUT/captions-$dev-$dt.err" || status=1
done
"$PY" - "$OUT" <<'PY' || status=1
import json, sys, os
out = sys.argv[1]
def load(n):
    p = os.path.join(out, f"captions-{n}.jsonl")
    return [json.loads(l)["captions"][0]["text"] for l in open(p)] if os.path.exists(p) else []
cpu = load("cpu-f32")
ok = True
for n in ["cuda-f32", "cuda-f16", "cuda-bf16"]:
    got = load(n)
    same = sum(a == b for a, b in zip(cpu, got))
    print(f"{n}: {same}/{len(cpu)} captions identical to CPU f32")
    if n == "cuda-f32" and (same != len(cpu) or not cpu):
        ok = False
sys.exit(0 if ok else 1)
PY
# Speed: beam 5 from embeddings, batch 1/16/64.
for dt in f32 f16 bf16; do
  "$BIN" bench-decode --model "$B" --device cuda --dtype "$dt" --images 64 --batch 1,16,64 \
    --beam 5 --max-tokens 67 --repeat 2 | tee -a "$OUT/bench-decode.jsonl" || status=1
done
"$BIN" bench-decode --model "$B" --device cpu --dtype f32 --images 16 --batch 1,16 --beam 5 \
  --max-tokens 67 | tee -a "$OUT/bench-decode.jsonl" || status=1
echo "gpu-check status $status"
exit $status
