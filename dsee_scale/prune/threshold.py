"""Choosing exactly k weights to prune across ranks, without any rank holding all the scores.

The k-th smallest score over all ranks' shards comes from two all-reduced 65,536-bin histograms
of the scores' float32 bit patterns (which order like the values for scores >= 0): the high 16
bits first, then the low 16 bits within the chosen high bin (`kth_smallest`). Ties at the
threshold are broken by (parameter order, flat index), so exactly k elements go (`_tie_quota`). Selectors, registered by name, decide what k is over: one
threshold over all targets ('global', the paper's) or one per matrix ('layer'); `rows` adds
Wanda's per-row groups ('row') and OWL's per-block ratios ('owl').
"""
from __future__ import annotations

from collections.abc import Callable

import torch

from dsee_scale import dist, zero
from dsee_scale.prune.masks import ShardMask
from dsee_scale.prune.scores import score_chunks
from dsee_scale.prune.targets import PruneTarget, shard_numels, targets_device

BINS = 1 << 16


def _bits(scores: torch.Tensor) -> torch.Tensor:
    return scores.contiguous().view(torch.int32).long()


def _histogram(targets: list[PruneTarget], score: str, prefix: int | None) -> torch.Tensor:
    """All-reduced counts of the high 16 bits (prefix None) or of the low 16 bits among
    scores whose high 16 bits equal prefix."""
    counts = torch.zeros(BINS, dtype=torch.int64, device=targets_device(targets))
    for target in targets:
        for _, s in score_chunks(target, score):
            bits = _bits(s)
            if prefix is None:
                counts += torch.bincount(bits >> 16, minlength=BINS)
            else:
                counts += torch.bincount(bits[(bits >> 16) == prefix] & 0xFFFF, minlength=BINS)
    return dist.all_reduce(counts)


def kth_smallest(targets: list[PruneTarget], score: str, k: int) -> tuple[int, int]:
    """(bit pattern t of the k-th smallest score, count of scores strictly below t); k >= 1."""
    high = _histogram(targets, score, None)
    cum = high.cumsum(0)
    b1 = int(torch.searchsorted(cum, torch.tensor(k, device=cum.device)).item())
    below = int(cum[b1 - 1]) if b1 else 0
    low = _histogram(targets, score, b1).cumsum(0)
    b2 = int(torch.searchsorted(low, torch.tensor(k - below, device=low.device)).item())
    return (b1 << 16) | b2, below + (int(low[b2 - 1]) if b2 else 0)


def _tie_quota(targets: list[PruneTarget], score: str, t: int, ties_needed: int) -> list[int]:
    """How many of this rank's ties (score == t) to prune in each target: lowest flat index first."""
    rank, world = dist.rank(), dist.world_size()
    table = torch.zeros(len(targets), world, dtype=torch.int64, device=targets_device(targets))
    for i, target in enumerate(targets):
        table[i, rank] = sum(int((_bits(s) == t).sum()) for _, s in score_chunks(target, score))
    table = dist.all_reduce(table)
    order = table.flatten()  # parameter-major, then rank: the global flat order
    before = order.cumsum(0) - order
    take = (ties_needed - before).clamp(min=0).minimum(order).view(len(targets), world)
    return take[:, rank].tolist()


def _apply(targets: list[PruneTarget], score: str, t: int | None, quota: list[int]) -> dict[str, ShardMask]:
    """Masks of this rank's shards: scores below t, and the first `quota` ties at t."""
    masks = {}
    for target, q in zip(targets, quota):
        parts = []
        for _, s in score_chunks(target, score):
            bits = _bits(s)
            pruned = bits < t if t is not None else torch.zeros_like(bits, dtype=torch.bool)
            ties = bits == t if t is not None else pruned
            if q > 0:
                tie_rank = ties.cumsum(0)
                pruned |= ties & (tie_rank <= q)
                q -= int(ties.sum().clamp(max=q))
            parts.append(pruned)
        mask = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.bool, device=targets_device([target]))
        start, _ = zero.shard_range(target.param)
        masks[target.name] = ShardMask.from_bool(start, mask)
    return masks


def _select(targets: list[PruneTarget], score: str, sparsity: float) -> dict[str, ShardMask]:
    total = int(dist.all_reduce(torch.tensor(sum(shard_numels(targets)), device=targets_device(targets))).item())
    k = int(round(sparsity * total))  # as torch.nn.utils.prune
    if k == 0:
        return _apply(targets, score, None, [0] * len(targets))
    t, below = kth_smallest(targets, score, k)
    return _apply(targets, score, t, _tie_quota(targets, score, t, k - below))


Selector = Callable[..., dict[str, ShardMask]]
PRUNE_SELECTORS: dict[str, Selector] = {}


def register_selector(name: str) -> Callable[[Selector], Selector]:
    """Add a way to choose which weights to prune: fn(targets, score name, sparsity, **options)
    → masks of this rank's shards (the caller applies them). Its options, if any, are keywords
    with defaults, which PruneConfig fields named '<name>_...' set (PruneConfig.scope_options).
    Collective: every rank calls it with the same targets."""
    def add(fn: Selector) -> Selector:
        PRUNE_SELECTORS[name] = fn
        return fn
    return add


@register_selector("global")
def _global(targets: list[PruneTarget], score: str, sparsity: float) -> dict[str, ShardMask]:
    """One threshold over all selected weights: the paper's global magnitude pruning."""
    return _select(targets, score, sparsity)


@register_selector("layer")
def _per_layer(targets: list[PruneTarget], score: str, sparsity: float) -> dict[str, ShardMask]:
    """The same fraction of every matrix."""
    masks = {}
    for target in targets:
        masks.update(_select([target], score, sparsity))
    return masks
