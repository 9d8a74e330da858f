"""Inference cost: analytic FLOPs per token, read off the model's actual layer shapes, and
measured latency on a fixed batch.

A matmul with a (d_out × d_in) weight costs 2·d_out·d_in FLOPs per token; attention adds
2·2·keys·(heads·head_dim) per layer (QKᵀ and AV), keys = ctx for a context of `ctx` tokens, or the
layer's sliding window where it is shorter (Gemma's local layers, Mistral, Phi-3); an unmerged DSEE
adapter adds 2·r·(d_in + d_out) per slice and 2·nnz. The LM head is a matmul like any other (tied or not); embedding lookups, biases,
norms and softmax are ignored.
Because shapes are read from the modules, removed heads and neurons count automatically.
DeBERTa's relative-position terms (content↔position attention) are not counted.
"""
from __future__ import annotations

import statistics
import time

import torch
from torch import nn

from dsee_scale.layer import DSEELayer, base_dims, weight_is_transposed


def _attention_width(config) -> tuple[int, int]:
    """(layers, total query width heads·head_dim) from an HF config, after any head pruning."""
    layers = getattr(config, "num_hidden_layers", None) or getattr(config, "n_layer")
    heads = getattr(config, "num_attention_heads", None) or getattr(config, "n_head")
    hidden = getattr(config, "hidden_size", None) or getattr(config, "n_embd")
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    return layers, heads * head_dim


def _attention_sizes(model: nn.Module, ctx: int) -> list[tuple[int, int]] | None:
    """Per-layer (query width heads · head_dim after any removal, keys each query sees), for a family dsee_scale knows."""
    from dsee_scale.arch import ARCHS, attention_layers, model_type

    if model_type(model) not in ARCHS:
        return None
    return [(a.heads * a.head_dim, min(ctx, a.window or ctx)) for a in attention_layers(model)]


def inference_flops(model: nn.Module, ctx: int, sparse_zeros: int = 0) -> dict:
    """FLOPs per token at context length ctx: matmuls, attention, adapters, and the dense-
    equivalent saving of `sparse_zeros` zeroed weight entries (each saves 2 FLOPs)."""
    matmul = adapters = 0
    seen: set[int] = set()
    for module in model.modules():
        if isinstance(module, DSEELayer):
            if not module.merged:
                rows = sum(stop - start for start, stop in module.slices)
                adapters += 2 * module.rank * (len(module.slices) * module.in_features + rows) + 2 * module.sparse_index.numel()
            continue
        if (isinstance(module, nn.Linear) or weight_is_transposed(module)) and id(module.weight) not in seen:
            seen.add(id(module.weight))
            out_f, in_f = base_dims(module)
            matmul += 2 * out_f * in_f
    config = getattr(model, "config", None)
    sizes = _attention_sizes(model, ctx)
    if sizes is None and config is not None:
        layers, width = _attention_width(config)
        sizes = [(width, ctx)] * layers
    attention = sum(4 * keys * width for width, keys in (sizes or []))
    total = matmul + attention + adapters
    return {
        "total": total,
        "matmul": matmul,
        "dense_model": matmul + attention,  # the deployable (merged) model, adapters excluded
        "attention": attention,
        "adapters": adapters,
        "sparse_saved": 2 * sparse_zeros,
        "sparse_saved_fraction": 2 * sparse_zeros / total if total else 0.0,
    }


@torch.inference_mode()
def measure_latency(model: nn.Module, batch: dict[str, torch.Tensor], repeats: int = 20, warmup: int = 3) -> float:
    """Median wall time in milliseconds of one forward pass over `batch` (eval mode)."""
    model.eval()
    device = next(iter(batch.values())).device
    times = []
    for i in range(warmup + repeats):
        _synchronize(device)
        tic = time.perf_counter()
        model(**batch)
        _synchronize(device)  # GPU kernels run asynchronously: wait before reading the clock
        if i >= warmup:
            times.append(1000 * (time.perf_counter() - tic))
    return statistics.median(times)


def _synchronize(device: torch.device) -> None:
    if device.type != "cpu":
        torch.accelerator.synchronize(device)


def latency_report(dense: nn.Module, exported: nn.Module, compacted: nn.Module, batch: dict[str, torch.Tensor], repeats: int = 20) -> dict:
    """Measured latency of the dense model, of a structured export as `from_pretrained` loads it
    (one size per config, zero-padded) and of the same export after `structured.compact`."""
    times = {name: measure_latency(m, batch, repeats) for name, m in (("dense", dense), ("exported", exported), ("compact", compacted))}
    return {
        "batch_shape": list(batch["input_ids"].shape),
        "threads": torch.get_num_threads(),
        **{f"{name}_ms": round(ms, 2) for name, ms in times.items()},
        "exported_speedup": round(times["dense"] / times["exported"], 3),
        "compact_speedup": round(times["dense"] / times["compact"], 3),
    }
