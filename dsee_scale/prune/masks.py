"""Pruning masks: which entries of each weight are zero, per ZeRO-3 shard, bit-packed.

A rank keeps only the mask of its own shard of each weight (`ShardMask`, host bits, saved with
checkpoints), so masks never cost more than one bit per local element. `whole_masks` gathers
them one weight at a time for saving at any world size, `unpack_mask` reads such a whole mask
back, `apply_mask` / `reapply_masks` zero the pruned entries (again, after base weights are
reloaded), and `sparsity_report` counts the zeros over all ranks.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from dsee_scale import dist, zero
from dsee_scale.prune.targets import default_targets, plain_parameters, shard_numels


@dataclass
class ShardMask:
    """Pruned positions of one weight's local shard, bit-packed (1 = pruned)."""

    start: int
    numel: int
    bits: np.ndarray

    @classmethod
    def from_bool(cls, start: int, pruned: torch.Tensor | np.ndarray) -> ShardMask:
        """The mask of the shard that begins at flat index `start` of its weight, from the shard's
        flat pruned flags (a tensor on any device, or an array): packed on the host, where
        checkpoints save it."""
        flags = pruned.cpu().numpy() if isinstance(pruned, torch.Tensor) else pruned
        return cls(start, flags.size, np.packbits(flags))

    @classmethod
    def from_whole(cls, param: torch.Tensor, pruned: torch.Tensor) -> ShardMask:
        """This rank's part of a whole weight's pruned flags (any shape, flattened in order)."""
        start, stop = zero.shard_range(param)
        return cls.from_bool(start, pruned.reshape(-1)[start:stop])

    def dense(self) -> torch.Tensor:
        return torch.from_numpy(np.unpackbits(self.bits, count=self.numel).astype(bool))


def whole_masks(masks: dict[str, ShardMask]) -> dict[str, torch.Tensor]:
    """Each pruned weight's mask over its whole flattened shape, bit-packed (1 = pruned).
    Collective, one weight at a time: no rank holds more than one weight's bits."""
    return {name: torch.from_numpy(np.packbits(whole_mask(masks[name]))) for name in sorted(masks)}


def whole_mask(mask: ShardMask) -> np.ndarray:
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
    targets = default_targets(model, include, exclude, frozen_only)
    zeros = []
    for t in targets:
        with zero.shard_in_memory(t.param):
            zeros.append((zero.local_shard(t.param) == 0).sum())
    zeros = torch.stack(zeros)
    numels = torch.tensor(shard_numels(targets), device=zeros.device)
    counts = dist.all_reduce(torch.stack([zeros, numels], dim=1)).cpu()  # one copy to the host
    per_layer = {t.name: counts[i, 0].item() / max(1, counts[i, 1].item()) for i, t in enumerate(targets)}
    zeros, total = counts.sum(0).tolist()
    return {"total": zeros / max(1, total), "zeros": zeros, "numel": total, "per_layer": per_layer}
