"""Memory and speed of full fine-tuning, PEFT LoRA and DSEE on the same ZeRO-3 engine config,
against the compute floor of data parallelism on this box (method "floor": each rank's DSEE work
in two concurrent plain processes, one core each, no DeepSpeed, no communication).

    python benchmarks/bench_memory.py            # GPT-2-medium config, seq 128, batch 2, 2 ranks, 10 steps (~16 min)
    python benchmarks/bench_memory.py --quick    # tiny GPT-2, 2 steps: a smoke run (< 60 s)

Each method runs as its own 2-rank `deepspeed` job (peak RSS is per process); one JSON line per
method (and the floor) is printed and appended to benchmarks/results/memory.jsonl (or --out),
all with one run_id, each with s/step ÷ the floor's and peak RSS ÷ PEFT LoRA's.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
METHODS = ("full", "peft_lora", "dsee")


def floor(size: list[str], env: dict) -> dict:
    """Both ranks' DSEE work at once in plain processes, each pinned to its own core with one
    thread (as --bind_cores_to_rank pins the ranks): what data parallelism costs without ZeRO-3."""
    scratch = Path(tempfile.mkdtemp()) / "floor.jsonl"
    procs = [subprocess.Popen(["taskset", "-c", str(rank), sys.executable, "benchmarks/memory_worker.py", "--method", "floor", "--out", str(scratch), *size],
                              cwd=ROOT, env={**env, "RANK": str(rank), "WORLD_SIZE": "2", "OMP_NUM_THREADS": "1"}) for rank in range(2)]
    if any(proc.wait() != 0 for proc in procs):
        sys.exit("the floor processes failed")
    ranks = sorted((json.loads(line) for line in scratch.read_text().splitlines()), key=lambda r: r["rank"])
    return {"method": "floor", "model": ranks[0]["model"], "params": ranks[0]["params"], "trainable_params": ranks[0]["trainable_params"], "world_size": 2,
            "seq": ranks[0]["seq"], "micro_batch": ranks[0]["micro_batch"], "peak_rss_mb_per_rank": [r["peak_mb"] for r in ranks],
            "s_per_step": round(max(r["s_per_step"] for r in ranks), 4)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "memory.jsonl"))
    args = p.parse_args()
    size = ["--model", "tiny", "--seq", "32", "--steps", "2", "--warmup", "1", "--rank", "4"] if args.quick else ["--model", "gpt2-medium", "--seq", "128", "--batch", "2", "--steps", "10", "--warmup", "2"]
    scratch = Path(tempfile.mkdtemp()) / "memory.jsonl"
    # glibc's default mmap threshold grows with freed blocks and keeps gathered layers resident;
    # a fixed threshold returns them to the OS (same setting for every method).
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072", "PYTHONPATH": str(ROOT)}
    deepspeed = str(Path(sys.executable).parent / "deepspeed")
    for method in METHODS:
        cmd = [deepspeed, "--num_gpus", "2", "--bind_cores_to_rank", "--master_port", str(29700 + METHODS.index(method)), "benchmarks/memory_worker.py", "--method", method, "--out", str(scratch), *size]
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            sys.exit(f"{method} failed:\n{(proc.stdout + proc.stderr)[-4000:]}")
    lines = [json.loads(line) for line in scratch.read_text().splitlines()]
    lines.append(floor(size, env))
    by_method = {line["method"]: line for line in lines}
    dsee, run_id = by_method["dsee"], time.strftime("%Y%m%dT%H%M%S")
    for line in lines:
        line.update(run_id=run_id, quick=args.quick, s_per_step_vs_floor=round(line["s_per_step"] / by_method["floor"]["s_per_step"], 3),
                    peak_vs_peft_lora=round(max(line["peak_rss_mb_per_rank"]) / max(by_method["peft_lora"]["peak_rss_mb_per_rank"]), 3))
        if line["method"] not in ("dsee", "floor"):
            line["dsee_peak_ratio"] = round(max(dsee["peak_rss_mb_per_rank"]) / max(line["peak_rss_mb_per_rank"]), 3)
            line["dsee_speed_ratio"] = round(dsee["s_per_step"] / line["s_per_step"], 3)
        print(json.dumps(line))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "a") as f:
        f.writelines(json.dumps(line) + "\n" for line in lines)


if __name__ == "__main__":
    main()
