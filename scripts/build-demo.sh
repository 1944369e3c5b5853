#!/usr/bin/env bash
# Builds the default bundle models/demo from nothing, reproducibly (~15 minutes on 2 cores):
#   1. the synthetic captioning set (clipcap synth)
#   2. a small image encoder (a shape/colour/size detector) trained on object windows of its
#      training split + a small random GPT-2 with the real GPT-2 vocabulary
#      (scripts/make_demo_base.py)
#   3. CLIP features of every image (clipcap prepare)
#   4. mapper + GPT-2 trained on the captions (clipcap train)
#   5. the quality table on the held-out test split (clipcap eval, greedy and beam)
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
cargo build --bin clipcap
BIN=target/debug/clipcap
WORK="${CLIPCAP_DEMO_WORK:-.cache/demo}"
IMAGES="${CLIPCAP_DEMO_IMAGES:-2000}"
EPOCHS="${CLIPCAP_DEMO_EPOCHS:-5}"
mkdir -p "$WORK"
t0=$(date +%s)
step() { echo "[build-demo $(( $(date +%s) - t0 ))s] $*"; }
if [ ! -f "$WORK/synth/dataset_coco.json" ]; then
  step "1/5 synthetic set: $IMAGES images"
  "$BIN" synth --out "$WORK/synth" --images "$IMAGES" --seed 0
fi
if [ ! -f "$WORK/base/clipcap.json" ]; then
  step "2/5 encoder pretraining + base bundle"
  "$CLIPCAP_PYTHON" scripts/make_demo_base.py --synth "$WORK/synth" --out "$WORK/base" --seed 0
fi
if [ ! -f "$WORK/data/meta.json" ]; then
  step "3/5 CLIP features"
  "$BIN" prepare --model "$WORK/base" --out "$WORK/data" --images "$WORK/synth" \
    --coco-captions "$WORK/synth/annotations/captions_synth.json" --karpathy "$WORK/synth/dataset_coco.json"
fi
step "4/5 training mapper + GPT-2 ($EPOCHS epochs)"
"$BIN" train --data "$WORK/data" --out models/demo --epochs "$EPOCHS" --batch-size 64 --lr 1e-3 \
  --warmup 100 --seed 0 --name demo --checkpoint-dir "$WORK/ckpt" --grad-clip 1.0 --dropout 0
# Say what it is wherever it is served (the page shows the notice under the model's name).
"$CLIPCAP_PYTHON" - <<'PY'
import json, os
path = "models/demo/clipcap.json"
m = json.load(open(path))
m.setdefault("provenance", {})["notice"] = (
    "a demo trained on synthetic shapes only: real photos get captions about coloured shapes")
tmp = path + ".tmp"
json.dump(m, open(tmp, "w"), indent=2)
os.replace(tmp, path)
PY
step "5/5 evaluation on the held-out test split"
"$BIN" eval --model models/demo --data "$WORK/data" --split test --greedy | tee "$WORK/eval-greedy.txt"
"$BIN" eval --model models/demo --data "$WORK/data" --split test | tee "$WORK/eval-beam.txt"
step "done: models/demo"
