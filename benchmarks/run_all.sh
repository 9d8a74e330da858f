#!/usr/bin/env bash
# `make bench`: every benchmark, one after another (they share the 2 cores), then RESULTS.md.
# Expected run time on 2 CPU cores: memory ~20 min, support ~15 min, accuracy ~40 min,
# GPT-2-XL ~20 min: about 1 h 35 min in all.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
$PY benchmarks/bench_memory.py
$PY benchmarks/bench_support.py
$PY benchmarks/bench_prune.py
$PY benchmarks/bench_accuracy.py
$PY benchmarks/bench_gpt2xl.py
$PY benchmarks/report.py
