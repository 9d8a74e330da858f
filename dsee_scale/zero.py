"""The one place that knows DeepSpeed ZeRO-3 internals (ds_tensor, ds_shape, ds_status, ...).

Everything works without DeepSpeed or a process group too: then a parameter is its own
"local shard" and gathers are no-ops. A DeepSpeed upgrade should be this file's work alone.
"""
from __future__ import annotations

import contextlib
import copy
import os
import secrets
from collections.abc import Callable, Iterator, Sequence

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


def whole_model_fits(module: nn.Module) -> bool:
    """Every rank can hold a whole copy of `module` (decided on all ranks together): on a GPU
    within 80% of its free memory, on a CPU host within 80% of what is free for its local ranks."""
    from deepspeed.accelerator import get_accelerator

    from dsee_scale import dist

    if on_nvme_count(module):  # its whole copy would need a swap buffer per NVMe weight at once
        return False
    accelerator = get_accelerator()
    need = sum(full_numel(p) * full_dtype(p).itemsize for p in module.parameters() if not shares_memory(p))  # shared: whole already
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
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    module = offload.module
    engine.empty_partition_cache()  # nothing prefetched or half-released from the last forward
    _view_whole([p for p in module.parameters() if shares_memory(p)], ZeroParamStatus.AVAILABLE)
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
    optimizer's persistent_parameters, which it re-gathers after every step and checkpoint; a
    later engine on the same model gets them added again. Every parameter of that list, DeepSpeed's
    own too, is then re-gathered in one collective (_regather_coalesced). Both are private: a
    DeepSpeed without them is refused rather than left with gathers.
    """
    params = [p for p in params if is_partitioned(p)]
    registry = getattr(getattr(engine, "optimizer", None), "persistent_parameters", None)
    if params and (registry is None or not all(hasattr(p, "ds_persist") for p in params)):
        import deepspeed

        raise RuntimeError(
            f"deepspeed {deepspeed.__version__} has no ZeRO-3 persistent_parameters / ds_persist: dsee_scale cannot keep "
            f"the adapters whole on every rank; use deepspeed 0.19.8 (constraints.txt)"
        )
    registered = {id(p) for p in registry or []}
    added = [p for p in params if id(p) not in registered]
    for p in added:
        p.ds_persist = True
        registry.append(p)
    _regather_coalesced(registry or [])
    if added:
        added[0].all_gather(added)


def _regather_coalesced(params: Sequence[torch.Tensor]) -> None:
    """ZeRO-3 gathers its persistent parameters again after every optimizer step with one
    collective per tensor (stage 3's _post_step; on CPU ranks each a gloo round trip, see
    RESULTS.md). Their synchronous all_gather is made one coalesced fetch per dtype."""
    for param in params:
        if not hasattr(param, "ds_gather_each"):
            param.ds_gather_each = param.all_gather
            param.all_gather = _coalesced_all_gather(param)


def _coalesced_all_gather(param: torch.Tensor) -> Callable:
    """`param`'s all_gather (DeepSpeed's `_all_gather` for a list led by `param`) as one ZeRO-3
    fetch per dtype, by its own unwrapped all_gather_coalesced: a shared frozen weight in the
    list gets a private copy, as from DeepSpeed's. Asynchronous gathers, hpZ's secondary
    partitions (stale right after a step) and quantized weights keep DeepSpeed's path."""
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    def all_gather(param_list: Sequence[torch.Tensor] | None = None, async_op: bool = False, hierarchy: int = 0):
        params = list(dict.fromkeys([param] if param_list is None else param_list))
        if async_op or any(getattr(p, "ds_secondary_tensor", None) is not None or hasattr(p.ds_tensor, "ds_quant_scale") for p in params):
            return param.ds_gather_each(param_list, async_op=async_op, hierarchy=hierarchy)
        by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
        for p in params:
            if p.ds_status == ZeroParamStatus.NOT_AVAILABLE:
                by_dtype.setdefault(full_dtype(p), []).append(p)
        fetch = getattr(param, "ds_gather_unshared", param.all_gather_coalesced)
        for released in by_dtype.values():  # in the list's order, the same on every rank
            fetch(released).wait()
        return None

    return all_gather


