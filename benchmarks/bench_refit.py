"""The SparseGPT re-fit spread over 2 ranks vs fitted on rank 0 alone (2 CPU ranks, ZeRO-3).

    python benchmarks/bench_refit.py                 # GPT-2-medium shapes (24 blocks, 96 matrices), 2:4, ~20 min
    python benchmarks/bench_refit.py --layers 2      # 2 blocks of the same shapes (~4 min on a loaded 2-core host)
    python benchmarks/bench_refit.py --model builtin:llama-7b --layers 2 --nvme /tmp/refit_nvme   # 2 blocks of LLaMA-7B's shapes, shards on NVMe (~29 min)

Random-init builtin:gpt2-medium with DSEE adapters under ZeRO-3 on 2 CPU ranks (one core each,
--bind_cores_to_rank), 2 calibration rows of 128 tokens per rank; `prune.refit` with the 2:4
pattern (the re-fit choosing its N of M, keep_sparse) timed spread over the ranks and with
spread=False (every matrix fitted on rank 0 while the other waits, as before the spread),
alternating so a shared machine's load falls on both (benchmarks/refit_worker.py). The gram
passes (input_grams) are the same work in both and timed apart. One JSON line appended to
benchmarks/results/refit.jsonl (or --out). --nvme keeps the frozen shards on disk
(ds_configs/zero3_nvme.json), as the LLaMA-7B recipe does (launch/recipes/llama7b-nvme-cpu-smoke.yaml).
"""
import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from results_io import add_out

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="builtin:gpt2-medium", help="a builtin: config (random init)")
    p.add_argument("--layers", type=int, help="only the first N blocks of the model")
    p.add_argument("--nvme", help="a folder on a local disk: the frozen shards swapped there instead of kept in memory")
    p.add_argument("--repeats", type=int, default=1, help="spread/alone/alone/spread cycles")
    p.add_argument("--master_port", type=int, default=29795)
    add_out(p, "refit")
    args = p.parse_args()
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072", "PYTHONPATH": str(ROOT)}
    deepspeed = str(Path(sys.executable).parent / "deepspeed")
    cmd = [deepspeed, "--num_gpus", "2", "--bind_cores_to_rank", "--master_port", str(args.master_port), "benchmarks/refit_worker.py",
           "--repeats", str(args.repeats), "--out", str(Path(args.out).resolve())]
    cmd += ["--model", args.model, *(["--layers", str(args.layers)] if args.layers else []), *(["--nvme", args.nvme] if args.nvme else [])]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"the re-fit benchmark failed:\n{(proc.stdout + proc.stderr)[-4000:]}")
    text = Path(args.out).read_text().splitlines()[-1]
    line = json.loads(text)
    print(text)
    print(f"re-fit of {line['matrices']} matrices on {line['world_size']} ranks: rank 0 alone {min(line['rank0_alone_s'])} s, spread {min(line['spread_s'])} s, "
          f"{line['speedup_best']}x faster spread (fits alone, without the gram passes: {line['speedup_fits_only_best']}x; target >= 1.7x)")


if __name__ == "__main__":
    main()
