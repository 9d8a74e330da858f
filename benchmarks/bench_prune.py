"""Distributed global magnitude pruning vs gathering to rank 0 (2 CPU ranks, ZeRO-3).

    python benchmarks/bench_prune.py                  # GPT-2-small config, both methods; then GPT-2-XL distributed (~4 min)
    python benchmarks/bench_prune.py --quick          # tiny config (< 60 s)

The gather-to-rank-0 baseline needs the whole selected model plus torch's score vector and
top-k buffers on rank 0: on this 24 GiB machine it was OOM-killed on GPT-2-medium (14 GB RSS on
rank 0 for 1.2 GB of selected weights), so the two methods are compared on GPT-2-small and the
distributed one is also run on GPT-2-XL.
One JSON line per run, appended to benchmarks/results/prune.jsonl (or --out).
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from results_io import add_out, record

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true")
    add_out(p, "prune")
    args = p.parse_args()
    runs = [("tiny", "distributed"), ("tiny", "gather_rank0")] if args.quick else [("gpt2", "distributed"), ("gpt2", "gather_rank0"), ("gpt2-xl", "distributed")]
    scratch = Path(tempfile.mkdtemp()) / "prune.jsonl"
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072", "PYTHONPATH": str(ROOT)}
    deepspeed = str(Path(sys.executable).parent / "deepspeed")
    for i, (model, method) in enumerate(runs):
        cmd = [deepspeed, "--num_gpus", "2", "--bind_cores_to_rank", "--master_port", str(29760 + i), "benchmarks/prune_worker.py", "--method", method, "--model", model, "--out", str(scratch)]
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            sys.exit(f"{model} {method} failed:\n{(proc.stdout + proc.stderr)[-4000:]}")
    rows = [json.loads(line) for line in scratch.read_text().splitlines()]
    base = {r["model"]: r for r in rows if r["method"] == "gather_rank0"}
    for row in rows:
        if row["method"] == "distributed" and row["model"] in base:
            row["time_ratio_vs_gather_rank0"] = round(row["seconds"] / base[row["model"]]["seconds"], 3)
        row["extra_over_shard"] = [round(e / s, 4) for e, s in zip(row["extra_peak_mb_per_rank"], row["shard_mb_per_rank"])]
        row["quick"] = args.quick
        record(row, args.out)


if __name__ == "__main__":
    main()
