"""Re-fitting the weights pruning keeps (SparseGPT's update), so a pruned matrix's output changes least.

Each pruned matrix's kept weights are re-fitted to its calibration inputs' XᵀX: `obs_reconstruct`
is the update itself (Frantar & Alistarh, 2023), on one whole (out × in) matrix; `refit` runs it
over the targets under ZeRO-3 with the XᵀX of as many matrices as GRAM_BYTES allows per
calibration pass, so a later pass sees the earlier matrices already pruned. The matrices of a
pass are independent, so the ranks fit them side by side (`fit_rounds`): each rank receives the
one matrix it fits (`zero.gather_to`) and sends each rank its shard of the result
(`zero.scatter_from`), one matrix per rank at a time. With an N:M pattern and no mask, the
update also chooses which N of every M stay.
"""
from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from dsee_scale import dist, zero
from dsee_scale.prune.masks import ShardMask, apply_mask, whole_mask
from dsee_scale.prune.scores import Calibration, input_grams
from dsee_scale.prune.targets import PruneTarget
from dsee_scale.semistructured import input_dim

GRAM_BYTES = 1 << 30  # XᵀX held at once while reconstructing


def refit(targets: list[PruneTarget], masks: dict[str, ShardMask], calibration: Calibration, keep_sparse: bool,
          nm: tuple[int, int] | None = None, spread: bool = True) -> None:
    """Re-fit each target's kept weights to the calibration inputs, then zero its pruned ones, as
    many matrices per calibration pass as GRAM_BYTES of XᵀX allows; a later pass sees the earlier
    matrices already pruned (SparseGPT's sequential order). The matrices of a pass are fitted in
    rounds, one per rank (`fit_rounds`); spread=False fits them all on rank 0 (the benchmark's
    baseline; the same weights bit for bit). A target without a mask gets the N:M one the re-fit
    chooses (`nm`), added to `masks`. Collective."""
    ranks = dist.world_size() if spread else 1
    for group in _gram_groups(targets):
        grams = input_grams(group, *calibration)  # all-reduced: every rank holds the pass's XᵀX anyway while summing
        for round_ in fit_rounds([_fit_cost(t) for t in group], ranks):
            fitted = _fit_mine(group, round_, grams, masks, keep_sparse, nm)
            for owner, i in round_:  # each rank writes its shard of every matrix of the round
                target = group[i]
                masks[target.name] = _write_back(target, masks.get(target.name), fitted if owner == dist.rank() else None, owner, keep_sparse)
                apply_mask(target.param, masks[target.name])


def fit_rounds(costs: list[float], ranks: int) -> list[list[tuple[int, int]]]:
    """Who fits which matrix when: rounds of (rank, index into costs) pairs, in index order, at
    most one matrix per rank per round. A round lasts as long as its costliest fit, so the
    costliest `ranks` matrices share the first round, the next ones the second, and so on; within
    a round the costlier matrix goes to the rank with less work so far (ties: the lower rank).
    Deterministic: every rank computes the same rounds."""
    order = sorted(range(len(costs)), key=lambda i: (-costs[i], i))
    loads = [0.0] * ranks
    rounds = []
    for first in range(0, len(order), ranks):
        chunk = order[first : first + ranks]
        idle = sorted(range(ranks), key=lambda r: (loads[r], r))
        for rank, i in zip(idle, chunk):
            loads[rank] += costs[i]
        rounds.append(sorted(zip(idle, chunk), key=lambda pair: pair[1]))
    return rounds


