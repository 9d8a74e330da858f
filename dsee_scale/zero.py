"""The one place that knows DeepSpeed ZeRO-3 internals (ds_tensor, ds_shape, ds_status, ...).

Everything works without DeepSpeed or a process group too: then a parameter is its own
"local shard" and gathers are no-ops. A DeepSpeed upgrade should be this file's work alone.
"""
from __future__ import annotations

import contextlib
import copy
import os
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
    change its full copy, so the same edit is made to that copy's slice too.
    """
    start, stop = shard_range(param)
    with shard_in_memory(param, modify=True):
        fn(local_shard(param), start)
        if is_partitioned(param) and is_whole(param):
            param.data.view(-1)[start:stop].copy_(local_shard(param))
            _sync_whole_copy(param)


def _sync_whole_copy(param: torch.Tensor) -> None:
    """After each rank edited its own slice of a whole copy, share the slices (all-gather)."""
    import torch.distributed as dist

    size = param.ds_tensor.ds_numel
    world = dist.get_world_size(group=param.ds_process_group)
    flat = torch.zeros(size * world, dtype=param.ds_tensor.dtype, device=param.ds_tensor.device)
    dist.all_gather_into_tensor(flat, param.ds_tensor.data.view(-1), group=param.ds_process_group)
    param.data.view(-1).copy_(flat[: param.ds_numel])


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

    with deepspeed.zero.GatheredParameters(params, modifier_rank=0 if modify else None):
        yield


def whole_model_fits(module: nn.Module) -> bool:
    """Every rank can hold a whole copy of `module` (decided on all ranks together): on a GPU
    within 80% of its free memory, on a CPU host within 80% of what is free for its local ranks."""
    from deepspeed.accelerator import get_accelerator

    from dsee_scale import dist

    if on_nvme_count(module):  # its whole copy would need a swap buffer per NVMe weight at once
        return False
    accelerator = get_accelerator()
    need = sum(full_numel(p) * full_dtype(p).itemsize for p in module.parameters())
    sharing = dist.local_world_size() if accelerator.device_name() == "cpu" else 1  # a CPU host's memory serves all its ranks
    fits = need * sharing <= 0.8 * accelerator.available_memory()
    return bool(dist.all_reduce(torch.tensor([int(fits)], device=next(module.parameters()).device), op="min").item())


@contextlib.contextmanager
def whole_model(engine) -> Iterator[None]:
    """The engine's model gathered whole on every rank, ZeRO-3's fetch hooks removed: forwards
    without collectives, so each rank generates at its own pace (no synced_gpus, no per-token
    layer fetches); partitioned and hooked again after. What TRL and DeepSpeed-Chat do for RLHF
    generation; the hooks are DeepSpeed's private parameter_offload API. Check whole_model_fits first."""
    offload = getattr(engine.optimizer, "parameter_offload", None)
    if offload is None:  # not ZeRO-3: the model is whole already
        yield
        return
    module = offload.module
    engine.empty_partition_cache()  # nothing prefetched or half-released from the last forward
    with gathered(list(module.parameters())):
        for param in module.parameters():
            param.ds_active_sub_modules.clear()
        offload._remove_module_hooks()
        offload.forward_hooks.clear()
        offload.backward_hooks.clear()
        try:
            yield
        finally:
            offload.setup_zero_stage3_hooks()


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


def keep_whole(engine, params: Sequence[torch.Tensor]) -> None:
    """Keep small trainable parameters (the adapters) whole on every rank, whatever the
    persistence threshold: no rank ever waits on a gather for them.

    DeepSpeed 0.19.8 has no public way to make chosen parameters persistent: its
    stage3_param_persistence_threshold is one size limit for every parameter, frozen ones too.
    So they are marked as its own threshold marks them (ds_persist) and added to the ZeRO-3
    optimizer's persistent_parameters, which it re-gathers after every step and checkpoint.
    Both are private: a DeepSpeed without them is refused rather than left with gathers.
    """
    params = [p for p in params if is_partitioned(p) and not getattr(p, "ds_persist", False)]
    if not params:
        return
    registry = getattr(getattr(engine, "optimizer", None), "persistent_parameters", None)
    if registry is None or not all(hasattr(p, "ds_persist") for p in params):
        import deepspeed

        raise RuntimeError(
            f"deepspeed {deepspeed.__version__} has no ZeRO-3 persistent_parameters / ds_persist: dsee_scale cannot keep "
            f"the adapters whole on every rank; use deepspeed 0.19.8 (constraints.txt)"
        )
    for p in params:
        p.ds_persist = True
        registry.append(p)
    params[0].all_gather(params)


