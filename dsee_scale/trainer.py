"""The DSEE recipe: setup → tune → prune → re-tune → export → evaluate, over a DeepSpeed engine.

Plain code, top to bottom. Every stage checkpoints (atomically, see checkpoint.py) so a run
resumes exactly: data order is a function of (seed, stage, step), and the checkpoint holds the
engine state, the frozen shards (with any pruning), masks, RNG state and stage/step counters.
"""
from __future__ import annotations

import json
import logging
import math
import resource
import shutil
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file
from tqdm import tqdm

from dsee_scale import checkpoint, dist, zero
from dsee_scale.config import TrainConfig
from dsee_scale.data import GlobalBatches, check_columns, collate, label_map, load_split, tokenize, train_sentencepiece, write_corpus
from dsee_scale.engine import create_engine, init_distributed
from dsee_scale.evaluate import finish, metric_sums
from dsee_scale.export import atomic_save_file, export_hf, load_support, save_adapter
from dsee_scale.flops import inference_flops
from dsee_scale.inject import apply_dsee, count_parameters, dsee_layers, support_of
from dsee_scale.models import build_model, builtin_config, resolve_model_path
from dsee_scale.prune import ShardMask, magnitude_prune, reapply_masks, sparsity_report
from dsee_scale.structured import structured_prune
from dsee_scale.validate import RUN_MARKER, run_marker, validate_before_launch

log = logging.getLogger("dsee_scale")


