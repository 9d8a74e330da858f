"""Self-distilled re-tuning (--prune.distill): the tuned model teaches its pruned self.

Under ZeRO-3 a second copy of the model as teacher would double its memory, and none is needed:
every re-tune batch is a function of (seed, stage, step) (data.GlobalBatches), so the prune stage
runs the re-tune's batches through the tuned engine in eval mode before it prunes (`label`), and
keeps what the re-tune's loss compares with (`teacher_outputs`): the class logits (cls), the
prediction (reg), or each target token's top-k logits in bf16 and their ids in int32 (lm). The
re-tune reads them back (`TeacherStore`) and learns from both (`distilled_loss`).

The outputs are kept by place, not by rank: `<output_dir>/teacher/step-NNNNNN.safetensors` holds
one step's global batch in row order (lm: the target tokens of its rows in order, and how many
each row has), so any world size, micro-batch and accumulation finds its rows, and a re-tune
resumed on other ranks reads what the uninterrupted one read. Each rank labels its own rows; a
step at a time they are gathered to the run folder's writers (every node's disk gets a copy, as
checkpoints do) and written, so no rank holds more than one step's outputs; the folder is staged
and renamed once complete (checkpoint.StagedFolder).
"""
from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file

from dsee_scale import checkpoint, dist
from dsee_scale.evaluate import CHUNK_TOKENS

TEACHER = "teacher"  # the folder in the run folder
META = "meta.json"  # written last: what the outputs are of (its presence: the folder is complete)
ROWS = {"cls": "logits", "reg": "prediction", "lm": "counts"}  # per task, the stored tensor with one entry per row


def step_file(step: int) -> str:
    return f"step-{step:06d}.safetensors"


def target_mask(labels: torch.Tensor) -> torch.Tensor:
    """lm: the positions whose logits predict a target (the model shifts labels by one)."""
    mask = torch.zeros_like(labels, dtype=torch.bool)
    mask[:, :-1] = labels[:, 1:] != -100
    return mask


def teacher_outputs(logits: torch.Tensor, labels: torch.Tensor, task: str, k: int) -> dict[str, torch.Tensor]:
    """What is kept of one micro-batch's logits, on the host. lm: `counts`, target tokens per row,
    and per target token (rows in order, tokens in order) the top-k logits and their ids, taken
    CHUNK_TOKENS tokens at a time (fp32 logits of a chunk, not of the batch)."""
    if task == "cls":
        return {"logits": logits.float().cpu()}
    if task == "reg":
        return {"prediction": logits[:, 0].float().cpu()}
    if k > logits.shape[-1]:
        raise ValueError(f"prune.distill_topk {k} is more than the model's {logits.shape[-1]} logits per token: lower --prune.distill_topk")
    mask = target_mask(labels)
    rows, cols = mask.nonzero(as_tuple=True)
    # cpu: the teacher's labels are staged to disk from the host, chunk by chunk
    values, ids = [torch.empty(0, k, dtype=torch.bfloat16, device="cpu")], [torch.empty(0, k, dtype=torch.int32, device="cpu")]
    for start in range(0, len(rows), CHUNK_TOKENS):
        top = logits[rows[start : start + CHUNK_TOKENS], cols[start : start + CHUNK_TOKENS]].float().topk(k, dim=-1)
        values.append(top.values.to(torch.bfloat16).cpu())
        ids.append(top.indices.to(torch.int32).cpu())
    return {"counts": mask.sum(1).cpu(), "topk_logits": torch.cat(values), "topk_ids": torch.cat(ids)}


def _join(parts: list[tuple[int, dict[str, torch.Tensor]]], task: str, global_batch: int) -> dict[str, torch.Tensor]:
    """Micro-batches' outputs (first row's place in the global batch, outputs) as one global batch's, in row order."""
    parts = sorted(parts, key=lambda part: part[0])
    places = [start for start, _ in parts]
    ends = [start + len(out[ROWS[task]]) for start, out in parts]
    if places != [0, *ends[:-1]] or ends[-1] != global_batch:
        raise RuntimeError(f"the ranks' teacher outputs cover rows {list(zip(places, ends))} of a global batch of {global_batch}")
    return {key: torch.cat([out[key] for _, out in parts]) for key in parts[0][1]}


