"""Shard access: a ZeRO-3 parameter's full shape, this rank's shard, gathers, edits.

Everything here works without DeepSpeed or a process group too: then a parameter is its own
"local shard" and gathers are no-ops. Anything that reads a frozen weight goes through these
calls, one matrix or one shard at a time.
"""
from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator, Sequence

import torch
from torch import nn


def is_partitioned(param: torch.Tensor) -> bool:
    """True for a parameter that ZeRO-3 owns (it has a ds_id)."""
    return hasattr(param, "ds_id")


def zero3_active(module: nn.Module) -> bool:
    return any(is_partitioned(p) for p in module.parameters())


def full_shape(param: torch.Tensor) -> torch.Size:
    return param.ds_shape if is_partitioned(param) else param.shape


def full_numel(param: torch.Tensor) -> int:
    return param.ds_numel if is_partitioned(param) else param.numel()


def full_dtype(param: torch.Tensor) -> torch.dtype:
    if _on_nvme(param):  # its ds_tensor is a 1-element fp16 placeholder until swapped in
        return param.nvme_swapper.dtype
    return param.ds_tensor.dtype if is_partitioned(param) else param.dtype


def _partition_rank(param: torch.Tensor) -> int:
    import torch.distributed as dist

    return dist.get_rank(group=param.ds_process_group)


def is_whole(param: torch.Tensor) -> bool:
    """A partitioned parameter whose full copy is currently materialised (persistent or fetched)."""
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    return is_partitioned(param) and param.ds_status == ZeroParamStatus.AVAILABLE


def shard_range(param: torch.Tensor) -> tuple[int, int]:
    """[start, stop) of this rank's slice of the flattened full parameter, padding excluded."""
    if not is_partitioned(param):
        return 0, param.numel()
    size = param.ds_tensor.ds_numel
    start = min(_partition_rank(param) * size, param.ds_numel)
    return start, min(start + size, param.ds_numel)


def partition_of(param: torch.Tensor, whole: torch.Tensor) -> torch.Tensor:
    """This rank's partition of a whole tensor shaped like a ZeRO-3 parameter, zero-padded to
    the partition size (as DeepSpeed's local fp32 / optimizer-state setters take it)."""
    size = param.ds_tensor.ds_numel
    start = _partition_rank(param) * size
    part = whole.reshape(-1)[start : start + size]
    return torch.nn.functional.pad(part, (0, size - part.numel()))


def local_shard(param: torch.Tensor) -> torch.Tensor:
    """This rank's elements of the flattened parameter (padding excluded), as a view; read it
    inside `shard_in_memory` (a ZeRO-Infinity shard may be on NVMe)."""
    if not is_partitioned(param):
        return param.data.view(-1)
    start, stop = shard_range(param)
    return param.ds_tensor.data.view(-1).narrow(0, 0, stop - start)


def shard_device(param: torch.Tensor) -> torch.device:
    """Where this rank's shard lives when in memory (an NVMe shard is swapped into host memory)."""
    return param.ds_tensor.device if is_partitioned(param) else param.device


def _on_nvme(param: torch.Tensor) -> bool:
    """A ZeRO-Infinity partition that lives on NVMe and is not in memory now."""
    if not is_partitioned(param):
        return False
    from deepspeed.runtime.zero.partition_parameters import PartitionedParamStatus

    return param.ds_tensor.status == PartitionedParamStatus.NOT_AVAILABLE


def _kept_on_nvme(param: torch.Tensor) -> bool:
    """A partition whose home is NVMe (offload_param device nvme), in memory now or not."""
    return is_partitioned(param) and getattr(param.ds_tensor, "final_location", None) == "nvme"


def on_nvme_count(module: nn.Module) -> int:
    """Parameters whose shards ZeRO-Infinity keeps on NVMe (offload_param device nvme)."""
    return sum(1 for p in module.parameters() if _kept_on_nvme(p))


