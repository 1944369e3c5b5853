#!/usr/bin/env bash
# One prepared check for a CUDA machine that has torch 2.11.0 but no Rust: the binary is built
# here and carried with a few images (scripts/gpu-prepare.sh -> .gpu/). It stops at once when
# `clipcap info` reports no CUDA, bounds every step with a timeout, keeps its work files outside
# OUTDIR, and returns one summary (summary.md) plus short logs; it fits in 8 minutes.
#
#   bash scripts/gpu-check.sh [.gpu] [OUTDIR]
#
# What it checks, on a GPT-2-small-shaped random bundle made there:
#   - captions on CPU f32 vs CUDA f32 (must be identical), f16 and bf16 (agreement reported);
#   - an OpenAI-shaped CLIP tower exported by export_clip.py, captioned in f32 and f16 there;
#   - batch 1 vs 12 (the same captions), --greedy and --sample --seed (the same twice);
#   - a 30 s `serve` + `bench-http` burst in f16 with mixed options (no errors);
#   - images/s at beam 1 and 5 by batch size 1/16/64/256 in f16 and bf16;
#   - training a tiny bundle with --amp none/bf16/fp16 (the loss must fall in each).
# GPU_CHECK_DEVICE=cpu runs the same steps on the CPU with a tiny bundle and small sizes: the
# CI dry run of this script (tests/gpu_check.rs).
set -uo pipefail
G="${1:-.gpu}"
OUT="${2:-${OUT:-/tmp/clipcap-gpu-check}}"
DEV="${GPU_CHECK_DEVICE:-cuda}"
WORK="${GPU_CHECK_WORK:-/tmp/clipcap-gpu-work}"
mkdir -p "$OUT" "$WORK"
PY="${CLIPCAP_PYTHON:-$(command -v python3)}"
[ -x /opt/torch/.venv/bin/python ] && PY=/opt/torch/.venv/bin/python
TORCH_LIB="$("$PY" -c 'import torch, os; print(os.path.join(os.path.dirname(torch.__file__), "lib"))')"
export LD_LIBRARY_PATH="$TORCH_LIB${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export PYTORCH_CUDA_ALLOC_CONF="${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}"
BIN="$G/clipcap"
SUMMARY="$OUT/summary.md"
status=0
: > "$SUMMARY"
say() { echo "$*" | tee -a "$SUMMARY"; }
# Runs a named step under a time limit; its output goes to WORK, its last lines to OUT on failure.
step() {
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS
  if timeout "$limit" "$@" > "$WORK/$name.log" 2>&1; then
    say "| $name | ok | $((SECONDS - t0)) s |"
  else
    local rc=$?
    status=1
    say "| $name | FAILED (exit $rc$([ $rc = 124 ] && echo ', timed out')) | $((SECONDS - t0)) s |"
    tail -n 15 "$WORK/$name.log" > "$OUT/$name.err.txt"
  fi
}

# Speed runs as "IMAGES:BATCHES" (small batches on fewer images, so batch 1 stays short).
if [ "$DEV" = cpu ]; then
  SIZE=tiny; SPEED="8:1,4"; TOKENS=12; BURST=5; DTYPES="bf16"; HALF=bf16; TRAIN_IMAGES=16; EPOCHS=2
  TRAIN_BATCH=8
else
  SIZE=small; SPEED="32:1,16 256:64,256"; TOKENS=30; BURST=30; DTYPES="f16 bf16"; HALF=f16
  TRAIN_IMAGES=64; EPOCHS=3; TRAIN_BATCH=16
fi

"$BIN" info > "$OUT/info.txt" 2>&1 || status=1
say "# clipcap gpu-check ($DEV)"
say '```'; grep -E "^(clipcap|torch|cpu|cuda)" "$OUT/info.txt" | tee -a "$SUMMARY"; say '```'
if [ "$DEV" != cpu ] && ! grep -q "^cuda available: true" "$OUT/info.txt"; then
  say "CUDA is not available: stopping (see info.txt)"
  exit 1
fi
say "| step | result | time |"
say "|---|---|---|"

