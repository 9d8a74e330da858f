"""Evaluation arithmetic shared by the training run and plain re-evaluation of an export.

`python -m dsee_scale.evaluate --model runs/x/export/merged --eval_file data.tsv --task cls`
re-computes the run's metric in a process without DeepSpeed; `--latency` adds, for a structured
export, FLOPs per token and measured forward latency of the dense architecture, the folder as
`from_pretrained` loads it, and the compacted model (structured.compact), on a fixed batch.
`--eval_perplexity FILE` adds the perplexity of a plain text (data.text_windows), `--harness
TASKS` lm-evaluation-harness's tasks (the `eval` extra): what pruning cost, as the field reports it.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch import nn

# Target tokens whose logits exist at once in LM evaluation, in fp32: 1024 × a 128k vocabulary is 512 MiB.
CHUNK_TOKENS = 1024


def lm_sums(model: nn.Module, forward: Callable, batch: dict[str, torch.Tensor], real: torch.Tensor, chunk: int = CHUNK_TOKENS) -> torch.Tensor:
    """LM: (summed token loss, tokens) of a batch; rows with real == False (padding rows) are not
    counted. `forward` calls `model` (a DeepSpeed engine around it, or the model itself).

    The model is called without labels: its own loss takes an fp32 copy of the B×T×V logits (and
    log-softmax another), which outgrows the model itself with a 128k vocabulary. The
    cross-entropy runs over `chunk` target tokens at a time instead, in fp32; where the logits are
    the head's output as is (arch.logits_are_head_output) and the head is one layer, the head too
    runs per chunk, on the final hidden states, so that no B×T×V tensor exists at all."""
    from dsee_scale.arch import logits_are_head_output

    labels = batch["labels"]
    targets = labels[:, 1:]
    counted = (targets != -100) & real.to(labels.device)[:, None]
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "use_cache": False}
    head = model.get_output_embeddings() if logits_are_head_output(model) else None
    # A head that wraps another module (an adapter on it) would call that module, and ZeRO-3's
    # hooks with it, once per chunk: a number that differs between ranks.
    if head is None or next(head.children(), None) is not None:
        total = _chunked_loss(forward(**inputs).logits, lambda logits: logits, targets, counted, chunk)
    else:
        with _loss_in_head(head, targets, counted, chunk) as totals:
            forward(**inputs)
        if len(totals) != 1:
            raise RuntimeError(f"{type(model).__name__} called its output embeddings {len(totals)} times in one forward, not once: "
                               "evaluation cannot take its loss from the head (arch.logits_are_head_output)")
        total = totals[0]
    return torch.stack([total, counted.sum().double()])


def _chunked_loss(features: torch.Tensor, to_logits: Callable[[torch.Tensor], torch.Tensor], targets: torch.Tensor, counted: torch.Tensor,
                  chunk: int) -> torch.Tensor:
    """Summed cross-entropy (float64) of the counted positions, `chunk` at a time: position t of
    `features` (B×T×V logits, or the hidden states that `to_logits` maps to logits) predicts
    targets[:, t]."""
    rows, cols = counted.nonzero(as_tuple=True)
    total = torch.zeros((), dtype=torch.float64, device=features.device)
    for start in range(0, len(rows), chunk):
        r, c = rows[start : start + chunk], cols[start : start + chunk]
        total += torch.nn.functional.cross_entropy(to_logits(features[r, c]).float(), targets[r, c], reduction="sum").double()
    return total


@contextlib.contextmanager
def _loss_in_head(head: nn.Module, targets: torch.Tensor, counted: torch.Tensor, chunk: int) -> Iterator[list[torch.Tensor]]:
    """While open, the head computes the chunked loss of its input (the final hidden states) into
    the list it yields and returns logits of width 0. It runs inside the model's forward, where
    ZeRO-3 has gathered the head's weights (its module hooks are untouched)."""
    totals: list[torch.Tensor] = []
    own, compute = vars(head).get("forward"), head.forward

    def forward(hidden: torch.Tensor) -> torch.Tensor:
        if hidden.shape[:2] != (targets.shape[0], targets.shape[1] + 1):
            raise RuntimeError(f"the output embeddings got hidden states of shape {tuple(hidden.shape)} for a batch of {tuple(counted.shape)} targets")
        totals.append(_chunked_loss(hidden, compute, targets, counted, chunk))
        return hidden.new_zeros((*hidden.shape[:-1], 0))

    head.forward = forward
    try:
        yield totals
    finally:
        if own is None:
            del head.forward
        else:
            head.forward = own


