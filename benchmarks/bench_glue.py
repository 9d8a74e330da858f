"""GLUE-style accuracy from the shipped pipeline: every number is a `launch/train.py` run.

    python benchmarks/bench_glue.py --jobs 2 --missing  # the paper-style table: 5 tasks × 5 methods × 3 seeds (the cells not yet in glue.jsonl)
    python benchmarks/bench_glue.py --tasks sst2-short --methods dsee,dsee_random,dsee_magnitude,dsee_prune20 --seeds 0,1,2

Each (task, method, seed) runs `launch/recipes/glue-<task>.yaml` (`minilm-sst2.yaml`, 64 tokens,
for `sst2-short`) under DeepSpeed's launcher on --nproc ranks, with the method's flags on top and
nothing tuned per task. `--jobs 2` instead runs two at once, each the same recipe in one process
on its own core: gradient accumulation over the recipe's ranks keeps its global batch, and ZeRO-2
replaces ZeRO-3, which has nothing to partition on one rank. On this 2-core box that is about
2.1x the throughput of 2-rank runs one after another, accuracy within seed noise (RESULTS.md,
GLUE). One JSON line per run, with the task's metrics after export (the merged model), appended
to benchmarks/results/glue.jsonl; `python benchmarks/report.py` makes the tables. The baselines
(full fine-tuning, PEFT LoRA) are `launch/train.py --method full|peft_lora` on the same engine,
data, stages and schedule; full fine-tuning alone gets its own learning rate. Structured rows
run alone (--jobs 1) also time the exported model's CPU forward against the dense one
(`dsee_scale.evaluate.structured_latency`, the first 32 evaluation rows).
"""
from __future__ import annotations

import argparse
import json
import os
import queue
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from results_io import add_out, record

ROOT = Path(__file__).resolve().parent.parent
RECIPES = {"sst2-short": "minilm-sst2.yaml", **{t: f"glue-{t}.yaml" for t in ("sst2", "cola", "mrpc", "rte", "stsb")}}
ALL_STAGES = "tune,prune,retune,export,evaluate"
RECIPE_RANKS = 2  # the recipes' global batch is micro_batch_size × this many ranks
COMMIT = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip() or None
# Every method runs the same two training stages (tune, then re-tune), so pruned rows and the
# unpruned one have equal compute.
# The _kd rows re-tune self-distilled (issue 43): α 0.5 keeps the labels' weight equal to the
# teacher's, since the teacher is the same model before pruning, no better than the labels on
# held-out rows; T 2 softens a teacher that after 500 steps is near one-hot on its training rows,
# so the term carries the relative class scores (at T 1 it would be close to the labels again),
# and T² keeps its gradient at the task loss's scale. STS-B (regression) takes α·MSE to the
# teacher's prediction, T unused. The usual Hinton/DistilBERT choice, not tuned per task.
KD = ["--prune.distill", "true", "--prune.distill_alpha", "0.5", "--prune.distill_t", "2"]
METHODS = {
    "full": ["--method", "full", "--lr", "5e-5", "--prune.sparsity", "0"],  # every weight: the usual BERT fine-tuning LR
    "peft_lora": ["--method", "peft_lora", "--prune.sparsity", "0"],  # LoRA r=16 on the same targets (query, value)
    "dsee": ["--prune.sparsity", "0"],
    "dsee_random": ["--prune.sparsity", "0", "--dsee.support", "random"],  # Ω drawn at random (ablation)
    "dsee_magnitude": ["--prune.sparsity", "0", "--dsee.support", "magnitude"],  # Ω = the largest |W| (ablation)
    "dsee_prune20": ["--prune.sparsity", "0.2"],
    "dsee_prune50": ["--prune.sparsity", "0.5"],  # the masked re-tune: ΔW ⊙ M, M by Wanda's |W + ΔW|·‖x_j‖; the export stays 50% sparse
    "dsee_prune50_weight": ["--prune.sparsity", "0.5", "--prune.score", "weight"],  # the masked re-tune, M by |W| (the paper's score)
    "dsee_prune50_dense_merge": ["--prune.sparsity", "0.5", "--prune.keep_sparse", "false", "--prune.score", "weight"],  # the paper's: |W| mask, ΔW dense, exact merge
    "dsee_prune50_merged_score": ["--prune.sparsity", "0.5", "--prune.score", "merged"],  # the masked re-tune, M chosen by |W + ΔW|
    "dsee_2of4": ["--prune.pattern", "2:4"],  # SparseGPT's re-fit chooses the 2 of 4 and updates the kept weights (prune.reconstruct's default with a pattern)
    "dsee_2of4_no_refit": ["--prune.pattern", "2:4", "--prune.reconstruct", "false"],  # the activation score's 2 of 4, weights as they were
    "dsee_prune50_reconstruct": ["--prune.sparsity", "0.5", "--prune.reconstruct", "true"],  # the activation mask, kept weights re-fitted
    # 30% of heads and neurons by gate gradients (the default score): about 30% of FLOPs (25% of each saved 24.7%, under the 25%)
    "dsee_structured": ["--prune.sparsity", "0", "--prune.heads", "0.3", "--prune.ffn", "0.3"],
    "dsee_structured_delta_score": ["--prune.sparsity", "0", "--prune.heads", "0.25", "--prune.ffn", "0.25", "--prune.structured_score", "dsee"],  # the paper's Σ|ΔW|, 25% of each
    "dsee_prune50_kd": ["--prune.sparsity", "0.5", *KD],  # dsee_prune50, re-tuned from the tuned model's own outputs as well as the labels
    "dsee_2of4_kd": ["--prune.pattern", "2:4", *KD],
    "dsee_structured_kd": ["--prune.sparsity", "0", "--prune.heads", "0.3", "--prune.ffn", "0.3", *KD],
}
METRICS = ("accuracy", "f1", "mcc", "pearson", "spearman", "eval_loss")


