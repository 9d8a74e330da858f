"""ZeRO-3 hooks per transformer block (zero.hook_per_block), 2 CPU ranks: for GPT-2, BERT and
LLaMA, with frozen weights shared, with activation checkpointing and with gradient accumulation,
DSEE steps give the losses and trained weights of ZeRO-3's per-layer hooks, and only blocks (not
their layers) are registered with ZeRO-3; with frozen weights fetched by ZeRO-3, or none frozen
(full fine-tuning), hooks stay per layer."""
import json
import sys
from pathlib import Path

import torch

from common import start, train_steps

from dsee_scale import DSEEConfig, apply_dsee, arch, zero
from dsee_scale.engine import create_engine
from dsee_scale.models import build_model, tiny_config

rank, world, out, config = start(sys.argv[-1])
ACCUMULATING = {**config, "train_micro_batch_size_per_gpu": config["train_micro_batch_size_per_gpu"] // 2, "gradient_accumulation_steps": 2}
CASES = {  # name: (family, task, method, share frozen weights, activation checkpointing, gradient accumulation)
    "gpt2": ("gpt2", "lm", "dsee", True, False, False),
    "gpt2_fetched": ("gpt2", "lm", "dsee", False, False, False),
    "gpt2_full": ("gpt2", "lm", "full", True, False, False),
    "gpt2_checkpointed": ("gpt2", "lm", "dsee", True, True, False),
    "gpt2_accumulating": ("gpt2", "lm", "dsee", True, False, True),
    "bert_cls": ("bert", "cls", "dsee", True, False, False),
    "llama": ("llama", "lm", "dsee", True, False, False),
}


def run(family: str, task: str, method: str, share: bool, checkpointed: bool, accumulating: bool, per_block: bool) -> dict:
    torch.manual_seed(0)
    ds_config = ACCUMULATING if accumulating else config
    model = build_model(tiny_config(family), task, ds_config=ds_config, **({"num_labels": 2} if task == "cls" else {}))
    if checkpointed:  # as the trainer does
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    if method == "dsee":
        apply_dsee(model, DSEEConfig(rank=4, nnz=8, support="magnitude"), ds_config=ds_config)
    engine = create_engine(model, ds_config, lr=1e-2, share_frozen=share, hook_per_block=per_block)
    losses = train_steps(engine, 4 if accumulating else 3, task, rank, world)  # accumulating: 2 optimizer steps of 2 micro-batches
    trained = [p for p in model.parameters() if p.requires_grad]
    with zero.gathered(trained):
        trained = [p.detach().clone() for p in trained]
    blocks = arch.blocks(model)
    hooked = {"blocks": sum(hasattr(b, "ds_id") for b in blocks), "in_blocks": sum(hasattr(m, "ds_id") for b in blocks for m in b.modules() if m is not b)}  # ZeRO-3 registered
    engine.destroy()
    return {"losses": losses, "trained": trained, "hooked": hooked, "blocks": len(blocks)}


result = {}
for name, case in CASES.items():
    per_layer, per_block = run(*case, per_block=False), run(*case, per_block=True)
    result[name] = {
        "loss_diff": max(abs(a - b) / abs(b) for a, b in zip(per_block["losses"], per_layer["losses"], strict=True)),
        # equal to float rounding (Adam steps of 1e-2): BERT and LLaMA differ in the last bits of some updates
        "trained_diff": max(float((a - b).abs().max()) for a, b in zip(per_block["trained"], per_layer["trained"], strict=True)),
        "blocks": per_block["blocks"], "hooked_per_layer": per_layer["hooked"], "hooked_per_block": per_block["hooked"],
    }
if rank == 0:
    Path(out, "result.json").write_text(json.dumps(result))