def finish(sums: torch.Tensor) -> dict:
    loss = sums[0].item() / max(1.0, sums[1].item())
    return {"eval_loss": loss, "perplexity": math.exp(min(loss, 50))}


class Tally:
    """What a task's metric needs from each evaluation batch: LM token-loss sums (lm_sums; `sums`,
    all-reduced), or, for cls/reg, every real row's prediction and label (`add`), gathered in rank
    order (each rank holds a contiguous share of the rows, so every row is counted once, in order)
    for metrics.compute. `result` is collective; without a process group it is this process's."""

    def __init__(self, task: str, metric: str | None, device: torch.device) -> None:
        self.task, self.metric = task, metric
        self.sums = torch.zeros(2, dtype=torch.float64, device=device)
        self.preds: list[torch.Tensor] = []
        self.labels: list[torch.Tensor] = []

    def add(self, logits: torch.Tensor, labels: torch.Tensor, real: torch.Tensor) -> None:
        """cls/reg: one batch's predictions and labels, rows with real == False left out."""
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
def evaluate_rows(model: nn.Module, rows, tokenizer, task: str, micro: int, metric: str | None = None, forward: Callable | None = None,
                  device: torch.device | None = None) -> dict:
    """The task's metrics of a model on tokenized rows, split over the ranks; the model is called
    without labels (`forward`: a DeepSpeed engine around it; default the model). Collective."""
    from dsee_scale.data import collate

    forward = forward or model
    device = device or next(model.parameters()).device
    tally = Tally(task, metric, device)
    for batch_rows, real in _my_batches(rows, micro, device):
        batch = {k: v.to(device) for k, v in collate(batch_rows, tokenizer).items()}
        if task == "lm":
            tally.sums += lm_sums(model, forward, batch, real)
        else:
            tally.add(forward(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits, batch["labels"], real)
    return tally.result()


def evaluate_engine(engine, rows, tokenizer, task: str, micro: int, metric: str | None = None) -> dict:
    """evaluate_rows on a (DeepSpeed) engine's model. Collective."""
    engine.eval()
    return evaluate_rows(engine.module, rows, tokenizer, task, micro, metric, forward=engine, device=engine.device)


def corpus_bleu(model, tokenizer, rows, samples: int, max_new_tokens: int, synced_gpus: bool) -> tuple[float, int]:
    """Greedy generation from each unique source (the first `samples`), split over the ranks;
    corpus BLEU against all of each source's references, and the tokens this rank generated.
    Collective."""
    from dsee_scale import dist

    refs = references(rows)
    sources = sorted(refs)[:samples]
    share, per_rank = _my_share(len(sources))
    mine = [sources[i] for i in share]
    outputs = [generate(model, tokenizer, s, max_new_tokens, synced_gpus) for s in mine]
    for _ in range(per_rank - len(mine) if synced_gpus else 0):  # keep the collective forwards in step across ranks
        generate(model, tokenizer, sources[0], max_new_tokens, synced_gpus)
    pairs = [p for part in dist.all_gather_object([(s, text) for s, (text, _) in zip(mine, outputs)]) for p in part]
    return grouped_bleu(pairs, refs), sum(n for _, n in outputs)


def references(rows) -> dict[str, list[str]]:
    """source -> its references, in row order: E2E lists each meaning representation once per
    human reference, and its metric scores a generation against all of them."""
    refs: dict[str, list[str]] = {}
    for source, target in zip(rows["source"], rows["target"]):
        refs.setdefault(source, []).append(target)
    return refs


def grouped_bleu(pairs: list[tuple[str, str]], refs: dict[str, list[str]]) -> float:
    """Corpus BLEU (sacrebleu) of (source, generation) pairs, each against all of its source's
    references (a source with fewer references repeats its last, as sacrebleu needs equal streams)."""
    import sacrebleu

    depth = max(len(refs[s]) for s, _ in pairs)
    streams = [[refs[s][min(i, len(refs[s]) - 1)] for s, _ in pairs] for i in range(depth)]
    return sacrebleu.corpus_bleu([h for _, h in pairs], streams).score


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
    device = next(model.parameters()).device
    ids = tokenizer(pair_prompt(source), add_special_tokens=False, return_tensors="pt")["input_ids"].to(device)
    out = model.generate(
        input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, synced_gpus=synced_gpus,
    )
    return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True).strip(), out.shape[1] - ids.shape[1]


def pair_prompt(source: str) -> str:
    """What an e2e row's target continues, as data.lm_example trains it: `source ||`."""
    from dsee_scale.data import PAIR_SEPARATOR

    return source + " " + PAIR_SEPARATOR


