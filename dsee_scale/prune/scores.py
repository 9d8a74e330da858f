"""Pruning scores: how much each weight matters (lower is pruned first), one shard chunk at a time.

Scores are registered by name (`register_score`): |W| ('weight', the paper's, data-free),
|W + ΔW| ('merged'), |ΔW| ('delta', the released DSEE code) and |W + ΔW|·‖x_j‖ ('activation':
Wanda's, each weight scaled by the norm of its input feature over calibration tokens; the
trainer's default). The norms, and the XᵀX that the re-fit needs, come from one pass of
calibration batches through the engine with a hook on each target (`input_norms`,
`input_grams`). `score_chunks` yields a rank's scores a chunk at a time, computing ΔW only for
the rows a chunk touches, so no rank ever holds a whole matrix of scores; `whole_scores` scores
one gathered matrix, for the groups (N:M, rows) that straddle shard boundaries.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import NamedTuple

import torch
from torch import nn

from dsee_scale import dist, zero
from dsee_scale.prune.targets import PruneTarget
from dsee_scale.semistructured import input_dim

CHUNK = 1 << 22

ScoreFn = Callable[[torch.Tensor, "torch.Tensor | None", "torch.Tensor | None"], torch.Tensor]
Calibration = tuple[Iterable[dict], Callable[[dict], object]]  # (batches, forward), see input_norms


class Score(NamedTuple):
    fn: ScoreFn
    uses_delta: bool  # ΔW is computed (for the rows a chunk touches) and passed
    uses_inputs: bool  # ‖x_j‖ of each weight's input feature is passed (targets need input_norm)


PRUNE_SCORES: dict[str, Score] = {}


def register_score(name: str, uses_delta: bool = False, uses_inputs: bool = False) -> Callable[[ScoreFn], ScoreFn]:
    """Add a pruning score: fn(W, ΔW or None, ‖x‖ or None) → scores >= 0 of W's shape, float32
    (lower is pruned first). ΔW is None for weights without an adapter or unless uses_delta; ‖x‖
    (the input feature's norm at each weight, W's shape) is None unless uses_inputs."""
    def add(fn: ScoreFn) -> ScoreFn:
        PRUNE_SCORES[name] = Score(fn, uses_delta, uses_inputs)
        return fn
    return add


@register_score("weight")
def _weight_score(w: torch.Tensor, delta: torch.Tensor | None, x_norm: torch.Tensor | None) -> torch.Tensor:
    return w.abs()


@register_score("merged", uses_delta=True)
def _merged_score(w: torch.Tensor, delta: torch.Tensor | None, x_norm: torch.Tensor | None) -> torch.Tensor:
    return (w if delta is None else w + delta).abs()


@register_score("delta", uses_delta=True)
def _delta_score(w: torch.Tensor, delta: torch.Tensor | None, x_norm: torch.Tensor | None) -> torch.Tensor:
    """The released DSEE code's |ΔW|; |W| where a weight has no adapter."""
    return (w if delta is None else delta).abs()


@register_score("activation", uses_delta=True, uses_inputs=True)
def _activation_score(w: torch.Tensor, delta: torch.Tensor | None, x_norm: torch.Tensor | None) -> torch.Tensor:
    """Wanda's |W|·‖x_j‖ (Sun et al., 2024) on the weight the model will have, W + ΔW."""
    return _merged_score(w, delta, None) * x_norm


@torch.no_grad()
def input_norms(targets: list[PruneTarget], batches: Iterable[dict], forward: Callable[[dict], object]) -> None:
    """Set each target's input_norm: ‖x_j‖₂ of its input features over the calibration inputs
    (`_input_sums`; float64 sums of squares). Collective."""
    sizes = [zero.full_shape(t.param)[input_dim(t.module)] for t in targets]
    sums = _input_sums(targets, batches, forward, lambda x: x.double().pow(2).sum(0), sizes, torch.float64)
    for t, s in zip(targets, sums):
        t.input_norm = s.sqrt().float()


@torch.no_grad()
def input_grams(targets: list[PruneTarget], batches: Iterable[dict], forward: Callable[[dict], object]) -> list[torch.Tensor]:
    """XᵀX (in × in, float32) of each target's calibration inputs (`_input_sums`): the Hessian
    of its output error that `obs_reconstruct` minimises. Collective."""
    sizes = [zero.full_shape(t.param)[input_dim(t.module)] for t in targets]
    sums = _input_sums(targets, batches, forward, lambda x: (x.float().T @ x.float()).reshape(-1), [n * n for n in sizes], torch.float32)
    return [s.view(n, n) for s, n in zip(sums, sizes)]


