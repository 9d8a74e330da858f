"""The real path on a GPU, in one command (`bash scripts/gpu_check.sh`); `--cpu` runs the same
steps on small models and 2 CPU ranks (part of `make test`).

1. GPT-2 (GPT-2-medium config on the GPU) under ZeRO-3 (bf16 on the GPU): Ω, tune, 50% global
   pruning, re-tune, export; the export reloaded with plain transformers (no DeepSpeed) must
   give the logits the engine gave.
2. A BERT config: structured pruning (heads and FFN neurons removed), re-tune, export, same
   reload check.
2b. GPT-2 with 2:4 pruning and the sparsity-preserving re-tune: the export is 2:4 in every
   pruned matrix; on a GPU it also runs with PyTorch semi-structured weights (logits, latency).
3. Training speed (tokens/s) of DSEE, PEFT LoRA and full fine-tuning on the same engine.

Each check prints one JSON line, appended to <out>/gpu_check.jsonl; the exit status is non-zero
if a reload check fails.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

MODES = {
    "gpu": dict(gpt2="builtin:gpt2-medium", bert="builtin:bert-base", ds_config="ds_configs/zero3_bf16.json", tune=20, retune=10,
                speed=["--model", "gpt2-medium", "--seq", "512", "--batch", "8", "--steps", "10", "--warmup", "3", "--bf16", "--no_comms_log"]),
    "cpu": dict(gpt2="builtin:tiny-gpt2", bert="builtin:tiny-bert", ds_config="ds_configs/zero3.json", tune=4, retune=2,
                speed=["--model", "tiny", "--seq", "32", "--batch", "2", "--steps", "2", "--warmup", "1", "--rank", "4", "--no_comms_log"]),
}
LOGIT_ROWS = 4


def worker(argv: list[str]) -> None:
    """Under the launcher: the shipped Recipe for each run (argument lists separated by --then,
    one launch for all), then the engine's logits on the first eval rows."""
    import torch

    from dsee_scale import dist
    from dsee_scale.config import train_config_from_argv
    from dsee_scale.data import collate
    from dsee_scale.trainer import Recipe

    runs: list[list[str]] = [[]]
    for arg in argv:
        if arg == "--then":
            runs.append([])
        else:
            runs[-1].append(arg)
    for i, run_argv in enumerate(runs):
        recipe = Recipe(train_config_from_argv(run_argv))
        recipe.setup()
        recipe.run()
        batch = {k: v.to(recipe.engine.device) for k, v in collate(recipe.eval_rows[:LOGIT_ROWS], recipe.tokenizer).items()}
        recipe.engine.eval()
        with torch.no_grad():
            logits = recipe.engine(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        if dist.is_main():
            torch.save({"logits": logits.float().cpu(), "input_ids": batch["input_ids"].cpu(), "attention_mask": batch["attention_mask"].cpu()}, recipe.run_dir / "engine_logits.pt")
        recipe.engine.destroy()  # its ZeRO-3 hooks and (on a GPU) memory go before the next run's
        recipe.close(end_process_group=i == len(runs) - 1)
        del recipe, batch, logits


def reload_check(run_dir: Path, task: str, device: str) -> dict:
    """Logits of the exported folder loaded by plain transformers vs the engine's."""
    import torch

    from dsee_scale.models import TASK_MODELS

    saved = torch.load(run_dir / "engine_logits.pt", weights_only=True)
    summary = json.loads((run_dir / "summary.json").read_text())
    model = TASK_MODELS[task].from_pretrained(run_dir / "export" / "merged").to(device).eval()
    with torch.no_grad():
        logits = model(input_ids=saved["input_ids"].to(device), attention_mask=saved["attention_mask"].to(device)).logits.float().cpu()
    diff = (logits - saved["logits"]).abs().max().item()
    relative = ((logits - saved["logits"]).norm() / saved["logits"].norm().clamp_min(1e-30)).item()
    # fp32: the same function to rounding. bf16: ZeRO-3's linear (matmul, then bias) and plain
    # torch's (fused bias) round differently in every layer, so the check is relative.
    ok = diff <= 1e-5 if model.dtype == torch.float32 else relative <= 2e-2
    return {
        "model_dtype": str(model.dtype), "max_abs_logit_diff": diff, "relative_l2_diff": relative, "reload_ok": ok,
        "sparsity": summary.get("sparsity"), "final_sparsity": summary.get("final_sparsity"), "flops_saved": summary.get("flops_saved"),
        "train_loss": summary.get("train_loss"), "timings": summary.get("timings"), "wall_s": summary.get("wall_s"),
        "peak_rss_mb_per_rank": summary.get("peak_rss_mb_per_rank"), "structured": summary.get("structured"),
    }


def write_classification_data(folder: Path) -> tuple[Path, Path]:
    """Price class (cheap / moderate / expensive) of the built-in corpus's sentences."""
    from dsee_scale.data import generate_corpus

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, n, seed in (("train.tsv", 2000, 0), ("eval.tsv", 64, 1)):
        rows = [(t, s.split("price : ")[1].split(" |")[0]) for s, t in generate_corpus(n, seed)]
        path = folder / name
        path.write_text("sentence\tlabel\n" + "".join(f"{t}\t{label}\n" for t, label in rows), encoding="utf-8")
        paths.append(path)
    return paths[0], paths[1]


def launcher(mode: str) -> list[str]:
    # The module, not the `deepspeed` script: DeepSpeed may be importable from a folder without
    # its scripts beside this interpreter (`pip install --target`).
    deepspeed = [sys.executable, "-m", "deepspeed.launcher.runner"]
    if mode == "cpu":
        return deepspeed + ["--num_gpus", "2", "--master_port", os.environ.get("MASTER_PORT", "29650")]
    return deepspeed + ["--num_gpus", "1"]


def run(cmd: list) -> None:
    cmd = [str(c) for c in cmd]
    env = {**os.environ, "PYTHONPATH": f"{ROOT}:{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"failed ({proc.returncode}): {' '.join(cmd)}\n{(proc.stdout + proc.stderr)[-6000:]}")


def sparse24_check(run_dir: Path, device: str) -> dict:
    """The 2:4 export: every pruned matrix (adapted ones too) 2:4 along its input dimension;
    on a GPU also loaded with PyTorch semi-structured weights: logits and latency vs dense."""
    import torch
    from safetensors.torch import load_file

    from dsee_scale.flops import measure_latency
    from dsee_scale.models import TASK_MODELS
    from dsee_scale.semistructured import is_nm_sparse, to_semi_structured

    weights = load_file(str(run_dir / "export" / "merged" / "model.safetensors"))
    pruned = [n for n in weights if ".h." in n and n.endswith("weight") and weights[n].dim() == 2]
    result = {"matrices": len(pruned), "all_2of4": all(is_nm_sparse(weights[n], 2, 4, dim=0) for n in pruned)}
    if device == "cuda":
        saved = torch.load(run_dir / "engine_logits.pt", weights_only=True)
        load = lambda: TASK_MODELS["lm"].from_pretrained(run_dir / "export" / "merged", dtype=torch.bfloat16).to(device).eval()  # noqa: E731
        dense, sparse = load(), load()
        result["semi_structured_modules"] = len(to_semi_structured(sparse))
        ids = saved["input_ids"].to(device)
        with torch.inference_mode():
            ref, got = dense(input_ids=ids).logits.float(), sparse(input_ids=ids).logits.float()
            result["semi_structured_relative_l2_diff"] = ((got - ref).norm() / ref.norm()).item()
            for batch in (1, 8, 64):
                tokens = {"input_ids": torch.randint(0, dense.config.vocab_size, (batch, 128), device=device)}
                result[f"latency_ms_batch{batch}"] = {"dense": round(measure_latency(dense, tokens), 3), "2of4": round(measure_latency(sparse, tokens), 3)}
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cpu", action="store_true", help="small models on 2 CPU ranks (the same code path)")
    p.add_argument("--out", default="runs/gpu_check")
    p.add_argument("--only", default="gpt2,bert,sparse24,speed", help="checks to run, comma-separated: gpt2, bert, sparse24, speed")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args, rest = p.parse_known_args()
    if args.worker:
        return worker(rest)
    import torch

    mode = "cpu" if args.cpu else "gpu"
    if mode == "gpu" and not torch.cuda.is_available():
        sys.exit("no GPU visible to torch: run `bash scripts/gpu_check.sh --cpu` for the CPU mode")
    settings = MODES[mode]
    gpt2, bert, ds_config, tune, retune, speed = (settings[k] for k in ("gpt2", "bert", "ds_config", "tune", "retune", "speed"))
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    device = "cuda" if mode == "gpu" else "cpu"
    host = {"mode": mode, "device": torch.cuda.get_device_name(0) if mode == "gpu" else "cpu", "torch": torch.__version__}
    results = []
    common = ["--ds_config", ds_config, "--steps", tune, "--retune_steps", retune, "--save_every", 0, "--log_every", max(1, tune // 4),
              "--stages", "tune,prune,retune,export", "--overwrite", "--micro_batch_size", 4]

    only = args.only.split(",")
    checks = []  # (check, model, task, run folder, the run's own flags): one launch runs them all
    if "gpt2" in only:
        checks.append(("gpt2_prune50_export_reload", gpt2, "lm", out / "gpt2_unstructured", ["--prune.sparsity", 0.5]))
    if "bert" in only:
        train, eval_ = write_classification_data(out / "data")
        checks.append(("bert_structured_export_reload", bert, "cls", out / "bert_structured",
                       ["--task", "cls", "--train_file", train, "--eval_file", eval_, "--text_column", "sentence", "--prune.sparsity", 0, "--prune.heads", 0.25, "--prune.ffn", 0.25]))
    if "sparse24" in only:
        checks.append(("gpt2_2of4_export_reload", gpt2, "lm", out / "gpt2_2of4", ["--prune.pattern", "2:4"]))
    if checks:
        runs = [["--model", model, *flags, "--output_dir", run_dir, *common] for _, model, _, run_dir, flags in checks]
        run(launcher(mode) + ["scripts/gpu_check.py", "--worker", *runs[0], *[a for r in runs[1:] for a in ["--then", *r]]])
    for check, model, task, run_dir, _ in checks:
        extra = sparse24_check(run_dir, device) if check == "gpt2_2of4_export_reload" else {}
        results.append({"check": check, "model": model, "ds_config": ds_config, **reload_check(run_dir, task, device), **extra})

    if "speed" in only:
        speed_file = out / "speed.jsonl"
        speed_file.unlink(missing_ok=True)
        for method in ("full", "peft_lora", "dsee"):
            run(launcher(mode) + ["benchmarks/memory_worker.py", "--method", method, "--out", str(speed_file), *speed])
        lines = {line["method"]: line for line in map(json.loads, speed_file.read_text().splitlines())}
        results.append({"check": "speed", **{f"{m}_tokens_per_s": lines[m]["tokens_per_s"] for m in lines},
                        "dsee_vs_peft_lora": round(lines["dsee"]["tokens_per_s"] / lines["peft_lora"]["tokens_per_s"], 3),
                        "dsee_vs_full": round(lines["dsee"]["tokens_per_s"] / lines["full"]["tokens_per_s"], 3),
                        "peak_device_mb": {m: lines[m].get("peak_device_mb") for m in lines}, "speed_flags": speed})
    with open(out / "gpu_check.jsonl", "a") as f:
        for result in results:
            line = json.dumps({**host, **result})
            print(line)
            f.write(line + "\n")
    if not all(r.get("reload_ok", True) and r.get("all_2of4", True) for r in results):
        sys.exit("a reloaded export did not give the engine's logits or is not 2:4 (see reload_ok / all_2of4 above)")


if __name__ == "__main__":
    main()
