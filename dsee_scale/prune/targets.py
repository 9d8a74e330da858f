"""Which weights pruning touches, named as in the plain model.

A target is one frozen 2-D weight whose plain name ('x.weight', never the adapter's
'x.base.weight') matches the include patterns and no exclude pattern, with the adapter on it (for
the scores that see ΔW), the module it belongs to (whose input is the weight's x) and the
transformer block holding it (`arch.blocks`; for OWL's per-block sparsities). Every rank
finds the same targets in the same (model) order, which the collective steps downstream rely on.
DEFAULT_INCLUDE / DEFAULT_EXCLUDE are the patterns used when none are given (and PruneConfig's).
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn

from dsee_scale import zero
from dsee_scale.arch import blocks
from dsee_scale.layer import DSEELayer

DEFAULT_INCLUDE = (r".*\.(layers?|h|block)\.\d+\..*weight$",)  # the 2-D weights of the transformer blocks
DEFAULT_EXCLUDE = (r".*(norm|ln_|embed|wte|wpe|LayerNorm).*",)


@dataclass
class PruneTarget:
    name: str
    param: nn.Parameter
    layer: DSEELayer | None  # the adapter on this weight, for 'merged' / 'delta' scores
    module: nn.Module  # the weight's own module (Linear, Conv1D): its input is x
    input_norm: torch.Tensor | None = None  # ‖x_j‖ per input feature, for the 'activation' score
    block: int | None = None  # index of its transformer block in arch.blocks(model); None outside them or in a family arch.py does not know


def plain_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """Parameters by the names of the plain model, in model order: an adapted layer's
    'x.base.weight' is 'x.weight', the name masks and saved weights use."""
    return {n.replace(".base.", "."): p for n, p in model.named_parameters()}


def prune_targets(model: nn.Module, include: list[str], exclude: list[str], frozen_only: bool = True) -> list[PruneTarget]:
    """Weights to prune, in model order (the same on every rank): frozen ones only, unless a
    report of a fully fine-tuned model asks. Names are those of the plain model: an adapted
    layer's weight 'x.base.weight' is reported as 'x.weight'."""
    layers = {id(m.base.weight): m for m in model.modules() if isinstance(m, DSEELayer)}
    owners = {id(p): module for module in model.modules() for p in module.parameters(recurse=False)}
    block_of = {id(module): i for i, block in enumerate(blocks(model)) for module in block.modules()}
    found = []
    for plain, param in plain_parameters(model).items():
        if len(zero.full_shape(param)) != 2 or (param.requires_grad and frozen_only):
            continue
        if any(re.fullmatch(p, plain) for p in include) and not any(re.fullmatch(p, plain) for p in exclude):
            owner = owners[id(param)]
            found.append(PruneTarget(plain, param, layers.get(id(param)), owner, block=block_of.get(id(owner))))
    if not found:
        raise ValueError(f"no weight matched the prune patterns include={include} exclude={exclude}")
    return found


def default_targets(model: nn.Module, include: list[str] | None, exclude: list[str] | None, frozen_only: bool = True) -> list[PruneTarget]:
    """prune_targets with the default patterns where none (or an empty list) is given."""
    return prune_targets(model, include or list(DEFAULT_INCLUDE), exclude or list(DEFAULT_EXCLUDE), frozen_only)


def targets_device(targets: list[PruneTarget]) -> torch.device:
    """Where the shards (and so their scores) live."""
    return zero.shard_device(targets[0].param)


def shard_numels(targets: list[PruneTarget]) -> list[int]:
    """Elements of each target's local shard (padding excluded), without reading the shard."""
    return [stop - start for start, stop in (zero.shard_range(t.param) for t in targets)]
