"""What a ZeRO-3 weight fetch costs on CPU ranks of one machine, by way of fetching: gloo's
all-gather, DeepSpeed's shared-memory all-reduce kernel (each rank's shard in a buffer filled with
-0.0, dsee_scale's fetch until 2026-12-02) and dsee_scale's own exchange through /dev/shm, as an
all-gather and as the all-reduce (bitwise OR) that 2-rank ZeRO-3 now fetches coalesced weights
by; each into a fresh buffer per fetch, as ZeRO-3 allocates them, and into one reused buffer.

    MALLOC_MMAP_THRESHOLD_=131072 deepspeed --num_gpus 2 --bind_cores_to_rank benchmarks/bench_fetch.py [--quick]

GPT-2-medium's four weight shapes (c_attn, c_fc, attn c_proj, wte), three times each, fp32; best
of 4 rounds after one. Rank 0 prints one JSON line per way and buffer and appends it to
benchmarks/results/fetch.jsonl (or --out).
"""
import argparse
import os
import time

import deepspeed.comm as comm
import torch
from deepspeed.comm import comm as ds_backend
from deepspeed.runtime.zero import partition_parameters

from results_io import add_out, record

from dsee_scale.engine import init_distributed

p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
p.add_argument("--quick", action="store_true", help="two small weights: a smoke run")
add_out(p, "fetch")
args, _ = p.parse_known_args()  # deepspeed's launcher adds --local_rank
SHAPES = [1000 * 8, 3 * 4096] if args.quick else [1024 * 3072, 1024 * 4096, 1024 * 1024, 50257 * 1024] * 3

init_distributed()  # installs dsee_scale's exchange as ZeRO-3's `dist` where every rank is on this machine
rank, world = comm.get_rank(), comm.get_world_size()
own_exchange = partition_parameters.dist
if own_exchange is comm:
    raise SystemExit("the shared-memory fetch is off: launch every rank on this machine with deepspeed's launcher")


def kernel_sum(out: torch.Tensor, shard: torch.Tensor) -> None:
    """The fetch before: a sum in DeepSpeed's kernel, the peers' parts -0.0 (x + -0.0 is x)."""
    n = shard.numel()
    out[: rank * n].fill_(-0.0)
    out[(rank + 1) * n:].fill_(-0.0)
    out[rank * n: (rank + 1) * n].copy_(shard)
    torch.ops.deepspeed.inference_all_reduce_(out)


def or_reduce(out: torch.Tensor, shard: torch.Tensor) -> None:
    """ZeRO-3's fetch by all-reduce: zeros but for this rank's shard, summed (here: OR-ed)."""
    out.zero_()
    out.view(world, -1)[rank].copy_(shard)
    own_exchange.all_reduce(out)


def kernel_ready() -> bool:
    """DeepSpeed maps its kernel's peers only under its own launcher, and only runs it on a CPU it builds it for."""
    backend = getattr(ds_backend, "cdb", None)
    return (getattr(backend, "shm_vector_kernel_level", 0) >= 1 and getattr(backend, "shm_comm_op", None) is not None
            and hasattr(torch.ops.deepspeed, "inference_all_reduce_") and os.environ.get("LOCAL_SIZE") == str(world))


WAYS = {
    "gloo all-gather": lambda out, shard: comm.allgather_fn(out, shard),
    "DeepSpeed all-reduce kernel": kernel_sum,
    "own exchange, all-gather": lambda out, shard: own_exchange.allgather_fn(out, shard),
    "own exchange, all-reduce (OR)": or_reduce,
}
if not kernel_ready():
    print("DeepSpeed's shared-memory kernel is not available here (its op, a CPU it supports, deepspeed's launcher): not timed", flush=True)
    del WAYS["DeepSpeed all-reduce kernel"]
shards = {n: torch.randn(n // world) for n in set(SHAPES)}
reused = {n: torch.empty(n) for n in set(SHAPES)}
run_id = time.strftime("%Y%m%dT%H%M%S")
for way, fetch in WAYS.items():
    for fresh in (True, False):
        rounds = []
        for _ in range(5):
            comm.barrier()
            tic = time.perf_counter()
            for n in SHAPES:
                fetch(torch.empty(n) if fresh else reused[n], shards[n])
            rounds.append(time.perf_counter() - tic)
        if rank == 0:
            record({"way": way, "buffer": "fresh" if fresh else "reused", "gb_gathered": round(sum(SHAPES) * 4 / 1e9, 2), "quick": args.quick,
                    "s_best": round(min(rounds[1:]), 5), "s_rounds": [round(r, 5) for r in rounds[1:]], "run_id": run_id}, args.out)
