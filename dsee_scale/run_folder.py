"""The run folder: what identifies the run, its config, the built-in corpus, metrics, summary.

    <output_dir>/dsee_run.json      marker: config, DeepSpeed config, world size
    <output_dir>/config.json        the TrainConfig as run
    <output_dir>/data/, tokenizer/  the built-in corpus and its SentencePiece tokenizer
    <output_dir>/support.safetensors   Ω, chosen once
    <output_dir>/metrics.jsonl, tensorboard/, summary.json
    <output_dir>/checkpoints/, export/
"""
from __future__ import annotations

import json
import shutil
import time
import uuid
from pathlib import Path

from dsee_scale import dist
from dsee_scale.config import TrainConfig
from dsee_scale.data import write_corpus
from dsee_scale.validate import RUN_MARKER, run_marker


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
    rows += [("sparsity (backbone / final model)", f"{100 * s.get('sparsity', 0.0):.1f}% / {100 * s.get('final_sparsity', 0.0):.1f}%"), ("FLOPs saved (dense-equivalent)", f"{100 * s.get('flops_saved', 0.0):.1f}%"), ("wall time", f"{s.get('wall_s', 0.0):.1f} s")]
    width = max(len(k) for k, _ in rows)
    line = "+" + "-" * (width + 2) + "+" + "-" * 44 + "+"
    body = "\n".join(f"| {k:<{width}} | {str(v):<42} |" for k, v in rows)
    return f"{line}\n| {'DSEE run summary':<{width + 45}}|\n{line}\n{body}\n{line}"
