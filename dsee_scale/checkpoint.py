"""Crash-safe checkpoints: written to a staging folder, renamed into place, `latest` last.

A checkpoint folder `<dir>/<tag>/` holds DeepSpeed's engine state (frozen shards included) and,
per rank, a safetensors file with the RNG state and the pruning masks, so a resumed run
continues bit for bit. A kill at any moment leaves the previous complete checkpoint as `latest`.
"""
from __future__ import annotations

import logging
import os
import shutil
import signal
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from dsee_scale import dist
from dsee_scale.export import atomic_save_file
from dsee_scale.prune import ShardMask

log = logging.getLogger(__name__)
FAULT_ENV = "DSEE_FAULT_INJECT"  # test hook: "kill_during_save:<tag>" SIGKILLs this process mid-save


def _rank_state(masks: dict[str, ShardMask]) -> dict[str, torch.Tensor]:
    from deepspeed.accelerator import get_accelerator

    state = {"rng::cpu": torch.get_rng_state()}
    if get_accelerator().device_name() != "cpu":
        state["rng::device"] = get_accelerator().get_rng_state()
    for name, mask in masks.items():
        state[f"mask::{name}::bits"] = torch.from_numpy(mask.bits)
        state[f"mask::{name}::range"] = torch.tensor([mask.start, mask.numel], device="cpu")  # cpu: written to a file
    return state


ADAPTER_ONLY = "ADAPTER_ONLY"


def save(engine, folder: Path, tag: str, client_state: dict, masks: dict[str, ShardMask], keep: int = 2, frozen: bool = True) -> None:
    """Collective. Only `keep` most recent checkpoints are kept. frozen=False leaves the frozen
    backbone out (it is rebuilt from the model source on resume, then the masks re-applied)."""
    staging = folder / f".staging-{tag}"
    engine.save_checkpoint(str(staging), tag=tag, client_state=client_state, save_latest=False, exclude_frozen_parameters=not frozen)
    if not frozen and dist.is_main():
        (staging / tag / ADAPTER_ONLY).touch()
    atomic_save_file(_rank_state(masks), staging / tag / f"rank{dist.rank()}_state.safetensors", {"format": "pt"})
    if os.environ.get(FAULT_ENV) == f"kill_during_save:{tag}":
        os.kill(os.getpid(), signal.SIGKILL)
    dist.barrier()
    if dist.is_main():
        final = folder / tag
        if final.exists():
            shutil.rmtree(final)
        os.replace(staging / tag, final)
        shutil.rmtree(staging, ignore_errors=True)
        pointer = folder / "latest.tmp"
        pointer.write_text(tag)
        os.replace(pointer, folder / "latest")
        complete = sorted((p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")), key=lambda p: p.stat().st_mtime)
        for old in complete[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    dist.barrier()


def load_latest(engine, folder: Path) -> tuple[dict | None, dict[str, ShardMask]]:
    """(client state, this rank's masks) of the checkpoint `latest` names; (None, {}) if none."""
    pointer = folder / "latest"
    if not pointer.exists():
        return None, {}
    tag = pointer.read_text().strip()
    _, client = engine.load_checkpoint(str(folder), tag=tag, load_module_strict=not (folder / tag / ADAPTER_ONLY).exists())
    state = load_file(str(folder / tag / f"rank{dist.rank()}_state.safetensors"))
    torch.set_rng_state(state["rng::cpu"])
    if "rng::device" in state:
        from deepspeed.accelerator import get_accelerator

        get_accelerator().set_rng_state(state["rng::device"])
    names = sorted({k.split("::")[1] for k in state if k.startswith("mask::")})
    masks = {n: ShardMask(int(state[f"mask::{n}::range"][0]), int(state[f"mask::{n}::range"][1]), np.asarray(state[f"mask::{n}::bits"].numpy())) for n in names}
    log.info("resumed from %s/%s", folder, tag)
    return client, masks
