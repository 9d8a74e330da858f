"""ZeRO-3's weight fetch through shared memory (zero.fetch_through_shared_memory) gathers every
weight bit for bit as gloo's all-gather does, odd sizes (padded shards) and -0.0 included, and
DSEE steps, whose fetches go through it, give gloo's losses. 2 CPU ranks, LOCAL_SIZE set as DeepSpeed's launcher sets it."""
import json
import sys
from pathlib import Path

import deepspeed
import deepspeed.comm
import torch
import torch.distributed as dist
from deepspeed.runtime.zero import partition_parameters

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import train_steps  # noqa: E402

from dsee_scale import DSEEConfig, apply_dsee, zero  # noqa: E402
from dsee_scale.engine import create_engine, init_distributed  # noqa: E402
from dsee_scale.models import build_model, tiny_config  # noqa: E402

init_distributed()
rank, world = dist.get_rank(), dist.get_world_size()
shared_memory = partition_parameters.dist
config = {"train_micro_batch_size_per_gpu": 2, "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}}
model = build_model(tiny_config("gpt2", vocab_size=129, n_embd=33, n_head=3), "lm", ds_config=config)  # 129: odd sizes, padded shards
with torch.no_grad(), deepspeed.zero.GatheredParameters([model.transformer.h[0].ln_1.bias], modifier_rank=0):
    model.transformer.h[0].ln_1.bias[:3] = -0.0


def gather_all(comm) -> dict[str, torch.Tensor]:
    """Every weight as ZeRO-3's fetch gathers it (its allgather_fn), through `comm`."""
    whole = {}
    for name, param in model.named_parameters():
        out = torch.empty(param.ds_tensor.numel() * world, dtype=param.ds_tensor.dtype)
        comm.allgather_fn(out, param.ds_tensor, async_op=True).wait()
        whole[name] = out
    return whole


def step_loss() -> list[float]:
    torch.manual_seed(0)
    copy = build_model(tiny_config("gpt2", vocab_size=129, n_embd=33, n_head=3), "lm", ds_config=config)
    apply_dsee(copy, DSEEConfig(rank=4, nnz=8, support="magnitude"), ds_config=config)
    engine = create_engine(copy, config, lr=1e-2)
    losses = train_steps(engine, 2, "lm", rank, world)
    engine.destroy()
    return losses


kernel_fetches = []
in_kernel = shared_memory.allgather_fn
shared_memory.allgather_fn = lambda out, *a, **k: kernel_fetches.append(out.numel()) or in_kernel(out, *a, **k)  # count what the step fetches
through_shm, shm_losses = gather_all(shared_memory), step_loss()
partition_parameters.dist = deepspeed.comm
through_gloo, gloo_losses = gather_all(deepspeed.comm), step_loss()
result = {
    "installed": isinstance(shared_memory, zero._FetchThroughSharedMemory),
    "fetches_in_step": len(kernel_fetches) - len(through_shm),
    "bitwise_equal": all(torch.equal(through_shm[n].view(torch.int32), through_gloo[n].view(torch.int32)) for n in through_gloo),
    "odd_sizes": sum(1 for p in model.parameters() if p.ds_numel % world),
    "negative_zero_kept": bool(torch.signbit(through_shm["transformer.h.0.ln_1.bias"][:3]).all()),  # in the kernel's vector part
    "losses": [shm_losses, gloo_losses],
}
if rank == 0:
    Path(sys.argv[-1], "result.json").write_text(json.dumps(result))
