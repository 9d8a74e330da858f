#!/usr/bin/env bash
# The real path on CUDA devices in one command (environment, the gpu test tier, medium-llama through
# every stage killed and resumed, tokens/s of DSEE, PEFT LoRA, OptimizedLinear and full fine-tuning;
# see scripts/gpu_check.py), within 9 minutes:
#   bash scripts/gpu_check.sh                     # on a GPU machine (after `make setup`)
#   bash scripts/gpu_check.sh --cpu               # the same steps, tiny models, 2 CPU ranks
# Options after the mode go to scripts/gpu_check.py (e.g. --out DIR, default runs/gpu_check;
# --only pipeline,speed). Exit status: 1 if a check failed, 124 at the timeout.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
# SIGTERM at 540 s: the script stops the launch under way and prints its step's line; SIGKILL 30 s later
exec timeout --kill-after=30 540 "$PY" scripts/gpu_check.py "$@"
