"""Evaluation arithmetic shared by the training run and plain re-evaluation of an export.

`python -m dsee_scale.evaluate --model runs/x/export/merged --eval_file data.tsv --task cls`
re-computes the run's metric in a process without DeepSpeed; `--latency` adds, for a structured
export, FLOPs per token and measured forward latency of the dense architecture, the folder as
`from_pretrained` loads it, and the compacted model (structured.compact), on a fixed batch.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import time

import torch


def metric_sums(logits: torch.Tensor, labels: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """LM: (summed token loss, tokens); rows with real == False (padding rows) are not counted."""
    real = real.to(logits.device)
    shifted, targets = logits[:, :-1].float(), labels[:, 1:]
    losses = torch.nn.functional.cross_entropy(shifted.transpose(1, 2), targets, ignore_index=-100, reduction="none")
    counted = (targets != -100) & real[:, None]
    return torch.stack([(losses * counted).sum().double(), counted.sum().double()])


def finish(sums: torch.Tensor) -> dict:
    loss = sums[0].item() / max(1.0, sums[1].item())
    return {"eval_loss": loss, "perplexity": math.exp(min(loss, 50))}


class Tally:
    """What a task's metric needs from each evaluation batch: LM token-loss sums (all-reduced),
    or, for cls/reg, every real row's prediction and label, gathered in rank order (each rank
    holds a contiguous share of the rows, so every row is counted once, in order) for
    metrics.compute. `result` is collective; without a process group it is this process's."""

    def __init__(self, task: str, metric: str | None, device: torch.device) -> None:
        self.task, self.metric = task, metric
        self.sums = torch.zeros(2, dtype=torch.float64, device=device)
        self.preds: list[torch.Tensor] = []
        self.labels: list[torch.Tensor] = []

    def add(self, logits: torch.Tensor, labels: torch.Tensor, real: torch.Tensor) -> None:
        if self.task == "lm":
            self.sums += metric_sums(logits, labels, real)
            return
        real = real.to(logits.device)
        preds = logits.argmax(-1) if self.task == "cls" else logits[:, 0].float()
        self.preds.append(preds[real].cpu())
        self.labels.append(labels[real].cpu())

    def result(self) -> dict:
        from dsee_scale import dist
        from dsee_scale.metrics import compute

        if self.task == "lm":
            return finish(dist.all_reduce(self.sums))
        mine = (torch.cat(self.preds).tolist(), torch.cat(self.labels).tolist()) if self.preds else ([], [])
        shares = dist.all_gather_object(mine)
        return compute(self.metric, [p for share in shares for p in share[0]], [y for share in shares for y in share[1]])


def _my_share(n: int) -> tuple[range, int]:
    """This rank's contiguous share of n items, and the share every rank is padded to."""
    from dsee_scale import dist

    per_rank = math.ceil(n / dist.world_size())
    return range(n)[dist.rank() * per_rank : (dist.rank() + 1) * per_rank], per_rank


def _my_batches(rows, micro: int, device: torch.device):
    """This rank's evaluation batches and which of their rows are real. Every rank runs the same
    number of forwards (ZeRO-3 gathers are collective); filler rows are not counted."""
    mine, per_rank = _my_share(len(rows))
    for i in range(math.ceil(per_rank / micro)):
        chunk = list(mine[i * micro : (i + 1) * micro])
        real = torch.tensor([True] * len(chunk) + [False] * (micro - len(chunk)), device=device)
        yield rows[chunk + [0] * (micro - len(chunk))], real


@torch.no_grad()
def evaluate_engine(engine, rows, tokenizer, task: str, micro: int, metric: str | None = None) -> dict:
    """The task's metrics of a (DeepSpeed) engine on tokenized rows, split over the ranks. Collective."""
    from dsee_scale.data import collate

    engine.eval()
    tally = Tally(task, metric, engine.device)
    for batch_rows, real in _my_batches(rows, micro, engine.device):
        batch = {k: v.to(engine.device) for k, v in collate(batch_rows, tokenizer).items()}
        tally.add(engine(**batch).logits, batch["labels"], real)
    return tally.result()


def corpus_bleu(model, tokenizer, rows, samples: int, max_new_tokens: int, synced_gpus: bool) -> tuple[float, int]:
    """Greedy generation from each unique source (the first `samples`), split over the ranks;
    corpus BLEU against all of each source's references, and the tokens this rank generated.
    Collective."""
    import sacrebleu

    from dsee_scale import dist

    refs: dict[str, list[str]] = {}
    for source, target in zip(rows["source"], rows["target"]):
        refs.setdefault(source, []).append(target)
    sources = sorted(refs)[:samples]
    share, per_rank = _my_share(len(sources))
    mine = [sources[i] for i in share]
    outputs = [generate(model, tokenizer, s, max_new_tokens, synced_gpus) for s in mine]
    for _ in range(per_rank - len(mine) if synced_gpus else 0):  # keep the collective forwards in step across ranks
        generate(model, tokenizer, sources[0], max_new_tokens, synced_gpus)
    pairs = [p for part in dist.all_gather_object([(s, text) for s, (text, _) in zip(mine, outputs)]) for p in part]
    depth = max(len(refs[s]) for s, _ in pairs)
    streams = [[refs[s][min(i, len(refs[s]) - 1)] for s, _ in pairs] for i in range(depth)]
    return sacrebleu.corpus_bleu([h for _, h in pairs], streams).score, sum(n for _, n in outputs)


