"""Comparison within each output row: Wanda's ('row' scope) and OWL's per-block ratios ('owl').

Wanda (Sun et al., 2024) compares a weight's score only with the others that feed the same
output, and prunes round(s × in) of every output row: no matrix or layer can lose more than its
share, which a global threshold over scores of different scales does (a real decoder lost 99.9% of
a layer's v_proj). A row straddles ZeRO-3 shard boundaries, so each matrix is scored gathered whole,
one at a time (as N:M pruning does); every rank decides the same rows, ties to the lower index (a
stable sort), and keeps its shard's part of the mask.

OWL (Yin et al., 2024, "Outlier Weighed Layerwise sparsity") gives each transformer block l its
own sparsity s_l, then prunes its rows as Wanda does: blocks with more outliers keep more.
D_l is the fraction of the block's scores (all its pruned matrices) above M × their mean; as the
released code (luuyin/OWL) does, the D_l are scaled to a spread of 2λ and centred on s:
s_l = s − (r_l − mean r), r_l = 2λ·(D_l − min D)/(max D − min D), so the blocks' mean sparsity is s
(and every s_l = s where all D_l are equal). The paper's "[s − λ, s + λ]" is that spread of 2λ; it
is centred on the mean, not on the middle, so one s_l may lie up to 2λ(1 − 1/L) from s.
The sums and counts behind D_l are per shard, all-reduced (float64).
"""
from __future__ import annotations

import torch

from dsee_scale import dist
from dsee_scale.prune.masks import ShardMask
from dsee_scale.prune.scores import score_chunks, whole_scores
from dsee_scale.prune.targets import PruneTarget, targets_device
from dsee_scale.prune.threshold import register_selector
from dsee_scale.semistructured import input_dim

OWL_M = 5.0  # the paper's outlier threshold: scores above M × the block's mean
OWL_LAMBDA = 0.08  # the paper's bound on each block's distance from the target sparsity (LLaMA-7B)


def row_mask(scores: torch.Tensor, sparsity: float, along: int) -> torch.Tensor:
    """Pruned flags of scores' shape: the round(sparsity × n) lowest of every line of n scores
    along `along` (the input dimension: one output's weights), ties to the lower index."""
    moved = scores.movedim(along, -1)
    k = int(round(sparsity * moved.shape[-1]))
    lowest = moved.sort(dim=-1, stable=True).indices[..., :k]
    return torch.zeros_like(moved, dtype=torch.bool).scatter_(-1, lowest, True).movedim(-1, along)


def _rows(targets: list[PruneTarget], score: str, sparsities: list[float]) -> dict[str, ShardMask]:
    """Each target's rows pruned at its own sparsity, one matrix gathered at a time. Collective."""
    masks = {}
    for target, sparsity in zip(targets, sparsities):
        with whole_scores(target, score) as scores:
            pruned = row_mask(scores, sparsity, input_dim(target.module))
        masks[target.name] = ShardMask.from_whole(target.param, pruned)
    return masks


@register_selector("row")
def _per_row(targets: list[PruneTarget], score: str, sparsity: float) -> dict[str, ShardMask]:
    """Wanda's comparison group: round(sparsity × in) of every output row."""
    return _rows(targets, score, [sparsity] * len(targets))


def check_owl(sparsity: float, owl_lambda: float) -> None:
    """Every block's sparsity in [0, 1) whatever the outliers: |s_l − s| < 2λ."""
    if sparsity - 2 * owl_lambda < 0 or sparsity + 2 * owl_lambda > 1:
        most = min(sparsity, 1 - sparsity) / 2
        raise ValueError(f"prune.scope owl: a block's sparsity may lie up to 2 × prune.owl_lambda ({2 * owl_lambda:g}) from prune.sparsity {sparsity:g}, "
                         f"outside [0, 1): lower prune.owl_lambda to at most {most:.4g}")


def check_blocks(targets: list[PruneTarget]) -> None:
    """OWL's sparsities are per transformer block: every target must lie in one."""
    outside = [t.name for t in targets if t.block is None]
    if outside:
        raise ValueError(f"prune.scope owl sets a sparsity per transformer block, and {outside[:3]} lie in none (a model family dsee_scale/arch.py "
                         f"does not know, or weights outside the blocks): exclude them (prune.exclude) or choose prune.scope row or layer")


def owl_sparsities(outlier_ratios: list[float], sparsity: float, owl_lambda: float) -> list[float]:
    """OWL's block sparsities from the blocks' outlier ratios D_l (the module docstring)."""
    low, high = min(outlier_ratios), max(outlier_ratios)
    if high == low:
        return [sparsity] * len(outlier_ratios)
    r = [(d - low) / (high - low) * 2 * owl_lambda for d in outlier_ratios]
    mean = sum(r) / len(r)
    return [sparsity - (x - mean) for x in r]


def outlier_ratios(targets: list[PruneTarget], score: str, owl_m: float) -> list[float]:
    """D_l of each block that holds targets, in block order: the fraction of its scores above
    owl_m × its mean score, over all ranks' shards (two passes over the scores). Collective."""
    index = {b: i for i, b in enumerate(sorted({t.block for t in targets}))}
    device = targets_device(targets)
    sums = torch.zeros(len(index), 2, dtype=torch.float64, device=device)  # Σ score, count
    for t in targets:
        for _, s in score_chunks(t, score):
            sums[index[t.block], 0] += s.double().sum()
            sums[index[t.block], 1] += s.numel()
    sums = dist.all_reduce(sums)
    limit = owl_m * sums[:, 0] / sums[:, 1]
    over = torch.zeros(len(index), dtype=torch.float64, device=device)
    for t in targets:
        for _, s in score_chunks(t, score):
            over[index[t.block]] += (s.double() > limit[index[t.block]]).sum()
    return (dist.all_reduce(over) / sums[:, 1]).tolist()


@register_selector("owl")
def _owl(targets: list[PruneTarget], score: str, sparsity: float, owl_m: float = OWL_M, owl_lambda: float = OWL_LAMBDA) -> dict[str, ShardMask]:
    """OWL: a sparsity per transformer block from its share of outlier scores, then per row."""
    if sparsity == 0:
        return _per_row(targets, score, 0.0)
    check_owl(sparsity, owl_lambda)
    check_blocks(targets)
    blocks = sorted({t.block for t in targets})
    per_block = owl_sparsities(outlier_ratios(targets, score, owl_m), sparsity, owl_lambda)
    return _rows(targets, score, [per_block[blocks.index(t.block)] for t in targets])
