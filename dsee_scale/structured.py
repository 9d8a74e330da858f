"""Structured DSEE: score attention heads and FFN neurons, remove the weakest physically.

Removal keeps everything consistent: base weights and biases, the adapters' B rows / A columns,
the sparse residual (entries in removed rows or columns dropped, the rest re-indexed), and the
attention modules' head counts. Under ZeRO-3 each layer is gathered, rebuilt and partitioned
again (zero.Init on that layer); the caller then builds a fresh engine for re-tuning.

Scores (per head / per neuron, higher = keep):
- `dsee`: Σ|ΔW| over the head's query and value rows (the released code), or the neuron's
  up-projection rows and down-projection column; |W| where a matrix has no adapter;
- `weight`: Σ|W| over the same rows and columns (q, k, v rows and o columns for heads);
- `gradient`: Σ |∂L/∂g| of a gate g = 1 on each head's / neuron's output, summed over calibration
  batches (Michel et al. 2019, per batch rather than per example).

Grouped KV heads (LLaMA-style with num_key_value_heads < num_attention_heads) are removed as
whole KV groups (the group's query heads together with its k/v head), scored by the sum of the
group's query-head scores. Removing single query heads would leave groups of unequal size,
which HF's attention (repeat_kv with one group size) cannot run.
"""
from __future__ import annotations

import copy
import logging
import torch
from torch import nn

from dsee_scale import dist, zero
from dsee_scale.arch import FFN, Arch, Attention, arch_of, attention_layers, ffn_layers, frozen_layer
from dsee_scale.layer import DSEELayer, base_dims, keep_base_cols, keep_base_rows, weight_is_transposed

log = logging.getLogger(__name__)


def _params(module: nn.Module) -> list[torch.Tensor]:
    return [p for p in module.parameters()]


def _unique(modules: list[nn.Module]) -> list[nn.Module]:
    """Each module once (a fused projection holds several parts), in order."""
    return list({id(m): m for m in modules}.values())


# ---- scores ----------------------------------------------------------------------------------

def _dense(module: nn.Module, delta: bool) -> torch.Tensor:
    """(out × in) |W| or |ΔW| (|W| without an adapter) of a gathered linear-like module."""
    if delta and isinstance(module, DSEELayer):
        return module.delta_weight().abs()
    w = frozen_layer(module).weight.detach()
    return (w.t() if weight_is_transposed(frozen_layer(module)) else w).abs().float()


