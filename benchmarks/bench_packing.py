"""Tokens/s of --packing against padded rows, in one process: GSM8K question→answer rows as
prompt_completion (or a five-task mixture with --data mixture; dsee_scale.data.tokenize, the GPT-2 tokenizer from ../shared/data), a small
random-init LLaMA at that tokenizer's vocabulary (--hidden, 4 layers, tied embeddings) with DSEE
on it (rank 8, q and v), each micro-batch a forward + backward + AdamW step as the trainer takes it (collate, the loss
share, packing.model_inputs). The same rows each way, so the same real tokens: padded
micro-batches of --micro_batch rows (right-padded to their longest, as data.collate pads) and
packed micro-batches of --windows windows of --max_length. The two ways' steps are interleaved
(a padded step, a packed step, ...), each timed, so that a neighbour's load on a shared host falls
on both alike; a way's time for a pass over the rows is the sum of its steps', its tokens/s the
median over --repeats passes.

    OMP_NUM_THREADS=1 python benchmarks/bench_packing.py      # appends to benchmarks/results/packing.jsonl
    OMP_NUM_THREADS=1 python benchmarks/bench_packing.py --data mixture --rows 320
"""
import argparse
import csv
import json
import random
import statistics
import time
from pathlib import Path

import torch
from datasets import Dataset
from results_io import add_out, record
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

from dsee_scale import DSEEConfig, apply_dsee, packing
from dsee_scale.config import TrainConfig
from dsee_scale.data import GlobalBatches, collate, tokenize

SHARED = Path(__file__).resolve().parent.parent.parent / "shared" / "data"


def gsm8k_problems(n: int) -> list[dict]:
    """The first n GSM8K training problems as prompt/completion (the loss on the worked answer)."""
    problems = [json.loads(line) for line in (SHARED / "gsm8k" / "train.jsonl").read_text().splitlines()[:n]]
    return [{"prompt": f"Question: {p['question']}\nAnswer:", "completion": " " + p["answer"]} for p in problems]


def tsv(path: Path) -> list[dict]:
    return list(csv.DictReader(path.read_text(encoding="utf-8-sig").splitlines(), delimiter="\t", quoting=csv.QUOTE_NONE))


