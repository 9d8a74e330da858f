"""Memory and speed of full fine-tuning, PEFT LoRA and DSEE on the same ZeRO-3 engine config
(the shipped default, ds_configs/zero3.json; zero2.json for OptimizedLinear; bf16 set by the
run), against the compute floor of data parallelism on this box (method "floor": each rank's
DSEE work in two concurrent plain processes, one core each, no DeepSpeed, no communication).

    python benchmarks/bench_memory.py            # GPT-2-medium config, seq 128, batch 2, 2 ranks, 10 steps (~21 min)
    python benchmarks/bench_memory.py --model minilm   # the SST-2 recipes' step: MiniLM-L6, seq 64, batch 16, zero3.json (~4 min)
    python benchmarks/bench_memory.py --quick    # tiny GPT-2, 2 steps: a smoke run (< 60 s)
    python benchmarks/bench_memory.py --model medium-llama   # DSEE vs DeepSpeed's OptimizedLinear LoRA, bf16
    python benchmarks/bench_memory.py --methods dsee --repeats 3   # DSEE and the floor, 3 launches each (~24 min)

`--model medium-llama` is the peer users of DeepSpeed would pick for LoRA: `OptimizedLinear` +
`LoRAConfig` on q and v (base weights sharded by the layer, ZeRO-2), against DSEE on ZeRO-3, on
GPT-2-medium's size in LLaMA's shape (OptimizedLinear replaces nn.Linear only, not GPT-2's
Conv1D), seq 128, batch 2; both in bf16, the only dtype OptimizedLinear builds, so it needs bf16
hardware: a CPU with AVX-512 bf16 or AMX (peak RSS is host memory).

Each method runs as its own 2-rank `deepspeed` job (peak RSS is per process); one JSON line per
method (and the floor) is printed and appended to benchmarks/results/memory.jsonl (or --out),
all with one run_id, each with s/step ÷ the floor's and peak RSS ÷ PEFT LoRA's. `--repeats N`
launches every method and the floor N times, interleaved, and reports each one's median launch
(launches of one method drift on this box by more than the methods differ). On one machine
the ranks read frozen weights whole from shared memory (zero.share_frozen_weights), so RSS counts
them in each rank: peak PSS splits shared pages between the ranks. "dsee_gathered" is DSEE with
ZeRO-3 fetching the frozen weights itself, the baseline of that change; "dsee_layer_hooks" is DSEE
with ZeRO-3's hooks on every layer rather than on each transformer block (zero.hook_per_block).
"""
import argparse
import ctypes.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from results_io import add_out, record

ROOT = Path(__file__).resolve().parent.parent
METHODS = ("full", "peft_lora", "dsee", "dsee_gathered", "dsee_layer_hooks")
# rows that run another method's worker with flags: DSEE as ZeRO-3 alone fetches the frozen
# weights, DSEE with ZeRO-3's hooks on every layer instead of each block
VARIANTS = {"dsee_gathered": ("dsee", ["--no_share_frozen_weights"]), "dsee_layer_hooks": ("dsee", ["--no_hook_per_block"])}
PEER_METHODS = ("optimized_linear", "dsee", "dsee_layer_hooks")  # --model medium-llama
# glibc's default mmap threshold grows with freed blocks and keeps gathered layers resident; a
# fixed threshold returns them to the OS, at the price of a page fault per page of every fetch.
# jemalloc reuses freed extents and returns idle ones after a second (dirty_decay_ms).
ALLOCATORS = {
    "glibc": {"MALLOC_MMAP_THRESHOLD_": "131072"},
    "jemalloc": {"LD_PRELOAD": "libjemalloc.so.2", "MALLOC_CONF": "dirty_decay_ms:1000,muzzy_decay_ms:0"},
}

SIZES = {  # memory_worker.py flags of each benchmarked setting
    "gpt2-medium": ["--model", "gpt2-medium", "--seq", "128", "--batch", "2", "--steps", "10", "--warmup", "2"],
    "minilm": ["--model", "minilm", "--steps", "10", "--warmup", "2"],  # minilm-sst2.yaml's sequence, batch and ds_config
    "quick": ["--model", "tiny", "--seq", "32", "--steps", "2", "--warmup", "1", "--rank", "4"],
    "medium-llama": ["--model", "medium-llama", "--seq", "128", "--batch", "2", "--steps", "10", "--warmup", "2", "--bf16"],
}


