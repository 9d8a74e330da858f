"""The DSEE adapter: a frozen base layer plus (alpha/r)·B·A + S, S stored as indices + values.

The base layer's own forward is called (so ZeRO-3's module hooks fetch its partitioned weight);
W + ΔW is never rebuilt in the forward pass. S is a trainable vector of `nnz` values and an
int64 buffer of flat indices into the (out_features × in_features) weight: never dense.
"""
from __future__ import annotations

import enum
import math
import zlib

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from dsee_scale import zero


class MergeState(enum.Enum):
    UNMERGED = "unmerged"
    MERGED = "merged"  # W ← W + ΔW exactly: unmerge() restores W
    REMASKED = "remasked"  # merged with a pruned W's zeros kept zero: ΔW there is gone for good

    def __bool__(self) -> bool:
        return self is not MergeState.UNMERGED


def weight_is_transposed(base: nn.Module) -> bool:
    """GPT-2's Conv1D stores its weight as (in, out); nn.Linear as (out, in)."""
    return isinstance(base, Conv1D)


def base_dims(base: nn.Module) -> tuple[int, int]:
    """(out_features, in_features) of a Linear or Conv1D, read from ds_shape when partitioned."""
    rows, cols = zero.full_shape(base.weight)
    return (cols, rows) if weight_is_transposed(base) else (rows, cols)


def keep_base_rows(base: nn.Module, kept: torch.Tensor) -> None:
    """Keep output features `kept` of a Linear/Conv1D (weight and bias), as new frozen parameters."""
    if weight_is_transposed(base):
        base.weight = nn.Parameter(base.weight.data[:, kept].clone(), requires_grad=False)
        base.nf = kept.numel()
    else:
        base.weight = nn.Parameter(base.weight.data[kept].clone(), requires_grad=False)
        base.out_features = kept.numel()
    if getattr(base, "bias", None) is not None:
        base.bias = nn.Parameter(base.bias.data[kept].clone(), requires_grad=False)


def keep_base_cols(base: nn.Module, kept: torch.Tensor) -> None:
    """Keep input features `kept` of a Linear/Conv1D's weight (the bias is per output)."""
    if weight_is_transposed(base):
        base.weight = nn.Parameter(base.weight.data[kept].clone(), requires_grad=False)
    else:
        base.weight = nn.Parameter(base.weight.data[:, kept].clone(), requires_grad=False)
        base.in_features = kept.numel()


def _new_positions(kept: torch.Tensor, size: int) -> torch.Tensor:
    """Position after removal of each of `size` old indices: kept[i] → i, removed ones → -1."""
    position = torch.full((size,), -1, dtype=torch.long, device=kept.device)
    position[kept] = torch.arange(kept.numel(), device=kept.device)
    return position


def name_seed(seed: int, name: str) -> int:
    """A per-module seed that depends on the module's name only (not on build order or world size)."""
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63)


def split_support(index: torch.Tensor, slices: list[tuple[int, int]], in_features: int) -> list[torch.Tensor]:
    """A layer's flat Ω over the whole weight → one Ω per slice, relative to the slice (nnz each)."""
    n = index.numel() // len(slices)
    return [index[i * n : (i + 1) * n] - start * in_features for i, (start, _) in enumerate(slices)]