def partition_new_parameters(module: nn.Module, ds_config: dict | None) -> None:
    """Hand parameters that were replaced by plain tensors (e.g. after structured pruning) back
    to ZeRO-3; parameters it already owns are left alone."""
    if all(is_partitioned(p) for p in module.parameters()):
        return
    import deepspeed

    dtype = next(full_dtype(p) for p in module.parameters())
    deepspeed.zero.Init(module=module, config_dict_or_path=_config_for_dtype(ds_config, dtype), dtype=None)


FETCH_CHUNK_BYTES = 16 << 20  # per half of each rank's /dev/shm buffer


class _FetchThroughSharedMemory:
    """deepspeed.comm as ZeRO-3's parameter code sees it, except that its all-gathers and sums of
    CPU tensors over the whole world (every weight fetch) go through shared memory: each rank
    copies its part into its own /dev/shm buffer and, after a barrier, reads its peers' parts out
    of theirs, bit for bit. Data moves in chunks through two halves of each buffer, used in turn:
    a rank writes a half again only after the next chunk's barrier, which its peers reach once
    they have read it. Anything else goes to deepspeed.comm unchanged. Collective to create."""

    def __init__(self, comm, world: int, rank: int, chunk_bytes: int = FETCH_CHUNK_BYTES) -> None:
        self._comm, self._world, self._rank, self._chunk = comm, world, rank, chunk_bytes
        path = [f"/dev/shm/dsee_fetch_{_shm_nonce()}_{r}" for r in range(world)]
        own = self._map(path[rank])
        torch.distributed.barrier()  # every buffer exists
        self._buffers = [own if r == rank else self._map(path[r]) for r in range(world)]
        torch.distributed.barrier()  # every rank has mapped every buffer: the names can go (tmpfs is RAM)
        os.unlink(path[rank])
        self._turn = 0

    def _map(self, path: str) -> torch.Tensor:
        return torch.from_file(path, shared=True, size=2 * self._chunk, dtype=torch.uint8)

    def __getattr__(self, name: str):
        return getattr(self._comm, name)

    def _whole_world_cpu(self, *tensors: torch.Tensor, group) -> bool:
        return (all(t.device.type == "cpu" and t.is_contiguous() for t in tensors)
                and (group is None or self._comm.get_world_size(group=group) == self._world))

    def _exchange(self, own: torch.Tensor) -> Iterator[tuple[slice, int, torch.Tensor]]:
        """Each chunk of this rank's bytes `own`, as (its place, a peer, that peer's chunk)."""
        for start in range(0, own.numel(), self._chunk):
            place = slice(start, min(start + self._chunk, own.numel()))
            half = self._chunk * (self._turn % 2)
            self._turn += 1
            self._buffers[self._rank][half: half + place.stop - start].copy_(own[place])
            torch.distributed.barrier()  # not deepspeed.comm's: its comms logger would time ~180 a step
            for peer in range(self._world):
                if peer != self._rank:
                    yield place, peer, self._buffers[peer][half: half + place.stop - start]

    def allgather_fn(self, output_tensor: torch.Tensor, input_tensor: torch.Tensor, group=None, async_op: bool = False, **kwargs):
        if not (self._whole_world_cpu(output_tensor, input_tensor, group=group) and input_tensor.dtype == output_tensor.dtype
                and output_tensor.numel() == input_tensor.numel() * self._world):
            return self._comm.allgather_fn(output_tensor, input_tensor, group=group, async_op=async_op, **kwargs)
        shard = input_tensor.view(-1).view(torch.uint8)
        out = output_tensor.view(-1).view(torch.uint8).view(self._world, -1)
        for place, peer, chunk in self._exchange(shard):
            out[peer, place].copy_(chunk)
        if out[self._rank].data_ptr() != shard.data_ptr():  # ZeRO-3 gathers in place: its input is the output's own slice
            out[self._rank].copy_(shard)
        return _Done() if async_op else None

    def all_reduce(self, tensor: torch.Tensor, op=None, group=None, async_op: bool = False, **kwargs):
        """ZeRO-3's fetch by all-reduce (stage3_use_all_reduce_for_fetch_params), the only sum in
        its parameter code: every rank's buffer is zeros but for its own shards, so the sum is
        the bitwise OR, -0.0 kept."""
        if not (self._whole_world_cpu(tensor, group=group) and op in (None, self._comm.ReduceOp.SUM)):
            op = self._comm.ReduceOp.SUM if op is None else op
            return self._comm.all_reduce(tensor, op=op, group=group, async_op=async_op, **kwargs)
        flat = tensor.view(-1).view(torch.uint8)
        for place, _, chunk in self._exchange(flat):
            flat[place].bitwise_or_(chunk)
        return _Done() if async_op else None


