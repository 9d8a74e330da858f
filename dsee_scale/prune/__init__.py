"""Exact distributed pruning on ZeRO-3 shards: unstructured (global, per matrix, per row or per block) and N:M.

Each rank scores only its local shard of each selected weight (`targets`), a chunk at a time
(`scores`; the trainer's default is Wanda's activation score). Unstructured pruning removes
exactly round(sparsity × N) weights, chosen by the exact k-th smallest score over all ranks
(`threshold`), or compares within each output row (`rows`: Wanda's, and OWL's per-block
sparsities); rows and N:M groups are decided one whole matrix at a time. The masks, bit-packed per shard,
are applied in place and kept for the re-tune and for checkpoints (`masks`); optionally the
kept weights are first re-fitted to the calibration inputs (`refit`, SparseGPT's update).
No rank ever holds more than one chunk of scores or one gathered matrix.
"""
from __future__ import annotations

from collections.abc import Mapping

from torch import nn

from dsee_scale import zero
from dsee_scale.prune.masks import ShardMask, apply_mask, reapply_masks, sparsity_report, unpack_mask, whole_masks
from dsee_scale.prune.refit import obs_reconstruct, refit
from dsee_scale.prune.rows import owl_sparsities
from dsee_scale.prune.scores import PRUNE_SCORES, Calibration, Score, input_grams, input_norms, register_score, score_chunks, whole_scores
from dsee_scale.prune.targets import DEFAULT_EXCLUDE, DEFAULT_INCLUDE, PruneTarget, default_targets, plain_parameters, prune_targets
from dsee_scale.prune.threshold import PRUNE_SELECTORS, kth_smallest, register_selector
from dsee_scale.semistructured import check_groups, input_dim, nm_keep, parse_pattern

__all__ = [
    "DEFAULT_EXCLUDE", "DEFAULT_INCLUDE", "PRUNE_SCORES", "PRUNE_SELECTORS", "Calibration", "PruneTarget", "Score",
    "ShardMask", "apply_mask", "input_grams", "input_norms", "kth_smallest", "obs_reconstruct", "owl_sparsities", "plain_parameters", "prune_nm",
    "prune_targets", "prune_unstructured", "reapply_masks", "register_score", "register_selector", "score_chunks", "sparsity_report",
    "unpack_mask", "whole_masks",
]


def prune_unstructured(
    model: nn.Module,
    sparsity: float,
    scope: str = "global",
    score: str = "weight",
    include: list[str] | None = None,
    exclude: list[str] | None = None,
    calibration: Calibration | None = None,
    reconstruct: bool = False,
    keep_sparse: bool = True,
    scope_options: Mapping[str, float] | None = None,
) -> dict[str, ShardMask]:
    """Prune exactly round(sparsity × N) elements (global), or that fraction of each matrix
    (layer) or of each output row (row), or of each row at its block's OWL sparsity (owl, with
    scope_options owl_m, owl_lambda); collective.
    `calibration` (batches, forward) feeds the 'activation' score's input norms and, with
    reconstruct, the re-fit of the kept weights (`obs_reconstruct`), made for a re-tune of
    ΔW ⊙ M if keep_sparse, of a dense ΔW otherwise. The score defaults to the data-free |W|
    here; the trainer's default (PruneConfig) is 'activation'."""
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
    if scope not in PRUNE_SELECTORS:
        raise ValueError(f"unknown prune scope {scope!r}: choose one of {', '.join(PRUNE_SELECTORS)}")
    targets = _scored_targets(model, score, include, exclude, calibration, reconstruct)
    masks = PRUNE_SELECTORS[scope](targets, score, sparsity, **(scope_options or {}))
    _mask_targets([t for t in targets if t.name in masks], masks, calibration if reconstruct else None, keep_sparse)
    return masks


def prune_nm(model: nn.Module, pattern: str, score: str = "weight", include: list[str] | None = None, exclude: list[str] | None = None,
             calibration: Calibration | None = None, reconstruct: bool = False, keep_sparse: bool = True) -> dict[str, ShardMask]:
    """N:M semi-structured pruning ('2:4'): in every M consecutive weights along the input
    dimension the N highest scores stay; with reconstruct, the N that SparseGPT's re-fit keeps
    (`score` unused). One matrix at a time, gathered whole, so groups that straddle ZeRO-3 shard
    boundaries are decided exactly; each rank masks its own shard. Collective."""
    n, m = parse_pattern(pattern)
    targets = _scored_targets(model, "weight" if reconstruct else score, include, exclude, calibration, reconstruct)
    if reconstruct:  # the re-fit chooses which N stay, on the weights as it updates them
        for target in targets:  # before any calibration work
            try:
                check_groups(zero.full_shape(target.param)[input_dim(target.module)], m)
            except ValueError as err:
                raise ValueError(f"{target.name}: {err}") from None
        masks: dict[str, ShardMask] = {}
        _mask_targets(targets, masks, calibration, keep_sparse, (n, m))
        return masks
    masks = {}
    for target in targets:
        with whole_scores(target, score) as scores:
            try:
                pruned = ~nm_keep(scores, n, m, input_dim(target.module))
            except ValueError as err:
                raise ValueError(f"{target.name}: {err}") from None
        masks[target.name] = ShardMask.from_whole(target.param, pruned)
    _mask_targets(targets, masks, None, keep_sparse)
    return masks


def _scored_targets(model: nn.Module, score: str, include: list[str] | None, exclude: list[str] | None, calibration: Calibration | None,
                    reconstruct: bool) -> list[PruneTarget]:
    """The targets (default patterns unless given), with input norms if the score needs them."""
    if score not in PRUNE_SCORES:
        raise ValueError(f"unknown prune score {score!r}: choose one of {', '.join(PRUNE_SCORES)}")
    targets = default_targets(model, include, exclude)
    if calibration is None and (reconstruct or PRUNE_SCORES[score].uses_inputs):
        why = "reconstruction fits weights to their inputs" if reconstruct else f"prune score {score!r} scales weights by their inputs"
        raise ValueError(f"{why}: pass calibration=(batches, forward)")
    if PRUNE_SCORES[score].uses_inputs:
        input_norms(targets, *calibration)
    return targets


def _mask_targets(targets: list[PruneTarget], masks: dict[str, ShardMask], calibration: Calibration | None, keep_sparse: bool,
                  nm: tuple[int, int] | None = None) -> None:
    """Zero the pruned weights, after re-fitting the kept ones to the calibration inputs if
    `calibration` is given (`refit`). Collective."""
    if calibration is None:
        for target in targets:
            apply_mask(target.param, masks[target.name])
        return
    refit(targets, masks, calibration, keep_sparse, nm)