def engine_bleu(engine, tokenizer, rows, samples: int, max_new_tokens: int, whole_if_fits: bool) -> dict:
    """BLEU of the engine's greedy generations (corpus_bleu), with how they ran and how fast.
    Under ZeRO-3 the model is gathered whole on every rank when `whole_if_fits` and it fits
    (ranks then generate independently); otherwise each token's forward fetches every layer,
    all ranks in step (synced_gpus). Collective."""
    from dsee_scale import dist, zero

    model = engine.module
    partitioned = zero.zero3_active(model)
    whole = partitioned and whole_if_fits and zero.whole_model_fits(model)
    tic = time.time()
    with zero.whole_model(engine) if whole else contextlib.nullcontext():
        bleu, tokens = corpus_bleu(model, tokenizer, rows, samples, max_new_tokens, synced_gpus=partitioned and not whole)
    seconds = time.time() - tic
    tokens_all = float(dist.all_reduce(torch.tensor([tokens], dtype=torch.float64, device=engine.device)))
    return {"bleu": bleu, "generation": "synced" if partitioned and not whole else "whole", "generation_s": seconds, "generation_tokens_per_s": tokens_all / seconds}


def generate(model, tokenizer, source: str, max_new_tokens: int, synced_gpus: bool) -> tuple[str, int]:
    """Greedy continuation of `source ||` and its length in tokens; synced_gpus keeps ZeRO-3
    ranks in step."""
    from dsee_scale.data import PAIR_SEPARATOR

    device = next(model.parameters()).device
    ids = tokenizer(source + " " + PAIR_SEPARATOR, add_special_tokens=False, return_tensors="pt")["input_ids"].to(device)
    out = model.generate(
        input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, synced_gpus=synced_gpus,
    )
    return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True).strip(), out.shape[1] - ids.shape[1]


@torch.no_grad()
def evaluate_folder(model_dir: str, eval_file: str, task: str, batch_size: int = 8, latency_batch: int = 0, **data_options) -> dict:
    """Load an exported HF folder (model + tokenizer) with plain transformers and evaluate it;
    latency_batch > 0 adds `structured_latency` on the first latency_batch evaluation rows."""
    from transformers import AutoTokenizer

    from dsee_scale.config import TrainConfig
    from dsee_scale.data import check_labels, collate, load_split, tokenize
    from dsee_scale.models import TASK_MODELS

    cfg = TrainConfig(task=task, eval_file=eval_file, train_file=eval_file, **data_options)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = TASK_MODELS[task].from_pretrained(model_dir).eval()
    labels = getattr(model.config, "dsee_label_map", None)
    if task == "cls" and not labels:
        raise ValueError(f"{model_dir}: the config has no dsee_label_map (was it exported by dsee_scale?)")
    data = load_split(cfg, "eval")
    if task != "lm":
        check_labels(data[cfg.label_column], cfg, eval_file)
    rows = tokenize(data, tokenizer, cfg, labels)
    device = next(model.parameters()).device
    tally = Tally(task, cfg.metric, device)
    for i in range(0, len(rows), batch_size):
        batch = {k: v.to(device) for k, v in collate(rows[i : i + batch_size], tokenizer).items()}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        tally.add(logits, batch["labels"], torch.ones(len(batch["input_ids"]), dtype=torch.bool, device=device))
    result = tally.result()
    if latency_batch:
        batch = collate(rows[:latency_batch], tokenizer)
        result["latency"] = structured_latency(model_dir, task, {k: batch[k] for k in ("input_ids", "attention_mask")})
    return result


def structured_latency(model_dir: str, task: str, batch: dict[str, torch.Tensor], repeats: int = 20) -> dict:
    """FLOPs per token and forward latency: dense architecture (random weights: latency does
    not depend on values) vs the structured export as loaded vs compacted to per-layer sizes."""
    from dsee_scale.flops import inference_flops, latency_report
    from dsee_scale.models import TASK_MODELS
    from dsee_scale.structured import compact, dense_config

    auto = TASK_MODELS[task]
    exported = auto.from_pretrained(model_dir)
    if not hasattr(exported.config, "dsee_structured"):
        raise ValueError(f"{model_dir}: not a structured export (no dsee_structured in its config): latency compares against the unpruned architecture")
    dense = auto.from_config(dense_config(exported.config))
    compacted = compact(auto.from_pretrained(model_dir))
    ctx = batch["input_ids"].shape[1]
    flops = {name: inference_flops(m, ctx=ctx)["dense_model"] for name, m in (("dense", dense), ("exported", exported), ("compact", compacted))}
    return {
        **{f"flops_per_token_{name}": value for name, value in flops.items()},
        "flops_saved": 1 - flops["compact"] / flops["dense"],
        **latency_report(dense, exported, compacted, batch, repeats),
    }


def main() -> None:
    from dsee_scale.config import TASKS

    p = argparse.ArgumentParser(description="Evaluate an exported model folder without DeepSpeed.")
    p.add_argument("--model", required=True)
    p.add_argument("--eval_file", required=True)
    p.add_argument("--task", default="lm", choices=TASKS)
    p.add_argument("--text_column", default="text")
    p.add_argument("--text_pair_column", default=None)
    p.add_argument("--label_column", default="label")
    p.add_argument("--header", default="true", choices=["true", "false"], help="false: a TSV/CSV file without a header row (columns named 0, 1, ...)")
    p.add_argument("--metric", default=None, help="cls/reg metrics (as launch/train.py --metric); default: the task's")
    p.add_argument("--max_length", type=int, default=128)
    p.add_argument("--latency", type=int, default=0, metavar="N", help="structured exports: FLOPs and CPU latency (dense vs exported vs compacted) on the first N evaluation rows")
    args = p.parse_args()
    result = evaluate_folder(args.model, args.eval_file, args.task, latency_batch=args.latency, text_column=args.text_column, text_pair_column=args.text_pair_column,
                             label_column=args.label_column, header=args.header == "true", metric=args.metric, max_length=args.max_length)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