@contextlib.contextmanager
def shard_in_memory(param: torch.Tensor, modify: bool = False) -> Iterator[None]:
    """This rank's shard readable (and, with modify, writable) through `local_shard` in the
    block. A shard on NVMe (offload_param device nvme) is read into one of DeepSpeed's swap
    buffers, written back after the block if modified, and its buffer released: one shard in
    memory at a time. Others are in memory already."""
    if not _on_nvme(param):
        if modify and _kept_on_nvme(param):
            raise RuntimeError(f"{param.ds_summary()}: its NVMe shard is in a swap buffer already (the parameter is gathered); "
                               "an edit now would be dropped when DeepSpeed releases the buffer: edit it outside the gather")
        yield
        return
    swapper = param.nvme_swapper
    swapper.swap_in([param], async_op=False)
    try:
        yield
        if modify:
            swapper.swap_out_and_release([param])  # blocking write of the edited buffer
    finally:
        swapper.remove_partition_and_release_buffers([param])


@torch.no_grad()
def edit_local_shard(param: torch.Tensor, fn) -> None:
    """Apply fn(shard_view, start) in place to this rank's shard (on NVMe too); keep a whole
    copy in step.

    Editing ds_tensor of a parameter that is currently whole (persistent or fetched) does not
    change its full copy, so the same edit is made to that copy's slice too (unless the copy is
    a view of the weight's shared file). Collective for weights in shared memory.
    """
    start, stop = shard_range(param)
    shared = shares_memory(param)
    if shared:  # peers read this slice whenever they like: edit once every rank has stopped reading
        torch.distributed.barrier()
    with shard_in_memory(param, modify=True):
        fn(local_shard(param), start)
        if is_whole(param) and not _views_its_file(param):
            param.data.view(-1)[start:stop].copy_(local_shard(param))
            _sync_whole_copy(param)
    if shared:  # and read it again once every rank has edited
        torch.distributed.barrier()


def _sync_whole_copy(param: torch.Tensor) -> None:
    """After each rank edited its own slice of a whole copy, share the slices (all-gather)."""
    import torch.distributed as dist

    size = param.ds_tensor.ds_numel
    world = dist.get_world_size(group=param.ds_process_group)
    flat = torch.zeros(size * world, dtype=param.ds_tensor.dtype, device=param.ds_tensor.device)
    dist.all_gather_into_tensor(flat, param.ds_tensor.data.view(-1), group=param.ds_process_group)
    param.data.view(-1).copy_(flat[: param.ds_numel])


@torch.no_grad()
def gather_to(param: torch.Tensor, dst: int) -> torch.Tensor | None:
    """The whole flattened parameter (its dtype, on the communication device) on rank dst, None
    on the others: each rank sends its shard, so only dst receives a whole matrix (`gathered`
    gives every rank one). Collective."""
    from dsee_scale import dist

    if not is_partitioned(param) or not dist.initialized():  # every rank holds it whole
        return param.data.view(-1) if dist.rank() == dst else None
    import torch.distributed as tdist

    size = param.ds_tensor.ds_numel
    with shard_in_memory(param):
        mine = local_shard(param)
        part = torch.nn.functional.pad(mine.to(dist.comm_device()), (0, size - mine.numel()))
    flat = torch.empty(size * tdist.get_world_size(group=param.ds_process_group), dtype=part.dtype, device=part.device) if dist.rank() == dst else None
    tdist.gather(part, None if flat is None else list(flat.split(size)), dst=dst, group=param.ds_process_group)
    return None if flat is None else flat[: param.ds_numel]


@torch.no_grad()
def scatter_from(param: torch.Tensor, whole: torch.Tensor | None, src: int) -> torch.Tensor:
    """This rank's slice (`shard_range`) of `whole`, a flat tensor of the parameter's full numel
    and dtype (`full_dtype`) that only rank src holds: src sends each rank its shard's span, so no
    other rank receives a whole matrix (a rank of an unpartitioned parameter gets all of it).
    Collective."""
    from dsee_scale import dist

    if not dist.initialized():
        return whole
    if not is_partitioned(param):
        return dist.broadcast(whole if dist.rank() == src else torch.empty(param.numel(), dtype=param.dtype, device=param.device), src)
    import torch.distributed as tdist

    size = param.ds_tensor.ds_numel
    part = torch.empty(size, dtype=full_dtype(param), device=dist.comm_device())
    parts = None
    if dist.rank() == src:
        padded = torch.nn.functional.pad(whole.to(part.device), (0, size * tdist.get_world_size(group=param.ds_process_group) - whole.numel()))
        parts = list(padded.split(size))
    tdist.scatter(part, parts, src=src, group=param.ds_process_group)
    start, stop = shard_range(param)
    return part[: stop - start]


