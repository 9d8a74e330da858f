"""World-size-independent, crash-safe checkpoints of a DSEE run.

What a DSEE run must remember is small and does not depend on how many ranks hold it: the
trainable values (fp32 master copies) and their optimizer moments, the pruning masks (one bit
per backbone weight, at global positions), the structured plan (kept heads and neurons), stage,
step and losses (run_state.py). The frozen backbone is rebuilt from --model, the plan and the
masks (a digest checks that it is the same backbone), and dropout is drawn per global row
(dropout.py). So a checkpoint resumes on any number of ranks.

`<dir>/<tag>/` holds state.json, trainable.safetensors and masks.safetensors. Backbone weights
that pruning re-fitted (prune.reconstruct) cannot be rebuilt from --model: they change once, and
`save_weights` writes them once, a matrix at a time, beside the checkpoints. Each writer
(global rank 0, and the first rank of every node whose disk does not hold rank 0's folder)
writes a complete copy into `<dir>/.staging-<tag>`, fsyncs every file and folder, renames it,
then points `latest` at it the same way: a kill or a full disk at any moment leaves the previous
checkpoint as `latest`.
"""
from __future__ import annotations

import json
import logging
import math
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from dsee_scale import dist, faults, zero
from dsee_scale.zero import compat
from dsee_scale.engine import torch_optimizer
from dsee_scale.prune import ShardMask, plain_parameters, unpack_mask

log = logging.getLogger(__name__)
STATE, TRAINABLE, MASKS, LATEST = "state.json", "trainable.safetensors", "masks.safetensors", "latest"
FORMAT = 2  # state.json: run (RunState), pruning (PruningState), identity, ...; checkpoints before run_state.py had none
MOMENTS = ("exp_avg", "exp_avg_sq")
WRITE_ERRORS = (OSError, SafetensorError)  # safetensors reports its own I/O failures (a full disk) as SafetensorError


class CheckpointError(RuntimeError):
    """A checkpoint could not be written or does not fit this run."""


# ---- what is saved -----------------------------------------------------------------------------
def _trainable(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def trainable_state(model: nn.Module, engine) -> dict[str, torch.Tensor]:
    """Whole fp32 value and optimizer moments of every trainable parameter, through DeepSpeed's
    tensor-fragment API (any ZeRO stage, any world size). Collective."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    optimizer, stepped = torch_optimizer(engine), optimizer_step(engine) > 0
    out = {}
    for name, p in _trainable(model):
        shape = zero.full_shape(p)
        value = safe_get_full_fp32_param(p)
        out[f"{name}::value"] = (p.detach() if value is None else value).float().reshape(shape).cpu()
        for key in MOMENTS:
            moment = safe_get_full_optimizer_state(p, key) if stepped else None  # no state before the first step
            if moment is None:  # no ZeRO: the torch optimizer's own state
                moment = optimizer.state.get(p, {}).get(key, torch.zeros(shape, dtype=torch.float32, device=value.device if value is not None else p.device))
            out[f"{name}::{key}"] = moment.float().reshape(shape).cpu()
    return out


def optimizer_step(engine) -> int:
    """Optimizer steps taken (every parameter group steps together)."""
    for state in torch_optimizer(engine).state.values():
        if "step" in state:
            return int(state["step"])
    return 0


def load_trainable_state(model: nn.Module, engine, tensors: dict[str, torch.Tensor], step: int) -> None:
    """Put saved values and moments into this engine, partitioned for this world size."""
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state, safe_set_local_fp32_param, safe_set_local_optimizer_state

    from dsee_scale.inject import load_dsee_state_dict

    trainable = _trainable(model)
    expected = {f"{n}::{k}" for n, _ in trainable for k in ("value", *MOMENTS)}
    if set(tensors) != expected:
        missing, unknown = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
        raise CheckpointError(f"the checkpoint's trainable tensors do not fit this model: missing {missing[:4]}, unexpected {unknown[:4]}")
    load_dsee_state_dict(model, {n: tensors[f"{n}::value"] for n, _ in trainable})
    optimizer = torch_optimizer(engine)
    if step:  # optimizers create their state at their first step: create it now, to fill it
        # ZeRO-3 hands its fp32 partitions to the torch optimizer only during a step.
        for held in compat.zero3_fp32_partitions(engine) or [p for group in optimizer.param_groups for p in group["params"]]:
            state = optimizer.state[held]
            for key in MOMENTS:
                state.setdefault(key, torch.zeros_like(held, dtype=torch.float32))
            state["step"] = _step_like(optimizer, state.get("step"), step)
    for name, p in trainable:
        device = zero.shard_device(p)
        if zero.is_partitioned(p):  # ZeRO-3: this rank's partitions (the full setters mis-slice a padded last partition)
            safe_set_local_fp32_param(p, zero.partition_of(p, tensors[f"{name}::value"]).to(device))
            for key in MOMENTS if step else ():
                safe_set_local_optimizer_state(p, zero.partition_of(p, tensors[f"{name}::{key}"]).to(device), key)
        elif compat.holds_fp32_copy(p):  # ZeRO-1/2 and bf16: DeepSpeed holds the fp32 copy and the moments
            safe_set_full_fp32_param(p, tensors[f"{name}::value"].to(device))
            for key in MOMENTS if step else ():
                safe_set_full_optimizer_state(p, tensors[f"{name}::{key}"].to(device), key)
        elif step:
            for key in MOMENTS:
                optimizer.state[p][key].copy_(tensors[f"{name}::{key}"])


def _step_like(optimizer, current, step: int):
    """The step count in the optimizer's own form: DeepSpeed's CPU Adam counts in a Python int,
    torch's Adam family in a float tensor on the host."""
    if torch.is_tensor(current):
        return current.fill_(step)
    if isinstance(current, int) or type(optimizer).__name__.startswith("DeepSpeedCPU"):
        return step
    return torch.tensor(float(step), device="cpu")  # cpu: where torch's AdamW keeps its step count


def shard_masks(model: nn.Module, packed: dict[str, torch.Tensor]) -> dict[str, ShardMask]:
    """This rank's part of saved whole-weight masks, for its own shard of each weight."""
    params = plain_parameters(model)
    unknown = sorted(set(packed) - set(params))
    if unknown:
        raise CheckpointError(f"the checkpoint has masks for weights this model does not have: {unknown[:3]}")
    out = {}
    for name, bits in packed.items():
        try:
            whole = unpack_mask(bits, zero.full_numel(params[name]))
        except ValueError as err:
            raise CheckpointError(f"the mask of {name}: {err}") from None
        start, stop = zero.shard_range(params[name])
        mine = whole[start:stop]
        out[name] = ShardMask.from_bool(start, mine)
    return out


def backbone_digest(model: nn.Module) -> list[float]:
    """Sum and sum of squares of every frozen weight, over shards, all-reduced: a resumed run's
    rebuilt backbone must match the one the checkpoint was taken from (`same_backbone`)."""
    sums = []
    for _, p in model.named_parameters():
        if p.requires_grad:
            continue
        total = torch.zeros(2, dtype=torch.float64, device=zero.shard_device(p))
        with zero.shard_in_memory(p):
            for chunk in zero.local_shard(p).detach().split(1 << 20):  # float64 a chunk at a time, not a copy of the shard
                chunk = chunk.double()
                total += torch.stack([chunk.sum(), chunk.dot(chunk)])
        sums.append(total)
    return dist.all_reduce(torch.stack(sums)).flatten().tolist() if sums else []


def same_backbone(saved: list[float], now: list[float]) -> bool:
    """Equal up to the summation order, which depends on the world size."""
    return len(saved) == len(now) and all(math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-9) for a, b in zip(saved, now))