class Recipe:
    """One DSEE run. `run()` executes cfg.stages in order; each stage is also a public method."""

    def __init__(self, cfg: TrainConfig) -> None:
        self.cfg = cfg
        self.run_dir = Path(cfg.output_dir)
        self.ckpt_dir = self.run_dir / "checkpoints"
        self.masks: dict[str, ShardMask] = {}
        self.summary: dict = {}
        self.done: dict = {"stage": None, "step": 0, "finished": []}
        self.losses: dict[str, list[float]] = {}
        self.timings: dict[str, float] = {}
        self.metrics = None

    # ---- setup -------------------------------------------------------------------------------
    def setup(self) -> None:
        cfg = self.cfg
        self.ds_config = validate_before_launch(cfg)
        init_distributed(cfg.dist_timeout_min)
        self.rank, self.world = dist.rank(), dist.world_size()
        # Each rank read the output folder before any collective (validate); rank 0's reading is
        # the one acted on, and no rank is still reading it once rank 0 may replace it.
        cfg.resume, cfg.overwrite = dist.all_gather_object((cfg.resume, cfg.overwrite))[0]
        logging.basicConfig(level=logging.INFO if dist.is_main() else logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
        torch.manual_seed(cfg.seed)
        if dist.is_main():
            self._prepare_run_dir()
        dist.barrier()
        self._data_paths()
        self.tokenizer = self._tokenizer()
        self._load_data()
        overrides = {}
        if cfg.task == "cls":
            overrides = {"num_labels": len(self.labels), "id2label": {i: v for v, i in self.labels.items()}, "label2id": dict(self.labels), "dsee_label_map": dict(self.labels)}
        source = builtin_config(cfg.model, vocab_size=len(self.tokenizer)) if cfg.model.startswith("builtin:") else cfg.model
        tic = time.time()
        self.model = build_model(source, cfg.task, ds_config=self.ds_config, dtype=self._dtype(), **overrides)
        self.timings["build_s"] = time.time() - tic
        if cfg.gradient_checkpointing:
            self.model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        vocab = self.model.config.vocab_size
        if len(self.tokenizer) > vocab:
            raise ValueError(f"tokenizer has {len(self.tokenizer)} tokens but the model's vocabulary is {vocab}: use the model's own tokenizer (--tokenizer)")
        self.model.config.pad_token_id = self.tokenizer.pad_token_id
        support_file = self.run_dir / "support.safetensors"
        support = load_file(str(support_file)) if support_file.exists() else None
        if support is None and cfg.support_file:
            support = load_support(self.model, cfg.dsee, cfg.support_file)
        tic = time.time()
        apply_dsee(self.model, cfg.dsee, ds_config=self.ds_config, support=support)
        self.timings["support_s"] = time.time() - tic
        if dist.is_main() and support is None:
            atomic_save_file(support_of(self.model), support_file, {"dsee_config": json.dumps(cfg.dsee.to_dict())})
        self.partitioned = zero.zero3_active(self.model)
        self.engine = create_engine(self.model, self.ds_config, lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.micro = self.engine.train_micro_batch_size_per_gpu()
        self.accum = self.engine.gradient_accumulation_steps()
        trainable, total = count_parameters(self.model)
        self.summary.update(trainable_params=trainable, total_params=total, trainable_pct=100.0 * trainable / total, world_size=self.world)
        if cfg.resume:
            self._load_latest_checkpoint()
        self.metrics = _MetricsWriter(self.run_dir) if dist.is_main() else None

    def _dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.ds_config.get("bf16", {}).get("enabled") else torch.float32

    def _prepare_run_dir(self) -> None:
        cfg = self.cfg
        if cfg.overwrite and self.run_dir.exists():
            shutil.rmtree(self.run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / RUN_MARKER).write_text(json.dumps({**run_marker(cfg, self.ds_config, self.world), "created": time.time()}, indent=2))
        (self.run_dir / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
        if not (cfg.train_file or cfg.dataset):
            data = self.run_dir / "data"
            write_corpus(data / "train.txt", 4000, seed=cfg.seed)
            write_corpus(data / "eval.txt", 200, seed=cfg.seed + 1)

    def _data_paths(self) -> None:
        cfg = self.cfg
        if not (cfg.train_file or cfg.dataset):
            cfg.train_file = str(self.run_dir / "data" / "train.txt")
            cfg.eval_file = str(self.run_dir / "data" / "eval.txt")

    def _tokenizer(self):
        cfg = self.cfg
        from transformers import AutoTokenizer

        if cfg.tokenizer or not cfg.model.startswith("builtin:"):
            tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(cfg.tokenizer or cfg.model))
        else:
            folder = self.run_dir / "tokenizer"
            if dist.is_main() and not (folder / "tokenizer_config.json").exists():
                train_sentencepiece(Path(cfg.train_file), folder, vocab_size=512)
            dist.barrier()
            tokenizer = AutoTokenizer.from_pretrained(str(folder))
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
        return tokenizer

    def _load_data(self) -> None:
        """Rank 0 loads and tokenizes first; the other ranks then read datasets' cache of it."""
        cfg = self.cfg
        with dist.main_process_first():
            train_ds = load_split(cfg, "train")
            check_columns(train_ds.column_names, cfg, "training data")
            eval_ds = load_split(cfg, "eval")
            if eval_ds is not None:
                check_columns(eval_ds.column_names, cfg, "evaluation data")
            self.labels = label_map(train_ds, cfg) if cfg.task == "cls" else None
            self.train_rows = tokenize(train_ds, self.tokenizer, cfg, self.labels)
            self.eval_rows = tokenize(eval_ds, self.tokenizer, cfg, self.labels) if eval_ds is not None else None

    # ---- training ----------------------------------------------------------------------------
    def _schedule(self, steps: int, start: int):
        """This stage's LR schedule (transformers.get_scheduler over the stage's own steps),
        positioned at `start` when the stage resumes; None where the DeepSpeed config's
        scheduler block drives the LR (the engine steps it and checkpoints its state)."""
        if "scheduler" in self.ds_config:
            return None
        from transformers import get_scheduler

        optimizer = getattr(self.engine.optimizer, "optimizer", self.engine.optimizer)  # the torch optimizer inside ZeRO's
        for group in optimizer.param_groups:
            group["initial_lr"] = self.cfg.lr
        return get_scheduler(self.cfg.lr_scheduler, optimizer, num_warmup_steps=self.cfg.warmup_steps, num_training_steps=steps,
                             scheduler_specific_kwargs={"last_epoch": start - 1})

    def _to_device(self, batch: dict) -> dict:
        device = self.engine.device
        return {k: v.to(device) for k, v in batch.items()}

    def _micro_batch(self, batches: GlobalBatches, step: int, accum: int) -> dict:
        """This rank's training micro-batch, collated and on the device."""
        return self._to_device(collate(self.train_rows[batches.micro_indices(step, accum, self.rank)], self.tokenizer))

    def train(self, stage: str, steps: int) -> None:
        """Optimizer steps of `stage` ('tune' or 'retune'); resumes from the checkpointed step."""
        cfg, engine = self.cfg, self.engine
        start = self.done["step"] if self.done["stage"] == stage else 0
        batches = GlobalBatches(len(self.train_rows), self.micro, self.accum, self.world, seed=cfg.seed + (1 if stage == "retune" else 0))
        schedule = self._schedule(steps, start)
        if schedule is not None and cfg.warmup_steps > steps:
            log.warning("warm-up (%d steps) is longer than the %s stage (%d steps): the LR never reaches --lr", cfg.warmup_steps, stage, steps)
        engine.train()
        # A bar only on a terminal: in a log file every refresh would add a line's worth of
        # carriage returns, so there the log_every records below are logged instead.
        bar = tqdm(range(start, steps), desc=stage, disable=not (dist.is_main() and sys.stderr.isatty()), dynamic_ncols=True)
        window, tic, stage_tic = [], time.time(), time.time()
        for step in bar:
            lr = engine.get_lr()[0]
            total = torch.zeros(1, device=engine.device)  # summed on the device: one sync per step, not per micro-step
            for accum in range(self.accum):
                loss = engine(**self._micro_batch(batches, step, accum)).loss
                engine.backward(loss)
                engine.step()
                total += loss.detach().float()
            if schedule is not None:
                schedule.step()
            loss_value = float(dist.all_reduce(total / self.accum)) / self.world
            window.append(loss_value)
            self.losses.setdefault(stage, []).append(loss_value)
            if (step + 1) % cfg.log_every == 0 or step + 1 == steps:
                elapsed = time.time() - tic
                samples = len(window) * batches.global_batch
                record = {"stage": stage, "step": step + 1, "loss": sum(window) / len(window), "lr": lr, "samples_per_s": samples / elapsed}
                bar.set_postfix(loss=f"{record['loss']:.4f}", sps=f"{record['samples_per_s']:.1f}")
                if bar.disable:
                    log.info("%s step %d/%d: loss %.4f, %.1f samples/s", stage, step + 1, steps, record["loss"], record["samples_per_s"])
                if self.metrics:
                    self.metrics.write(record)
                window, tic = [], time.time()
            self.done.update(stage=stage, step=step + 1)
            if cfg.eval_every and (step + 1) % cfg.eval_every == 0:
                self.evaluate(tag=f"{stage}-{step + 1}")
                engine.train()
            if cfg.save_every and (step + 1) % cfg.save_every == 0 and step + 1 < steps:
                self.save_checkpoint()
        bar.close()
        if steps > start:
            self.timings[f"{stage}_s_per_step"] = (time.time() - stage_tic) / (steps - start)

    # ---- pruning -----------------------------------------------------------------------------
    def prune(self) -> None:
        """Global (or per-layer) magnitude pruning of the frozen backbone; masks stay fixed after."""
        p = self.cfg.prune
        if p.heads or p.ffn:
            tic = time.time()
            calibration = self._calibration_batches(p.calibration_batches) if p.structured_score == "gradient" else None
            self.summary["structured"] = structured_prune(self.model, p, calibration, self.ds_config, ctx=self.cfg.max_length, engine=self.engine)
            # Parameter shapes changed: a fresh engine (and optimizer) for re-tuning.
            self.engine.destroy()
            self.engine = create_engine(self.model, self.ds_config, lr=self.cfg.lr, weight_decay=self.cfg.weight_decay)
            self.timings["structured_s"] = time.time() - tic
        if p.sparsity > 0:
            tic = time.time()
            self.masks = magnitude_prune(self.model, p.sparsity, p.scope, p.score, p.include, p.exclude)
            self.timings["prune_s"] = time.time() - tic
            log.info("pruned to %.1f%% sparsity in %.1fs", 100 * p.sparsity, self.timings["prune_s"])
        self.summary["sparsity"] = sparsity_report(self.model, p.include, p.exclude)["total"]

    def _calibration_batches(self, n: int) -> list[dict]:
        batches = GlobalBatches(len(self.train_rows), self.micro, 1, self.world, seed=self.cfg.seed + 7)
        return [self._micro_batch(batches, s, 0) for s in range(n)]

    # ---- evaluation --------------------------------------------------------------------------
    def _eval_batches(self):
        """This rank's evaluation batches and which rows are real. Every rank runs the same
        number of forwards (ZeRO-3 gathers are collective); padding rows are not counted."""
        rows = self.eval_rows or self.train_rows.select(range(min(len(self.train_rows), 4 * self.micro * self.world)))
        per_rank = math.ceil(len(rows) / self.world)
        mine = range(len(rows))[self.rank * per_rank : (self.rank + 1) * per_rank]
        for i in range(math.ceil(per_rank / self.micro)):
            chunk = list(mine[i * self.micro : (i + 1) * self.micro])
            real = torch.tensor([True] * len(chunk) + [False] * (self.micro - len(chunk)), device=self.engine.device)
            yield rows[chunk + [0] * (self.micro - len(chunk))], real

    @torch.no_grad()
    def evaluate(self, tag: str = "final", bleu: bool = True) -> dict:
        cfg, engine = self.cfg, self.engine
        engine.eval()
        sums = torch.zeros(2, dtype=torch.float64, device=engine.device)
        for rows, real in self._eval_batches():
            batch = self._to_device(collate(rows, self.tokenizer))
            sums += metric_sums(engine(**batch).logits, batch["labels"], cfg.task, real)
        result = finish(dist.all_reduce(sums), cfg.task)
        if cfg.task == "lm" and bleu and self.eval_rows and "source" in self.eval_rows[0]:
            result["bleu"] = self._bleu()
        if self.metrics:
            self.metrics.write({"stage": "evaluate", "tag": tag, **result})
        log.info("evaluation %s: %s", tag, result)
        return result

    def _bleu(self) -> float:
        """Greedy generation from each unique source; corpus BLEU against all of its references."""
        import sacrebleu

        refs: dict[str, list[str]] = {}
        for row in self.eval_rows:
            refs.setdefault(row["source"], []).append(row["target"])
        sources = sorted(refs)[: self.cfg.gen_samples]
        per_rank = math.ceil(len(sources) / self.world)
        mine = sources[self.rank * per_rank : (self.rank + 1) * per_rank]
        hyps = [self._generate(s) for s in mine]
        for _ in range(per_rank - len(mine)):  # keep the collective forwards in step across ranks
            self._generate(sources[0])
        gathered = dist.all_gather_object(list(zip(mine, hyps)))
        pairs = [p for part in gathered for p in part]
        depth = max(len(refs[s]) for s, _ in pairs)
        streams = [[refs[s][min(i, len(refs[s]) - 1)] for s, _ in pairs] for i in range(depth)]
        return sacrebleu.corpus_bleu([h for _, h in pairs], streams).score

    def _generate(self, source: str) -> str:
        from dsee_scale.data import PAIR_SEPARATOR

        ids = self.tokenizer(source + " " + PAIR_SEPARATOR, add_special_tokens=False, return_tensors="pt")["input_ids"].to(self.engine.device)
        out = self.engine.module.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=self.cfg.gen_max_new_tokens, do_sample=False,
            pad_token_id=self.tokenizer.pad_token_id, eos_token_id=self.tokenizer.eos_token_id, synced_gpus=self.partitioned,
        )
        return self.tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True).strip()

    # ---- export and checkpoints --------------------------------------------------------------
    def export(self) -> None:
        """Adapter-only file, then the adapters merged in place (exactly, or re-masked with
        --export_remask) and the model written as a plain HF folder. A later `evaluate` measures
        exactly that model."""
        out = self.run_dir / "export"
        tic = time.time()
        save_adapter(self.model, out / "adapter", self.cfg.dsee)
        self.timings["adapter_save_s"] = time.time() - tic
        self.summary["adapter_bytes"] = (out / "adapter" / "dsee_adapter.safetensors").stat().st_size
        if dist.is_main():
            self.tokenizer.save_pretrained(str(out / "adapter"))
        if self.cfg.export_merged:
            for layer in dsee_layers(self.model).values():
                layer.merge(remask=self.cfg.export_remask and bool(self.masks))
            export_hf(self.model, out / "merged", merge=False)
            if dist.is_main():
                self.tokenizer.save_pretrained(str(out / "merged"))
        self.summary["export"] = str(out)

    def save_checkpoint(self) -> None:
        tag = f"{self.done['stage']}-{self.done['step']}"
        client = {"done": self.done, "losses": self.losses, "summary": self.summary}
        checkpoint.save(self.engine, self.ckpt_dir, tag, client, self.masks, keep=self.cfg.keep_checkpoints, frozen=self.cfg.checkpoint_frozen)

    def _load_latest_checkpoint(self) -> None:
        client, masks = checkpoint.load_latest(self.engine, self.ckpt_dir)
        if client is None:
            log.info("no checkpoint in %s: starting from the beginning", self.ckpt_dir)
            return
        self.done, self.losses, self.summary = client["done"], client["losses"], {**client["summary"], **self.summary}
        if masks:
            self.masks = masks
            reapply_masks(self.model, masks)

    # ---- the whole run -----------------------------------------------------------------------
    def run(self) -> dict:
        cfg = self.cfg
        tic = time.time()
        if "before" not in self.summary and "evaluate" in cfg.stages and self.done["stage"] is None:
            self.summary["before"] = self.evaluate(tag="before", bleu=False)
        for stage in cfg.stages:
            if stage in self.done["finished"]:
                continue
            if stage == "tune":
                self.train("tune", cfg.steps)
            elif stage == "prune":
                self.prune()
            elif stage == "retune":
                self.train("retune", cfg.retune_steps)
            elif stage == "evaluate":
                self.summary["after"] = self.evaluate(tag="final")
            elif stage == "export":
                self.export()
            self.done["finished"].append(stage)
            if stage in ("tune", "prune", "retune"):
                self.done.update(stage=stage, step=self.done["step"] if stage != "prune" else 0)
                self.save_checkpoint()
        report = sparsity_report(self.model, cfg.prune.include, cfg.prune.exclude)
        zeros = report["zeros"]
        self.summary["final_sparsity"] = report["total"]  # after an exact merge, adapted matrices are dense
        flops = inference_flops(self.model, ctx=cfg.max_length, sparse_zeros=zeros)
        dense_before = self.summary.get("structured", {}).get("flops_before", flops["dense_model"])
        final = flops["dense_model"] - flops["sparse_saved"]  # dense-equivalent: zeros cost nothing
        self.summary.update(flops_per_token=final, flops_saved=1 - final / dense_before, wall_s=time.time() - tic, output_dir=str(self.run_dir))
        self.summary["train_loss"] = {k: [v[0], v[-1]] for k, v in self.losses.items() if v}
        self.summary["losses"] = self.losses
        self.summary["timings"] = self.timings
        self.summary["peak_rss_mb_per_rank"] = [round(x, 1) for x in dist.all_gather_object(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)]
        if dist.is_main():
            (self.run_dir / "summary.json").write_text(json.dumps(self.summary, indent=2))
            print(format_summary(self.summary))
        return self.summary

    def close(self) -> None:
        if self.metrics:
            self.metrics.close()
        if dist.initialized():
            dist.barrier()
            torch.distributed.destroy_process_group()


