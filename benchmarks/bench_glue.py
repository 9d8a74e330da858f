"""GLUE-style accuracy from the shipped pipeline: every number is a `launch/train.py` run.

    python benchmarks/bench_glue.py                     # the paper-style table: 5 tasks × 5 methods × 3 seeds
    python benchmarks/bench_glue.py --tasks sst2-short --methods dsee,dsee_random,dsee_magnitude,dsee_prune20 --seeds 0,1,2

Each (task, method, seed) runs `launch/recipes/glue-<task>.yaml` (`minilm-sst2.yaml`, 64 tokens,
for `sst2-short`) under DeepSpeed's launcher on --nproc ranks, with the method's flags on top and
nothing tuned per task. One JSON line per run, with the task's metrics after export (the merged
model), appended to benchmarks/results/glue.jsonl; `python benchmarks/report.py` makes the tables.
The baselines (full fine-tuning, PEFT LoRA) are `launch/train.py --method full|peft_lora` on the
same engine, data, stages and schedule; full fine-tuning alone gets its own learning rate.
Structured rows also time the exported model's CPU forward against the dense one
(`dsee_scale.evaluate.structured_latency`, the first 32 evaluation rows).
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
RECIPES = {"sst2-short": "minilm-sst2.yaml", **{t: f"glue-{t}.yaml" for t in ("sst2", "cola", "mrpc", "rte", "stsb")}}
ALL_STAGES = "tune,prune,retune,export,evaluate"
# Every method runs the same two training stages (tune, then re-tune), so pruned rows and the
# unpruned one have equal compute.
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
    "dsee_2of4": ["--prune.pattern", "2:4"],
    "dsee_structured": ["--prune.sparsity", "0", "--prune.heads", "0.25", "--prune.ffn", "0.25"],
}
METRICS = ("accuracy", "f1", "mcc", "pearson", "spearman", "eval_loss")


def run(task: str, method: str, seed: int, args) -> dict:
    out = Path(args.runs) / f"{task}-{method}-{seed}"
    shutil.rmtree(out, ignore_errors=True)
    launcher = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(args.nproc), "--bind_cores_to_rank",
                "--master_port", str(args.master_port)]
    cmd = [*launcher, "launch/train.py", "--config", f"launch/recipes/{RECIPES[task]}", "--stages", ALL_STAGES, "--seed", str(seed),
           "--dsee.seed", str(seed), "--output_dir", str(out), *METHODS[method], *args.extra]
    tic = time.time()
    with open(out.parent / f"{out.name}.log", "w") as log:
        subprocess.run(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, check=True)
    summary = json.loads((out / "summary.json").read_text())
    after = summary["after"]
    latency = exported_latency(out) if "--prune.heads" in METHODS[method] else {}
    return {"task": task, "method": method, "seed": seed, **{k: after[k] for k in METRICS if k in after},
            "trainable_pct": summary.get("trainable_pct"), "sparsity": summary.get("sparsity"), "final_sparsity": summary.get("final_sparsity"),
            "flops_saved": summary.get("flops_saved"), "wall_s": round(time.time() - tic, 1), "nproc": args.nproc, "recipe": RECIPES[task],
            **latency, "command": " ".join(cmd[cmd.index("launch/train.py"):])}


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
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--master_port", type=int, default=29500, help="another port lets the suite run beside the benchmark")
    p.add_argument("--runs", default=str(ROOT / "runs" / "glue"))
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "glue.jsonl"))
    p.add_argument("extra", nargs="*", help="more launch/train.py flags for every run (after --)")
    args = p.parse_args()
    unknown = [m for m in args.methods.split(",") if m not in METHODS] + [t for t in args.tasks.split(",") if t not in RECIPES]
    if unknown:
        p.error(f"unknown {unknown}: methods {', '.join(METHODS)}; tasks {', '.join(RECIPES)}")
    Path(args.runs).mkdir(parents=True, exist_ok=True)
    run_id = time.strftime("%Y%m%dT%H%M%S")
    for seed in map(int, args.seeds.split(",")):
        for task in args.tasks.split(","):
            for method in args.methods.split(","):
                line = {"run_id": run_id, **run(task, method, seed, args)}
                print(json.dumps(line), flush=True)
                with open(args.out, "a") as f:
                    f.write(json.dumps(line) + "\n")


if __name__ == "__main__":
    main()
