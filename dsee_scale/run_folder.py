"""The run folder: what identifies the run, its config, the built-in corpus, metrics, summary.

    <output_dir>/dsee_run.json      marker: config, DeepSpeed config, world size
    <output_dir>/config.json        the TrainConfig as run
    <output_dir>/data/, tokenizer/  the built-in corpus and its SentencePiece tokenizer
    <output_dir>/support.safetensors   Ω, chosen once
    <output_dir>/metrics.jsonl, tensorboard/, summary.json
    <output_dir>/checkpoints/, refitted/, export/
"""
from __future__ import annotations

import json
import resource
import shutil
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

from torch import nn

from dsee_scale import dist
from dsee_scale.config import TrainConfig
from dsee_scale.data import write_corpus
from dsee_scale.flops import inference_flops
from dsee_scale.prune import sparsity_report

if TYPE_CHECKING:
    from dsee_scale.run_state import RunState

RUN_MARKER = "dsee_run.json"
REFITTED = "refitted"  # the backbone weights prune.reconstruct re-fitted, saved once


def run_marker(cfg: TrainConfig, ds_config: dict, world: int) -> dict:
    """What identifies a run: its configuration, resolved DeepSpeed config and world size."""
    return {"config": {**cfg.to_dict(), "resume": False, "overwrite": False}, "ds_config": ds_config, "world_size": world}


IDENTITY_FIELDS = ("model", "method", "task", "tokenizer", "train_file", "dataset", "dataset_config", "text_column", "text_pair_column", "label_column",
                   "data_format", "chat_template", "max_length", "packing", "max_train_samples", "seed", "ds_config")


def run_identity(cfg: TrainConfig, ds_config: dict) -> dict:
    """What a checkpoint must share with the run that resumes it: the model, the data, DSEE's
    shape (targets, rank, nnz, ...), the global batch (the data order depends on it) and the
    DeepSpeed config as resolved (validate.choose_ds_config: a default chosen by device is
    recorded by name, so that a resume on another kind of device is named as such)."""
    return {**{k: getattr(cfg, k) for k in IDENTITY_FIELDS}, "dsee": cfg.dsee.to_dict(), "global_batch": ds_config["train_batch_size"]}


# What a run written before the identity had these fields did: a resume that asks otherwise is
# another run. (ds_config is not here: an older run's config is unknown, so it is not compared.)
BEFORE_RECORDED = {"data_format": "auto", "chat_template": None, "packing": False}


def identity_differences(saved: dict, current: dict) -> list[str]:
    """'field: checkpoint X, now Y' for every difference (DSEE fields by their flag names). A field
    the checkpoint does not record (written before the identity had it) counts as what runs did
    then (BEFORE_RECORDED), or is not compared where that is unknown."""
    flat = lambda d: {**{k: v for k, v in d.items() if k != "dsee"}, **{f"dsee.{k}": v for k, v in d.get("dsee", {}).items()}}  # noqa: E731
    before, now = {**{k: v for k, v in BEFORE_RECORDED.items() if k in current}, **flat(saved)}, flat(current)
    return [f"{k}: checkpoint {before[k]!r}, now {now.get(k)!r}" for k in sorted(before) if before[k] != now.get(k)]


def is_writer(folder: Path) -> bool:
    """Whether this rank writes this node's copy of the run folder (marker, built-in corpus and
    tokenizer, Ω, checkpoints): global rank 0, and the first rank of every node that does not
    see rank 0's folder (node-local disks), so that every node can resume. Collective."""
    folder.mkdir(parents=True, exist_ok=True)
    probe = folder / f".probe-{dist.all_gather_object(uuid.uuid4().hex)[0]}"
    if dist.is_main():
        probe.touch()
    dist.barrier()
    writer = dist.is_main() or (dist.local_rank() == 0 and not probe.exists())
    dist.barrier()
    if dist.is_main():
        probe.unlink()
    return writer


