"""Shared by the multi-process test drivers and their single-process references."""
from __future__ import annotations

from pathlib import Path

import torch

GLOBAL_BATCH = 4
SEQ = 16
VOCAB = 128


def batch(step: int, task: str, num_labels: int = 2) -> dict[str, torch.Tensor]:
    """The global batch of a step: fixed-length rows, so every micro-batch averages equal token counts."""
    g = torch.Generator().manual_seed(1000 + step)
    ids = torch.randint(1, VOCAB, (GLOBAL_BATCH, SEQ), generator=g)
    if task == "cls":
        return {"input_ids": ids, "labels": torch.randint(0, num_labels, (GLOBAL_BATCH,), generator=g)}
    return {"input_ids": ids, "labels": ids.clone()}


def shard(b: dict[str, torch.Tensor], rank: int, world: int) -> dict[str, torch.Tensor]:
    per = GLOBAL_BATCH // world
    return {k: v[rank * per : (rank + 1) * per] for k, v in b.items()}


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


def start(out: str) -> tuple[int, int, Path, dict]:
    """Join the process group; (rank, world size, output folder, ZeRO-3 test config)."""
    import torch.distributed as dist

    from dsee_scale.engine import init_distributed

    init_distributed()
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    return dist.get_rank(), dist.get_world_size(), folder, ds_config(dist.get_world_size())


def train_steps(engine, steps: int, task: str, rank: int, world: int) -> list[float]:
    """`steps` steps on this rank's share of the fixed global batches; the losses."""
    losses = []
    for step in range(steps):
        loss = engine(**shard(batch(step, task), rank, world)).loss
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    return losses