class _Done:
    """The handle of a collective that has already completed."""

    def wait(self, **kwargs) -> None:
        return None


def fetch_through_shared_memory() -> bool:
    """On CPU ranks that share one machine, ZeRO-3 fetches weights through shared memory.

    gloo's all-gather goes through TCP, one copy per hop, with the operating system's work on the
    ranks' own cores (48 MB in 95 ms on 2 ranks here); through shared memory a shard is copied in
    once and out once per peer. DeepSpeed 0.19.8 has no shared-memory all-gather on CPU, so
    ZeRO-3's module-level `dist` is wrapped (a DeepSpeed whose partition_parameters has no `dist`
    or comm no `allgather_fn` keeps gloo).
    With 2 ranks ZeRO-3 also fetches by all-reduce unless a config says otherwise
    (stage3_use_all_reduce_for_fetch_params, a process-wide default from here on): it leaves the
    weights where they were gathered, where its coalesced all-gather copies them into a fresh
    buffer once more. A sum moves each rank's whole buffer to every peer, so with more ranks it
    moves more than the all-gather and its copy together. Collective: every rank calls it.
    DeepSpeed's comms logger does not see these fetches. Returns whether the path is on.
    """
    import deepspeed.comm as comm
    from deepspeed.runtime.zero import partition_parameters
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    if isinstance(partition_parameters.dist, _FetchThroughSharedMemory):
        return True
    world = comm.get_world_size()
    if not (_ranks_share_one_machine() and partition_parameters.dist is comm and hasattr(comm, "allgather_fn")):
        return False
    if not _shm_room_everywhere(2 * world * FETCH_CHUNK_BYTES):  # 2 chunks per rank
        return False
    partition_parameters.dist = _FetchThroughSharedMemory(comm, world, comm.get_rank())
    if world == 2:
        DeepSpeedZeroConfig.model_fields["use_all_reduce_for_fetch_params"].default = True
        DeepSpeedZeroConfig.model_rebuild(force=True)
    return True


def _ranks_share_one_machine() -> bool:
    """More than one rank, all on this machine (the launcher's local world size is the world)."""
    from dsee_scale import dist

    return dist.world_size() > 1 and dist.local_world_size() == dist.world_size()


def can_share_frozen_weights() -> bool:
    """CPU ranks, all on this machine: where share_frozen_weights can hold frozen weights once for
    all (a GPU fetches onto itself)."""
    from deepspeed.accelerator import get_accelerator

    return _ranks_share_one_machine() and get_accelerator().device_name() == "cpu"


def hook_per_block(blocks: Sequence[nn.Module]) -> None:
    """ZeRO-3 hooks each transformer block instead of each of its ~15 layers (DeepSpeed's leaf
    modules; before deepspeed.initialize): a block's weights are fetched in one go and its
    gradients reduced once, after its backward, instead of from a hook per tensor. Meant for
    frozen weights in shared memory, whose fetches are free, so that ZeRO-3's per-module and
    per-gradient Python is what is left of a step's overhead; so only blocks with frozen weights.
    Where ZeRO-3 fetches the weights, a block at a time gains nothing and holds more (GPT-2-medium
    on 2 CPU ranks: 1 GB more per rank, no faster). The first block also computes a
    gradient for its input that nothing uses (see _input_needs_grad)."""
    from deepspeed.utils import set_z3_leaf_module

    for block in blocks:
        if all(p.requires_grad for p in block.parameters()):
            continue
        set_z3_leaf_module(block, True)
        if not hasattr(block, "dsee_input_hook"):  # once, however many engines the model gets
            block.dsee_input_hook = block.register_forward_pre_hook(_input_needs_grad)


def hook_per_layer(blocks: Sequence[nn.Module]) -> None:
    """Undo hook_per_block on a model that gets another engine (ZeRO-3 fetching its weights, or
    hooks per layer asked for); leaf modules set by anyone else stay."""
    from deepspeed.utils import set_z3_leaf_module

    for block in blocks:
        if hasattr(block, "dsee_input_hook"):
            set_z3_leaf_module(block, False)