def mixture_problems(n: int) -> list[dict]:
    """n rows of a FLAN-style task mixture, the tasks in turn: GSM8K's worked answers, E2E's
    restaurant descriptions, SST-2 sentiment, MRPC paraphrase and RTE entailment as instructions
    with one-word answers: lengths from a dozen tokens to hundreds, as instruction mixtures have."""
    e2e = [line.split("||") for line in (SHARED / "e2e" / "valid.txt").read_text().splitlines()]
    tasks = [
        gsm8k_problems(n),
        [{"prompt": f"Describe the restaurant: {mr.strip()}\nDescription:", "completion": " " + text.strip()} for mr, text in e2e],
        [{"prompt": f"Is this review positive or negative? {r['sentence'].strip()}\nAnswer:", "completion": " " + ("positive" if r["label"] == "1" else "negative")}
         for r in tsv(SHARED / "sst2" / "train.tsv")],
        [{"prompt": f"Do these sentences mean the same? 1: {r['#1 String']} 2: {r['#2 String']}\nAnswer:", "completion": " " + ("yes" if r["Quality"] == "1" else "no")}
         for r in tsv(SHARED / "glue" / "MRPC" / "train.tsv")],
        [{"prompt": f"{r['sentence1']}\nDoes it follow that: {r['sentence2']}\nAnswer:", "completion": " " + ("yes" if r["label"] == "entailment" else "no")}
         for r in tsv(SHARED / "glue" / "RTE" / "train.tsv")],
    ]
    return [tasks[i % len(tasks)][i // len(tasks)] for i in range(n)]


DATA = {"gsm8k": gsm8k_problems, "mixture": mixture_problems}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", choices=DATA, default="gsm8k", help="gsm8k: its problems alone; mixture: five tasks in turn (mixture_problems)")
    p.add_argument("--rows", type=int, default=192, help="rows, the same each way")
    p.add_argument("--max_length", type=int, default=512, help="tokens per packed window (and the longest row kept)")
    p.add_argument("--micro_batch", type=int, default=8, help="padded: rows per micro-batch")
    p.add_argument("--windows", type=int, default=None, help="packed: windows per micro-batch; default: as many as hold the real tokens of --micro_batch rows on average (3 × 512 for GSM8K's 8)")
    p.add_argument("--repeats", type=int, default=3, help="passes over the rows per way, interleaved")
    p.add_argument("--hidden", type=int, default=64, help="the model's width: at 64, with the GPT-2 vocabulary, a step takes about half a second on one core")
    p.add_argument("--threads", type=int, default=1, help="torch threads (one rank's share of a 2-core host)")
    add_out(p, "packing")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    tokenizer = AutoTokenizer.from_pretrained(str(SHARED / "gpt2_tokenizer"))
    tokenizer.pad_token = tokenizer.eos_token  # as data.load_tokenizer does
    rows = tokenize(Dataset.from_list(DATA[args.data](args.rows)), tokenizer, TrainConfig(max_length=args.max_length))
    windows = args.windows or max(1, round(args.micro_batch * statistics.mean(map(len, rows["input_ids"])) / args.max_length))
    ways = {"padded": (rows.select_columns(["input_ids", "labels"]), args.micro_batch), "packed": (packing.pack(rows, args.max_length, seed=0), windows)}

    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=args.hidden, intermediate_size=args.hidden * 11 // 4, num_hidden_layers=4, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=args.max_length, tie_word_embeddings=True)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    apply_dsee(model, DSEEConfig(rank=8, nnz=64, support="magnitude"))
    model.train()
    optimizer = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=1e-3)
    attention = model.config._attn_implementation

    def micro_batches(way: str) -> list[dict]:
        data, size = ways[way]
        order = list(range(len(data)))
        random.Random(0).shuffle(order)
        return [collate(data[order[i : i + size]], tokenizer) for i in range(0, len(order), size)]

    def step(batch: dict) -> None:
        share = GlobalBatches(batch["input_ids"].shape[0], batch["input_ids"].shape[0], 1, 1, seed=0).loss_share(batch["labels"].tolist())
        inputs = packing.model_inputs(batch, attention, torch.float32) if "position_ids" in batch else batch
        model(**inputs, **share).loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    batches = {way: micro_batches(way) for way in ways}
    real = {way: sum(int(b["attention_mask"].sum()) for b in bs) for way, bs in batches.items()}
    positions = {way: sum(b["attention_mask"].numel() for b in bs) for way, bs in batches.items()}
    assert real["padded"] == real["packed"], real  # the same rows, so the same real tokens
    for way in ways:  # warm-up: allocator, caches, first calls
        step(batches[way][0])
    seconds = {way: [] for way in ways}
    for r in range(args.repeats):
        spent = dict.fromkeys(ways, 0.0)
        for i in range(max(map(len, batches.values()))):
            for way in (list(ways) if (r + i) % 2 == 0 else list(ways)[::-1]):
                if i < len(batches[way]):
                    tic = time.perf_counter()
                    step(batches[way][i])
                    spent[way] += time.perf_counter() - tic
        for way in ways:
            seconds[way].append(spent[way])
    tokens_per_s = {way: real[way] / statistics.median(s) for way, s in seconds.items()}
    line = {"benchmark": "packing", "data": args.data, "rows": len(rows), "model": f"llama-{args.hidden}x4", "vocab": len(tokenizer), "max_length": args.max_length,
            "micro_batch": args.micro_batch, "windows_per_micro_batch": windows, "threads": args.threads, "repeats": args.repeats,
            "real_tokens": real["packed"], "target_tokens": sum(rows["targets"]), "windows": len(ways["packed"][0]),
            "steps": {way: len(bs) for way, bs in batches.items()}, "fill": {way: real[way] / positions[way] for way in ways},
            "seconds": seconds, "tokens_per_s": tokens_per_s, "ratio": tokens_per_s["packed"] / tokens_per_s["padded"]}
    record(line, args.out)
    print(f"packed {tokens_per_s['packed']:.0f} tokens/s, padded {tokens_per_s['padded']:.0f} tokens/s (real input tokens): {line['ratio']:.2f}×", flush=True)


if __name__ == "__main__":
    main()