def run(task: str, method: str, seed: int, args, slot: int = 0) -> dict:
    """One launch/train.py run; with one rank (--jobs > 1 or --nproc 1), one process pinned to the `slot`-th allowed core."""
    out = Path(args.runs) / f"{task}-{method}-{seed}"
    shutil.rmtree(out, ignore_errors=True)
    launcher = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(args.nproc), "--bind_cores_to_rank",
                "--master_port", str(args.master_port + slot)]
    one_process = []
    if args.nproc == 1:
        launcher += ["--bind_core_list", str(sorted(os.sched_getaffinity(0))[slot])]
        one_process = ["--grad_accum", str(RECIPE_RANKS), "--ds_config", "ds_configs/zero2.json"]
    cmd = [*launcher, "launch/train.py", "--config", f"launch/recipes/{RECIPES[task]}", "--stages", ALL_STAGES, "--seed", str(seed),
           "--dsee.seed", str(seed), "--output_dir", str(out), *one_process, *METHODS[method], *args.extra]
    tic = time.time()
    with open(out.parent / f"{out.name}.log", "w") as log:
        subprocess.run(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, check=True)
    summary = json.loads((out / "summary.json").read_text())
    after, prune = summary["after"], json.loads((out / "config.json").read_text())["prune"]
    # Timed only alone on the box: beside another job the latency would measure the sharing.
    latency = exported_latency(out) if "--prune.heads" in METHODS[method] and args.jobs == 1 else {}
    return {"task": task, "method": method, "seed": seed, **{k: after[k] for k in METRICS if k in after},
            "trainable_pct": summary.get("trainable_pct"), "sparsity": summary.get("sparsity"), "final_sparsity": summary.get("final_sparsity"),
            "flops_saved": summary.get("flops_saved"), "prune_score": prune_score(prune),
            "retune_s_per_step": summary["timings"].get("retune_s_per_step"), "teacher_s": summary["timings"].get("teacher_s"),
            "wall_s": round(time.time() - tic, 1), "nproc": args.nproc, "jobs": args.jobs, "recipe": RECIPES[task], "commit": COMMIT,
            **latency, "command": " ".join(cmd[cmd.index("launch/train.py"):])}


def prune_score(prune: dict) -> str | None:
    """What chose the unstructured or N:M mask: the score, or with a pattern and the re-fit, the re-fit itself."""
    if not (prune["pattern"] or prune["sparsity"] > 0):
        return None
    from dsee_scale.config import PruneConfig

    return "refit" if prune["pattern"] and PruneConfig(**prune).refits else prune["score"]