# ---- writing -----------------------------------------------------------------------------------
def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write(folder: Path, tag: str, state: dict, tensors: dict[str, torch.Tensor], masks: dict[str, torch.Tensor], keep: int) -> None:
    staging = folder / f".staging-{tag}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    save_file(tensors, str(staging / TRAINABLE))
    faults.during_save(tag)
    save_file(masks, str(staging / MASKS))
    (staging / STATE).write_text(json.dumps({"format": FORMAT, **state}, indent=1))
    for path in (staging / TRAINABLE, staging / MASKS, staging / STATE, staging):
        _fsync(path)
    final = folder / tag
    if final.exists():  # a save of this tag that a crash left without `latest` pointing at it
        shutil.rmtree(final)
    os.replace(staging, final)
    _fsync(folder)
    pointer = folder / f"{LATEST}.tmp"
    pointer.write_text(tag)
    _fsync(pointer)
    os.replace(pointer, folder / LATEST)
    _fsync(folder)
    complete = sorted((p for p in folder.iterdir() if p.is_dir() and (p / STATE).exists()), key=lambda p: p.stat().st_mtime)
    for old in complete[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def save(folder: Path, tag: str, state: dict, tensors: dict[str, torch.Tensor], masks: dict[str, torch.Tensor], writer: bool, keep: int = 2) -> None:
    """Collective: every rank calls it with the same (gathered) content; writers write. A
    failed write on any node fails every rank with one message; `latest` is left as it was."""
    error = None
    if writer:
        try:
            _write(folder, tag, state, tensors, masks, keep)
        except WRITE_ERRORS as err:
            shutil.rmtree(folder / f".staging-{tag}", ignore_errors=True)
            previous = latest_tag(folder) or "none"
            error = f"checkpoint {tag} could not be written to {folder}: {getattr(err, 'strerror', None) or err}; the previous checkpoint ({previous}) is intact and resumable"
    dist.raise_if_any(error, CheckpointError)


class StagedFolder:
    """A folder the run folder's writers fill in a staging copy, one file at a time, which
    replaces `folder` once complete (every file fsynced, then renamed): a kill at any moment
    leaves the previous folder, or none. After a failed write the later writes are skipped (the
    caller's collectives go on) and `close` fails every rank with one message naming `what`."""

    def __init__(self, folder: Path, writer: bool, what: str) -> None:
        self.folder, self.writer, self.what = folder, writer, what
        self.staging = folder.with_name(f".staging-{folder.name}")
        self.error: str | None = None
        self.write(lambda: (shutil.rmtree(self.staging, ignore_errors=True), self.staging.mkdir(parents=True)))

    def write(self, fn: Callable[[], None]) -> None:
        """Run `fn` (which writes into `staging`) on writers, unless a write failed already."""
        if self.writer and self.error is None:
            try:
                fn()
            except WRITE_ERRORS as err:
                self.error = f"{self.what} could not be written to {self.folder}: {getattr(err, 'strerror', None) or err}"

    def close(self) -> None:
        """Collective: the staging copy replaces `folder`; a failed write fails every rank."""
        self.write(self._publish)
        if self.error:
            shutil.rmtree(self.staging, ignore_errors=True)
        dist.raise_if_any(self.error, CheckpointError)

    def _publish(self) -> None:
        for path in [*self.staging.iterdir(), self.staging]:
            _fsync(path)
        shutil.rmtree(self.folder, ignore_errors=True)
        os.replace(self.staging, self.folder)
        _fsync(self.folder.parent)


def save_weights(folder: Path, params: dict[str, torch.Tensor], writer: bool) -> None:
    """Whole values of some frozen weights, one gathered at a time, one file each (StagedFolder).
    Collective: every rank gathers, writers write; a failed write fails every rank with one message."""
    out = StagedFolder(folder, writer, "the re-fitted weights")
    for i, (name, param) in enumerate(params.items()):
        with zero.gathered([param]):
            out.write(lambda: save_file({name: param.detach().contiguous().cpu()}, str(out.staging / f"{i:05d}.safetensors")))
    out.write(lambda: (out.staging / "index.json").write_text(json.dumps({name: f"{i:05d}.safetensors" for i, name in enumerate(params)})))
    out.close()


def load_weights(folder: Path, params: dict[str, torch.Tensor]) -> None:
    """Put weights saved by `save_weights` into this model: each rank reads only the rows its
    own shard covers. Collective (a weight kept whole on every rank is re-synced)."""
    absent = [rank for rank, here in enumerate(dist.all_gather_object((folder / "index.json").exists())) if not here]
    if absent:  # decided together: a rank that raised alone would leave the others in the next collective
        raise CheckpointError(f"{folder} is missing on rank(s) {absent}: it is written after pruning with prune.reconstruct and must stay beside the checkpoints")
    index = json.loads((folder / "index.json").read_text())
    missing = sorted(set(params) - set(index))
    if missing:
        raise CheckpointError(f"{folder} has no saved values for {missing[:3]}: it was written by another run")
    for name, param in params.items():
        start, stop = zero.shard_range(param)
        cols = zero.full_shape(param)[1]
        first = start // cols
        mine = None  # an empty shard reads nothing, but still takes part in the edit's collective
        if stop > start:
            with safe_open(str(folder / index[name]), framework="pt") as f:
                mine = f.get_slice(name)[first : (stop - 1) // cols + 1].reshape(-1)[start - first * cols : stop - first * cols]
        zero.edit_local_shard(param, lambda shard, _start: None if mine is None else shard.copy_(mine))


# ---- reading -----------------------------------------------------------------------------------
def latest_tag(folder: Path) -> str | None:
    """The tag `latest` names; None before the first checkpoint."""
    pointer = folder / LATEST
    return pointer.read_text().strip() if pointer.exists() else None


def latest_state(folder: Path) -> dict | None:
    """state.json of the checkpoint `latest` names (cheap: read before any heavy work)."""
    tag = latest_tag(folder)
    return None if tag is None else json.loads((folder / tag / STATE).read_text())


def unreadable_reason(state: dict) -> str | None:
    """Why this dsee_scale cannot resume a checkpoint's state, or None."""
    if state.get("format") != FORMAT:
        return f"it was written by another dsee_scale version (checkpoint format {state.get('format', 1)}, this one reads {FORMAT})"
    return None


def load_latest(folder: Path) -> tuple[dict, dict[str, torch.Tensor], dict[str, torch.Tensor]] | None:
    """(state, trainable tensors, whole-weight masks) of the checkpoint `latest` names."""
    tag = latest_tag(folder)
    if tag is None:
        return None
    state = json.loads((folder / tag / STATE).read_text())
    if reason := unreadable_reason(state):
        raise CheckpointError(f"{folder / tag} cannot be resumed: {reason}; start again with --overwrite")
    log.info("resuming from %s", folder / tag)
    return state, load_file(str(folder / tag / TRAINABLE)), load_file(str(folder / tag / MASKS))
