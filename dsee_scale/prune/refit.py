"""Re-fitting the weights pruning keeps (SparseGPT's update), so a pruned matrix's output changes least.

Each pruned matrix's kept weights are re-fitted to its calibration inputs' XᵀX: `obs_reconstruct`
is the update itself (Frantar & Alistarh, 2023), on one whole (out × in) matrix; `refit` runs it
over the targets under ZeRO-3, in model order, one matrix gathered at a time (rank 0 fits, every
rank takes its shard of the result) and the XᵀX of as many matrices as GRAM_BYTES allows per
calibration pass, so a later pass sees the earlier matrices already pruned. With an N:M pattern
and no mask, the update also chooses which N of every M stay.
"""
from __future__ import annotations

from collections.abc import Iterator

import torch

from dsee_scale import dist, zero
from dsee_scale.prune.masks import ShardMask, apply_mask, whole_mask
from dsee_scale.prune.scores import Calibration, input_grams
from dsee_scale.prune.targets import PruneTarget
from dsee_scale.semistructured import input_dim

GRAM_BYTES = 1 << 30  # XᵀX held at once while reconstructing


def refit(targets: list[PruneTarget], masks: dict[str, ShardMask], calibration: Calibration, keep_sparse: bool,
          nm: tuple[int, int] | None = None) -> None:
    """Re-fit each target's kept weights to the calibration inputs, then zero its pruned ones, in
    model order, as many matrices per calibration pass as GRAM_BYTES of XᵀX allows; a later pass
    sees the earlier matrices already pruned (SparseGPT's sequential order). A target without a
    mask gets the N:M one the re-fit chooses (`nm`), added to `masks`. Collective."""
    for group in _gram_groups(targets):
        for target, gram in zip(group, input_grams(group, *calibration)):
            masks[target.name] = _reconstruct(target, masks.get(target.name), gram, keep_sparse, nm)
            apply_mask(target.param, masks[target.name])


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
    given = None if mask is None else torch.from_numpy(whole_mask(mask).astype(bool))
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