@torch.no_grad()
def greedy_continuations(model, tokenizer, prompts: list[str], max_new_tokens: int, stops: list[int], batch_size: int = 16) -> list[str]:
    """Greedy continuations of rendered prompt texts, in batches padded on the left (the same
    replies as one at a time); each stops at one of the `stops` token ids. One process, plain
    transformers."""
    from dsee_scale.data import with_pad_token

    tokenizer = with_pad_token(tokenizer)
    device = next(model.parameters()).device
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    replies = []
    try:
        for start in range(0, len(prompts), batch_size):
            batch = tokenizer(prompts[start : start + batch_size], add_special_tokens=False, padding=True, return_tensors="pt").to(device)
            out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id, eos_token_id=stops)
            replies += tokenizer.batch_decode(out[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)
    finally:
        tokenizer.padding_side = side
    return [r.strip() for r in replies]


def chat_replies(model, tokenizer, conversations: list[list[dict]], max_new_tokens: int, batch_size: int = 16) -> list[str]:
    """Greedy replies to conversations, rendered with the tokenizer's chat template and its
    generation prompt as training rendered them (chat.py); each reply stops at the end-of-turn
    token (or EOS)."""
    from dsee_scale.chat import end_of_turn

    stops = [t for t in (end_of_turn(tokenizer), tokenizer.eos_token_id) if t is not None]
    texts = [tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in conversations]
    return greedy_continuations(model, tokenizer, texts, max_new_tokens, stops, batch_size)


def pair_continuations(model, tokenizer, sources: list[str], max_new_tokens: int, batch_size: int = 16) -> list[str]:
    """Greedy targets of e2e sources (`source ||` continued up to EOS), batched."""
    return greedy_continuations(model, tokenizer, [pair_prompt(s) for s in sources], max_new_tokens, [tokenizer.eos_token_id], batch_size)


@torch.no_grad()
def evaluate_folder(model_dir: str, eval_file: str | None, task: str = "lm", batch_size: int = 8, latency_batch: int = 0, perplexity_file: str | None = None,
                    **data_options) -> dict:
    """Load an exported HF folder (model + tokenizer) with plain transformers and evaluate it on
    eval_file's rows; perplexity_file adds `text_perplexity` (data.text_windows of max_length
    tokens), latency_batch > 0 `structured_latency` on the first latency_batch evaluation rows."""
    from transformers import AutoTokenizer

    from dsee_scale.config import TrainConfig
    from dsee_scale.data import check_labels, collate, load_split, text_windows, tokenize, with_pad_token
    from dsee_scale.models import TASK_MODELS

    cfg = TrainConfig(task=task, eval_file=eval_file, train_file=eval_file, eval_perplexity=perplexity_file, **data_options)
    tokenizer = with_pad_token(AutoTokenizer.from_pretrained(model_dir))
    model = TASK_MODELS[task].from_pretrained(model_dir).eval()
    result = {}
    if eval_file:
        labels = getattr(model.config, "dsee_label_map", None)
        if task == "cls" and not labels:
            raise ValueError(f"{model_dir}: the config has no dsee_label_map (was it exported by dsee_scale?)")
        data = load_split(cfg, "eval")
        if task != "lm":
            check_labels(data[cfg.label_column], cfg, eval_file)
        rows = tokenize(data, tokenizer, cfg, labels)
        result = evaluate_rows(model, rows, tokenizer, task, batch_size, cfg.metric)
        if latency_batch:
            batch = collate(rows[:latency_batch], tokenizer)
            result["latency"] = structured_latency(model_dir, task, {k: batch[k] for k in ("input_ids", "attention_mask")})
    if perplexity_file:
        windows = text_windows(perplexity_file, tokenizer, cfg.max_length)
        ppl = evaluate_rows(model, windows, tokenizer, "lm", batch_size)["perplexity"]
        result["text_perplexity"] = {"file": perplexity_file, "window": cfg.max_length, "windows": len(windows), "perplexity": ppl}
    return result


def harness(model_dir: str, tasks: list[str], include_path: str | None = None, num_fewshot: int | None = None, limit: int | None = None,
            batch_size: int = 8) -> dict:
    """lm-evaluation-harness tasks (zero-shot unless num_fewshot) on an exported folder, through
    its Python API: simple_evaluate over an HFLM that loads the folder. `include_path`: a folder of
    task YAMLs (local data: offline); it is indexed alone first, and lm-eval's own few thousand
    tasks (~20 s to index; their data comes from the hub) only when a task is not there.
    Returns lm-eval's results, sample counts, shots and task versions."""
    from dsee_scale import extras

    extras.require("lm_eval")
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    if include_path and not Path(include_path).is_dir():
        raise FileNotFoundError(f"--include_path {include_path} is not a folder (of lm-eval task YAMLs)")
    manager = TaskManager(include_path=include_path, include_defaults=False) if include_path else None
    if manager is None or not set(tasks) <= set(manager.all_tasks):
        manager = TaskManager(include_path=include_path)
    unknown = [task for task in tasks if task not in manager.all_tasks and not Path(task).is_file()]
    if unknown:
        raise ValueError(f"--harness: lm-eval knows no task {', '.join(map(repr, unknown))}: name one of its tasks (`lm-eval ls tasks`) or of "
                         "--include_path's YAMLs, or give a task YAML's path")
    model = HFLM(pretrained=model_dir, device="cuda" if torch.cuda.is_available() else "cpu", batch_size=batch_size)
    out = lm_eval.simple_evaluate(model=model, tasks=tasks, num_fewshot=num_fewshot, limit=limit, task_manager=manager, log_samples=False)
    return {key: out[key] for key in ("results", "groups", "n-samples", "n-shot", "versions") if key in out}


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
    from dsee_scale.extras import MissingExtra, require
    from dsee_scale.models import resolve_model_path

    p = argparse.ArgumentParser(description="Evaluate an exported model folder without DeepSpeed: its run's metric on --eval_file, "
                                            "the perplexity of a text (--eval_perplexity), lm-evaluation-harness tasks (--harness).")
    p.add_argument("--model", required=True, help="an exported folder (a run's export/merged), or a package:/gguf: source as launch/train.py takes it (a dense baseline)")
    p.add_argument("--eval_file", help="rows of --task, read as training reads them")
    p.add_argument("--task", default="lm", choices=TASKS)
    p.add_argument("--text_column", default="text")
    p.add_argument("--text_pair_column", default=None)
    p.add_argument("--label_column", default="label")
    p.add_argument("--header", default="true", choices=["true", "false"], help="false: a TSV/CSV file without a header row (columns named 0, 1, ...)")
    p.add_argument("--metric", default=None, help="cls/reg metrics (as launch/train.py --metric); default: the task's")
    p.add_argument("--max_length", type=int, default=128, help="tokens per row; --eval_perplexity: tokens per window (SparseGPT and Wanda use the model's context, 4096 for LLaMA-2)")
    p.add_argument("--batch_size", type=int, default=8, help="rows (windows) per forward")
    p.add_argument("--latency", type=int, default=0, metavar="N", help="structured exports: FLOPs and CPU latency (dense vs exported vs compacted) on the first N evaluation rows")
    p.add_argument("--eval_perplexity", metavar="FILE", help="perplexity of a plain text file (e.g. WikiText-2's test split) in windows of --max_length tokens, as SparseGPT and Wanda measure it")
    p.add_argument("--harness", metavar="TASKS", help="lm-evaluation-harness tasks, comma-separated (the 'eval' extra: pip install -e '.[eval]')")
    p.add_argument("--include_path", metavar="DIR", help="--harness: a folder of task YAMLs (tasks on local files run offline)")
    p.add_argument("--num_fewshot", type=int, default=None, help="--harness: examples in each prompt (default: each task's own, mostly 0)")
    p.add_argument("--limit", type=int, default=None, help="--harness: only the first N examples of each task")
    args = p.parse_args()
    if not (args.eval_file or args.eval_perplexity or args.harness):
        p.error("nothing to evaluate: give --eval_file, --eval_perplexity and/or --harness")
    if args.latency and not args.eval_file:
        p.error("--latency times the first N rows of --eval_file: give --eval_file")
    try:
        if args.harness:
            require("lm_eval")  # before any model is loaded
        args.model = resolve_model_path(args.model)
        result = {}
        if args.eval_file or args.eval_perplexity:
            result = evaluate_folder(args.model, args.eval_file, args.task, batch_size=args.batch_size, latency_batch=args.latency, perplexity_file=args.eval_perplexity,
                                     text_column=args.text_column, text_pair_column=args.text_pair_column, label_column=args.label_column,
                                     header=args.header == "true", metric=args.metric, max_length=args.max_length)
        if args.harness:
            result["harness"] = harness(args.model, args.harness.split(","), args.include_path, args.num_fewshot, args.limit, args.batch_size)
    except (MissingExtra, ValueError, FileNotFoundError) as err:
        p.exit(2, f"dsee_scale.evaluate: error: {err}\n")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
