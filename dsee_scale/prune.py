"""Exact distributed magnitude pruning on ZeRO-3 shards.

Each rank scores only its local shard of each selected weight (padding excluded), a chunk at a
time. The exact k-th smallest score over all ranks comes from two all-reduced 65,536-bin
histograms of the scores' float32 bit patterns (which order like the values for scores >= 0);
ties at the threshold are broken by (parameter order, flat index), so exactly k elements are
pruned. Masks are applied in place to the shards and kept as bit-packed buffers per shard.
No rank ever holds more than one chunk of scores.

Scores: |W|, |W + ΔW|, |ΔW|, or |W + ΔW|·‖x_j‖ ('activation': Wanda's per-weight score, each
weight scaled by the norm of its input feature over calibration tokens, from `input_norms`; the
weights it prunes are chosen by this run's scope, global or per matrix, where Wanda compares
within each output row).

Reconstruction (optional, SparseGPT's update for the chosen mask): each pruned matrix's kept
weights are re-fitted to its calibration inputs' XᵀX so that its output changes least; one
matrix gathered at a time, the XᵀX of as many matrices as GRAM_BYTES allows per calibration pass.
"""
from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
from torch import nn

from dsee_scale import dist, zero
from dsee_scale.layer import DSEELayer
from dsee_scale.semistructured import check_groups, input_dim, nm_keep, parse_pattern

log = logging.getLogger(__name__)
CHUNK = 1 << 22
BINS = 1 << 16


@dataclass
class PruneTarget:
    name: str
    param: nn.Parameter
    layer: DSEELayer | None  # the adapter on this weight, for 'merged' / 'delta' scores
    module: nn.Module  # the weight's own module (Linear, Conv1D): its input is x
    input_norm: torch.Tensor | None = None  # ‖x_j‖ per input feature, for the 'activation' score


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
    found = []
    for plain, param in plain_parameters(model).items():
        if len(zero.full_shape(param)) != 2 or (param.requires_grad and frozen_only):
            continue
        if any(re.fullmatch(p, plain) for p in include) and not any(re.fullmatch(p, plain) for p in exclude):
            found.append(PruneTarget(plain, param, layers.get(id(param)), owners[id(param)]))
    if not found:
        raise ValueError(f"no weight matched the prune patterns include={include} exclude={exclude}")
    return found


ScoreFn = Callable[[torch.Tensor, "torch.Tensor | None", "torch.Tensor | None"], torch.Tensor]


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


Calibration = tuple[Iterable[dict], Callable[[dict], object]]  # (batches, forward), see input_norms


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
    norm = _input_norm(target).to(zero.shard_device(target.param)) if uses_inputs else None
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


def _input_norm(target: PruneTarget) -> torch.Tensor:
    if target.input_norm is None:
        raise ValueError(f"{target.name}: the 'activation' score needs input norms from calibration batches (prune.input_norms)")
    return target.input_norm


def _device(targets: list[PruneTarget]) -> torch.device:
    """Where the shards (and so their scores) live."""
    return zero.shard_device(targets[0].param)


def _shard_numels(targets: list[PruneTarget]) -> list[int]:
    """Elements of each target's local shard (padding excluded), without reading the shard."""
    return [stop - start for start, stop in (zero.shard_range(t.param) for t in targets)]


def _bits(scores: torch.Tensor) -> torch.Tensor:
    return scores.contiguous().view(torch.int32).long()


def _histogram(targets: list[PruneTarget], score: str, prefix: int | None) -> torch.Tensor:
    """All-reduced counts of the high 16 bits (prefix None) or of the low 16 bits among
    scores whose high 16 bits equal prefix."""
    counts = torch.zeros(BINS, dtype=torch.int64, device=_device(targets))
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
    table = torch.zeros(len(targets), world, dtype=torch.int64, device=_device(targets))
    for i, target in enumerate(targets):
        table[i, rank] = sum(int((_bits(s) == t).sum()) for _, s in score_chunks(target, score))
    table = dist.all_reduce(table)
    order = table.flatten()  # parameter-major, then rank: the global flat order
    before = order.cumsum(0) - order
    take = (ties_needed - before).clamp(min=0).minimum(order).view(len(targets), world)
    return take[:, rank].tolist()


@dataclass
class ShardMask:
    """Pruned positions of one weight's local shard, bit-packed (1 = pruned)."""

    start: int
    numel: int
    bits: np.ndarray

    def dense(self) -> torch.Tensor:
        return torch.from_numpy(np.unpackbits(self.bits, count=self.numel).astype(bool))