def prepare(cfg: TrainConfig, ds_config: dict, world: int) -> None:
    """Writers: a fresh (or replaced) folder gets its marker, config and, without data files,
    the built-in corpus. A resumed folder keeps what it has."""
    folder = Path(cfg.output_dir)
    if cfg.overwrite and folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if not cfg.resume:
        (folder / RUN_MARKER).write_text(json.dumps({**run_marker(cfg, ds_config, world), "created": time.time()}, indent=2))
    (folder / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
    if not (cfg.train_file or cfg.dataset) and not (folder / "data" / "eval.txt").exists():
        write_corpus(folder / "data" / "train.txt", 4000, seed=cfg.seed)
        write_corpus(folder / "data" / "eval.txt", 200, seed=cfg.seed + 1)


def use_builtin_data(cfg: TrainConfig) -> None:
    """Without data files or a hub dataset, the run trains on the folder's built-in corpus."""
    if not (cfg.train_file or cfg.dataset):
        cfg.train_file = str(Path(cfg.output_dir) / "data" / "train.txt")
        cfg.eval_file = str(Path(cfg.output_dir) / "data" / "eval.txt")


class MetricsWriter:
    """JSONL lines and TensorBoard scalars, rank 0 only."""

    def __init__(self, folder: Path) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.jsonl = (folder / "metrics.jsonl").open("a")
        self.tb = SummaryWriter(str(folder / "tensorboard"))
        self.n = 0

    def write(self, record: dict) -> None:
        record = {"time": time.time(), **record}
        self.jsonl.write(json.dumps(record) + "\n")
        self.jsonl.flush()
        self.n += 1
        step = record.get("step", self.n)
        for key, value in record.items():
            if isinstance(value, (int, float)) and key not in ("time", "step"):
                self.tb.add_scalar(f"{record.get('stage', 'run')}/{key}", value, step)

    def close(self) -> None:
        self.jsonl.close()
        self.tb.close()


def complete_summary(model: nn.Module, cfg: TrainConfig, state: RunState, wall_s: float) -> None:
    """The summary's closing figures (sparsity, FLOPs, losses, timings, peak memory per rank)
    added to state.summary. Collective."""
    report = sparsity_report(model, cfg.prune.include, cfg.prune.exclude, frozen_only=cfg.method != "full")
    summary = state.summary
    summary["final_sparsity"] = report["total"]  # below the backbone's only where a dense ΔW was merged (keep_sparse false)
    flops = inference_flops(model, ctx=cfg.max_length, sparse_zeros=report["zeros"])
    dense_before = summary.get("structured", {}).get("flops_before", flops["dense_model"])
    final = flops["dense_model"] - flops["sparse_saved"]  # dense-equivalent: zeros cost nothing
    summary.update(flops_per_token=final, flops_saved=1 - final / dense_before, wall_s=wall_s, output_dir=str(Path(cfg.output_dir)))
    summary["train_loss"] = {k: [v[0], v[-1]] for k, v in state.losses.items() if v}
    summary["losses"] = state.losses
    summary["skipped_steps"] = state.skipped
    summary["timings"] = state.timings
    summary["peak_rss_mb_per_rank"] = [round(x, 1) for x in dist.all_gather_object(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)]


def write_summary(folder: Path, summary: dict) -> None:
    (folder / "summary.json").write_text(json.dumps(summary, indent=2))
    print(format_summary(summary))


def format_summary(s: dict) -> str:
    """The table printed at the end of a run."""
    rows = [("output folder", s.get("output_dir", "")), ("world size", s.get("world_size", 1)), ("trainable", f"{s['trainable_params']:,} of {s['total_params']:,} ({s['trainable_pct']:.3f}%)")]
    for key, value in s.get("train_loss", {}).items():
        rows.append((f"{key} loss first → last", f"{value[0]:.4f} → {value[1]:.4f}"))
    for label in ("before", "after"):
        for key, value in (s.get(label) or {}).items():
            rows.append((f"{key} ({label})", f"{value:.4f}"))
    text = s.get("perplexity") or {}
    rows += [(f"perplexity of {Path(text['file']).name} ({key})", f"{value:.4f}") for key, value in text.items() if isinstance(value, float)]
    rows += [("sparsity (backbone / final model)", f"{100 * s.get('sparsity', 0.0):.1f}% / {100 * s.get('final_sparsity', 0.0):.1f}%"), ("FLOPs saved (dense-equivalent)", f"{100 * s.get('flops_saved', 0.0):.1f}%"), ("wall time", f"{s.get('wall_s', 0.0):.1f} s")]
    width = max(len(k) for k, _ in rows)
    line = "+" + "-" * (width + 2) + "+" + "-" * 44 + "+"
    body = "\n".join(f"| {k:<{width}} | {str(v):<42} |" for k, v in rows)
    return f"{line}\n| {'DSEE run summary':<{width + 45}}|\n{line}\n{body}\n{line}"
