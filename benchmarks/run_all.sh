#!/usr/bin/env bash
# `make bench`: the systems benchmarks, one after another (they share the 2 cores), then
# RESULTS.md's tables. Measured on 2 CPU cores: memory 16 min, support 5 min, prune 4 min,
# GPT-2-XL 8.5 min: about 35 min in all. Accuracy runs through launch/train.py and takes hours
# here (about 15 min per run): `python benchmarks/bench_glue.py` (RESULTS.md has each command).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
$PY benchmarks/bench_memory.py
$PY benchmarks/bench_support.py
$PY benchmarks/bench_prune.py
$PY benchmarks/bench_gpt2xl.py
$PY benchmarks/report.py