B="$WORK/bundle-$SIZE"
[ -f "$B/clipcap.json" ] || step make-bundle 120 "$PY" scripts/make_test_bundle.py --out "$B" --size "$SIZE" --seed 0
IMAGES=("$G"/images/*)
twelve=(); while [ ${#twelve[@]} -lt 12 ]; do twelve+=("${IMAGES[@]}"); done; twelve=("${twelve[@]:0:12}")

# Correctness: the same captions on the CPU and the device; batch 1 vs 12; greedy; seeded sampling.
cap() { local name=$1; shift; step "$name" 120 "$BIN" caption --model "$B" --json --max-tokens "$TOKENS" "$@"; }
cap captions-cpu-f32 --device cpu --dtype f32 "${twelve[@]}"
for dt in f32 $DTYPES; do
  cap "captions-$DEV-$dt" --device "$DEV" --dtype "$dt" "${twelve[@]}"
done
cap batch1-$DEV --device "$DEV" --dtype f32 --batch 1 "${twelve[@]}"
cap greedy-$DEV --device "$DEV" --dtype "$HALF" --greedy "${twelve[@]}"
cap sample-a-$DEV --device "$DEV" --dtype "$HALF" --sample --seed 3 -n 2 "${twelve[@]}"
cap sample-b-$DEV --device "$DEV" --dtype "$HALF" --sample --seed 3 -n 2 "${twelve[@]}"
"$PY" - "$WORK" "$DEV" "$DTYPES" <<'PY' | tee -a "$SUMMARY" || status=1
import json, os, sys
work, dev, dtypes = sys.argv[1], sys.argv[2], sys.argv[3].split()
def caps(name):
    p = os.path.join(work, name + ".log")
    out = []
    for line in open(p) if os.path.exists(p) else []:
        line = line.strip()
        if line.startswith("{"):
            out.append([c["text"] for c in json.loads(line).get("captions", [])])
    return out
cpu = caps("captions-cpu-f32")
ok = bool(cpu)
print(f"\n| captions vs CPU f32 ({len(cpu)} images) | identical |\n|---|---|")
for dt in ["f32"] + dtypes:
    got = caps(f"captions-{dev}-{dt}")
    same = sum(a[:1] == b[:1] for a, b in zip(cpu, got))
    print(f"| {dev} {dt} | {same}/{len(cpu)} |")
    if dt == "f32" and same != len(cpu):
        ok = False
b1 = caps(f"batch1-{dev}")
same = sum(a[:1] == b[:1] for a, b in zip(caps(f"captions-{dev}-f32"), b1))
print(f"| {dev} f32, batch 1 vs 12 | {same}/{len(b1)} |")
ok &= bool(b1) and same == len(b1)
sa, sb = caps(f"sample-a-{dev}"), caps(f"sample-b-{dev}")
print(f"| {dev} sampling, seed 3 twice | {'same' if sa == sb and sa else 'DIFFERENT'} |")
ok &= bool(sa) and sa == sb
print(f"| {dev} greedy | {len(caps(f'greedy-{dev}'))} captions |")
sys.exit(0 if ok else 1)
PY

# An OpenAI-shaped CLIP tower (scripts/ref/fake_clip: the class token's zeros on x.device, fp16
# weights as OpenAI stores them) exported with export_clip.py and captioned in f32 and the half
# type on the device: the export must run there in both.
OC="$WORK/openai-clip"
mkdir -p "$OC"
step openai-clip-export 60 env PYTHONPATH=scripts/ref/fake_clip "$PY" scripts/export_clip.py --openai ViT-Tiny \
  --out "$OC/clip_image.pt"
step openai-clip-bundle 60 "$PY" - "$OC" <<'PY'
import json, os, shutil, subprocess, sys
oc = sys.argv[1]
b = os.path.join(oc, "bundle")
subprocess.run([sys.executable, "scripts/make_test_bundle.py", "--out", b, "--size", "tiny", "--clip-dim", "48",
                "--seed", "2"], check=True)
shutil.copyfile(os.path.join(oc, "clip_image.pt"), os.path.join(b, "clip_image.pt"))
m = json.load(open(os.path.join(b, "clipcap.json")))
m["image"]["size"] = 32
json.dump(m, open(os.path.join(b, "clipcap.json"), "w"))
PY
for dt in f32 $HALF; do
  step "openai-clip-$DEV-$dt" 60 "$BIN" caption --model "$OC/bundle" --device "$DEV" --dtype "$dt" --json \
    --max-tokens 8 "${IMAGES[@]:0:4}"
done
if grep -q "it runs in f32" "$WORK/openai-clip-$DEV-$HALF.log" 2>/dev/null; then
  say "| openai-clip encoder in $HALF | FAILED: fell back to f32 |"; status=1
fi

# A burst through the server in the half type, with mixed options on both doors.
# A free loopback port (a fixed one may be taken on a shared machine).
PORT="${GPU_CHECK_PORT:-$("$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}"
"$BIN" serve --model "b=$B" --bind 127.0.0.1:$PORT --device "$DEV" --dtype "$HALF" > "$WORK/serve.log" 2>&1 &
SERVER=$!
for _ in $(seq 1 300); do curl -fs "http://127.0.0.1:$PORT/ready" >/dev/null 2>&1 && break; sleep 0.2; done
burst() {
  local name=$1 q=$2
  step "burst-$name" $((BURST + 60)) "$BIN" bench-http --url "http://127.0.0.1:$PORT" --image "${IMAGES[0]}" \
    --image "${IMAGES[-1]}" --api caption,openai --concurrency 16 --requests "$((BURST * 2))" --warmup 1 \
    --query "$q" --out "$WORK/burst-$name.json"
}
# The KV budget defaults from the device's free memory on CUDA (no limit on the CPU), and the
# bundle loaded on a side stream (no fallback warning).
"$PY" - "http://127.0.0.1:$PORT/info" "$DEV" "$WORK/serve.log" <<'PY' | tee -a "$SUMMARY" || status=1
import json, sys, urllib.request
budget = json.load(urllib.request.urlopen(sys.argv[1]))["batching"]["kv_cache_bytes"]
fallback = "running on the current CUDA stream" in open(sys.argv[3]).read()
ok = (budget > 0) == (sys.argv[2] != "cpu") and not fallback
print(f"\n- KV budget from free memory: {budget / 2**30:.1f} GiB; loads on a side stream: {not fallback}"
      f" ({'ok' if ok else 'FAILED'})")
sys.exit(0 if ok else 1)
PY
burst beam "max_tokens=$TOKENS"
burst greedy "strategy=greedy&max_tokens=$TOKENS"
burst sample "strategy=sample&seed=1&n=2&max_tokens=$TOKENS"
kill -TERM $SERVER 2>/dev/null; wait $SERVER 2>/dev/null
"$PY" - "$WORK" <<'PY' | tee -a "$SUMMARY" || status=1
import json, glob, sys
print("\n| burst (concurrency 16) | API | images/s | p50 ms | p99 ms | errors |\n|---|---|---|---|---|---|")
bad = 0
for f in sorted(glob.glob(sys.argv[1] + "/burst-*.json")):
    for l in json.load(open(f))["levels"]:
        bad += l["errors"]
        print(f"| {f.split('burst-')[1][:-5]} | {l['api']} | {l['images_per_s']:.1f} | {l['p50_ms']:.0f} | {l['p99_ms']:.0f} | {l['errors']} |")
sys.exit(1 if bad else 0)
PY

# Speed: images/s at beam 1 and 5 by batch size, from embeddings.
for dt in $DTYPES; do
  for beam in 1 5; do
    for run in $SPEED; do
      step "speed-$dt-beam$beam-${run%%:*}" 120 "$BIN" bench-decode --model "$B" --device "$DEV" \
        --dtype "$dt" --images "${run%%:*}" --batch "${run##*:}" --beam-size "$beam" --max-tokens "$TOKENS"
    done
  done
done
"$PY" - "$WORK" "$DTYPES" <<'PY' | tee -a "$SUMMARY" || status=1
import json, os, sys
work, dtypes = sys.argv[1], sys.argv[2].split()
rows = {}
for dt in dtypes:
    for beam in (1, 5):
        for name in sorted(os.listdir(work)):
            if not name.startswith(f"speed-{dt}-beam{beam}-"):
                continue
            for line in open(os.path.join(work, name)):
                if line.startswith("{"):
                    r = json.loads(line)
                    rows.setdefault(r["batch"], {})[(dt, beam)] = r["images_per_s"]
cols = [(dt, b) for dt in dtypes for b in (1, 5)]
print("\n| batch | " + " | ".join(f"{dt} beam {b}" for dt, b in cols) + " |")
print("|---|" + "---|" * len(cols))
for batch in sorted(rows):
    print(f"| {batch} | " + " | ".join(f"{rows[batch].get(c, float('nan')):.1f}" for c in cols) + " |")
print("(images/s)")
sys.exit(0 if rows else 1)
PY

# Mixed-precision training: a small synthetic set, a few epochs per mode.
T="$WORK/amp"; mkdir -p "$T"
step amp-base 60 "$PY" scripts/make_test_bundle.py --out "$T/base" --size tiny --seed 1 --wte-std 0.02
step amp-synth 60 "$BIN" synth --out "$T/synth" --images "$TRAIN_IMAGES" --seed 1
step amp-prepare 120 "$BIN" prepare --model "$T/base" --out "$T/data" --images "$T/synth" --quiet \
  --coco-captions "$T/synth/annotations/captions_synth.json" --karpathy "$T/synth/dataset_coco.json" \
  --device "$DEV"
say ""
for amp in none bf16 fp16; do
  step "train-$amp" 150 "$BIN" train --data "$T/data" --out "$T/out-$amp" --base "$T/base" --device "$DEV" \
    --amp "$amp" --epochs "$EPOCHS" --batch-size "$TRAIN_BATCH" --lr 3e-3 --warmup 5 --seed 0 --checkpoint-dir "$T/ckpt-$amp"
  "$PY" - "$WORK/train-$amp.log" "$amp" <<'PY' | tee -a "$SUMMARY" || status=1
import re, sys
log = open(sys.argv[1]).read()
epochs = [float(x) for x in re.findall(r"epoch \d+ done: loss ([0-9.]+)", log)]
final = re.findall(r"final loss ([0-9.]+)", log)
print(f"- amp {sys.argv[2]}: epoch losses {epochs}, final {final}")
sys.exit(0 if epochs and final and float(final[0]) < epochs[0] else 1)
PY
done
say ""
say "gpu-check status $status"
exit $status