def _fit_cost(target: PruneTarget) -> int:
    """The update's work, up to a constant: the factorisations of the (in × in) XᵀX and the
    column sweep over (out × in)."""
    shape = zero.full_shape(target.param)
    n = shape[input_dim(target.module)]
    return n * n * (n + shape.numel() // n)


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


def _fit_mine(group: list[PruneTarget], round_: list[tuple[int, int]], grams: list[torch.Tensor], masks: dict[str, ShardMask],
              keep_sparse: bool, nm: tuple[int, int] | None) -> tuple[torch.Tensor, torch.Tensor] | None:
    """This rank's fit of one round (`_fit`), None if it has none: every matrix of the round
    goes to the rank that fits it, then the ranks fit side by side. Collective: a failure on any
    rank (out of memory, a failed factorisation) raises on all."""
    mine, fitted, error = None, None, None
    for owner, i in round_:
        got = _fit_input(group[i], masks.get(group[i].name), keep_sparse, owner)
        if got is not None:
            mine = i, got
    if mine is not None:
        i, (weight, delta, given) = mine
        try:
            fitted = _fit(group[i], weight, delta, given, grams[i], nm)
        except (RuntimeError, ValueError) as err:
            error = f"{group[i].name}: the re-fit failed on rank {dist.rank()}: {err}"
    dist.raise_if_any(error)
    return fitted


@torch.no_grad()
def _fit_input(target: PruneTarget, mask: ShardMask | None, keep_sparse: bool, owner: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None:
    """On rank `owner`: the target's weight W (float32, storage layout), the ΔW the fit must
    account for (keep_sparse: the re-tune will add ΔW ⊙ M; otherwise a scalar 0) and the given
    mask (bool, or None to choose one); None on the other ranks. Collective."""
    given = None if mask is None else whole_mask(mask)
    layer = target.layer if keep_sparse else None
    shape = zero.full_shape(target.param)
    flat = zero.gather_to(target.param, owner)
    with zero.gathered(layer.adapter_parameters() if layer else []):
        if flat is None:
            return None
        weight = flat.float().view(shape)
        delta = layer.delta_rows(0, shape[0]).to(weight.device) if layer else torch.zeros((), device=weight.device)
    return weight, delta, None if given is None else torch.from_numpy(given.astype(bool)).reshape(shape).to(weight.device)


@torch.no_grad()
def _fit(target: PruneTarget, weight: torch.Tensor, delta: torch.Tensor, given: torch.Tensor | None, gram: torch.Tensor,
         nm: tuple[int, int] | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Re-fit one whole matrix so its output on the calibration inputs changes least; without a
    mask, choose N of every M as well. With keep_sparse (delta is ΔW) W' + ΔW ⊙ M is fitted to
    W + ΔW and the adapter is confined to M (layer.keep_mask, in `_write_back`); otherwise (delta
    is 0) W' alone to W (ΔW stays dense). Returns (W' flat in the weight's dtype, pruned flat)."""
    transposed = input_dim(target.module) == 0  # Conv1D: (in, out); the fit works on (out, in)
    out_in = (lambda m: m.T) if transposed else (lambda m: m)  # noqa: E731
    fit, chosen = obs_reconstruct(out_in(weight + delta), gram.to(weight.device), None if given is None else out_in(given), nm)
    chosen = out_in(chosen)
    fitted = (out_in(fit) - delta).masked_fill_(chosen, 0).reshape(-1)
    return fitted.to(zero.full_dtype(target.param)), chosen.reshape(-1)


@torch.no_grad()
def _write_back(target: PruneTarget, mask: ShardMask | None, fitted: tuple[torch.Tensor, torch.Tensor] | None, owner: int,
                keep_sparse: bool) -> ShardMask:
    """Every rank writes its shard of the matrix rank `owner` fitted (`fitted` there, None
    elsewhere), takes the pruned positions (sent bit-packed) and returns its shard's mask.
    Collective."""
    shape = zero.full_shape(target.param)
    weight, pruned = fitted or (None, None)
    part = zero.scatter_from(target.param, weight, owner)
    # cpu: numpy packs the pruned positions on the host; dist.broadcast moves them to the communication device
    bits = torch.from_numpy(np.packbits(pruned.cpu().numpy())) if pruned is not None else torch.empty((shape.numel() + 7) // 8, dtype=torch.uint8, device="cpu")
    pruned = torch.from_numpy(np.unpackbits(dist.broadcast(bits, owner).numpy(), count=shape.numel()).astype(bool))
    zero.edit_local_shard(target.param, lambda shard, start: shard.copy_(part))
    if keep_sparse and target.layer is not None:  # as the re-tune will run it; later calibration passes see it so
        target.layer.keep_mask(~pruned.reshape(shape))
    return mask if mask is not None else ShardMask.from_whole(target.param, pruned)


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