@torch.no_grad()
def _static_scores(model: nn.Module, method: str) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    delta = method == "dsee"
    heads, neurons = [], []
    for attn in attention_layers(model):
        with zero.gathered([p for m in _unique([attn.q[0], attn.k[0], attn.v[0], attn.o]) for p in _params(m)]):
            width = attn.heads * attn.head_dim
            parts = [attn.q, attn.v] if delta else [attn.q, attn.k, attn.v]
            score = torch.zeros(attn.heads, device=frozen_layer(attn.o).weight.device)
            for module, first in parts:
                rows = _dense(module, delta)
                kv_width = attn.kv_heads * attn.head_dim
                span = width if module is attn.q[0] and first == attn.q[1] else kv_width
                per = rows[first : first + span].sum(1).view(-1, attn.head_dim).sum(1)
                score += per if per.numel() == attn.heads else per.repeat_interleave(attn.heads // attn.kv_heads)
            if not delta:
                score += _dense(attn.o, False)[:, :width].sum(0).view(attn.heads, attn.head_dim).sum(1)
        heads.append(score)
    for ffn in ffn_layers(model):
        with zero.gathered([p for m in _unique([up for up, _ in ffn.ups] + [ffn.down]) for p in _params(m)]):
            score = sum(_dense(m, delta)[first : first + ffn.size].sum(1) for m, first in ffn.ups) + _dense(ffn.down, delta).sum(0)
        neurons.append(score)
    return heads, neurons


def _gradient_scores(model: nn.Module, batches: list[dict]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Σ_batches |∂L/∂g| of gates on each head's output (input of o) and each neuron (input of
    down). The absolute value is taken per batch so opposite-signed batches do not cancel."""
    attns, ffns = attention_layers(model), ffn_layers(model)
    device = frozen_layer(attns[0].o).weight.device  # the compute device (under ZeRO-3 too)
    head_gates = [torch.ones(a.heads, device=device, requires_grad=True) for a in attns]
    neuron_gates = [torch.ones(f.size, device=device, requires_grad=True) for f in ffns]
    hooks = []
    for attn, gate in zip(attns, head_gates):
        hooks.append(attn.o.register_forward_pre_hook(lambda m, args, g=gate, d=attn.head_dim: (_gated(args[0], g, d),) + args[1:]))
    for ffn, gate in zip(ffns, neuron_gates):
        hooks.append(ffn.down.register_forward_pre_hook(lambda m, args, g=gate: (_gated(args[0], g, 1),) + args[1:]))
    totals = [torch.zeros_like(g) for g in head_gates + neuron_gates]
    try:
        for batch in batches:
            loss = model(**batch).loss
            grads = torch.autograd.grad(loss, head_gates + neuron_gates)
            for total, grad in zip(totals, grads):
                total += grad.detach().abs()
    finally:
        for hook in hooks:
            hook.remove()
    totals = [dist.all_reduce(t) for t in totals]
    return totals[: len(attns)], totals[len(attns) :]


def _gated(x: torch.Tensor, gate: torch.Tensor, width: int) -> torch.Tensor:
    g = gate.to(x.dtype).repeat_interleave(width)
    return x * g


def importance(model: nn.Module, method: str, calibration: list[dict] | None = None) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per-layer head scores and neuron scores (higher = more important)."""
    if method == "gradient":
        if not calibration:
            raise ValueError("structured_score 'gradient' needs calibration batches")
        return _gradient_scores(model, calibration)
    if method not in ("dsee", "weight"):
        raise ValueError(f"unknown structured score {method!r}: choose dsee, weight or gradient")
    return _static_scores(model, method)


# ---- selection -------------------------------------------------------------------------------

def select(scores: list[torch.Tensor], fraction: float, scope: str, group: list[int] | None = None) -> list[torch.Tensor]:
    """Indices to keep per layer. 'layer': the same count removed in every layer; 'global': one
    budget over all layers on per-layer-normalised scores. Each layer keeps at least one unit;
    `group[i]` units of layer i move together (KV groups)."""
    group = group or [1] * len(scores)
    units = [s.view(-1, g).sum(1) for s, g in zip(scores, group)]
    if scope == "layer":
        drop = [min(int(round(fraction * u.numel())), u.numel() - 1) for u in units]
    else:
        normalised = [u / u.sum().clamp_min(1e-30) for u in units]
        flat = torch.cat(normalised)
        total = int(round(fraction * flat.numel()))
        order = torch.argsort(flat, stable=True)
        owner = torch.cat([torch.full((u.numel(),), i, device=u.device) for i, u in enumerate(units)])[order].tolist()
        drop = [0] * len(units)
        for layer in owner:
            if total == 0:
                break
            if drop[layer] < units[layer].numel() - 1:
                drop[layer] += 1
                total -= 1
    keep = []
    for u, d, g in zip(units, drop, group):
        kept_units = torch.sort(torch.argsort(u, descending=True, stable=True)[: u.numel() - d]).values
        keep.append((kept_units[:, None] * g + torch.arange(g, device=u.device)).flatten())
    return keep


# ---- physical removal ------------------------------------------------------------------------

def _rows(module: nn.Module, parts: list[tuple[int, int, torch.Tensor]]) -> None:
    """Keep, of each part (first row, rows, kept), the rows first + kept; rows outside every
    part untouched. A fused projection (GPT-2's c_attn, Phi-3's qkv_proj) has several parts."""
    base = frozen_layer(module)
    device = base.weight.device
    pieces, cursor = [], 0
    for first, span, keep in sorted(parts, key=lambda part: part[0]):
        pieces += [torch.arange(cursor, first, device=device), first + keep.to(device)]
        cursor = first + span
    kept = torch.cat([*pieces, torch.arange(cursor, base_dims(base)[0], device=device)])
    if isinstance(module, DSEELayer):
        module.keep_rows(kept)
    else:
        keep_base_rows(module, kept)


def _rows_by_module(parts: list[tuple[tuple[nn.Module, int], int, torch.Tensor]]) -> None:
    """_rows for ((module, first row), rows, kept) parts, those of one module cut together."""
    by_module: dict[int, tuple[nn.Module, list]] = {}
    for (module, first), span, keep in parts:
        by_module.setdefault(id(module), (module, []))[1].append((first, span, keep))
    for module, module_parts in by_module.values():
        _rows(module, module_parts)


def _cols(module: nn.Module, keep: torch.Tensor) -> None:
    """Keep input columns `keep` of a layer (and of its adapter, if any)."""
    keep = keep.to(frozen_layer(module).weight.device)
    if isinstance(module, DSEELayer):
        module.keep_cols(keep)
    else:
        keep_base_cols(module, keep)


def _head_rows(keep_heads: torch.Tensor, head_dim: int) -> torch.Tensor:
    return (keep_heads[:, None] * head_dim + torch.arange(head_dim, device=keep_heads.device)).flatten()


def _remove_heads(arch: Arch, attn: Attention, keep_q: torch.Tensor, keep_kv: torch.Tensor) -> None:
    d = attn.head_dim
    width, kv_width = attn.heads * d, attn.kv_heads * d
    q_rows, kv_rows = _head_rows(keep_q, d), _head_rows(keep_kv, d)
    _rows_by_module([(attn.q, width, q_rows), (attn.k, kv_width, kv_rows), (attn.v, kv_width, kv_rows)])
    for module in attn.more:
        _rows(module, [(0, width, q_rows)])
    _cols(attn.o, q_rows)
    arch.set_heads(attn.module, keep_q.numel(), keep_kv.numel(), d)


def _remove_neurons(ffn: FFN, keep: torch.Tensor) -> None:
    _rows_by_module([(up, ffn.size, keep) for up in ffn.ups])
    _cols(ffn.down, keep)


@torch.no_grad()
def remove(model: nn.Module, keep_heads: list[torch.Tensor] | None, keep_neurons: list[torch.Tensor] | None, ds_config: dict | None = None) -> None:
    """Physically remove heads/neurons not listed, layer by layer (gathered under ZeRO-3, then
    partitioned again). keep_heads lists query heads; KV heads follow their groups."""
    partitioned, arch = zero.zero3_active(model), arch_of(model)
    for i, (attn, ffn) in enumerate(zip(attention_layers(model), ffn_layers(model))):
        unique = _unique([attn.q[0], attn.k[0], attn.v[0], attn.o, *attn.more, *(up for up, _ in ffn.ups), ffn.down])
        with zero.gathered([p for m in unique for p in _params(m)]):  # new, smaller plain parameters are built here
            if keep_heads is not None and keep_heads[i].numel() < attn.heads:
                group = attn.heads // attn.kv_heads
                _remove_heads(arch, attn, keep_heads[i], torch.unique(keep_heads[i] // group))
            if keep_neurons is not None and keep_neurons[i].numel() < ffn.size:
                _remove_neurons(ffn, keep_neurons[i])
        if partitioned:
            for m in unique:
                zero.partition_new_parameters(m, ds_config)
    _update_config(model)


def _update_config(model: nn.Module) -> None:
    """Record the per-layer sizes in the config (export.export_layout turns them into HF fields)."""
    attns, ffns = attention_layers(model), ffn_layers(model)
    heads, kv, sizes = [a.heads for a in attns], [a.kv_heads for a in attns], [f.size for f in ffns]
    model.config.dsee_structured = {"heads": heads, "kv_heads": kv, "ffn": sizes}


def structured_prune(model: nn.Module, cfg, calibration: list[dict] | None = None, ds_config: dict | None = None, ctx: int = 128, engine=None) -> tuple[dict, dict]:
    """Score, select and remove heads (cfg.heads) and FFN neurons (cfg.ffn); returns a report
    with the inference FLOPs per token (context ctx) of the merged model before and after, and
    the plan (kept query heads and FFN neurons per layer, for `remove` on a rebuilt model).

    Under ZeRO-3 pass the DeepSpeed `engine` that wraps the model: the gradient score's backward
    reaches only the gates, so ZeRO-3 would leave the layers below gathered (it releases them
    at the next optimizer step); they are released before removal re-partitions anything.
    """
    from dsee_scale.flops import inference_flops

    before = inference_flops(model, ctx=ctx)["dense_model"]
    head_scores, neuron_scores = importance(model, cfg.structured_score, calibration)
    if engine is not None and zero.zero3_active(model):
        engine.empty_partition_cache()
    attns = attention_layers(model)
    groups = [a.heads // a.kv_heads for a in attns]
    keep_heads = select(head_scores, cfg.heads, cfg.structured_scope, groups) if cfg.heads else None
    keep_neurons = select(neuron_scores, cfg.ffn, cfg.structured_scope) if cfg.ffn else None
    remove(model, keep_heads, keep_neurons, ds_config)
    after = inference_flops(model, ctx=ctx)["dense_model"]
    report = {"heads": model.config.dsee_structured["heads"], "ffn": model.config.dsee_structured["ffn"], "flops_before": before, "flops_after": after, "flops_saved": 1 - after / before}
    log.info("structured pruning: heads per layer %s, FFN sizes %s, %.1f%% FLOPs saved", report["heads"], report["ffn"], 100 * report["flops_saved"])
    plan = {"heads": [k.tolist() for k in keep_heads] if keep_heads else None, "ffn": [k.tolist() for k in keep_neurons] if keep_neurons else None}
    return report, plan


def dense_config(config):
    """The unpruned architecture's config, from a structured export's config (for baselines)."""
    config = copy.deepcopy(config)
    for key, value in config.dsee_dense_fields.items():
        setattr(config, key, value)
    for key in ("dsee_dense_fields", "dsee_structured"):
        delattr(config, key)
    return config


def compact(model: nn.Module) -> nn.Module:
    """Drop the zero heads / neurons an export padded in, so every layer is back at its kept size.

    A structured export loads with plain `from_pretrained` at one size per config; the real
    speed-up needs per-layer sizes. The layout is the config's `dsee_structured` record, and
    the kept units come first in every block (see export.pad_for_export). Exact: only zeros go.
    """
    layout = getattr(model.config, "dsee_structured", None)
    if not layout:
        raise ValueError("this model has no 'dsee_structured' record in its config: compact() is for folders exported after structured pruning")
    device = next(model.parameters()).device
    remove(model, [torch.arange(h, device=device) for h in layout["heads"]], [torch.arange(n, device=device) for n in layout["ffn"]])
    return model


def plan_tensors(plan: dict, device: torch.device) -> tuple[list[torch.Tensor] | None, list[torch.Tensor] | None]:
    """A saved structured plan (lists of kept indices per layer) as `remove` takes it."""
    def tensors(key: str) -> list[torch.Tensor] | None:
        return None if plan[key] is None else [torch.tensor(kept, dtype=torch.long, device=device) for kept in plan[key]]
    return tensors("heads"), tensors("ffn")