class _MetricsWriter:
    """JSONL lines and TensorBoard scalars, rank 0 only."""

    def __init__(self, run_dir: Path) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.jsonl = (run_dir / "metrics.jsonl").open("a")
        self.tb = SummaryWriter(str(run_dir / "tensorboard"))
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


def format_summary(s: dict) -> str:
    """The table printed at the end of a run."""
    rows = [("output folder", s.get("output_dir", "")), ("world size", s.get("world_size", 1)), ("trainable", f"{s['trainable_params']:,} of {s['total_params']:,} ({s['trainable_pct']:.3f}%)")]
    for key, value in s.get("train_loss", {}).items():
        rows.append((f"{key} loss first → last", f"{value[0]:.4f} → {value[1]:.4f}"))
    for label in ("before", "after"):
        for key, value in (s.get(label) or {}).items():
            rows.append((f"{key} ({label})", f"{value:.4f}"))
    rows += [("sparsity (backbone / final model)", f"{100 * s.get('sparsity', 0.0):.1f}% / {100 * s.get('final_sparsity', 0.0):.1f}%"), ("inference FLOPs saved", f"{100 * s.get('flops_saved', 0.0):.1f}%"), ("wall time", f"{s.get('wall_s', 0.0):.1f} s")]
    width = max(len(k) for k, _ in rows)
    line = "+" + "-" * (width + 2) + "+" + "-" * 44 + "+"
    body = "\n".join(f"| {k:<{width}} | {str(v):<42} |" for k, v in rows)
    return f"{line}\n| {'DSEE run summary':<{width + 45}}|\n{line}\n{body}\n{line}"
