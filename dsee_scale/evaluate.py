"""Evaluation arithmetic shared by the training run and plain re-evaluation of an export.

`python -m dsee_scale.evaluate --model runs/x/export/merged --eval_file data.tsv --task cls`
re-computes the run's metric in a process without DeepSpeed.
"""
from __future__ import annotations

import argparse
import json
import math

import torch


def metric_sums(logits: torch.Tensor, labels: torch.Tensor, task: str, real: torch.Tensor) -> torch.Tensor:
    """(correct, count) for classification or (summed token loss, tokens) for LM; rows with
    real == False (padding rows) are not counted."""
    real = real.to(logits.device)
    if task == "cls":
        correct = (logits.argmax(-1) == labels) & real
        return torch.tensor([correct.sum().item(), real.sum().item()], dtype=torch.float64)
    shifted, targets = logits[:, :-1].float(), labels[:, 1:]
    losses = torch.nn.functional.cross_entropy(shifted.transpose(1, 2), targets, ignore_index=-100, reduction="none")
    counted = (targets != -100) & real[:, None]
    return torch.tensor([(losses * counted).sum().item(), counted.sum().item()], dtype=torch.float64)


def finish(sums: torch.Tensor, task: str) -> dict:
    if task == "cls":
        return {"accuracy": sums[0].item() / max(1.0, sums[1].item())}
    loss = sums[0].item() / max(1.0, sums[1].item())
    return {"eval_loss": loss, "perplexity": math.exp(min(loss, 50))}


@torch.no_grad()
def evaluate_folder(model_dir: str, eval_file: str, task: str, batch_size: int = 8, **data_options) -> dict:
    """Load an exported HF folder (model + tokenizer) with plain transformers and evaluate it."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    from dsee_scale.config import TrainConfig
    from dsee_scale.data import collate, load_split, tokenize

    cfg = TrainConfig(task=task, eval_file=eval_file, train_file=eval_file, **data_options)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    auto = AutoModelForSequenceClassification if task == "cls" else AutoModelForCausalLM
    model = auto.from_pretrained(model_dir).eval()
    labels = getattr(model.config, "dsee_label_map", None)
    if task == "cls" and not labels:
        raise ValueError(f"{model_dir}: the config has no dsee_label_map (was it exported by dsee_scale?)")
    rows = tokenize(load_split(cfg, "eval"), tokenizer, cfg, labels)
    sums = torch.zeros(2, dtype=torch.float64)
    for i in range(0, len(rows), batch_size):
        batch = collate(rows[i : i + batch_size], tokenizer.pad_token_id)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        sums += metric_sums(logits, batch["labels"], task, torch.ones(len(batch["input_ids"]), dtype=torch.bool))
    return finish(sums, task)


def main() -> None:
    p = argparse.ArgumentParser(description="Evaluate an exported model folder without DeepSpeed.")
    p.add_argument("--model", required=True)
    p.add_argument("--eval_file", required=True)
    p.add_argument("--task", default="lm", choices=["lm", "cls"])
    p.add_argument("--text_column", default="text")
    p.add_argument("--label_column", default="label")
    p.add_argument("--max_length", type=int, default=128)
    args = p.parse_args()
    print(json.dumps(evaluate_folder(args.model, args.eval_file, args.task, text_column=args.text_column, label_column=args.label_column, max_length=args.max_length)))


if __name__ == "__main__":
    main()
