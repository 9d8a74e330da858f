"""Shared by the multi-process test drivers and their single-process references."""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from dsee_scale import DSEEConfig

GLOBAL_BATCH = 4
SEQ = 16
VOCAB = 128
# The adapters zero3_tiny.py trains under ZeRO-3 and reference_run trains in one plain process.
ZERO3_DSEE = DSEEConfig(rank=4, alpha=8.0, nnz=8, support="grebsmo", init="lora")


def batch(step: int, task: str, num_labels: int = 2) -> dict[str, torch.Tensor]:
    """The global batch of a step: fixed-length rows, so every micro-batch averages equal token counts."""
    g = torch.Generator().manual_seed(1000 + step)
    ids = torch.randint(1, VOCAB, (GLOBAL_BATCH, SEQ), generator=g)
    if task == "cls":
        return {"input_ids": ids, "labels": torch.randint(0, num_labels, (GLOBAL_BATCH,), generator=g)}
    return {"input_ids": ids, "labels": ids.clone()}


def shard(b: dict[str, torch.Tensor], rank: int, world: int, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """This rank's rows of a global batch, on `device` (the engine's: a GPU in the gpu tier)."""
    per = GLOBAL_BATCH // world
    return {k: v[rank * per : (rank + 1) * per].to(device) for k, v in b.items()}


def eval_batch() -> torch.Tensor:
    return torch.randint(1, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(7))


def ds_config(world: int, persistence: int = 0) -> dict:
    return {
        "train_batch_size": GLOBAL_BATCH,
        "train_micro_batch_size_per_gpu": GLOBAL_BATCH // world,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": persistence, "stage3_gather_16bit_weights_on_model_save": True},
        "steps_per_print": 1000000,
        "wall_clock_breakdown": False,
    }


class _CountingComm:
    """The communication module as ZeRO-3's parameter code sees it, counting collectives."""

    COLLECTIVES = ("allgather_fn", "all_gather_into_tensor", "all_gather", "all_reduce")

    def __init__(self, comm) -> None:
        self.comm, self.calls = comm, 0

    def __getattr__(self, name: str):
        attr = getattr(self.comm, name)
        if name not in self.COLLECTIVES:
            return attr

        def counted(*args, **kwargs):
            self.calls += 1
            return attr(*args, **kwargs)

        return counted


def param_collectives(fn: Callable[[], object]) -> int:
    """How many collectives ZeRO-3's parameter code (its fetches and re-gathers) issues in fn()."""
    from deepspeed.runtime.zero import partition_parameters

    comm = partition_parameters.dist
    partition_parameters.dist = counting = _CountingComm(comm)
    try:
        fn()
    finally:
        partition_parameters.dist = comm
    return counting.calls


def full_masks(masks: dict) -> dict[str, torch.Tensor]:
    """Each rank's shard masks (prune's ShardMask) → whole-matrix masks on every rank (test only)."""
    from dsee_scale import dist

    parts = dist.all_gather_object({n: (m.start, m.dense().cpu()) for n, m in masks.items()})
    result = {}
    for name in masks:
        pieces = sorted((part[name] for part in parts), key=lambda x: x[0])
        result[name] = torch.cat([d for _, d in pieces])
    return result


def start(out: str) -> tuple[int, int, Path, dict]:
    """Join the process group; (rank, world size, output folder, ZeRO-3 test config). fp32 means
    fp32 on GPUs too: no TF32 in matrix products, so the gpu tier compares with one plain process
    to rounding."""
    import torch.distributed as dist

    from dsee_scale.engine import init_distributed

    torch.set_float32_matmul_precision("highest")
    init_distributed()
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    return dist.get_rank(), dist.get_world_size(), folder, ds_config(dist.get_world_size())


def train_steps(engine, steps: int, task: str, rank: int, world: int) -> list[float]:
    """`steps` steps on this rank's share of the fixed global batches; the losses."""
    losses = []
    for step in range(steps):
        loss = engine(**shard(batch(step, task), rank, world, engine.device)).loss
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    return losses


def reference_run(base: Path | str, task: str, steps: int) -> tuple[list[float], dict[str, torch.Tensor], torch.nn.Module]:
    """zero3_tiny.py's training in one plain process on the CPU, without DeepSpeed, on each step's
    global batch: (losses, adapter state, model)."""
    from dsee_scale import apply_dsee, dsee_state_dict
    from dsee_scale.models import build_model

    model = build_model(base, task)
    apply_dsee(model, ZERO3_DSEE)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
    losses = []
    for step in range(steps):
        loss = model(**batch(step, task)).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses, dsee_state_dict(model), model
