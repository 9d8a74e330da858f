"""apply_dsee: find target layers, choose Ω, swap in DSEELayer, mark only adapters trainable."""
from __future__ import annotations

import itertools
import logging
import re
from collections.abc import Callable

import torch
from torch import nn

from dsee_scale import zero
from dsee_scale.arch import ARCHS, model_type
from dsee_scale.config import DSEEConfig
from dsee_scale.layer import DSEELayer, base_dims, name_seed, split_support, weight_is_transposed
from dsee_scale.support import SupportJob, choose_supports

log = logging.getLogger(__name__)

DEFAULT_TRAINABLE_MODULES = ["classifier", "score"]


def _parse_target(spec: str) -> tuple[str, tuple[str, ...] | None]:
    name, _, parts = spec.partition(":")
    return name, (tuple(p.strip() for p in parts.split(",")) if parts else None)


def _slices_for(model: nn.Module, module_name: str, out_features: int, parts: tuple[str, ...] | None, fused: dict[str, Callable[[nn.Module], dict[str, int]]]) -> list[tuple[int, int]]:
    if parts is None:
        return [(0, out_features)]
    holder_name, _, suffix = module_name.rpartition(".")
    if suffix not in fused:
        raise ValueError(f"target '{suffix}:{','.join(parts)}': '{suffix}' is not a fused projection of this model ({', '.join(fused) or 'it has none'})")
    rows = fused[suffix](model.get_submodule(holder_name))  # the parts' rows, in order, from the module holding the projection
    unknown = [p for p in parts if p not in rows]
    if unknown:
        raise ValueError(f"target parts {unknown} of '{suffix}' unknown: choose from {', '.join(rows)}")
    starts = dict(zip(rows, itertools.accumulate(rows.values(), initial=0)))
    return [(starts[p], starts[p] + rows[p]) for p in sorted(parts, key=list(rows).index)]


def find_targets(model: nn.Module, config: DSEEConfig) -> list[tuple[str, nn.Module, list[tuple[int, int]]]]:
    """(name, base module, output slices) of every layer to adapt, in model order."""
    arch = ARCHS.get(model_type(model))
    targets = config.targets
    if targets is None and config.target_regex is None:
        if arch is None:
            raise ValueError(
                f"no default DSEE targets for model type {model_type(model)!r}: set DSEEConfig.targets "
                f"(module-name suffixes such as ['q_proj', 'v_proj']) or target_regex"
            )
        targets = list(arch.targets)
    fused = arch.fused if arch is not None else {}
    specs = [_parse_target(t) for t in targets] if targets is not None else []
    found = []
    for name, module in model.named_modules():
        if isinstance(module, DSEELayer) or not hasattr(module, "weight") or module.weight is None:
            continue
        if not (isinstance(module, nn.Linear) or weight_is_transposed(module)):
            continue
        if config.target_regex is not None:
            parts = None if re.fullmatch(config.target_regex, name) else False
        else:
            parts = next((p for suffix, p in specs if name == suffix or name.endswith("." + suffix)), False)
        if parts is not False:
            found.append((name, module, _slices_for(model, name, base_dims(module)[0], parts, fused)))
    if not found:
        wanted = config.target_regex or targets
        linear_names = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear) or weight_is_transposed(m)})
        raise ValueError(f"no module matched the DSEE targets {wanted!r}; linear layers in this model end with: {', '.join(linear_names)}")
    return found


def check_targets(model: nn.Module, config: DSEEConfig) -> list[tuple[str, nn.Module, list[tuple[int, int]]]]:
    """find_targets, then refuse ranks and nnz that do not fit a matrix (works on a meta model)."""
    found = find_targets(model, config)
    for name, module, slices in found:
        out_features, in_features = base_dims(module)
        for start, stop in slices:
            rows = stop - start
            if config.rank > min(rows, in_features):
                raise ValueError(f"DSEE rank {config.rank} is larger than a dimension of {name} ({rows}×{in_features}): use rank <= {min(rows, in_features)}")
            if config.nnz > rows * in_features:
                raise ValueError(f"DSEE nnz {config.nnz} is larger than the {rows}×{in_features} matrix {name}: use nnz <= {rows * in_features}")
    return found


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def _job_name(name: str, slice_index: int) -> str:
    return f"{name}#{slice_index}"