def exported_latency(out: Path) -> dict:
    """The structured export reloaded without DeepSpeed: FLOPs and CPU forward latency, dense vs
    as loaded vs compacted, on the first 32 evaluation rows."""
    from dsee_scale.evaluate import evaluate_folder

    cfg = json.loads((out / "config.json").read_text())
    data = {k: cfg[k] for k in ("text_column", "text_pair_column", "label_column", "header", "metric", "max_length")}
    result = evaluate_folder(str(out / "export" / "merged"), str(ROOT / cfg["eval_file"]), cfg["task"], latency_batch=32, **data)
    return {"latency": result["latency"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tasks", default="sst2,cola,mrpc,rte,stsb")
    p.add_argument("--methods", default="full,peft_lora,dsee,dsee_prune50,dsee_structured", help=f"any of {', '.join(METHODS)}")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--nproc", type=int, default=None, help=f"ranks per run (default {RECIPE_RANKS}, the recipes'); 1: one process as with --jobs, on the first core this process may use (taskset)")
    p.add_argument("--jobs", type=int, default=1, help="runs at once, each one process on its own core (gradient accumulation for the recipe's global batch, ZeRO-2); at most the cores this process may use")
    p.add_argument("--master_port", type=int, default=29500, help="another port lets the suite run beside the benchmark (--jobs use the next ones too)")
    p.add_argument("--runs", default=str(ROOT / "runs" / "glue"))
    add_out(p, "glue")
    p.add_argument("--missing", action="store_true", help="run only the (task, method, seed) cells --out has no line for yet (resume a table)")
    p.add_argument("--stop_file", default=None, help="start no further run once this file exists (stops a table running in the background between runs; the runs under way finish)")
    p.add_argument("extra", nargs="*", help="more launch/train.py flags for every run (after --)")
    args = p.parse_args()
    unknown = [m for m in args.methods.split(",") if m not in METHODS] + [t for t in args.tasks.split(",") if t not in RECIPES]
    if unknown:
        p.error(f"unknown {unknown}: methods {', '.join(METHODS)}; tasks {', '.join(RECIPES)}")
    cores = len(os.sched_getaffinity(0))
    if not 1 <= args.jobs <= cores:
        p.error(f"--jobs {args.jobs}: give 1 to {cores} (one core per job)")
    if args.jobs > 1 and args.nproc not in (None, 1):
        p.error(f"--jobs {args.jobs} runs each job in one process: drop --nproc {args.nproc}")
    args.nproc = 1 if args.jobs > 1 else args.nproc or RECIPE_RANKS
    Path(args.runs).mkdir(parents=True, exist_ok=True)
    run_id = time.strftime("%Y%m%dT%H%M%S")
    todo = [(task, method, seed) for seed in map(int, args.seeds.split(",")) for task in args.tasks.split(",") for method in args.methods.split(",")]
    if args.missing and Path(args.out).exists():
        done = {(r["task"], r["method"], r["seed"]) for r in map(json.loads, Path(args.out).read_text().splitlines())}
        todo = [cell for cell in todo if cell not in done]
        print(f"{len(todo)} cells missing from {args.out}", flush=True)
    if args.stop_file and Path(args.stop_file).exists():
        p.error(f"--stop_file {args.stop_file} exists already: remove it, or nothing would run")
    slots, written, failed, not_started = queue.Queue(), threading.Lock(), [], []
    for slot in range(args.jobs):
        slots.put(slot)

    def run_in_a_free_slot(task: str, method: str, seed: int) -> None:
        slot = slots.get()
        if args.stop_file and Path(args.stop_file).exists():
            slots.put(slot)
            not_started.append((task, method, seed))
            return
        try:
            line = {"run_id": run_id, **run(task, method, seed, args, slot)}
        except Exception as error:  # reported; the other runs go on
            failure = f"{task}-{method}-{seed}: {error!r} (log: {Path(args.runs) / f'{task}-{method}-{seed}.log'})"
            failed.append(failure)
            print(f"failed: {failure}", file=sys.stderr, flush=True)
            return
        finally:
            slots.put(slot)
        with written:
            record(line, args.out)

    with ThreadPoolExecutor(args.jobs) as pool:
        futures = [pool.submit(run_in_a_free_slot, *job) for job in todo]
        try:
            for future in futures:
                future.result()
        except KeyboardInterrupt:  # the running jobs got the same signal; start no more
            pool.shutdown(wait=False, cancel_futures=True)
            raise
    if not_started:
        print(f"stopped by {args.stop_file}: {len(not_started)} of {len(todo)} runs not started", flush=True)
    if failed:
        sys.exit(f"{len(failed)} of {len(todo)} runs failed:\n" + "\n".join(failed))

if __name__ == "__main__":
    main()
