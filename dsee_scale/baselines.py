"""The methods DSEE is measured against, built on the same Recipe and engine: full fine-tuning
and PEFT's LoRA (the adapter users would otherwise pick). Only the model's trainable part differs;
data, schedule, ZeRO-3, checkpoints, export and evaluation are the DSEE run's own."""
from __future__ import annotations

import logging

from torch import nn

from dsee_scale import zero
from dsee_scale.config import DSEEConfig
from dsee_scale.inject import DEFAULT_TRAINABLE_MODULES, count_parameters, find_targets, is_trainable_module
from dsee_scale.layer import base_dims, weight_is_transposed

log = logging.getLogger(__name__)


def train_everything(model: nn.Module) -> nn.Module:
    """Full fine-tuning: every weight trains (under ZeRO-3 each rank holds its shard of the
    weights, their gradients and optimizer state)."""
    for param in model.parameters():
        param.requires_grad_(True)
    return model


def apply_peft_lora(model: nn.Module, config: DSEEConfig) -> nn.Module:
    """PEFT LoRA (rank, alpha, dropout of `config`) on DSEE's target modules, in place; the task
    head trains as under DSEE. PEFT adapts whole modules: a fused target such as GPT-2's
    `c_attn:q,v` gets LoRA on all of c_attn (q, k and v)."""
    from peft import LoraConfig, inject_adapter_in_model

    found = find_targets(model, config)
    if any(slices != [(0, base_dims(module)[0])] for _, module, slices in found):
        log.info("PEFT LoRA adapts whole modules: the fused targets get LoRA on every part")
    lora = LoraConfig(r=config.rank, lora_alpha=config.alpha, lora_dropout=config.dropout, target_modules=[name for name, _, _ in found],
                      fan_in_fan_out=weight_is_transposed(found[0][1]))
    inject_adapter_in_model(lora, model)
    patterns = DEFAULT_TRAINABLE_MODULES if config.trainable_modules is None else config.trainable_modules
    for name, param in model.named_parameters():
        param.requires_grad_("lora_" in name or is_trainable_module(name.rpartition(".")[0], patterns))
    trainable, total = count_parameters(model)
    log.info("PEFT LoRA on %d layers: %d trainable of %d parameters (%.3f%%)", len(found), trainable, total, 100 * trainable / total)
    return model


def merge_peft_lora(model: nn.Module) -> None:
    """W ← W + (α/r)·B·A for every PEFT LoRA layer, which is then replaced by its base layer: a
    plain HF model. Under ZeRO-3 one layer's weights are gathered at a time."""
    from peft.tuners.lora import LoraLayer

    layers = [(name, module) for name, module in model.named_modules() if isinstance(module, LoraLayer)]
    for name, layer in layers:
        with zero.gathered(list(layer.parameters()), modify=True):
            layer.merge()
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, layer.get_base_layer())