def partition_new_parameters(module: nn.Module, ds_config: dict | None) -> None:
    """Hand parameters that were replaced by plain tensors (e.g. after structured pruning) back
    to ZeRO-3; parameters it already owns are left alone."""
    if all(is_partitioned(p) for p in module.parameters()):
        return
    import deepspeed

    dtype = next(full_dtype(p) for p in module.parameters())
    deepspeed.zero.Init(module=module, config_dict_or_path=_config_for_dtype(ds_config, dtype), dtype=None)


class _FetchThroughSharedMemory:
    """deepspeed.comm as ZeRO-3's parameter code sees it, except that its all-gathers of CPU
    tensors over the whole world (every weight fetch) are sums in DeepSpeed's shared-memory
    kernel: each rank puts its shard in an output filled with -0.0, the identity of IEEE
    addition, so the sum is the gathered weight bit for bit (but for the sign of a zero among a
    buffer's last < 8 elements, which the kernel's scalar tail sums from +0.0). Anything else
    goes to deepspeed.comm unchanged."""

    def __init__(self, comm, world: int, rank: int, kernel_level: int) -> None:
        self._comm, self._world, self._rank, self._kernel_level = comm, world, rank, kernel_level

    def __getattr__(self, name: str):
        return getattr(self._comm, name)

    def allgather_fn(self, output_tensor: torch.Tensor, input_tensor: torch.Tensor, group=None, async_op: bool = False, **kwargs):
        n = input_tensor.numel()
        in_kernel = (output_tensor.device.type == "cpu" and output_tensor.is_contiguous() and output_tensor.numel() == n * self._world
                     and input_tensor.dtype == output_tensor.dtype and (group is None or self._comm.get_world_size(group=group) == self._world)
                     and (output_tensor.dtype == torch.float32 or (output_tensor.dtype == torch.bfloat16 and self._kernel_level >= 2)))
        if not in_kernel:
            return self._comm.allgather_fn(output_tensor, input_tensor, group=group, async_op=async_op, **kwargs)
        flat = output_tensor.view(-1)
        flat[: self._rank * n].fill_(-0.0)  # x + -0.0 is x, bit for bit, -0.0 too
        flat[(self._rank + 1) * n:].fill_(-0.0)
        flat[self._rank * n: (self._rank + 1) * n].copy_(input_tensor.reshape(-1))
        torch.ops.deepspeed.inference_all_reduce_(flat)
        return _Done() if async_op else None


class _Done:
    """The handle of a collective that has already completed."""

    def wait(self, **kwargs) -> None:
        return None


def fetch_through_shared_memory() -> bool:
    """On CPU ranks that share one machine, ZeRO-3 fetches weights through shared memory.

    gloo's all-gather goes through TCP, one copy per hop, with the kernel's work on the ranks'
    own cores; DeepSpeed's shared-memory all-reduce (built for its CPU inference) sums 48 MB
    in 18 ms on 2 ranks here where gloo's all-gather takes 95 ms. DeepSpeed 0.19.8 reaches the
    kernel only from inference, so ZeRO-3's module-level `dist` is wrapped (a DeepSpeed without
    these names keeps gloo). DeepSpeed's comms logger does not see these fetches. Returns
    whether the shared-memory path is on.
    """
    import deepspeed.comm as comm
    from deepspeed.runtime.zero import partition_parameters

    if isinstance(partition_parameters.dist, _FetchThroughSharedMemory):
        return True
    backend = getattr(comm.comm, "cdb", None)
    level = getattr(backend, "shm_vector_kernel_level", 0)
    world = comm.get_world_size()
    local = world > 1 and int(os.environ.get("LOCAL_SIZE", 0)) == world  # DeepSpeed's kernel maps its peers only then
    if not (local and level >= 1 and getattr(backend, "shm_comm_op", None) is not None and hasattr(torch.ops.deepspeed, "inference_all_reduce_")
            and partition_parameters.dist is comm and hasattr(comm, "allgather_fn")):
        return False
    partition_parameters.dist = _FetchThroughSharedMemory(comm, world, comm.get_rank(), level)
    return True