def _input_sums(targets: list[PruneTarget], batches: Iterable[dict], forward: Callable[[dict], object],
                stat: Callable[[torch.Tensor], torch.Tensor], widths: list[int], dtype: torch.dtype) -> list[torch.Tensor]:
    """Σ stat(x) of each target's input rows x (rows × in) over every real token (attention
    mask) of the calibration batches of all ranks, and over every row of inputs that are not per
    token (DeBERTa's relative-position embeddings pass through its position and, with
    share_att_key, query/key projections). One forward per batch through `forward` (the engine,
    so ZeRO-3 fetches weights as in training); the sums and each weight's count of inputs seen
    share one buffer, all-reduced once, so every rank reaches the same verdict on a weight no
    input reached."""
    device = zero.shard_device(targets[0].param)
    flat = torch.zeros(sum(widths) + len(targets), dtype=dtype, device=device)
    *sums, seen = flat.split([*widths, len(targets)])
    real = {"tokens": None}  # the current batch's attention mask

    def hook(i: int):
        def accumulate(module: nn.Module, args: tuple) -> None:
            x = args[0].detach()
            mask = real["tokens"]
            if mask is not None and x.shape[:-1] == mask.shape:  # per token: padding left out
                x = x[mask.to(x.device)]
            sums[i] += stat(x.reshape(-1, x.shape[-1])).to(device=device, dtype=dtype)
            seen[i] += 1
        return accumulate

    handles = [t.module.register_forward_pre_hook(hook(i)) for i, t in enumerate(targets)]
    try:
        for batch in batches:
            mask = batch.get("attention_mask")
            real["tokens"] = None if mask is None else mask.bool()
            forward(batch)
    finally:
        for handle in handles:
            handle.remove()
    *sums, seen = dist.all_reduce(flat).split([*widths, len(targets)])
    missing = [t.name for t, n in zip(targets, seen) if n == 0]
    if missing:
        raise ValueError(f"no calibration input reached {missing[:3]}: the 'activation' score and reconstruction need every pruned weight used in forward")
    return sums


def score_chunks(target: PruneTarget, score: str, chunk: int = CHUNK) -> Iterator[tuple[int, torch.Tensor]]:
    """(offset in the local shard, float32 scores) over this rank's shard, a chunk at a time.

    ΔW is computed only for the rows that the chunk touches, never as a full matrix; a shard on
    NVMe is in memory while it is scored. Consume it whole.
    """
    fn, uses_delta, uses_inputs = PRUNE_SCORES[score]
    start, _ = zero.shard_range(target.param)
    shape = zero.full_shape(target.param)
    layer = target.layer if uses_delta else None
    along = input_dim(target.module)
    norm = input_norm_of(target).to(zero.shard_device(target.param)) if uses_inputs else None
    # collective: every rank enters the gather once per target, even with an empty shard
    with zero.gathered(layer.adapter_parameters() if layer else []), zero.shard_in_memory(target.param):
        shard = zero.local_shard(target.param)
        for offset in range(0, shard.numel(), chunk):
            w = shard[offset : offset + chunk].detach().float()
            delta = None
            if layer is not None:
                lo = start + offset
                hi = lo + w.numel()
                first, last = lo // shape[1], (hi - 1) // shape[1] + 1
                delta = layer.delta_rows(first, last).reshape(-1)[lo - first * shape[1] : hi - first * shape[1]].to(w.device)  # shards may be offloaded to the CPU
            x_norm = None
            if uses_inputs:
                flat = torch.arange(start + offset, start + offset + w.numel(), device=w.device)
                x_norm = norm[flat % shape[1] if along == 1 else flat // shape[1]]
            yield offset, fn(w, delta, x_norm)


@contextmanager
def whole_scores(target: PruneTarget, score: str) -> Iterator[torch.Tensor]:
    """The scores of one whole matrix in its storage layout, while it is gathered (ZeRO-3): for
    comparison groups that straddle shard boundaries, decided alike on every rank. Collective."""
    fn, uses_delta, uses_inputs = PRUNE_SCORES[score]
    layer = target.layer if uses_delta else None
    along = input_dim(target.module)
    with torch.no_grad(), zero.gathered([target.param, *(layer.adapter_parameters() if layer else [])]):
        weight = target.param.detach().float()
        delta = layer.delta_rows(0, weight.shape[0]).to(weight.device) if layer else None
        x_norm = input_norm_of(target).unsqueeze(1 - along).to(weight.device).expand_as(weight) if uses_inputs else None
        yield fn(weight, delta, x_norm)


def input_norm_of(target: PruneTarget) -> torch.Tensor:
    """The target's ‖x_j‖ (set by input_norms), or why the 'activation' score cannot run."""
    if target.input_norm is None:
        raise ValueError(f"{target.name}: the 'activation' score needs input norms from calibration batches (prune.input_norms)")
    return target.input_norm