def _apply(targets, score, t: int | None, quota: list[int]) -> dict[str, ShardMask]:
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
        mask = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.bool, device=_device([target]))
        start, _ = zero.shard_range(target.param)
        masks[target.name] = ShardMask(start, mask.numel(), np.packbits(mask.cpu().numpy()))  # host bits: saved with checkpoints
    return masks


def whole_masks(masks: dict[str, ShardMask]) -> dict[str, torch.Tensor]:
    """Each pruned weight's mask over its whole flattened shape, bit-packed (1 = pruned).
    Collective, one weight at a time: no rank holds more than one weight's bits."""
    return {name: torch.from_numpy(np.packbits(_whole_mask(masks[name]))) for name in sorted(masks)}


def _whole_mask(mask: ShardMask) -> np.ndarray:
    """One weight's mask over all ranks' shards, flat 0/1 (1 = pruned). Collective."""
    parts = sorted(dist.all_gather_object((mask.start, mask.numel, mask.bits)))
    return np.concatenate([np.unpackbits(b, count=n) for _, n, b in parts])


def unpack_mask(bits: torch.Tensor, numel: int) -> np.ndarray:
    """A whole weight's packed mask (whole_masks) as flat 0/1 (1 = pruned)."""
    if bits.numel() != (numel + 7) // 8:
        raise ValueError(f"a mask of {bits.numel() * 8} bits cannot cover a weight of {numel} entries")
    return np.unpackbits(bits.numpy(), count=numel)


def apply_mask(param: torch.Tensor, mask: ShardMask) -> None:
    """Zero the masked entries of this rank's shard (and of a whole copy, if one exists)."""
    dense = mask.dense()
    zero.edit_local_shard(param, lambda shard, _start: shard.masked_fill_(dense.to(shard.device), 0))


def _select(targets, score: str, sparsity: float) -> dict[str, ShardMask]:
    total = int(dist.all_reduce(torch.tensor(sum(_shard_numels(targets)), device=_device(targets))).item())
    k = int(round(sparsity * total))  # as torch.nn.utils.prune
    if k == 0:
        return _apply(targets, score, None, [0] * len(targets))
    t, below = kth_smallest(targets, score, k)
    return _apply(targets, score, t, _tie_quota(targets, score, t, k - below))


Selector = Callable[[list[PruneTarget], str, float], dict[str, ShardMask]]
PRUNE_SELECTORS: dict[str, Selector] = {}


def register_selector(name: str) -> Callable[[Selector], Selector]:
    """Add a way to choose which weights to prune: fn(targets, score name, sparsity) → masks
    of this rank's shards (the caller applies them). Collective: every rank calls it with the same targets."""
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


def magnitude_prune(
    model: nn.Module,
    sparsity: float,
    scope: str = "global",
    score: str = "weight",
    include: list[str] | None = None,
    exclude: list[str] | None = None,
    calibration: Calibration | None = None,
    reconstruct: bool = False,
    keep_sparse: bool = True,
) -> dict[str, ShardMask]:
    """Prune exactly round(sparsity × N) elements (global) or per matrix (layer); collective.
    `calibration` (batches, forward) feeds the 'activation' score's input norms and, with
    reconstruct, the re-fit of the kept weights (`obs_reconstruct`), made for a re-tune of
    ΔW ⊙ M if keep_sparse, of a dense ΔW otherwise. The score defaults to the data-free |W|
    here; the trainer's default (PruneConfig) is 'activation'."""
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
    if scope not in PRUNE_SELECTORS:
        raise ValueError(f"unknown prune scope {scope!r}: choose one of {', '.join(PRUNE_SELECTORS)}")
    targets = _scored_targets(model, score, include, exclude, calibration, reconstruct)
    masks = PRUNE_SELECTORS[scope](targets, score, sparsity)
    _mask_targets([t for t in targets if t.name in masks], masks, calibration if reconstruct else None, keep_sparse)
    return masks


def _scored_targets(model: nn.Module, score: str, include: list[str] | None, exclude: list[str] | None, calibration: Calibration | None,
                    reconstruct: bool) -> list[PruneTarget]:
    from dsee_scale.config import PruneConfig

    if score not in PRUNE_SCORES:
        raise ValueError(f"unknown prune score {score!r}: choose one of {', '.join(PRUNE_SCORES)}")
    defaults = PruneConfig()
    targets = prune_targets(model, include or defaults.include, exclude or defaults.exclude)
    if calibration is None and (reconstruct or PRUNE_SCORES[score].uses_inputs):
        why = "reconstruction fits weights to their inputs" if reconstruct else f"prune score {score!r} scales weights by their inputs"
        raise ValueError(f"{why}: pass calibration=(batches, forward)")
    if PRUNE_SCORES[score].uses_inputs:
        input_norms(targets, *calibration)
    return targets


