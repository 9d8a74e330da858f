#!/usr/bin/env bash
# `make bench`: the systems benchmarks, one after another (they share the 2 cores), then
# RESULTS.md's tables. Measured on 2 CPU cores: memory 21 min, support 5 min, prune 4 min,
# GPT-2-XL 8.5 min, fetch 1 min: about 40 min in all. Accuracy runs through launch/train.py and takes hours
# here (about 15 min per run): `python benchmarks/bench_glue.py` (RESULTS.md has each command).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
$PY benchmarks/bench_memory.py
$PY benchmarks/bench_support.py
$PY benchmarks/bench_prune.py
$PY benchmarks/bench_gpt2xl.py
MALLOC_MMAP_THRESHOLD_=131072 .venv/bin/deepspeed --num_gpus 2 --bind_cores_to_rank benchmarks/bench_fetch.py  # 1 min
$PY benchmarks/report.py