@contextlib.contextmanager
def gathered(params: Sequence[torch.Tensor], modify: bool = False) -> Iterator[None]:
    """Make full copies of params available; with modify=True, rank 0's edits are kept everywhere.

    A no-op for parameters that ZeRO-3 does not own.
    """
    params = [p for p in params if is_partitioned(p)]
    if not params:
        yield
        return
    import deepspeed

    if modify:  # a view of a shared file is every rank's copy: each rank edits a private one
        for param in params:
            if _views_its_file(param):
                param.partition()
    with deepspeed.zero.GatheredParameters(params, modifier_rank=0 if modify else None):
        yield
    if modify and any(shares_memory(p) for p in params):  # peers read the slices written back from now on
        torch.distributed.barrier()


def shares_memory(param: torch.Tensor) -> bool:
    """A frozen weight whose partitions lie side by side in one /dev/shm file (share_frozen_weights)."""
    return hasattr(param, "ds_shared_whole")


def _views_its_file(param: torch.Tensor) -> bool:
    """A shared weight that is whole as a view of its file (not as a private gather)."""
    return shares_memory(param) and is_whole(param) and param.data.data_ptr() == param.ds_shared_whole.data_ptr()


def _config_for_dtype(ds_config: dict | None, dtype: torch.dtype) -> dict:
    """ds_config with its bf16/fp16 flags saying `dtype`.

    zero.Init's own `dtype` argument cannot be trusted: DeepSpeed 0.19 replaces it by bf16 on
    any accelerator without fp16 support (AMD CPUs without mkldnn fp16), whatever was asked.
    With dtype=None the config's flags decide, identically on every host.
    """
    config = copy.deepcopy(ds_config) if ds_config else {}
    # New parameters (the adapters) stay in memory under ZeRO-Infinity: each zero.Init would
    # otherwise build its own NVMe swapper, with buffer_count × buffer_size of swap buffers, for
    # every adapted layer. (A CPU offload_param is kept.)
    if config.get("zero_optimization", {}).get("offload_param", {}).get("device") == "nvme":
        del config["zero_optimization"]["offload_param"]
    if not any(k in config for k in ("train_batch_size", "train_micro_batch_size_per_gpu")):
        config["train_micro_batch_size_per_gpu"] = 1  # DeepSpeed's config parser insists; Init never uses it
    for key, wanted in (("bf16", torch.bfloat16), ("fp16", torch.float16)):
        config[key] = {**config.get(key, {}), "enabled": dtype == wanted}
    return config


def init_context(ds_config: dict | None, dtype: torch.dtype, enabled: bool):
    """Context to create new parameters that ZeRO-3 partitions at once, in `dtype` (or a no-op)."""
    if not enabled:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.Init(config_dict_or_path=_config_for_dtype(ds_config, dtype), dtype=None)


def check_created_like(what: str, reference: torch.Tensor, params: Sequence[torch.Tensor], buffers: Sequence[torch.Tensor] = ()) -> None:
    """Refuse parameters not in the reference's dtype and device, and buffers not on its device."""
    dtype, device = full_dtype(reference), reference.device
    found = [(full_dtype(p), p.device) for p in params] + [(dtype, b.device) for b in buffers]
    for t_dtype, t_device in found:
        if t_dtype != dtype or t_device != device:
            raise RuntimeError(
                f"{what} was created as {t_dtype} on {t_device} beside a frozen weight in {dtype} on {device}: "
                f"this DeepSpeed version does not create parameters as dsee_scale asks zero.Init to; use deepspeed "
                f"0.19.8 (constraints.txt) or report the host line that .ci/run prints"
            )


def partition_new_parameters(module: nn.Module, ds_config: dict | None) -> None:
    """Hand parameters that were replaced by plain tensors (e.g. after structured pruning) back
    to ZeRO-3; parameters it already owns are left alone."""
    if all(is_partitioned(p) for p in module.parameters()):
        return
    import deepspeed

    dtype = next(full_dtype(p) for p in module.parameters())
    deepspeed.zero.Init(module=module, config_dict_or_path=_config_for_dtype(ds_config, dtype), dtype=None)