def nm_prune(model: nn.Module, pattern: str, score: str = "weight", include: list[str] | None = None, exclude: list[str] | None = None,
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
    fn, uses_delta, uses_inputs = PRUNE_SCORES[score]
    masks = {}
    for target in targets:
        layer = target.layer if uses_delta else None
        along = input_dim(target.module)
        with torch.no_grad(), zero.gathered([target.param, *(layer.adapter_parameters() if layer else [])]):
            weight = target.param.detach().float()
            delta = layer.delta_rows(0, weight.shape[0]).to(weight.device) if layer else None
            x_norm = _input_norm(target).unsqueeze(1 - along).to(weight.device).expand_as(weight) if uses_inputs else None
            try:
                pruned = ~nm_keep(fn(weight, delta, x_norm), n, m, along)
            except ValueError as err:
                raise ValueError(f"{target.name}: {err}") from None
        start, stop = zero.shard_range(target.param)
        mine = pruned.reshape(-1)[start:stop]
        masks[target.name] = ShardMask(start, mine.numel(), np.packbits(mine.cpu().numpy()))  # host bits: saved with checkpoints
    _mask_targets(targets, masks, None, keep_sparse)
    return masks


def _mask_targets(targets: list[PruneTarget], masks: dict[str, ShardMask], calibration: Calibration | None, keep_sparse: bool,
                  nm: tuple[int, int] | None = None) -> None:
    """Zero the pruned weights, after re-fitting the kept ones to the calibration inputs if
    `calibration` is given: in model order, as many matrices per calibration pass as
    GRAM_BYTES of XᵀX allows; a later pass sees the earlier matrices already pruned (SparseGPT's
    sequential order). A target without a mask gets the N:M one the re-fit chooses (`nm`).
    Collective."""
    if calibration is None:
        for target in targets:
            apply_mask(target.param, masks[target.name])
        return
    for group in _gram_groups(targets):
        for target, gram in zip(group, input_grams(group, *calibration)):
            masks[target.name] = _reconstruct(target, masks.get(target.name), gram, keep_sparse, nm)
            apply_mask(target.param, masks[target.name])


GRAM_BYTES = 1 << 30  # XᵀX held at once while reconstructing


def _gram_groups(targets: list[PruneTarget]) -> Iterator[list[PruneTarget]]:
    group, size = [], 0
    for target in targets:
        n = zero.full_shape(target.param)[input_dim(target.module)]
        if group and size + 4 * n * n > GRAM_BYTES:
            yield group
            group, size = [], 0
        group.append(target)
        size += 4 * n * n
    if group:
        yield group


@torch.no_grad()
def _reconstruct(target: PruneTarget, mask: ShardMask | None, gram: torch.Tensor, keep_sparse: bool, nm: tuple[int, int] | None) -> ShardMask:
    """Re-fit the kept weights of one matrix (gathered whole; rank 0 computes, every rank takes
    its shard of the result) so its output on the calibration inputs changes least; without a
    mask, choose N of every M as well. With keep_sparse the re-tune will add ΔW ⊙ M, so
    W' + ΔW ⊙ M is fitted to W + ΔW and the adapter is confined to M now (layer.keep_mask);
    otherwise W' alone to W (ΔW stays dense)."""
    given = None if mask is None else torch.from_numpy(_whole_mask(mask).astype(bool))
    layer = target.layer if keep_sparse else None
    transposed = input_dim(target.module) == 0  # Conv1D: (in, out); the fit works on (out, in)
    out_in = (lambda m: m.T) if transposed else (lambda m: m)  # noqa: E731
    shape = zero.full_shape(target.param)
    error = None
    with zero.gathered([target.param, *(layer.adapter_parameters() if layer else [])]):
        weight = target.param.detach().float()
        fitted = torch.empty(shape.numel(), device=weight.device)
        pruned = torch.empty(shape.numel(), dtype=torch.uint8, device=weight.device)
        if dist.is_main():
            try:
                delta = layer.delta_rows(0, shape[0]).to(weight.device) if layer else torch.zeros((), device=weight.device)
                fit, chosen = obs_reconstruct(out_in(weight + delta), gram.to(weight.device), None if given is None else out_in(given.reshape(shape).to(weight.device)), nm)
                chosen = out_in(chosen)
                fitted.copy_(((out_in(fit) - delta).masked_fill_(chosen, 0)).reshape(-1))
                pruned.copy_(chosen.reshape(-1))
            except (RuntimeError, ValueError) as err:  # out of memory, a failed factorisation: every rank must hear of it
                error = f"{target.name}: the re-fit failed on rank 0: {err}"
    dist.raise_if_any(error)
    fitted, pruned = dist.broadcast(fitted, 0), dist.broadcast(pruned, 0).bool()
    zero.edit_local_shard(target.param, lambda shard, start: shard.copy_(fitted[start : start + shard.numel()]))
    if keep_sparse and target.layer is not None:  # as the re-tune will run it; later calibration passes see it so
        target.layer.keep_mask(~pruned.reshape(shape))
    start, stop = zero.shard_range(target.param)
    return mask if mask is not None else ShardMask(start, stop - start, np.packbits(pruned[start:stop].cpu().numpy()))


def obs_reconstruct(weight: torch.Tensor, gram: torch.Tensor, pruned: torch.Tensor | None = None, nm: tuple[int, int] | None = None,
                    damp: float = 0.01, block: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """SparseGPT's weight update (Frantar & Alistarh, 2023): the columns of W (out × in) are
    pruned left to right, and each pruned weight's error ‖(w - w')x‖² is compensated on the
    columns not yet visited, through the Cholesky factor U of (XᵀX + λI)⁻¹, λ = damp × mean diag.
    The mask is `pruned`, or, with nm = (N, M), chosen as the sweep reaches each group of M
    columns: the M - N lowest w²/U_jj² of each row, on the weights as updated so far. Exact least
    squares when only the first column is pruned; rows are independent. Inputs never seen (zero
    diagonal) keep their weights. Returns (W', pruned)."""
    if (pruned is None) == (nm is None):
        raise ValueError("give the mask (pruned) or an N:M pattern to choose one (nm), not both")
    w = weight.float().clone()
    h = gram.float().clone()
    dead = h.diagonal() == 0
    h[dead, dead] = 1
    h.diagonal().add_(damp * h.diagonal().mean())
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    if nm is not None:
        n, m = nm
        pruned = torch.zeros_like(w, dtype=torch.bool)
        block = m * max(1, block // m)  # groups never straddle blocks
    cols = w.shape[1]
    for i1 in range(0, cols, block):
        i2 = min(i1 + block, cols)
        w1, h1, err = w[:, i1:i2].clone(), hinv[i1:i2, i1:i2], torch.zeros_like(w[:, i1:i2])
        for i in range(i2 - i1):
            if nm is not None and i % m == 0:
                saliency = w1[:, i : i + m].pow(2) / h1.diagonal()[i : i + m].pow(2)
                pruned[:, i1 + i : i1 + i + m].scatter_(1, saliency.topk(m - n, dim=1, largest=False).indices, True)
            col = w1[:, i]
            e = torch.where(pruned[:, i1 + i], col, torch.zeros_like(col)) / h1[i, i]
            w1[:, i:] -= e.unsqueeze(1) * h1[i, i:].unsqueeze(0)
            err[:, i] = e
        w[:, i1:i2] = w1
        w[:, i2:] -= err @ hinv[i1:i2, i2:]
    return w.masked_fill_(pruned, 0), pruned


def reapply_masks(model: nn.Module, masks: dict[str, ShardMask]) -> None:
    """Zero pruned entries again (after loading base weights); masks must match this sharding."""
    params = plain_parameters(model)
    unknown = sorted(set(masks) - set(params))
    if unknown:
        raise ValueError(f"masks for weights this model does not have: {unknown[:3]}")
    # Model order on every rank: re-syncing a whole copy is a collective, so ranks must agree.
    for name in (n for n in params if n in masks):
        mask = masks[name]
        start, stop = zero.shard_range(params[name])
        if (start, stop - start) != (mask.start, mask.numel):
            raise ValueError(f"mask for {name} covers [{mask.start}, {mask.start + mask.numel}), this rank holds [{start}, {stop}): load masks saved at the same world size")
        apply_mask(params[name], mask)


def sparsity_report(model: nn.Module, include: list[str] | None = None, exclude: list[str] | None = None, frozen_only: bool = True) -> dict:
    """Zeros per selected weight and in total, counted over shards and all-reduced; the frozen
    weights only, unless every weight trains (full fine-tuning)."""
    from dsee_scale.config import PruneConfig

    defaults = PruneConfig()
    targets = prune_targets(model, include or defaults.include, exclude or defaults.exclude, frozen_only)
    zeros = []
    for t in targets:
        with zero.shard_in_memory(t.param):
            zeros.append((zero.local_shard(t.param) == 0).sum())
    zeros = torch.stack(zeros)
    numels = torch.tensor(_shard_numels(targets), device=zeros.device)
    counts = dist.all_reduce(torch.stack([zeros, numels], dim=1)).cpu()  # one copy to the host
    per_layer = {t.name: counts[i, 0].item() / max(1, counts[i, 1].item()) for i, t in enumerate(targets)}
    zeros, total = counts.sum(0).tolist()
    return {"total": zeros / max(1, total), "zeros": zeros, "numel": total, "per_layer": per_layer}
