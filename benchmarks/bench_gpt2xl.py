"""The GPT-2-XL path on this box: 1.56B-parameter config built partitioned under ZeRO-3 on 2 CPU
ranks, Ω chosen, 2 steps at seq 64, 50% global prune, 1 re-tune step, adapter-only export;
with the size and save time of its last checkpoint (adapters, moments, masks, plan).

    python benchmarks/bench_gpt2xl.py       # ~8.5 min here; prints one JSON line

Appends the line to benchmarks/results/gpt2xl.jsonl (or --out).
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from results_io import add_out, record

ROOT = Path(__file__).resolve().parent.parent


def _folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.iterdir())


def run(output_dir: Path, extra: list[str], recipe: str = "launch/recipes/gpt2-xl-cpu-smoke.yaml", what: str = "gpt2xl_smoke") -> dict:
    """One 2-rank run of `recipe` under DeepSpeed's launcher; its figures from summary.json."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072", "PYTHONPATH": str(ROOT)}
    deepspeed = str(Path(sys.executable).parent / "deepspeed")
    cmd = [deepspeed, "--num_gpus", "2", "--bind_cores_to_rank", "--master_port", "29790", "launch/train.py", "--config", recipe, "--output_dir", str(output_dir), *extra]
    tic = time.time()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit((proc.stdout + proc.stderr)[-5000:])
    summary = json.loads((output_dir / "summary.json").read_text())
    t = summary["timings"]
    return {
        "what": what, "params": summary["total_params"], "trainable_params": summary["trainable_params"], "world_size": summary["world_size"],
        "peak_rss_mb_per_rank": summary["peak_rss_mb_per_rank"], "total_rss_gib": round(sum(summary["peak_rss_mb_per_rank"]) / 1024, 2),
        "build_s": round(t["build_s"], 1), "support_s": round(t["support_s"], 1), "step_s": round(t["tune_s_per_step"], 1),
        "prune_s": round(t["prune_s"], 1), "retune_step_s": round(t["retune_s_per_step"], 1), "adapter_ckpt_bytes": summary["adapter_bytes"],
        "checkpoint_s": round(t["checkpoint_s"], 1), "checkpoint_bytes": _folder_bytes(output_dir / "checkpoints" / (output_dir / "checkpoints" / "latest").read_text()),
        "sparsity": summary["sparsity"], "wall_s": round(time.time() - tic, 1),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_out(p, "gpt2xl")
    p.add_argument("--output_dir", default=None, help="run folder (default: a temporary one)")
    args, extra = p.parse_known_args()
    record(run(Path(args.output_dir or tempfile.mkdtemp()) / "run", extra), args.out)


if __name__ == "__main__":
    main()
