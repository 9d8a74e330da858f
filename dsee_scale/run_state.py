"""What a run has done and decided, apart from tensors: with the trainable values, their moments
and the masks, all that a checkpoint holds (checkpoint.py writes it; the Recipe fills it).

RunState is where the run is and what it measured; PruningState what pruning decided, fixed
from then on. Both are independent of the world size: a checkpoint resumes on any number of ranks.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from dsee_scale import checkpoint, zero
from dsee_scale.inject import dsee_layers
from dsee_scale.prune import ShardMask, plain_parameters, reapply_masks, unpack_mask

CHECKPOINTED = ("tune", "prune", "retune")  # stages that end with a checkpoint


@dataclass
class RunState:
    """Stages finished, the training stage and optimizer step reached in it, the losses, the steps
    skipped for a non-finite loss, timings, and the summary so far."""

    stage: str | None = None  # the stage `step` counts in; None before the first training step
    step: int = 0
    finished: list[str] = field(default_factory=list)
    losses: dict[str, list[float]] = field(default_factory=dict)
    skipped: dict[str, list[int]] = field(default_factory=dict)  # per stage (--skip_nonfinite)
    timings: dict[str, float] = field(default_factory=dict)
    summary: dict = field(default_factory=dict)

    def start_step(self, stage: str) -> int:
        """The step `stage` continues from: where a checkpoint left it, else 0."""
        return self.step if self.stage == stage else 0

    def finish(self, stage: str) -> None:
        """`stage` is done; a checkpointed one is where a resume continues (prune counts no steps)."""
        self.finished.append(stage)
        if stage in CHECKPOINTED:
            self.stage, self.step = stage, self.step if stage != "prune" else 0

    @property
    def tag(self) -> str:
        """The checkpoint's name at this point of the run."""
        return f"{self.stage}-{self.step}"

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> RunState:
        return cls(**data)


@dataclass
class PruningState:
    """The structured plan (kept heads and FFN neurons per layer), this rank's shard of every mask
    and the same masks whole (bit-packed, as checkpoints save them), whether the adapters are
    confined to the kept weights (prune.keep_sparse), whether the kept weights were re-fitted
    (prune.reconstruct: then they are saved once in the run folder, see `refitted_dir`), and the
    re-tune's distillation (prune.distill: its teacher outputs are kept in the run folder too)."""

    plan: dict | None = None
    masks: dict[str, ShardMask] = field(default_factory=dict)
    packed: dict[str, torch.Tensor] = field(default_factory=dict)
    keep_sparse: bool = False
    refitted: bool = False
    distill: dict | None = None  # prune.distill: {"alpha", "t"} of the re-tune's loss (distill.py); its teacher outputs are in the run folder

    def to_json(self) -> dict:
        """What state.json holds; the packed masks are saved as tensors beside it."""
        return {"plan": self.plan, "keep_sparse": self.keep_sparse, "refitted": self.refitted, "distill": self.distill}

    @classmethod
    def from_json(cls, data: dict, packed: dict[str, torch.Tensor], model: nn.Module) -> PruningState:
        """A saved state, each mask cut to this rank's shard of `model`'s weight."""
        masks = checkpoint.shard_masks(model, packed) if packed else {}
        return cls(plan=data["plan"], masks=masks, packed=packed, keep_sparse=data["keep_sparse"], refitted=data["refitted"], distill=data.get("distill"))

    def pruned_weights(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The pruned backbone weights by their plain names, in model order."""
        return {n: p for n, p in plain_parameters(model).items() if n in self.masks}

    def confine_adapters(self, model: nn.Module) -> None:
        """From now on every adapter trains and merges ΔW ⊙ M (layer.keep_mask)."""
        for name, layer in dsee_layers(model).items():
            bits = self.packed.get(f"{name}.weight")
            if bits is not None:
                shape = zero.full_shape(layer.base.weight)
                layer.keep_mask(torch.from_numpy(unpack_mask(bits, shape.numel()) == 0).reshape(shape))

    def restore(self, model: nn.Module, refitted_dir: Path) -> None:
        """Make a backbone rebuilt from --model the pruned one again: re-fitted weights read back,
        pruned entries zeroed, adapters confined. Collective."""
        if not self.masks:
            return
        if self.refitted:
            checkpoint.load_weights(refitted_dir, self.pruned_weights(model))
        reapply_masks(model, self.masks)
        if self.keep_sparse:
            self.confine_adapters(model)