class DSEELayer(nn.Module):
    """Wraps a frozen Linear/Conv1D; adapts all its outputs, or only some row slices of a fused one.

    `slices` are (start, stop) ranges of output features, each with its own A (r × in) and B
    (len × r) and its own share of the sparse support. `support` holds flat indices into the
    (out × in) weight, nnz per slice, already chosen (see `dsee_scale.support`).
    """

    def __init__(
        self,
        base: nn.Module,
        rank: int,
        alpha: float,
        support: torch.Tensor,
        slices: list[tuple[int, int]] | None = None,
        dropout: float = 0.0,
        init: str = "lora",
        seed: int = 0,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.base = base
        self.out_features, self.in_features = base_dims(base)
        self.slices = [tuple(s) for s in (slices or [(0, self.out_features)])]
        self.rank = rank
        self.scaling = alpha / rank
        self.transposed = weight_is_transposed(base)
        self.merged = MergeState.UNMERGED
        dtype = dtype or zero.full_dtype(base.weight)
        device = base.weight.device  # under ZeRO-3: where the gathered weight will live
        n_rows = sum(stop - start for start, stop in self.slices)
        # Drawn on the CPU, then moved: the same seed gives the same adapters on every device.
        generator = torch.Generator(device="cpu").manual_seed(seed)
        a = torch.empty(len(self.slices) * rank, self.in_features, device="cpu")  # cpu: seeded draw, moved below
        nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=generator)
        b = torch.zeros(n_rows, rank, device="cpu")  # cpu: seeded draw, moved below
        values = torch.zeros(support.numel(), device="cpu")  # cpu: seeded draw, moved below
        if init == "normal":  # in place, so each value is rounded once even when zero.Init made the tensors bf16
            for t in (a, b, values):
                t.normal_(0.0, 0.02, generator=generator)
        self.lora_A = nn.Parameter(a.to(device=device, dtype=dtype))
        self.lora_B = nn.Parameter(b.to(device=device, dtype=dtype))
        self.sparse_values = nn.Parameter(values.to(device=device, dtype=dtype))
        self.register_buffer("sparse_index", support.to(device=device, dtype=torch.int64, copy=True))
        # Set after pruning (keep_mask): ΔW is trained and merged as ΔW ⊙ M, so the merged weight
        # is exactly as sparse as the pruned W. Whole (storage layout) on every rank; not saved
        # with the adapter (checkpoints and the run's masks restore it).
        self.register_buffer("delta_mask", None, persistent=False)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def extra_repr(self) -> str:
        return (
            f"in={self.in_features}, out={self.out_features}, rank={self.rank}, "
            f"slices={self.slices}, nnz={self.sparse_index.numel()}, merged={self.merged.value}"
        )

    def _low_rank(self, x: torch.Tensor) -> torch.Tensor:
        """(alpha/r)·B·A·x for every slice, zero elsewhere, over all out_features."""
        h = x @ self.lora_A.t()
        pieces, cursor, row = [], 0, 0
        for i, (start, stop) in enumerate(self.slices):
            if start > cursor:
                pieces.append(x.new_zeros(*x.shape[:-1], start - cursor))
            b = self.lora_B[row : row + stop - start]
            pieces.append(h[..., i * self.rank : (i + 1) * self.rank] @ b.t())
            cursor, row = stop, row + stop - start
        if cursor < self.out_features:
            pieces.append(x.new_zeros(*x.shape[:-1], self.out_features - cursor))
        out = pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=-1)
        return out * self.scaling

    def adapter_parameters(self) -> list[nn.Parameter]:
        """The trainable tensors (A, B, S values): what is gathered, kept whole and optimised."""
        return [self.lora_A, self.lora_B, self.sparse_values]

    def _support_coordinates(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(row, column) in the (out × in) weight of each flat index of Ω."""
        return self.sparse_index // self.in_features, self.sparse_index % self.in_features

    def _keep_support(self, alive: torch.Tensor, index: torch.Tensor) -> None:
        """Keep the sparse entries where `alive`, with their new flat indices `index[alive]`."""
        self.sparse_values = nn.Parameter(self.sparse_values.data[alive].clone())
        self.sparse_index = index[alive]

    def _sparse(self, x: torch.Tensor) -> torch.Tensor:
        """S·x with S given by (sparse_index, sparse_values): gather inputs, scatter-add outputs."""
        rows, cols = self._support_coordinates()
        contrib = x.index_select(-1, cols) * self.sparse_values
        out = x.new_zeros(*x.shape[:-1], self.out_features)
        return out.index_add(-1, rows, contrib)

    def keep_mask(self, mask: torch.Tensor | None) -> None:
        """Confine ΔW to the backbone's surviving weights (mask: bool, True = kept, in the base
        weight's storage layout); None lifts it."""
        self.delta_mask = None if mask is None else mask.to(device=self.sparse_index.device, dtype=torch.bool)

    def _slice_factors(self, a: torch.Tensor, b: torch.Tensor):
        """(start, stop, A_i, B_i) of each adapted slice: its rank-r block of A, its rows of B."""
        row = 0
        for i, (start, stop) in enumerate(self.slices):
            yield start, stop, a[i * self.rank : (i + 1) * self.rank], b[row : row + stop - start]
            row += stop - start

    def _masked_delta(self, a: torch.Tensor, b: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """ΔW ⊙ M (out × in) from the factors given, differentiable in them."""
        delta = a.new_zeros(self.out_features, self.in_features)
        for start, stop, a_i, b_i in self._slice_factors(a, b):
            delta[start:stop] = (b_i @ a_i) * self.scaling
        rows, cols = self._support_coordinates()
        delta = delta.index_put((rows, cols), values, accumulate=True)
        return delta * (self.delta_mask.t() if self.transposed else self.delta_mask)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if self.merged:
            return y
        h = self.dropout(x)
        if self.delta_mask is not None:
            return y + MaskedDeltaLinear.apply(h, self, *self.adapter_parameters()).to(y.dtype)
        delta = self._low_rank(h)
        if self.sparse_index.numel():
            delta = delta + self._sparse(h)
        return y + delta.to(y.dtype)

    @torch.no_grad()
    def delta_rows(self, first: int, last: int) -> torch.Tensor:
        """Rows [first, last) of ΔW in the base weight's storage layout (ΔWᵀ for Conv1D), fp32.

        The one ΔW computation (merges, exports, pruning scores; ⊙ M under keep_mask); only the
        rows asked for are formed. Call inside `zero.gathered` of the adapter under ZeRO-3.
        """
        a, b = self.lora_A.detach().float(), self.lora_B.detach().float()
        block = torch.zeros(last - first, self.out_features if self.transposed else self.in_features, device=a.device)
        for start, stop, a_i, b_i in self._slice_factors(a, b):
            if self.transposed:  # storage rows are input features
                block[:, start:stop] = (a_i[:, first:last].t() @ b_i.t()) * self.scaling
            else:
                lo, hi = max(first, start), min(last, stop)
                if lo < hi:
                    block[lo - first : hi - first] = (b_i[lo - start : hi - start] @ a_i) * self.scaling
        rows, cols = self._support_coordinates()
        r, c = (cols, rows) if self.transposed else (rows, cols)
        keep = (r >= first) & (r < last)
        block.index_put_((r[keep] - first, c[keep]), self.sparse_values.detach().float()[keep], accumulate=True)
        return block if self.delta_mask is None else block * self.delta_mask[first:last]

    def delta_weight(self) -> torch.Tensor:
        """Dense ΔW (out × in) of this one matrix, fp32; call inside `zero.gathered` under ZeRO-3."""
        rows = self.delta_rows(0, self.in_features if self.transposed else self.out_features)
        return rows.t() if self.transposed else rows

    def support_per_slice(self) -> list[torch.Tensor]:
        """Ω of each adapted slice, as flat indices relative to the slice."""
        return split_support(self.sparse_index, self.slices, self.in_features)

    def keep_rows(self, kept: torch.Tensor) -> None:
        """Keep output features `kept` (sorted, on the weight's device) of W, B and S.

        Structured pruning's cut, kept here because it rebuilds the layer's own layout: each
        slice shrinks to its kept rows (a slice left empty goes, with its block of A) and Ω is
        re-indexed. Call with base and adapter gathered under ZeRO-3; the new parameters are
        plain tensors until re-partitioned.
        """
        assert self.delta_mask is None, "structured removal comes before unstructured masks"
        keep_base_rows(self.base, kept)
        position = _new_positions(kept, self.out_features)
        a_rows, b_rows, slices, row = [], [], [], 0
        for i, (start, stop) in enumerate(self.slices):
            inside = position[start:stop]
            alive = torch.nonzero(inside >= 0).flatten()
            if alive.numel():
                b_rows.append(row + alive)
                slices.append((int(inside[alive[0]]), int(inside[alive[-1]]) + 1))
                a_rows.append(torch.arange(i * self.rank, (i + 1) * self.rank, device=kept.device))
            row += stop - start
        self.lora_A = nn.Parameter(self.lora_A.data[torch.cat(a_rows)].clone())
        self.lora_B = nn.Parameter(self.lora_B.data[torch.cat(b_rows)].clone())
        rows, cols = self._support_coordinates()
        self._keep_support(position[rows] >= 0, position[rows] * self.in_features + cols)
        self.slices, self.out_features = slices, kept.numel()

    def keep_cols(self, kept: torch.Tensor) -> None:
        """Keep input features `kept` (sorted, on the weight's device) of W, A and S; as keep_rows."""
        assert self.delta_mask is None, "structured removal comes before unstructured masks"
        keep_base_cols(self.base, kept)
        position = _new_positions(kept, self.in_features)
        self.lora_A = nn.Parameter(self.lora_A.data[:, kept].clone())
        rows, cols = self._support_coordinates()
        self._keep_support(position[cols] >= 0, rows * kept.numel() + position[cols])
        self.in_features = kept.numel()

    @torch.no_grad()
    def merged_weight(self, sign: float = 1.0, remask: bool = False) -> torch.Tensor:
        """W ± ΔW in the base weight's own layout (call with W and the adapter gathered).
        remask=True keeps the zeros of a pruned W zero."""
        weight = self.base.weight.data
        delta = self.delta_weight().to(weight.dtype)
        merged = weight + sign * (delta.t() if self.transposed else delta)
        return merged.masked_fill(weight == 0, 0) if remask else merged

    @torch.no_grad()
    def _add_delta(self, sign: float, remask: bool = False) -> None:
        with zero.gathered([self.base.weight, *self.adapter_parameters()], modify=True):
            self.base.weight.data.copy_(self.merged_weight(sign, remask))

    def merge(self, remask: bool = False) -> None:
        """W ← W + ΔW, after which forward is the base layer's alone. remask=True keeps the
        zeros of a pruned W zero (the merged weight is exactly as sparse; not reversible)."""
        if not self.merged:
            self._add_delta(+1.0, remask)
            self.merged = MergeState.REMASKED if remask else MergeState.MERGED

    def unmerge(self) -> None:
        if self.merged is MergeState.REMASKED:
            raise RuntimeError("a merge with remask=True dropped ΔW at pruned entries and cannot be undone")
        if self.merged:
            self._add_delta(-1.0)
            self.merged = MergeState.UNMERGED


class MaskedDeltaLinear(torch.autograd.Function):
    """x·(ΔW ⊙ M)ᵀ, the re-tune forward under keep_mask, in bounded memory: the dense ΔW ⊙ M
    (one out × in matrix) is formed for one layer at a time, in forward and again in backward,
    instead of autograd keeping one per adapted layer from forward until backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, layer: DSEELayer, a: torch.Tensor, b: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        ctx.layer = layer
        ctx.save_for_backward(x, a, b, values)
        return nn.functional.linear(x, layer._masked_delta(a, b, values))

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, *factors = ctx.saved_tensors
        leaves = [t.detach().requires_grad_(need) for t, need in zip(factors, ctx.needs_input_grad[2:])]
        with torch.enable_grad():
            delta = ctx.layer._masked_delta(*leaves)
        grad_x = grad @ delta.detach() if ctx.needs_input_grad[0] else None
        wanted = [t for t in leaves if t.requires_grad]
        grads = iter(torch.autograd.grad(delta, wanted, grad.reshape(-1, grad.shape[-1]).t() @ x.reshape(-1, x.shape[-1])) if wanted else ())
        return grad_x, None, *(next(grads) if t.requires_grad else None for t in leaves)