def label(folder: Path, steps: int, micro_batches: Callable[[int], Iterable[tuple[range, dict]]], logits_of: Callable[[dict], torch.Tensor],
          task: str, k: int, global_batch: int, writer: bool) -> int:
    """Collective. The teacher outputs of `steps` steps, written into `folder` a step at a time:
    `micro_batches(step)` gives this rank's (places in the global batch, micro-batch) pairs,
    `logits_of(batch)` the model's logits (eval mode, no gradients). Returns the bytes kept."""
    out = checkpoint.StagedFolder(folder, writer, "the teacher outputs")
    kept = 0
    for step in range(steps):
        with torch.no_grad():
            mine = [(places.start, teacher_outputs(logits_of(batch), batch["labels"], task, k)) for places, batch in micro_batches(step)]
        tensors = _join([part for rank in dist.all_gather_object(mine) for part in rank], task, global_batch)
        out.write(lambda: save_file(tensors, str(out.staging / step_file(step))))
        kept += sum(t.nbytes for t in tensors.values())
    meta = {"task": task, "k": k, "steps": steps, "global_batch": global_batch}
    out.write(lambda: (out.staging / META).write_text(json.dumps(meta)))
    out.close()
    return kept


class TeacherStore:
    """The kept teacher outputs, read a micro-batch's rows at a time (only those rows' bytes)."""

    def __init__(self, folder: Path, task: str, steps: int, global_batch: int) -> None:
        if not (folder / META).exists():
            raise FileNotFoundError(f"{folder} holds no teacher outputs, and this run pruned with --prune.distill, whose prune stage writes them there "
                                    "for the re-tune: start again with --overwrite")
        meta = json.loads((folder / META).read_text())
        if (meta["task"], meta["global_batch"]) != (task, global_batch) or meta["steps"] < steps:
            raise ValueError(f"{folder} holds teacher outputs of task {meta['task']}, {meta['steps']} re-tune steps of {meta['global_batch']} rows, not of "
                             f"task {task}, {steps} steps of {global_batch}: keep --retune_steps at most {meta['steps']}, or start again with --overwrite")
        self.folder, self.task = folder, task

    def rows(self, step: int, places: range) -> dict[str, torch.Tensor]:
        """The outputs of the rows at `places` of `step`'s global batch."""
        with safe_open(str(self.folder / step_file(step)), framework="pt") as f:
            if self.task != "lm":
                return {ROWS[self.task]: f.get_slice(ROWS[self.task])[places.start : places.stop]}
            counts = f.get_tensor("counts")
            first = int(counts[: places.start].sum())
            last = first + int(counts[places.start : places.stop].sum())
            return {"counts": counts[places.start : places.stop], **{key: f.get_slice(key)[first:last] for key in ("topk_logits", "topk_ids")}}


def _kl(student: torch.Tensor, teacher: torch.Tensor, t: float) -> torch.Tensor:
    """Σ over rows of KL(softmax(teacher / t) ‖ softmax(student / t)), in fp32."""
    return F.kl_div(F.log_softmax(student.float() / t, -1), F.log_softmax(teacher.float() / t, -1), log_target=True, reduction="sum")


def distilled_loss(task_loss: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor, teacher: dict[str, torch.Tensor], task: str, alpha: float, t: float,
                   num_items: float | None = None) -> torch.Tensor:
    """(1 − α)·task loss + α·T²·KL(teacher ‖ student) of a micro-batch, the KL normalised as the
    task loss is: a mean over the micro-batch's rows (cls), or a share of one mean over the global
    batch's target tokens (lm: `num_items`, GlobalBatches.loss_share's), over each token's teacher
    top-k ids, both distributions renormalised to them. reg: α·MSE to the teacher's prediction
    (a temperature means nothing there)."""
    teacher = {key: value.to(logits.device) for key, value in teacher.items()}
    if task == "reg":
        term = F.mse_loss(logits[:, 0].float(), teacher["prediction"])
    elif task == "cls":
        term = t * t * _kl(logits, teacher["logits"], t) / logits.shape[0]
    else:
        mask = target_mask(labels)
        if not torch.equal(mask.sum(1), teacher["counts"]):
            raise ValueError("the kept teacher outputs do not fit this batch's target tokens: they were written for other data; start again with --overwrite")
        rows, cols = mask.nonzero(as_tuple=True)
        student = logits[rows[:, None], cols[:, None], teacher["topk_ids"].long()]  # (target tokens, k): the student's logits at the teacher's ids
        term = t * t * _kl(student, teacher["topk_logits"], t) / num_items
    return (1 - alpha) * task_loss + alpha * term
