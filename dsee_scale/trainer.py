"""The DSEE recipe: setup → tune → prune → re-tune → export → evaluate, over a DeepSpeed engine.

Plain code, top to bottom; each stage is a method of the same name. Training stages checkpoint
(checkpoint.py) so a killed run resumes exactly, on any number of ranks: data order is a
function of (seed, stage, step), dropout of (seed, stage, step, row; dropout.py), and a
checkpoint holds everything else a run has learnt: the adapters and their optimizer moments,
RunState (where the run is, what it measured) and PruningState (masks, plan; run_state.py).
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import shutil
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import datasets
import torch
import transformers
from safetensors.torch import load_file
from tqdm import tqdm

from dsee_scale import checkpoint, dist, distill, dropout, faults, packing, run_folder, zero
from dsee_scale.arch import model_type, prune_scope_of
from dsee_scale.baselines import apply_peft_lora, merge_peft_lora, train_everything
from dsee_scale.config import TrainConfig
from dsee_scale.chat import use_chat_template
from dsee_scale.data import GlobalBatches, batch_counts, check_columns, check_labels, collate, data_counts, data_format, label_map, load_split, load_tokenizer, text_windows, tokenize
from dsee_scale.ds_config import nvme_offload
from dsee_scale.engine import create_engine, init_distributed, torch_optimizer
from dsee_scale.evaluate import engine_bleu, evaluate_engine
from dsee_scale.export import atomic_save_file, compressed_format, export_compressed, export_hf, load_support, save_adapter, save_for_generation
from dsee_scale.inject import apply_dsee, count_parameters, dsee_layers, support_of
from dsee_scale.metrics import check_metric
from dsee_scale.models import build_model, builtin_config
from dsee_scale.prune import PRUNE_SCORES, prune_nm, prune_unstructured, sparsity_report, whole_masks
from dsee_scale.run_state import CHECKPOINTED, PruningState, RunState
from dsee_scale.structured import plan_tensors, remove, structured_prune
from dsee_scale.validate import validate_before_launch

if TYPE_CHECKING:
    from datasets import Dataset

log = logging.getLogger("dsee_scale")


def shows_progress() -> bool:
    """Progress bars on rank 0 at a terminal only: in a log file every refresh adds a line's worth
    of carriage returns, so there the log_every records are logged instead."""
    return dist.is_main() and sys.stderr.isatty()


class NonFiniteLoss(RuntimeError):
    """Training produced a NaN or infinite loss; the last checkpoint is the last good state."""


class Recipe:
    """One DSEE run. `run()` executes cfg.stages in order; each stage is a method of its name."""

    def __init__(self, cfg: TrainConfig) -> None:
        self.cfg = cfg
        self.run_dir = Path(cfg.output_dir)
        self.ckpt_dir = self.run_dir / "checkpoints"
        self.state = RunState()  # where the run is and what it measured (checkpointed)
        self.pruning = PruningState()  # what pruning decided (checkpointed)
        self.compressed_format: str | None = None  # export_format compressed: sparse-bitmask or sparse-24-bitmask
        self.train_windows: Dataset | None = None  # --packing: the training rows packed into windows (packing.pack), what training steps read
        self.metrics = None

    # ---- setup -------------------------------------------------------------------------------
    def setup(self) -> None:
        cfg = self.cfg
        self.ds_config = validate_before_launch(cfg)
        self.identity = run_folder.run_identity(cfg, self.ds_config)
        init_distributed(cfg.dist_timeout_min)
        self.rank, self.world = dist.rank(), dist.world_size()
        # Each rank read the output folder before any collective (validate); rank 0's reading is
        # the one acted on, and no rank is still reading it once rank 0 may replace it.
        cfg.resume, cfg.overwrite = dist.all_gather_object((cfg.resume, cfg.overwrite))[0]
        logging.basicConfig(level=logging.INFO if dist.is_main() else logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
        if not shows_progress():  # the libraries' bars as well: datasets reading and tokenizing, transformers loading weights
            datasets.disable_progress_bars()
            transformers.utils.logging.disable_progress_bar()
        self.writer = run_folder.is_writer(self.run_dir)
        if self.writer:
            run_folder.prepare(cfg, self.ds_config, self.world)
        dist.barrier()
        run_folder.use_builtin_data(cfg)
        self.ds_config = zero.with_fetch_defaults(self.ds_config)  # after the run folder recorded the config as given
        self.tokenizer = load_tokenizer(cfg, self.writer)
        # before the model is built: a builtin model is built with the template's tokens, a pretrained one grows to them
        self.new_tokens = use_chat_template(self.tokenizer, cfg.chat_template) if cfg.chat_template else 0
        self._load_data()
        self.perplexity_rows = text_windows(cfg.eval_perplexity, self.tokenizer, cfg.max_length) if cfg.eval_perplexity else None
        saved = checkpoint.load_latest(self.ckpt_dir) if cfg.resume else None
        self._build_model()
        if cfg.export_format == "compressed":
            self.compressed_format = compressed_format(self.model, cfg.prune)  # a refusal comes now, not after training
        if saved and not checkpoint.same_backbone(saved[0]["backbone_digest"], self.backbone_digest):
            raise checkpoint.CheckpointError(f"the backbone built from --model {cfg.model} differs from the one {self.ckpt_dir} was saved from: resume needs the same model files")
        if saved and saved[0]["pruning"]["plan"]:
            remove(self.model, *plan_tensors(saved[0]["pruning"]["plan"], zero.shard_device(next(self.model.parameters()))), self.ds_config)
        self.engine = self._create_engine()
        self.micro = self.engine.train_micro_batch_size_per_gpu()
        self.accum = self.engine.gradient_accumulation_steps()
        trainable, total = count_parameters(self.model)
        self.state.summary.update(trainable_params=trainable, total_params=total, trainable_pct=100.0 * trainable / total, world_size=self.world)
        if saved:
            self._restore(*saved)
        elif cfg.resume:
            log.info("no checkpoint in %s: starting from the beginning", self.ckpt_dir)
        self.metrics = run_folder.MetricsWriter(self.run_dir) if dist.is_main() else None

    def _create_engine(self):
        return create_engine(self.model, self.ds_config, lr=self.cfg.lr, weight_decay=self.cfg.weight_decay,
                             share_frozen=self.cfg.share_frozen_weights, hook_per_block=self.cfg.zero3_hook_per_block)

    def _load_data(self) -> None:
        """Rank 0 loads and tokenizes first; the other ranks then read datasets' cache of it.
        LM splits: their format and what fitting them to max_length did are logged and kept in
        the summary's `data`; with --packing, the training rows are packed (every rank alike)."""
        cfg = self.cfg
        with dist.main_process_first():
            train_ds = load_split(cfg, "train")
            eval_ds = load_split(cfg, "eval")
            for ds, where in ((train_ds, "training data"), (eval_ds, "evaluation data")):
                if ds is not None:
                    check_columns(ds.column_names, cfg, where)
                    if cfg.task != "lm":
                        check_labels(ds[cfg.label_column], cfg, where)
            self.labels = label_map(train_ds, cfg) if cfg.task == "cls" else None
            if self.labels is not None:
                check_metric(cfg.metric, self.labels)
            self.train_rows = tokenize(train_ds, self.tokenizer, cfg, self.labels)
            self.eval_rows = tokenize(eval_ds, self.tokenizer, cfg, self.labels) if eval_ds is not None else None
        if cfg.task != "lm":
            return
        counts = {split: data_counts(ds, rows, data_format(ds.column_names, cfg)) for split, ds, rows in (("train", train_ds, self.train_rows), ("eval", eval_ds, self.eval_rows)) if ds is not None}
        for split, c in counts.items():
            log.info("%s data: format %s%s; %d rows, %d truncated, %d dropped (answer longer than --max_length %d), %d target tokens", split, c["format"],
                     " (--data_format auto, by its columns)" if cfg.data_format == "auto" else "", c["rows"], c["truncated_rows"], c["dropped_rows"], cfg.max_length, c["target_tokens"])
        if not len(self.train_rows):
            raise ValueError(f"every training row's answer is longer than --max_length {cfg.max_length}: raise --max_length")
        if cfg.packing:
            self.train_windows = packing.pack(self.train_rows, cfg.max_length, cfg.seed)
            tokens = sum(map(len, self.train_windows["input_ids"]))
            counts["train"]["packing"] = {"windows": len(self.train_windows), "fill": tokens / (len(self.train_windows) * cfg.max_length)}
            log.info("packing: %d training rows in %d windows of --max_length %d, %.1f%% of their tokens real", len(self.train_rows), len(self.train_windows),
                     cfg.max_length, 100 * counts["train"]["packing"]["fill"])
        self.state.summary["data"] = counts

    def _build_model(self) -> None:
        """The frozen backbone (partitioned as it is built under ZeRO-3) with DSEE on it (or a
        baseline's trainable part: cfg.method)."""
        cfg = self.cfg
        overrides = {}
        if cfg.task == "cls":
            overrides = {"num_labels": len(self.labels), "id2label": {i: v for v, i in self.labels.items()}, "label2id": dict(self.labels), "dsee_label_map": dict(self.labels)}
        elif cfg.task == "reg":
            overrides = {"num_labels": 1, "problem_type": "regression"}  # one output; HF's loss is then the MSE
        source = builtin_config(cfg.model, vocab_size=len(self.tokenizer)) if cfg.model.startswith("builtin:") else cfg.model
        self.dtype = torch.bfloat16 if self.ds_config.get("bf16", {}).get("enabled") else torch.float32
        torch.manual_seed(cfg.seed)  # random-init (builtin) models: the same backbone on every rank and every resume
        tic = time.time()
        self.model = build_model(source, cfg.task, ds_config=self.ds_config, dtype=self.dtype, vocab_size=len(self.tokenizer) if self.new_tokens else None, **overrides)
        self.state.timings["build_s"] = time.time() - tic
        if cfg.gradient_checkpointing:
            self.model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        if len(self.tokenizer) > self.model.config.vocab_size:
            raise ValueError(f"tokenizer has {len(self.tokenizer)} tokens but the model's vocabulary is {self.model.config.vocab_size}: use the model's own tokenizer (--tokenizer)")
        self.model.config.pad_token_id = self.tokenizer.pad_token_id
        if cfg.method == "dsee":
            self._apply_dsee()
        elif cfg.method == "peft_lora":
            apply_peft_lora(self.model, cfg.dsee)
        else:
            train_everything(self.model)
        if cfg.row_dropout:
            dropout.install(self.model)  # the backbone's, the adapters' and the head's dropout, keyed by row
        if cfg.packing:
            packing.check_model(self.model.config, cfg.max_length)  # the attention as installed (a hub model is first seen here)
        on_nvme = zero.on_nvme_count(self.model)
        if on_nvme:
            self.state.summary["nvme_params"] = on_nvme  # weights whose shards live on NVMe (ZeRO-Infinity)
        self.backbone_digest = checkpoint.backbone_digest(self.model)

    def _apply_dsee(self) -> None:
        """Ω is chosen once and kept in the run folder (a resumed run reads it back)."""
        cfg = self.cfg
        support_file = self.run_dir / "support.safetensors"
        support = load_file(str(support_file)) if support_file.exists() else None
        if support is None and cfg.support_file:
            support = load_support(self.model, cfg.dsee, cfg.support_file)
        tic = time.time()
        apply_dsee(self.model, cfg.dsee, ds_config=self.ds_config, support=support)
        self.state.timings["support_s"] = time.time() - tic
        if self.writer and support is None:
            atomic_save_file(support_of(self.model), support_file, {"dsee_config": json.dumps(cfg.dsee.to_dict())})

    # ---- training ----------------------------------------------------------------------------
    def tune(self) -> None:
        self.train("tune", self.cfg.steps)

    def retune(self) -> None:
        self.train("retune", self.cfg.retune_steps)

    def _schedule(self, steps: int, start: int):
        """This stage's LR schedule (transformers.get_scheduler over the stage's own steps),
        positioned at `start` when the stage resumes; None where the DeepSpeed config's
        scheduler block drives the LR (the engine steps it; checkpoints keep its state)."""
        if "scheduler" in self.ds_config:
            return None
        from transformers import get_scheduler

        optimizer = torch_optimizer(self.engine)
        for group in optimizer.param_groups:
            group["initial_lr"] = self.cfg.lr
        return get_scheduler(self.cfg.lr_scheduler, optimizer, num_warmup_steps=self.cfg.warmup_steps, num_training_steps=steps,
                             scheduler_specific_kwargs={"last_epoch": start - 1})

    def _micro_batch(self, rows: Dataset, batches: GlobalBatches, step: int, accum: int) -> dict:
        """This rank's micro-batch of `rows` (tokenized rows, or packed windows), collated and on the device."""
        batch = collate(rows[batches.micro_indices(step, accum, self.rank)], self.tokenizer)
        return {k: v.to(self.engine.device) for k, v in batch.items()}

    def _model_inputs(self, batch: dict) -> dict:
        """A training micro-batch as the model takes it: packed windows get their rows' attention (packing.model_inputs)."""
        if "position_ids" not in batch:
            return batch
        return packing.model_inputs(batch, self.model.config._attn_implementation, self.dtype)

    def _loss_share(self, rows: Dataset, batches: GlobalBatches, step: int) -> dict:
        """The LM loss's normaliser for this step (GlobalBatches.loss_share)."""
        if self.cfg.task != "lm":
            return {}
        return batches.loss_share(rows[batches.global_indices(step)]["labels"])

    def _stage_batches(self, stage: str) -> tuple[Dataset, GlobalBatches]:
        """What the steps of training stage `stage` read: the rows (tokenized, or packed windows: a
        packed window is one row of the global batch) and the stage's global batches."""
        rows = self.train_rows if self.train_windows is None else self.train_windows
        return rows, GlobalBatches(len(rows), self.micro, self.accum, self.world, seed=self.cfg.seed + (1 if stage == "retune" else 0))

    def train(self, stage: str, steps: int) -> None:
        """Optimizer steps of `stage` ('tune' or 'retune'); resumes from the checkpointed step."""
        cfg, engine = self.cfg, self.engine
        start = self.state.start_step(stage)
        rows, batches = self._stage_batches(stage)
        kd = self.pruning.distill if stage == "retune" else None  # --prune.distill as pruning decided it
        teacher = distill.TeacherStore(self.run_dir / distill.TEACHER, cfg.task, steps, batches.global_batch) if kd else None
        if kd:
            log.info("re-tune distilled from the tuned model's outputs in %s: alpha %g, T %g (as pruning decided)", teacher.folder, kd["alpha"], kd["t"])
        schedule = self._schedule(steps, start)
        if schedule is not None and cfg.warmup_steps > steps:
            log.warning("warm-up (%d steps) is longer than the %s stage (%d steps): the LR never reaches --lr", cfg.warmup_steps, stage, steps)
        engine.train()
        bar = tqdm(range(start, steps), desc=stage, disable=not shows_progress(), dynamic_ncols=True)
        window, tic, stage_tic = [], time.time(), time.time()
        examples = tokens = stage_tokens = 0.0  # examples and real input tokens since the last log record; real input tokens of the stage
        for step in bar:
            torch.manual_seed(dropout.seed_of(cfg.seed, stage, step, self.rank))  # draws outside dropout.rows (torch's own) depend on where the run is too
            lr = engine.get_lr()[0]
            share = self._loss_share(rows, batches, step)
            # loss, examples, real input tokens: summed on the device, one sync per step, not per micro-step
            total = torch.zeros(3, dtype=torch.float64, device=engine.device)
            for accum in range(self.accum):
                batch = self._micro_batch(rows, batches, step, accum)
                # dropout keyed by each row's (or packed window's) place in the global batch: the same masks in any split (backward recomputes under checkpointing)
                keyed = dropout.rows(cfg.seed, stage, step, batches.micro_positions(accum, self.rank), batch["attention_mask"]) if cfg.row_dropout else contextlib.nullcontext()
                with keyed:
                    out = engine(**self._model_inputs(batch), **share)
                    loss = out.loss
                    if teacher is not None:
                        kept = teacher.rows(step, batches.micro_positions(accum, self.rank))
                        loss = distill.distilled_loss(loss, out.logits, batch["labels"], kept, cfg.task, kd["alpha"], kd["t"], share.get("num_items_in_batch"))
                    loss = faults.training_loss(loss, stage, step + 1)
                    engine.backward(loss)
                engine.step()
                total += torch.cat([loss.detach().double().reshape(1) / self.accum, batch_counts(batch).double()])
            if schedule is not None:
                schedule.step()
            loss_sum, step_examples, step_tokens = dist.all_reduce(total).tolist()
            loss_value = loss_sum / self.world
            examples, tokens, stage_tokens = examples + step_examples, tokens + step_tokens, stage_tokens + step_tokens
            if math.isfinite(loss_value):
                window.append(loss_value)
                self.state.losses.setdefault(stage, []).append(loss_value)
            else:
                self._skip_or_stop(stage, step + 1, loss_value)
            if window and ((step + 1) % cfg.log_every == 0 or step + 1 == steps):
                elapsed = time.time() - tic
                record = {"stage": stage, "step": step + 1, "loss": sum(window) / len(window), "lr": lr, "samples_per_s": examples / elapsed, "tokens_per_s": tokens / elapsed}
                bar.set_postfix(loss=f"{record['loss']:.4f}", sps=f"{record['samples_per_s']:.1f}", tps=f"{record['tokens_per_s']:.0f}")
                if bar.disable:
                    log.info("%s step %d/%d: loss %.4f, %.1f samples/s, %.0f tokens/s", stage, step + 1, steps, record["loss"], record["samples_per_s"], record["tokens_per_s"])
                if self.metrics:
                    self.metrics.write(record)
                window, examples, tokens, tic = [], 0.0, 0.0, time.time()
            self.state.stage, self.state.step = stage, step + 1
            if cfg.eval_every and (step + 1) % cfg.eval_every == 0:
                self.measure(tag=f"{stage}-{step + 1}")
                engine.train()
            if cfg.save_every and (step + 1) % cfg.save_every == 0 and step + 1 < steps:
                self.save_checkpoint()
        bar.close()
        if steps > start:
            elapsed = time.time() - stage_tic
            self.state.timings[f"{stage}_s_per_step"] = elapsed / (steps - start)
            self.state.timings[f"{stage}_tokens_per_s"] = stage_tokens / elapsed  # real (non-padding) input tokens, packed or not

    def _skip_or_stop(self, stage: str, step: int, loss_value: float) -> None:
        """A non-finite loss stops the run, unless --skip_nonfinite allows one more skipped step
        and the engine discarded its update (DeepSpeed's overflow check of the gradient norm)."""
        where = f"{stage} step {step}: the loss is {loss_value}"
        skipped = self.state.skipped
        if sum(map(len, skipped.values())) >= self.cfg.skip_nonfinite:
            raise NonFiniteLoss(f"{where}; the run stops here and its last checkpoint is the last good state "
                                f"(lower --lr, check the data, or let --skip_nonfinite N steps be skipped; now {self.cfg.skip_nonfinite})")
        if self.engine.was_step_applied():
            raise NonFiniteLoss(f"{where} and the engine applied the update anyway (this ZeRO stage and dtype do not check the "
                                "gradients for overflow), so the step cannot be skipped; the last checkpoint is the last good state")
        skipped.setdefault(stage, []).append(step)
        log.warning("%s: step skipped, its update discarded (%d of --skip_nonfinite %d)", where, sum(map(len, skipped.values())), self.cfg.skip_nonfinite)

    # ---- pruning -----------------------------------------------------------------------------
    def prune(self) -> None:
        """Structured removal and/or global (or per-layer, or N:M) pruning of the frozen backbone
        by prune.score; the masks and the plan stay fixed afterwards. With prune.distill, first
        the teacher pass over the re-tune's batches, on the model as tuned."""
        p, pruning, timings = self.cfg.prune, self.pruning, self.state.timings
        if p.distill:
            self._label_retune()
            pruning.distill = {"alpha": p.distill_alpha, "t": p.distill_t}
        if p.heads or p.ffn:
            tic = time.time()
            calibration = self._calibration_batches(p.calibration_batches) if p.structured_score == "gradient" else None
            self.state.summary["structured"], pruning.plan = structured_prune(self.model, p, calibration, self.ds_config, ctx=self.cfg.max_length, engine=self.engine)
            # Parameter shapes changed: a fresh engine (and optimizer) for re-tuning.
            self.engine.destroy()
            self.engine = self._create_engine()
            timings["structured_s"] = time.time() - tic
        if p.pattern or p.sparsity > 0:
            tic = time.time()
            uses_inputs = PRUNE_SCORES[p.score].uses_inputs or p.refits
            calibration = (self._calibration_batches(p.calibration_batches), self._forward) if uses_inputs else None
            if p.pattern:
                pruning.masks = prune_nm(self.model, p.pattern, p.score, p.include, p.exclude, calibration, p.refits, p.keep_sparse)
            else:
                scope = p.scope or prune_scope_of(self.model, self.cfg.task)
                if p.scope is None:
                    log.info("prune.scope unset: %s, the default for %s models (--prune.scope chooses another)", scope, model_type(self.model) or "these")
                pruning.masks = prune_unstructured(self.model, p.sparsity, scope, p.score, p.include, p.exclude, calibration, p.refits, p.keep_sparse,
                                                  p.scope_options(scope))
                self.state.summary["prune_scope"] = scope
            timings["prune_s"] = time.time() - tic
            log.info("pruned (%s) in %.1fs", p.pattern or f"{100 * p.sparsity:.1f}%", timings["prune_s"])
            pruning.keep_sparse = p.keep_sparse
            if p.refits:  # the re-fitted backbone cannot be rebuilt from --model: kept for a resume
                checkpoint.save_weights(self.run_dir / run_folder.REFITTED, pruning.pruned_weights(self.model), self.writer)
                pruning.refitted = True
            pruning.packed = whole_masks(pruning.masks)
            if pruning.keep_sparse:
                pruning.confine_adapters(self.model)
        self.state.summary["sparsity"] = sparsity_report(self.model, p.include, p.exclude, frozen_only=self.cfg.method != "full")["total"]

    def _forward(self, batch: dict) -> torch.Tensor:
        """One forward in eval mode (no dropout, no loss, no cache): the logits. For the activation
        score's input norms and the re-fit's inputs, and distillation's teacher outputs."""
        was_training = self.engine.module.training
        self.engine.eval()
        inputs = self._model_inputs({k: v for k, v in batch.items() if k != "labels"})
        try:
            with torch.no_grad():
                return self.engine(**inputs, **({"use_cache": False} if self.cfg.task == "lm" else {})).logits
        finally:
            self.engine.train(was_training)

    def _label_retune(self) -> None:
        """--prune.distill: the tuned model's outputs on every re-tune batch, kept in the run
        folder before pruning changes the model (distill.py). Collective."""
        cfg = self.cfg
        rows, batches = self._stage_batches("retune")

        def micro_batches(step: int):
            return ((batches.micro_positions(accum, self.rank), self._micro_batch(rows, batches, step, accum)) for accum in range(self.accum))

        tic = time.time()
        kept = distill.label(self.run_dir / distill.TEACHER, cfg.retune_steps, micro_batches, self._forward, cfg.task, cfg.prune.distill_topk,
                             batches.global_batch, self.writer)
        self.state.timings["teacher_s"] = time.time() - tic
        self.state.summary["teacher_mb"] = kept / 2**20
        log.info("teacher outputs of %d re-tune steps in %.1fs (%.1f MB in %s)", cfg.retune_steps, self.state.timings["teacher_s"], kept / 2**20, self.run_dir / distill.TEACHER)

    def _calibration_batches(self, n: int) -> list[dict]:
        """This rank's micro-batches of the first n global batches of their own shuffle, split as
        training splits them: the same rows on any ranks × accumulation, so the same scores."""
        batches = GlobalBatches(len(self.train_rows), self.micro, self.accum, self.world, seed=self.cfg.seed + 7)
        return [self._micro_batch(self.train_rows, batches, s, a) for s in range(n) for a in range(self.accum)]

    # ---- evaluation and export ---------------------------------------------------------------
    def measure(self, tag: str, bleu: bool = True) -> dict:
        """The task's metrics (cfg.metric for cls/reg) on the evaluation rows (a slice of the
        training rows without them), and BLEU for source||target data."""
        cfg = self.cfg
        rows = self.eval_rows or self.train_rows.select(range(min(len(self.train_rows), 4 * self.micro * self.world)))
        result = evaluate_engine(self.engine, rows, self.tokenizer, cfg.task, self.micro, cfg.metric)
        if cfg.task == "lm" and bleu and self.eval_rows is not None and "source" in self.eval_rows.column_names:
            generation = engine_bleu(self.engine, self.tokenizer, self.eval_rows, cfg.gen_samples, cfg.gen_max_new_tokens, cfg.gen_whole_model)
            result["bleu"] = generation.pop("bleu")
            self.state.summary["generation"] = generation.pop("generation")
            self.state.timings.update(generation)
        if self.metrics:
            self.metrics.write({"stage": "evaluate", "tag": tag, **result})
        log.info("evaluation %s: %s", tag, result)
        return result

    def measure_perplexity(self, key: str) -> None:
        """The perplexity of --eval_perplexity's text (data.text_windows) as the model now is, kept
        in summary.json's `perplexity` under `key`: before, the stage just run, or after (the
        evaluate stage's). The model's mode is kept: the next stage (pruning's gradient scores) sees
        it as it would without this. Collective."""
        if self.perplexity_rows is None:
            return
        training = self.engine.module.training
        result = evaluate_engine(self.engine, self.perplexity_rows, self.tokenizer, "lm", self.micro)
        self.engine.train(training)
        text = {"file": self.cfg.eval_perplexity, "window": self.cfg.max_length, "windows": len(self.perplexity_rows)}
        record = self.state.summary.get("perplexity", {})
        if {k: record.get(k) for k in text} != text:  # a resume measuring another text: the old figures are not comparable
            if record:
                log.warning("perplexity: measuring %s now; the figures of %s measured before the resume are dropped from summary.json", text["file"], record["file"])
            record = self.state.summary["perplexity"] = dict(text)
        record[key] = result["perplexity"]
        if self.metrics:
            self.metrics.write({"stage": "perplexity", "tag": key, **result})
        log.info("perplexity of %s (%d windows of %d tokens), %s: %.4f", record["file"], record["windows"], record["window"], key, result["perplexity"])

    def evaluate(self) -> None:
        self.state.summary["after"] = self.measure(tag="final")
        self.measure_perplexity("after")

    def export(self) -> None:
        """Adapter-only file, then the adapters merged in place (exactly, or re-masked with
        --export_remask) and the model written as a plain HF folder. A later `evaluate` measures
        exactly that model. Baselines: the merged folder (PEFT LoRA merged; full: the model)."""
        out = self.run_dir / "export"
        if self.cfg.method == "dsee":
            tic = time.time()
            save_adapter(self.model, out / "adapter", self.cfg.dsee)
            self.state.timings["adapter_save_s"] = time.time() - tic
            if dist.is_main():  # exports are written on rank 0's node
                self.state.summary["adapter_bytes"] = (out / "adapter" / "dsee_adapter.safetensors").stat().st_size
                self.tokenizer.save_pretrained(str(out / "adapter"))
        if self.cfg.export_merged or self.cfg.method != "dsee":  # a baseline's export is its merged model
            for layer in dsee_layers(self.model).values():
                layer.merge(remask=self.cfg.export_remask and bool(self.pruning.masks))
            if self.cfg.method == "peft_lora":
                merge_peft_lora(self.model)
            export_hf(self.model, out / "merged", merge=False)
            if dist.is_main():
                save_for_generation(self.model, self.tokenizer, out / "merged")
            if self.cfg.export_format == "compressed":
                self._export_compressed(out)
        self.state.summary["export"] = str(out)

    def _export_compressed(self, out: Path) -> None:
        """export/merged in compressed-tensors' format: rank 0 reads it back and writes export/compressed."""
        if not self.pruning.masks:
            log.warning("export_format compressed: this run pruned nothing (no prune stage), so there is no export/compressed")
            return
        tic = time.time()
        if dist.is_main():
            export_compressed(out / "merged", out / "compressed", self.compressed_format, self.pruning.masks)
            self.state.summary["compressed_format"] = self.compressed_format
        dist.barrier()
        self.state.timings["compressed_export_s"] = time.time() - tic

    # ---- checkpoints -------------------------------------------------------------------------
    def save_checkpoint(self) -> None:
        """Collective: the (small, world-size-independent) state of the run, written by each writer."""
        tic = time.time()
        scheduler = self.engine.lr_scheduler
        saved = {
            "run": self.state.to_json(), "pruning": self.pruning.to_json(), "identity": self.identity, "world_size": self.world,
            "backbone_digest": self.backbone_digest, "optimizer_step": checkpoint.optimizer_step(self.engine),
            "lr_scheduler": scheduler.state_dict() if scheduler is not None else None,
        }
        saved = dist.all_gather_object(saved)[0]  # rank 0's timings: every node's writer writes the same checkpoint
        tensors = checkpoint.trainable_state(self.model, self.engine)
        checkpoint.save(self.ckpt_dir, self.state.tag, saved, tensors, self.pruning.packed, self.writer, keep=self.cfg.keep_checkpoints)
        self.state.timings["checkpoint_s"] = time.time() - tic

    def _restore(self, saved: dict, tensors: dict[str, torch.Tensor], masks: dict[str, torch.Tensor]) -> None:
        setup = self.state  # this process's set-up figures (world size, build time, ...) win over the saved ones
        self.state = RunState.from_json(saved["run"])
        self.state.summary.update(setup.summary)
        self.state.timings.update(setup.timings)
        checkpoint.load_trainable_state(self.model, self.engine, tensors, saved["optimizer_step"])
        if saved["lr_scheduler"] is not None and self.engine.lr_scheduler is not None:
            self.engine.lr_scheduler.load_state_dict(saved["lr_scheduler"])
        self.pruning = PruningState.from_json(saved["pruning"], masks, self.model)
        self.pruning.restore(self.model, self.run_dir / run_folder.REFITTED)
        log.info("resumed at %s step %d (saved by %d ranks, now %d)", self.state.stage, self.state.step, saved["world_size"], self.world)

    # ---- the whole run -----------------------------------------------------------------------
    def run(self) -> dict:
        cfg = self.cfg
        tic = time.time()
        if "before" not in self.state.summary and "evaluate" in cfg.stages and self.state.stage is None:
            self.state.summary["before"] = self.measure(tag="before", bleu=False)
        if "before" not in self.state.summary.get("perplexity", {}) and self.state.stage is None:
            self.measure_perplexity("before")
        for stage in cfg.stages:
            if stage in self.state.finished:
                continue
            getattr(self, stage)()
            if stage in CHECKPOINTED:  # the stages that change the model (export merges it as it is)
                self.measure_perplexity(stage)
            self.state.finish(stage)
            if stage in CHECKPOINTED:
                self.save_checkpoint()
        run_folder.complete_summary(self.model, cfg, self.state, time.time() - tic)
        if dist.is_main():
            run_folder.write_summary(self.run_dir, self.state.summary)
        return self.state.summary

    def close(self, end_process_group: bool = True) -> None:
        """end_process_group False: another Recipe follows in this process (scripts/gpu_check.py)."""
        if self.metrics:
            self.metrics.close()
        if dist.initialized():
            dist.barrier()
            if end_process_group:
                torch.distributed.destroy_process_group()
        swap = nvme_offload(self.ds_config)
        if swap and dist.local_rank() == 0:  # this run's NVMe swap files (a killed run's stay for its resume)
            shutil.rmtree(swap["nvme_path"], ignore_errors=True)

