#!/usr/bin/env bash
# `make bench`: every benchmark, one after another (they share the 2 cores), then RESULTS.md.
# Measured on 2 CPU cores: memory 16 min, support 5 min, prune 4 min, accuracy 30 min per
# seed (3 seeds), GPT-2-XL 7 min: about 2 h in all.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
$PY benchmarks/bench_memory.py
$PY benchmarks/bench_support.py
$PY benchmarks/bench_prune.py
$PY benchmarks/bench_accuracy.py
$PY benchmarks/bench_gpt2xl.py
$PY benchmarks/report.py