def native_bf16_cpu() -> bool:
    """Whether this CPU runs bf16 itself rather than emulating it (DeepSpeed's CPU accelerator
    answers yes on every CPU): timing emulation would say nothing about either method."""
    import torch

    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


def cpu_columns(ranks: list[dict]) -> dict:
    """Each rank's CPU use per timed step (memory_worker.py's "cpu"), one column per figure."""
    return {f"{key}_per_step_per_rank": [round(rank["cpu"][key], 3) for rank in ranks] for key in ("user_s", "sys_s", "minor_faults")}


def floor(size: list[str], env: dict, profile: str | None = None) -> dict:
    """Both ranks' DSEE work at once in plain processes, each pinned to its own core with one
    thread (as --bind_cores_to_rank pins the ranks): what data parallelism costs without ZeRO-3."""
    with tempfile.TemporaryDirectory() as scratch:
        out = Path(scratch, "floor.jsonl")
        procs = [subprocess.Popen(["taskset", "-c", str(rank), sys.executable, "benchmarks/memory_worker.py", "--method", "floor", "--out", str(out), *size,
                                  *(["--profile", str(Path(profile, "profile_floor.json"))] if profile else [])],
                                  cwd=ROOT, env={**env, "RANK": str(rank), "WORLD_SIZE": "2", "OMP_NUM_THREADS": "1"}) for rank in range(2)]
        if any(proc.wait() != 0 for proc in procs):
            sys.exit("the floor processes failed")
        ranks = sorted((json.loads(line) for line in out.read_text().splitlines()), key=lambda r: r["rank"])
    return {"method": "floor", "model": ranks[0]["model"], "params": ranks[0]["params"], "trainable_params": ranks[0]["trainable_params"], "world_size": 2,
            "seq": ranks[0]["seq"], "micro_batch": ranks[0]["micro_batch"], "ds_config": ranks[0]["ds_config"], "gradient_clipping": ranks[0]["gradient_clipping"],
            "peak_rss_mb_per_rank": [r["peak_mb"] for r in ranks],
            "peak_pss_mb_per_rank": [r["peak_pss_mb"] for r in ranks],
            "s_per_step": round(max(r["s_per_step"] for r in ranks), 4),
            **cpu_columns(ranks)}


def launch(method: str, size: list[str], env: dict, port: int, profile: str | None = None) -> dict:
    """One 2-rank `deepspeed` job of the method (a row of METHODS or PEER_METHODS): its line."""
    worker, flags = VARIANTS.get(method, (method, []))
    with tempfile.TemporaryDirectory() as scratch:
        out = Path(scratch, "memory.jsonl")
        cmd = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", "2", "--bind_cores_to_rank", "--master_port", str(port), "benchmarks/memory_worker.py",
               "--method", worker, *flags, "--out", str(out), *size]
        if profile:
            Path(profile).mkdir(parents=True, exist_ok=True)
            cmd += ["--profile", str(Path(profile, f"profile_{method}.json"))]
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            sys.exit(f"{method} failed:\n{(proc.stdout + proc.stderr)[-4000:]}")
        return {**json.loads(out.read_text().splitlines()[-1]), "method": method}


