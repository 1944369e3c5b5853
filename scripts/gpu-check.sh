#!/usr/bin/env bash
# One prepared check for a CUDA machine that has torch 2.11.0 but no Rust: the binary is built
# here and carried with a small bundle. Checks CPU vs CUDA captions (f32 must match token for
# token; f16/bf16 agreement is reported), times decoding at batch 1/16/64 in f32/f16/bf16, and
# trains a tiny bundle on CUDA with --amp none/bf16/fp16 (the loss must fall in each).
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
    --beam-size 5 --max-tokens 67 --repeat 2 | tee -a "$OUT/bench-decode.jsonl" || status=1
done
"$BIN" bench-decode --model "$B" --device cpu --dtype f32 --images 16 --batch 1,16 --beam-size 5 \
  --max-tokens 67 | tee -a "$OUT/bench-decode.jsonl" || status=1
# Mixed-precision training on CUDA: a small synthetic set, 3 epochs per mode.
# (AMP_DEVICE=cpu runs this part on a CPU machine, to check the script itself.)
AMP_DEVICE="${AMP_DEVICE:-cuda}"
T="$OUT/amp"; mkdir -p "$T"
"$PY" scripts/make_test_bundle.py --out "$T/base" --size tiny --seed 1 --wte-std 0.02 >/dev/null || status=1
"$BIN" synth --out "$T/synth" --images 64 --seed 1 >/dev/null || status=1
"$BIN" prepare --model "$T/base" --out "$T/data" --images "$T/synth" --quiet \
  --coco-captions "$T/synth/annotations/captions_synth.json" --karpathy "$T/synth/dataset_coco.json" \
  --device "$AMP_DEVICE" || status=1
for amp in none bf16 fp16; do
  "$BIN" train --data "$T/data" --out "$T/out-$amp" --base "$T/base" --device "$AMP_DEVICE" --amp "$amp" \
    --epochs 3 --batch-size 16 --lr 3e-3 --warmup 5 --seed 0 --checkpoint-dir "$T/ckpt-$amp" \
    > "$T/train-$amp.log" 2>&1 || status=1
  "$PY" - "$T/train-$amp.log" "$amp" <<'PY' || status=1
import re, sys
log = open(sys.argv[1]).read()
epochs = [float(x) for x in re.findall(r"epoch \d+ done: loss ([0-9.]+)", log)]
final = re.findall(r"final loss ([0-9.]+)", log)
print(f"amp {sys.argv[2]}: epoch losses {epochs}, final {final}")
sys.exit(0 if epochs and final and float(final[0]) < epochs[0] else 1)
PY
done
echo "gpu-check status $status"
exit $status
