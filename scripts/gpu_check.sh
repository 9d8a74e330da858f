#!/usr/bin/env bash
# The real path on a GPU in one command (1 GPU, ZeRO-3 bf16, GPT-2-medium config; structured
# pruning on a BERT config; tokens/s of DSEE vs PEFT LoRA vs full fine-tuning):
#   bash scripts/gpu_check.sh                     # on a GPU machine (after `make setup`)
#   bash scripts/gpu_check.sh --cpu               # the same steps, small models, 2 CPU ranks
# Options after the mode go to scripts/gpu_check.py (e.g. --out DIR; default runs/gpu_check).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
exec "$PY" scripts/gpu_check.py "$@"