def combine(launches: list[dict]) -> dict:
    """One method's row from its launches: the median launch (the lower of two middle ones), every
    launch's s/step beside it, and the highest peaks of all."""
    median = statistics.median_low(line["s_per_step"] for line in launches)
    row = {**next(line for line in launches if line["s_per_step"] == median), "s_per_step_launches": [line["s_per_step"] for line in launches]}
    for peaks in ("peak_rss_mb_per_rank", "peak_pss_mb_per_rank", "peak_device_mb"):
        if row.get(peaks) is not None:
            row[peaks] = [max(rank) for rank in zip(*(line[peaks] for line in launches))]
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--model", choices=["gpt2-medium", "minilm", "medium-llama"], default=None,
                   help="gpt2-medium (the default); minilm: the step of launch/recipes/minilm-sst2.yaml (its model, sequence, batch and ds_config); medium-llama: DSEE vs DeepSpeed's OptimizedLinear LoRA in bf16")
    add_out(p, "memory")
    p.add_argument("--allocator", choices=sorted(ALLOCATORS), default="glibc", help="glibc with a fixed mmap threshold, or jemalloc preloaded (apt-get install libjemalloc2)")
    p.add_argument("--master_port", type=int, default=29700, help="the first launch's rendezvous port; each next launch takes the next one")
    p.add_argument("--profile", metavar="DIR", help="also profile each method's timed steps (rank 0): DIR/profile_<method>.json, self time by kind of op (the profiler slows the steps)")
    p.add_argument("--methods", help="comma-separated rows to run (default: all of the model's); dsee always runs, and the floor with gpt2-medium and minilm")
    p.add_argument("--repeats", type=int, default=1, help="launches of each method and of the floor, interleaved; rows report the median launch")
    args = p.parse_args()
    if args.repeats < 1 or (args.profile and args.repeats > 1):
        p.error("--repeats: 1 or more, and 1 with --profile (one profile per method)")
    if args.quick and args.model:
        p.error("--quick runs its own tiny model: drop --model")
    if args.allocator == "jemalloc" and ctypes.util.find_library("jemalloc") is None:
        sys.exit("--allocator jemalloc: libjemalloc is not installed: apt-get install libjemalloc2")
    if args.model == "medium-llama":  # host RSS and CPU time: the GPU check (scripts/gpu_check.sh) times GPUs
        import torch

        if torch.cuda.is_available():
            sys.exit("--model medium-llama compares host memory and CPU time: run it on a CPU-only machine")
        if not native_bf16_cpu():
            sys.exit("--model medium-llama times bf16, and this CPU has no AVX-512 bf16 or AMX (it would time emulation): run it on such a CPU")
    size = SIZES["quick" if args.quick else args.model or "gpt2-medium"]
    methods = PEER_METHODS if args.model == "medium-llama" else METHODS
    if args.methods:
        asked = {"dsee", *args.methods.split(",")}
        if asked - set(methods):
            p.error(f"--methods: {', '.join(sorted(asked - set(methods)))} not among this model's rows: {', '.join(methods)}")
        methods = tuple(m for m in methods if m in asked)
    env = {**os.environ, **ALLOCATORS[args.allocator], "PYTHONPATH": str(ROOT)}  # the same allocator for every method and the floor
    rows = methods + (("floor",) if args.model != "medium-llama" else ())  # the floor is DSEE's fp32 work: no floor for the bf16 comparison
    launches = {row: [] for row in rows}
    for repeat in range(args.repeats):  # interleaved: drift over the run reaches every row alike
        for i, row in enumerate(rows):
            launches[row].append(floor(size, env, args.profile) if row == "floor" else launch(row, size, env, args.master_port + repeat * len(rows) + i, args.profile))
    lines = [combine(launches[row]) for row in rows]
    by_method = {line["method"]: line for line in lines}
    dsee, run_id = by_method["dsee"], time.strftime("%Y%m%dT%H%M%S")
    for line in lines:
        line.update(run_id=run_id, quick=args.quick, allocator=args.allocator)
        if "floor" in by_method:
            line["s_per_step_vs_floor"] = round(line["s_per_step"] / by_method["floor"]["s_per_step"], 3)
        if "peft_lora" in by_method:
            line["peak_vs_peft_lora"] = round(max(line["peak_rss_mb_per_rank"]) / max(by_method["peft_lora"]["peak_rss_mb_per_rank"]), 3)
        if line["method"] not in ("dsee", "floor"):
            line["dsee_peak_ratio"] = round(max(dsee["peak_rss_mb_per_rank"]) / max(line["peak_rss_mb_per_rank"]), 3)
            line["dsee_speed_ratio"] = round(dsee["s_per_step"] / line["s_per_step"], 3)
        record(line, args.out)


if __name__ == "__main__":
    main()
