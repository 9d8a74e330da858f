"""CPU ranks that share one machine: ZeRO-3 fetches through /dev/shm, frozen weights held once
in shared memory, DeepSpeed's own shm buffers unlinked. Nothing here runs on GPUs; the run starts
it with one call, `on_process_group_start`, and an engine build shares frozen weights."""
from __future__ import annotations

import contextlib
import glob
import logging
import os
import secrets
from collections.abc import Iterator, Sequence

import torch
from torch import nn

from dsee_scale import dist
from dsee_scale.zero.shards import is_partitioned, shares_memory

log = logging.getLogger(__name__)


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
    or comm no `allgather_fn` keeps gloo). Collective: every rank calls it. DeepSpeed's comms
    logger does not see these fetches. Returns whether the path is on.
    """
    import deepspeed.comm as comm
    from deepspeed.runtime.zero import partition_parameters

    if fetches_through_shared_memory():
        return True
    world = comm.get_world_size()
    if not (_ranks_share_one_machine() and partition_parameters.dist is comm and hasattr(comm, "allgather_fn")):
        return False
    if not _shm_room_everywhere(2 * world * FETCH_CHUNK_BYTES):  # 2 chunks per rank
        return False
    partition_parameters.dist = _FetchThroughSharedMemory(comm, world, comm.get_rank())
    return True


def fetches_through_shared_memory() -> bool:
    """Whether this process's ZeRO-3 fetches go through shared memory (fetch_through_shared_memory)."""
    from deepspeed.runtime.zero import partition_parameters

    return isinstance(partition_parameters.dist, _FetchThroughSharedMemory)


FETCH_BY_ALL_REDUCE = "stage3_use_all_reduce_for_fetch_params"


def with_fetch_defaults(ds_config: dict) -> dict:
    """ds_config with ZeRO-3 fetching by all-reduce where weights go through shared memory on 2
    ranks, unless the config says otherwise (its public key stage3_use_all_reduce_for_fetch_params).
    A fetch by all-gather leaves the weights in a buffer that ZeRO-3 then copies once more; a sum
    leaves them in place, but moves each rank's whole buffer to every peer, so with more ranks it
    moves more than the all-gather and its copy together. Every config a model is built,
    adapted or wrapped with must pass through here, as the Recipe's does."""
    zero = ds_config.get("zero_optimization", {})
    if zero.get("stage") != 3 or FETCH_BY_ALL_REDUCE in zero or not (fetches_through_shared_memory() and dist.world_size() == 2):
        return ds_config
    return {**ds_config, "zero_optimization": {**zero, FETCH_BY_ALL_REDUCE: True}}


def unlink_shm_buffers() -> None:
    """DeepSpeed's CPU shared-memory collectives create a 69 MB /dev/shm buffer per rank and run
    (tmpfs: it is RAM) and never remove it; a killed run left them behind (19 GB after one test
    suite). Once every rank has mapped them, the names can go: the memory stays mapped while the
    ranks live and is freed with the last of them, however it ends. Collective: every rank calls it
    once the process group (and with it DeepSpeed's shm_initialize) is up."""
    dist.barrier()  # every rank has mapped every peer's buffer
    pattern = f"/dev/shm/deepspeed_*_{os.environ.get('MASTER_ADDR', '*')}_{os.environ.get('MASTER_PORT', '*')}_{dist.rank()}"
    for path in glob.glob(pattern):
        with contextlib.suppress(OSError):
            os.unlink(path)


def on_process_group_start() -> None:
    """Everything single-host CPU ranks do once their process group is up (collective)."""
    unlink_shm_buffers()
    if fetch_through_shared_memory() and dist.is_main():
        log.info("ZeRO-3 fetches weights through shared memory")


def _ranks_share_one_machine() -> bool:
    """More than one rank, all on this machine (the launcher's local world size is the world)."""
    return dist.world_size() > 1 and dist.local_world_size() == dist.world_size()


def can_share_frozen_weights() -> bool:
    """CPU ranks, all on this machine: where share_frozen_weights can hold frozen weights once for
    all (a GPU fetches onto itself)."""
    from deepspeed.accelerator import get_accelerator

    return _ranks_share_one_machine() and get_accelerator().device_name() == "cpu"


def _shm_room_everywhere(size: int) -> bool:
    """Whether /dev/shm has room for `size` bytes, twice over, on every rank (collective): tmpfs
    writes past its size are SIGBUS, not errors, and other runs may share the machine's."""
    room = os.statvfs("/dev/shm") if os.path.isdir("/dev/shm") else None
    free = room.f_bavail * room.f_frsize if room else 0
    return bool(dist.all_reduce(torch.tensor([int(free > 2 * size)], device="cpu"), op="min").item())  # host: a gloo flag


def _shm_nonce() -> int:
    """A random number from rank 0 (collective), naming one call's /dev/shm files."""
    return dist.broadcast(torch.tensor([secrets.randbits(62)], device="cpu"), src=0).item()  # host: over gloo


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


def view_whole(params: Sequence[torch.Tensor], status) -> None:
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
        view_whole(shared, ZeroParamStatus.INFLIGHT)  # as ZeRO-3 leaves them for its handle's wait
        rest = [p for p in params if not shares_memory(p)]
        handles = [AllReduceCoalescedHandle(_Done(), shared)] if shared else []
        if rest or not shared:
            handles.append(gather(rest, safe_mode=safe_mode, quantize=quantize))
        return MultipleAllGatherHandles(handles)

    return all_gather_coalesced
