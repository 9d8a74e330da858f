"""N:M semi-structured sparsity: every M consecutive weights along the input dimension keep N.

2:4 is the pattern NVIDIA's sparse tensor cores (Ampere and later) multiply at up to twice the
dense rate; PyTorch exposes them as `SparseSemiStructuredTensor`. Unstructured sparsity has no
such hardware path, so this is how a pruned model becomes faster to serve on a GPU.
"""
from __future__ import annotations

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D


def parse_pattern(pattern: str) -> tuple[int, int]:
    """'2:4' -> (2, 4)."""
    try:
        n, m = (int(part) for part in pattern.split(":"))
    except ValueError:
        raise ValueError(f"N:M pattern {pattern!r} is not two integers like '2:4'") from None
    if not 0 < n < m:
        raise ValueError(f"N:M pattern {pattern!r} must keep 0 < N < M weights per group")
    return n, m


def input_dim(module: nn.Module) -> int:
    """Conv1D stores its weight as (in, out), nn.Linear as (out, in)."""
    return 0 if isinstance(module, Conv1D) else 1


def check_groups(size: int, m: int) -> None:
    if size % m:
        raise ValueError(f"input dimension of size {size} is not a multiple of M={m}; exclude this weight from N:M pruning")


def nm_keep(scores: torch.Tensor, n: int, m: int, dim: int) -> torch.Tensor:
    """Keep-mask holding the N highest scores of every M consecutive entries along `dim`.

    Ties go to the lower index (a stable sort), so every device and rank picks the same weights.
    """
    check_groups(scores.shape[dim], m)
    moved = scores.movedim(dim, -1)
    groups = moved.reshape(-1, m)
    order = groups.sort(dim=1, descending=True, stable=True).indices
    keep = torch.zeros_like(groups, dtype=torch.bool).scatter_(1, order[:, :n], True)
    return keep.reshape(moved.shape).movedim(-1, dim)


def is_nm_sparse(weight: torch.Tensor, n: int, m: int, dim: int) -> bool:
    """Every group of M along `dim` has at most N non-zeros."""
    if weight.shape[dim] % m:
        return False
    return bool(((weight.movedim(dim, -1).reshape(-1, m) != 0).sum(dim=1) <= n).all())


def to_semi_structured(model: nn.Module) -> list[str]:
    """Swap every 2:4-sparse Linear / Conv1D weight for a `SparseSemiStructuredTensor`, in place.

    Needs a CUDA GPU with sparse tensor cores and fp16/bf16 weights. A Conv1D becomes an
    nn.Linear holding its transposed weight (the sparse kernels reduce along the last dimension).
    Returns the names of the swapped modules; dense or shared weights (a tied LM head) stay.
    """
    from torch.sparse import to_sparse_semi_structured

    counts: dict[int, int] = {}
    for module in model.modules():
        for p in module.parameters(recurse=False):
            counts[id(p)] = counts.get(id(p), 0) + 1
    swapped = []
    for name, module in list(model.named_modules()):
        if not isinstance(module, (nn.Linear, Conv1D)) or counts.get(id(module.weight), 0) > 1:
            continue
        if not is_nm_sparse(module.weight, 2, 4, input_dim(module)):
            continue
        weight = module.weight.detach()
        if isinstance(module, Conv1D):
            weight = weight.t()
            linear = nn.Linear(weight.shape[1], weight.shape[0], bias=module.bias is not None, device=weight.device, dtype=weight.dtype)
            if module.bias is not None:
                linear.bias = module.bias
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, child, linear)
            module = linear
        module.weight = nn.Parameter(to_sparse_semi_structured(weight.contiguous()), requires_grad=False)
        swapped.append(name)
    return swapped
