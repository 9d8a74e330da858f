"""Rank/world helpers and collectives that also work in a single process without a process group."""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.distributed as dist


def initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if initialized() else 1


def local_rank() -> int:
    """Rank on this node, as the launcher (torchrun, deepspeed, accelerate, mpirun) reports it."""
    import os

    for key in ("LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID", "SLURM_LOCALID"):
        if key in os.environ:
            return int(os.environ[key])
    return 0


def local_world_size() -> int:
    """Ranks on this node, as the launcher reports it (one if it does not)."""
    import os

    for key in ("LOCAL_WORLD_SIZE", "LOCAL_SIZE", "OMPI_COMM_WORLD_LOCAL_SIZE", "MPI_LOCALNRANKS", "SLURM_NTASKS_PER_NODE"):
        if os.environ.get(key, "").isdigit():
            return int(os.environ[key])
    return 1


def is_main() -> bool:
    return rank() == 0


def comm_device() -> torch.device:
    """Where tensors must live for collectives: the accelerator's device (CPU under gloo)."""
    if not initialized() or dist.get_backend() == "gloo":
        return torch.device("cpu")
    from deepspeed.accelerator import get_accelerator

    return torch.device(get_accelerator().current_device_name())


def broadcast(tensor: torch.Tensor, src: int) -> torch.Tensor:
    """Broadcast from src; returns the received tensor (on the tensor's original device)."""
    if not initialized() or world_size() == 1:
        return tensor
    buf = tensor.to(comm_device())
    dist.broadcast(buf, src=src)
    return buf.to(tensor.device)


def all_reduce(tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """All-reduce a copy of tensor ('sum', 'max' or 'min'); returns it on the original device."""
    if not initialized() or world_size() == 1:
        return tensor
    ops = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}
    buf = tensor.to(comm_device())
    dist.all_reduce(buf, op=ops[op])
    return buf.to(tensor.device)


def barrier() -> None:
    if initialized():
        dist.barrier()


@contextmanager
def main_process_first() -> Iterator[None]:
    """Rank 0 runs the body (filling a cache, e.g. datasets' tokenized files), then the others run
    it and read that cache. No barrier on the way out of an exception: a failing rank exits and
    the launcher stops the others (no collective clean-up)."""
    if not is_main():
        barrier()
    yield
    if is_main():
        barrier()


def all_gather_object(obj) -> list:
    """Every rank's obj, in rank order (a one-element list without a process group)."""
    if not initialized() or world_size() == 1:
        return [obj]
    out = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def raise_if_any(error: str | None, kind: type[Exception] = RuntimeError) -> None:
    """Collective: if any rank has an error, every rank raises the first one, so no rank is
    left waiting alone in a later collective."""
    errors = [e for e in all_gather_object(error) if e]
    if errors:
        raise kind(errors[0])
