"""Generation under ZeRO-3 (BLEU's greedy decoding) on 2 CPU ranks: the model gathered whole on
every rank (the default when it fits) against the synced per-layer path (every token's forward
fetches each layer, ranks in step), through launch/train.py's evaluate stage.

    python benchmarks/bench_generation.py     # the demo model and a GPT-2-medium config

Prints and appends one JSON line per (model, path) to benchmarks/results/generation.jsonl, with
generated tokens/s over both ranks and the whole path's speed-up over the synced one.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from results_io import add_out, record

ROOT = Path(__file__).resolve().parent.parent
MODELS = {
    "demo": [],  # the built-in tiny LLaMA and corpus of `make demo`
    "gpt2-medium": ["--model", "builtin:gpt2-medium", "--tokenizer", "../shared/data/gpt2_tokenizer", "--train_file", "../shared/data/e2e/valid.txt",
                    "--eval_file", "../shared/data/e2e/test.txt", "--max_train_samples", "64", "--max_eval_samples", "64"],
}


def tokens_per_s(model: str, whole: bool, args, folder: Path) -> dict:
    out = folder / f"{model}-{'whole' if whole else 'synced'}"
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--bind_cores_to_rank", "--master_port", "29791", "launch/train.py",
           "--ds_config", "ds_configs/zero3.json", "--stages", "evaluate", "--gen_samples", str(args.samples), "--gen_max_new_tokens", str(args.tokens),
           "--gen_whole_model", str(whole).lower(), "--output_dir", str(out), *MODELS[model]]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit((proc.stdout + proc.stderr)[-5000:])
    summary = json.loads((out / "summary.json").read_text())
    return {"model": model, "path": summary["generation"], "tokens_per_s": round(summary["timings"]["generation_tokens_per_s"], 2),
            "generation_s": round(summary["timings"]["generation_s"], 1), "samples": args.samples, "max_new_tokens": args.tokens,
            "peak_rss_mb_per_rank": summary["peak_rss_mb_per_rank"], "bleu": summary["after"]["bleu"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--samples", type=int, default=8)
    p.add_argument("--tokens", type=int, default=32)
    add_out(p, "generation")
    args = p.parse_args()
    run_id = time.strftime("%Y%m%dT%H%M%S")
    with tempfile.TemporaryDirectory() as folder:
        for model in args.models.split(","):
            whole, synced = (tokens_per_s(model, w, args, Path(folder)) for w in (True, False))
            whole["speedup_vs_synced"] = round(whole["tokens_per_s"] / synced["tokens_per_s"], 2)
            for line in (whole, synced):
                record({"run_id": run_id, **line}, args.out)


if __name__ == "__main__":
    main()