def _input_needs_grad(block: nn.Module, args: tuple):
    """DeepSpeed reduces a leaf block's gradients in a full backward hook, and torch fires that hook
    before the block's own gradients exist when no positional input needs a gradient (the first
    block, fed by frozen embeddings): its hidden states are made to need one."""
    from deepspeed.utils import z3_leaf_module

    if not (torch.is_grad_enabled() and z3_leaf_module(block) and any(p.requires_grad for p in block.parameters())):
        return None
    if not (args and isinstance(args[0], torch.Tensor) and args[0].is_floating_point()):
        raise RuntimeError(f"{type(block).__name__} was called without its hidden states as the first positional argument, so ZeRO-3 "
                           "would reduce its gradients before they exist: set zero3_hook_per_block to false for this model "
                           "(create_engine(..., hook_per_block=False))")
    if args[0].requires_grad:
        return None
    return (args[0].detach().requires_grad_(True), *args[1:])


class TorchLinear(nn.Linear):
    """nn.Linear through torch's own linear, whatever ZeRO-3 made of F.linear (torch_linear_where_whole)."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return torch._C._nn.linear(input, self.weight, self.bias)


def torch_linear_where_whole(module: nn.Module) -> int:
    """zero.Init swaps F.linear, for the whole process, for a Python autograd Function that
    fetches a released weight again in backward rather than keep it from forward (DeepSpeed's
    memory_efficient_linear): two Python calls per nn.Linear and step, 5-8% of a medium-LLaMA
    step on CPU ranks. A layer whose weights ZeRO-3 keeps from forward to backward (shared frozen
    weights, adapters kept whole, parameters under the persistence threshold) has nothing to
    fetch again: it becomes a TorchLinear, which autograd serves natively, and goes back to
    nn.Linear once it no longer qualifies. Decided when called (create_engine): whatever releases a
    kept weight later (a new engine's sharing, new partitions) must call it again, as create_engine
    does. Exact nn.Linear only (subclasses have their own forward); returns how many are TorchLinear."""
    count = 0
    for layer in module.modules():
        if type(layer) in (nn.Linear, TorchLinear):
            whole = all(not is_partitioned(p) or p.ds_persist for p in layer.parameters(recurse=False))
            layer.__class__ = TorchLinear if whole else nn.Linear
            count += whole
    return count


def _shm_room_everywhere(size: int) -> bool:
    """Whether /dev/shm has room for `size` bytes, twice over, on every rank (collective): tmpfs
    writes past its size are SIGBUS, not errors, and other runs may share the machine's."""
    from dsee_scale import dist

    room = os.statvfs("/dev/shm") if os.path.isdir("/dev/shm") else None
    free = room.f_bavail * room.f_frsize if room else 0
    return bool(dist.all_reduce(torch.tensor([int(free > 2 * size)], device="cpu"), op="min").item())  # host: a gloo flag


def _shm_nonce() -> int:
    """A random number from rank 0 (collective), naming one call's /dev/shm files."""
    from dsee_scale import dist

    return dist.broadcast(torch.tensor([secrets.randbits(62)], device="cpu"), src=0).item()  # host: over gloo


def shares_memory(param: torch.Tensor) -> bool:
    """A frozen weight whose partitions lie side by side in one /dev/shm file (share_frozen_weights)."""
    return hasattr(param, "ds_shared_whole")


def _views_its_file(param: torch.Tensor) -> bool:
    """A shared weight that is whole as a view of its file (not as a private gather)."""
    return shares_memory(param) and is_whole(param) and param.data.data_ptr() == param.ds_shared_whole.data_ptr()


def _shareable(param: torch.Tensor, world: int) -> bool:
    import torch.distributed as tdist

    tensor = param.ds_tensor
    return (not param.requires_grad and not param.ds_persist and not shares_memory(param) and tensor.device.type == "cpu"
            and getattr(tensor, "final_location", None) is None and not hasattr(tensor, "ds_quant_scale")
            and getattr(param, "ds_zero_param_process_group", None) is None  # no hpZ secondary partitions
            and tdist.get_world_size(group=param.ds_process_group) == world)


def share_frozen_weights(module: nn.Module, share_new: bool = True) -> int:
    """On CPU ranks that share one machine, each frozen weight's ZeRO-3 partitions lie side by
    side in one /dev/shm file: rank r's shard is the file's r-th slice, written by rank r alone,
    so the file is the whole weight. ZeRO-3's fetch makes it a view of that file: no copy, no
    collective waiting for a peer, and the machine holds each weight once, as the partitions did.
    Only frozen weights: a peer's slice is read at any time, so the writes (edit_local_shard,
    gathered(modify=True)) are collective and fenced by barriers, and none may happen in a step;
    DeepSpeed's own writers (engine.load_checkpoint of module weights, offload_states) are not
    fenced, and dsee_scale does not call them. Shared weights count against
    stage3_max_live_parameters until the step ends (ZeRO-3 keeps them fetched), which stops its
    prefetch of what is not shared: trainable weights, whole already if adapters.
    With share_new=False nothing more is shared, but ZeRO-3's fetch is still wrapped for every
    parameter once any is shared (a rank's fetch of a module goes through whichever of its
    parameters comes first in a set, so all must fetch alike). Collective; returns how many
    weights this call shared (none where /dev/shm lacks room on a rank)."""
    from dsee_scale import dist

    _wrap_fetches(module)
    if not (share_new and can_share_frozen_weights()):
        return 0
    world = dist.world_size()
    params = [p for p in module.parameters() if is_partitioned(p) and _shareable(p, world)]
    ids = sum(p.ds_id for p in params)
    agreed = dist.all_reduce(torch.tensor([len(params), -len(params), ids, -ids], device="cpu"), op="min")  # host: gloo integers
    if not (params and agreed[0] == -agreed[1] and agreed[2] == -agreed[3]):  # every rank the same weights
        return 0
    if not _shm_room_everywhere(sum(p.ds_numel_aligned * p.ds_tensor.dtype.itemsize for p in params)):
        return 0
    rank, nonce = dist.rank(), _shm_nonce()
    paths = [f"/dev/shm/dsee_weights_{nonce}_{i}" for i in range(len(params))]
    wholes = [torch.from_file(path, shared=True, size=p.ds_numel_aligned, dtype=p.ds_tensor.dtype) for path, p in zip(paths, params)]
    dist.barrier()  # every file exists at its full size and is mapped everywhere: the names can go (tmpfs is RAM)
    for path in paths[rank::world]:
        os.unlink(path)
    for param, whole in zip(params, wholes):
        size = param.ds_tensor.ds_numel
        own = whole.narrow(0, rank * size, size)
        own.copy_(param.ds_tensor.data)
        param.ds_tensor.data = own
        param.ds_shared_whole = whole
        param.ds_persist = True  # kept from forward to backward (free: a view); ZeRO-3 still releases it at each step
    _wrap_fetches(module)
    dist.barrier()  # every slice written before anyone reads a peer's
    return len(params)


def _wrap_fetches(module: nn.Module) -> None:
    """Wrap ZeRO-3's fetch of every partitioned parameter not wrapped yet, once any is shared."""
    if not any(shares_memory(p) for p in module.parameters()):
        return
    for param in module.parameters():
        if is_partitioned(param) and not hasattr(param, "ds_gather_unshared"):
            param.ds_gather_unshared = param.all_gather_coalesced
            param.all_gather_coalesced = _fetch_shared_first(param.ds_gather_unshared)


def _view_whole(params: Sequence[torch.Tensor], status) -> None:
    """Released shared weights become whole as views of their files, in ZeRO-3 status `status`."""
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    for param in params:
        if param.ds_status != ZeroParamStatus.NOT_AVAILABLE:
            raise RuntimeError(f"expected a released parameter: {param.ds_summary()}")
        param.data = param.ds_shared_whole.narrow(0, 0, param.ds_numel).view(param.ds_shape)
        param.ds_status = status


def _fetch_shared_first(gather):
    """ZeRO-3's fetch (partition_parameters' all_gather_coalesced, called by its coordinator through
    one of a module's parameters): shared weights become views at once, the rest go to `gather`."""
    from deepspeed.runtime.zero.partition_parameters import AllReduceCoalescedHandle, MultipleAllGatherHandles, ZeroParamStatus

    def all_gather_coalesced(params, safe_mode: bool = False, quantize: bool = False):
        params = list(params)
        shared = [p for p in params if shares_memory(p)]
        _view_whole(shared, ZeroParamStatus.INFLIGHT)  # as ZeRO-3 leaves them for its handle's wait
        rest = [p for p in params if not shares_memory(p)]
        handles = [AllReduceCoalescedHandle(_Done(), shared)] if shared else []
        if rest or not shared:
            handles.append(gather(rest, safe_mode=safe_mode, quantize=quantize))
        return MultipleAllGatherHandles(handles)

    return all_gather_coalesced
