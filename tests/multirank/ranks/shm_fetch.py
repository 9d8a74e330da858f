"""ZeRO-3's weight fetch through shared memory (zero.single_host.fetch_through_shared_memory) gathers every
weight bit for bit as gloo's all-gather does, by all-gather and by all-reduce (ZeRO-3's fetch by
all-reduce, on by default with it: zero.with_fetch_defaults), odd sizes (padded shards) and -0.0 included, also in chunks
much smaller than a shard (so both halves of each buffer are reused many times), and DSEE steps,
whose fetches go through it either way, give gloo's losses. 2 CPU ranks, LOCAL_SIZE set as DeepSpeed's launcher sets it."""
import json
import sys
from pathlib import Path

import deepspeed
import deepspeed.comm
import torch
import torch.distributed as dist
from deepspeed.runtime.zero import partition_parameters

from common import train_steps

from dsee_scale import DSEEConfig, apply_dsee, zero
from dsee_scale.engine import create_engine, init_distributed
from dsee_scale.models import build_model, tiny_config
from dsee_scale.zero.single_host import FETCH_BY_ALL_REDUCE, _FetchThroughSharedMemory

init_distributed()
rank, world = dist.get_rank(), dist.get_world_size()
shared_memory = partition_parameters.dist
config = zero.with_fetch_defaults({"train_micro_batch_size_per_gpu": 2, "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}})
model = build_model(tiny_config("gpt2", vocab_size=129, n_embd=33, n_head=3), "lm", ds_config=config)  # 129: odd sizes, padded shards
with torch.no_grad(), deepspeed.zero.GatheredParameters([model.transformer.h[0].ln_1.bias], modifier_rank=0):
    model.transformer.h[0].ln_1.bias[:3] = -0.0


def gather_all(comm, dtype=torch.float32) -> dict[str, torch.Tensor]:
    """Every weight as ZeRO-3's fetch gathers it (its allgather_fn), through `comm`."""
    whole = {}
    for name, param in model.named_parameters():
        out = torch.empty(param.ds_tensor.numel() * world, dtype=dtype)
        comm.allgather_fn(out, param.ds_tensor.to(dtype), async_op=True).wait()
        whole[name] = out
    return whole


def reduce_all(comm) -> dict[str, torch.Tensor]:
    """Every weight as ZeRO-3's fetch by all-reduce builds it, through `comm`: zeros, but for
    this rank's shard in its place."""
    whole = {}
    for name, param in model.named_parameters():
        out = torch.zeros(param.ds_tensor.numel() * world, dtype=param.ds_tensor.dtype)
        out.view(world, -1)[rank].copy_(param.ds_tensor)
        comm.all_reduce(out, group=param.ds_process_group, async_op=True).wait()
        whole[name] = out
    return whole


def step_loss(by_all_reduce: bool | None) -> list[float]:
    """Two DSEE steps; fetching by all-reduce as `by_all_reduce` says, or as the default is."""
    torch.manual_seed(0)
    step_config = config if by_all_reduce is None else {**config, "zero_optimization": {**config["zero_optimization"], "stage3_use_all_reduce_for_fetch_params": by_all_reduce}}
    copy = build_model(tiny_config("gpt2", vocab_size=129, n_embd=33, n_head=3), "lm", ds_config=step_config)
    apply_dsee(copy, DSEEConfig(rank=4, nnz=8, support="magnitude"), ds_config=step_config)
    engine = create_engine(copy, step_config, lr=1e-2, share_frozen=False)  # every weight fetched through the exchange
    losses = train_steps(engine, 2, "lm", rank, world)
    engine.destroy()
    return losses


def counted(name: str, fn):
    return lambda *a, **k: fetches.append(name) or fn(*a, **k)


SMALL_CHUNK = 24  # bytes: 6 fp32 values
fetches = []
shared_memory.allgather_fn, shared_memory.all_reduce = counted("all_gather", shared_memory.allgather_fn), counted("all_reduce", shared_memory.all_reduce)
default_step = step_loss(by_all_reduce=None)
default_fetches, fetches[:] = fetches[:], []
turns_in_default_step = shared_memory._turn
shm = {"all_gather": gather_all(shared_memory), "all_reduce": reduce_all(shared_memory),
       "all_gather_in_chunks": gather_all(in_chunks := _FetchThroughSharedMemory(deepspeed.comm, world, rank, chunk_bytes=SMALL_CHUNK)),
       "all_reduce_in_chunks": reduce_all(in_chunks)}
bf16_through_shm = gather_all(shared_memory, torch.bfloat16)
shm_losses = [default_step, step_loss(by_all_reduce=False)]
partition_parameters.dist = deepspeed.comm
through_gloo, gloo_losses = gather_all(deepspeed.comm), step_loss(by_all_reduce=False)
result = {
    "installed": isinstance(shared_memory, _FetchThroughSharedMemory),
    "default_fetches": {kind: default_fetches.count(kind) for kind in ("all_gather", "all_reduce")},
    "fetch_by_all_reduce_is_default": config["zero_optimization"][FETCH_BY_ALL_REDUCE],
    "exchanged_chunks": {"default_step": turns_in_default_step, "in_chunks": in_chunks._turn},  # through shared memory, not gloo
    "bf16_bitwise_equal": all(torch.equal(bf16_through_shm[n].view(torch.int16), through_gloo[n].bfloat16().view(torch.int16)) for n in through_gloo),
    "bitwise_equal": {way: all(torch.equal(got[n].view(torch.int32), through_gloo[n].view(torch.int32)) for n in through_gloo) for way, got in shm.items()},
    "largest_shard_in_chunks": max(p.ds_tensor.numel() for p in model.parameters()) * 4 // SMALL_CHUNK,
    "odd_sizes": sum(1 for p in model.parameters() if p.ds_numel % world),
    "negative_zero_kept": {way: bool(torch.signbit(got["transformer.h.0.ln_1.bias"][:3]).all()) for way, got in shm.items()},
    "losses": [*shm_losses, gloo_losses],
}
if rank == 0:
    Path(sys.argv[-1], "result.json").write_text(json.dumps(result))