def apply_dsee(
    model: nn.Module,
    config: DSEEConfig,
    ds_config: dict | None = None,
    support: dict[str, torch.Tensor] | None = None,
) -> nn.Module:
    """Adapt `model` in place and return it. Works on a plain model and on a ZeRO-3-partitioned one.

    `support` reuses Ω from an earlier run (see `support_of`); otherwise Ω is chosen here, the work
    spread over ranks. Under ZeRO-3 pass the engine's `ds_config` (or keep an HfDeepSpeedConfig
    alive) so that adapter parameters are created partitioned, in the model's dtype.
    """
    found = check_targets(model, config)
    jobs = [
        SupportJob(_job_name(name, i), module.weight, weight_is_transposed(module), rows)
        for name, module, slices in found
        for i, rows in enumerate(slices)
    ]
    if support is None:
        support = choose_supports(jobs, config.nnz, config.support, config.seed)
    partitioned = zero.zero3_active(model)
    if partitioned and ds_config is None:
        from transformers.integrations.deepspeed import deepspeed_config

        ds_config = deepspeed_config()
    for name, module, slices in found:
        in_features = base_dims(module)[1]
        index = torch.cat([support[_job_name(name, i)] + start * in_features for i, (start, _) in enumerate(slices)])
        dtype = zero.full_dtype(module.weight)
        with zero.init_context(ds_config, dtype, enabled=partitioned):
            layer = DSEELayer(module, config.rank, config.alpha, index, slices, config.dropout, config.init, name_seed(config.seed, name), dtype)
        zero.check_created_like(f"the DSEE adapter of {name}", module.weight, layer.adapter_parameters(), [layer.sparse_index])
        _set_submodule(model, name, layer)
    mark_only_dsee_as_trainable(model, config.trainable_modules)
    trainable, total = count_parameters(model)
    log.info("DSEE on %d layers: %d trainable of %d parameters (%.3f%%)", len(found), trainable, total, 100 * trainable / total)
    return model


def is_trainable_module(name: str, patterns: list[str]) -> bool:
    return any(name == p or name.endswith("." + p) or name.startswith(p + ".") or f".{p}." in name for p in patterns)


def mark_only_dsee_as_trainable(model: nn.Module, trainable_modules: list[str] | None = None) -> None:
    """Freeze everything but A, B, S values and the task head (modules named in trainable_modules).
    An empty S (--dsee.nnz 0, DSEE's LoRA) stays frozen: there is nothing in it to train, and
    ZeRO keeps no optimizer state for an empty tensor."""
    patterns = DEFAULT_TRAINABLE_MODULES if trainable_modules is None else trainable_modules
    adapters = {id(p) for p in adapter_parameters(model) if zero.full_numel(p) > 0}
    for name, param in model.named_parameters():
        module_name = name.rsplit(".", 1)[0] if "." in name else ""
        param.requires_grad = id(param) in adapters or is_trainable_module(module_name, patterns)


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) element counts, exact also when ZeRO-3 has partitioned the weights."""
    trainable = total = 0
    for param in model.parameters():
        n = zero.full_numel(param)
        total += n
        trainable += n if param.requires_grad else 0
    return trainable, total


def dsee_layers(model: nn.Module) -> dict[str, DSEELayer]:
    return {name: m for name, m in model.named_modules() if isinstance(m, DSEELayer)}


def adapter_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Every adapter's A, B and S values, in model order."""
    return [p for layer in dsee_layers(model).values() for p in layer.adapter_parameters()]


def support_of(model: nn.Module) -> dict[str, torch.Tensor]:
    """Ω of every adapted matrix, keyed as apply_dsee's `support` argument expects."""
    result = {}
    for name, layer in dsee_layers(model).items():
        for i, part in enumerate(layer.support_per_slice()):
            result[_job_name(name, i)] = part
    return result


def support_from_layers(model: nn.Module, config: DSEEConfig, by_layer: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Saved per-layer Ω (the sparse_index buffers) → apply_dsee's `support` for a fresh model."""
    result = {}
    for name, module, slices in find_targets(model, config):
        if name not in by_layer:
            raise ValueError(f"no saved Ω for layer {name}: the adapter was saved for another model or targets")
        for i, part in enumerate(split_support(by_layer[name], slices, base_dims(module)[1])):
            result[_job_name(name, i)] = part
    return result


def dsee_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """A, B, S values, S indices and the trainable task head: all a fresh base model needs."""
    wanted = {n: p for n, p in model.named_parameters() if p.requires_grad}
    out = {}
    with zero.gathered(list(wanted.values())):
        for name, param in wanted.items():
            out[name] = param.data.detach().to("cpu", copy=True)
    for name, buf in model.named_buffers():
        if name.endswith("sparse_index"):
            out[name] = buf.detach().to("cpu", copy=True)
    return out


def load_dsee_state_dict(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy adapter tensors into an adapted model; shapes and names must match exactly."""
    params = dict(model.named_parameters())
    buffers = dict(model.named_buffers())
    missing = sorted(n for n, p in params.items() if p.requires_grad and n not in state)
    unknown = sorted(n for n in state if n not in params and n not in buffers)
    if missing or unknown:
        raise ValueError(
            f"adapter state does not fit this model: missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {unknown[:5]}{'...' if len(unknown) > 5 else ''} (was it saved from another model or DSEE config?)"
        )
    for name, tensor in state.items():
        target = params.get(name, buffers.get(name))
        shape = tuple(zero.full_shape(target))
        if tuple(tensor.shape) != shape:
            raise ValueError(f"adapter tensor {name} has shape {tuple(tensor.shape)}, the model expects {shape}")
    for name, tensor in state.items():  # one tensor gathered at a time (all of them: a fully fine-tuned model)
        target = params.get(name, buffers.get(name))
        with torch.no_grad(), zero.gathered([target] if name in params else [], modify=True):
            target.data.copy_(tensor.to(target.dtype))
