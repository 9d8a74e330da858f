"""DSEE configuration: plain data, validated once, before any heavy work.

The dataclasses are pydantic's: every field's type (fixed choices as Literal, names from an open
registry and ranges as Annotated) is checked when one is made, from a recipe, flags or code;
__post_init__ keeps the checks that involve several fields.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import typing
from dataclasses import field
from pathlib import Path
from collections.abc import Callable
from typing import Annotated, Literal

from pydantic import AfterValidator, Field
from pydantic.dataclasses import dataclass

from dsee_scale import extras
from dsee_scale.prune.rows import OWL_LAMBDA, OWL_M, check_owl
from dsee_scale.prune.targets import DEFAULT_EXCLUDE, DEFAULT_INCLUDE


def _registered(registry: Callable[[], dict], what: str) -> AfterValidator:
    """A name that must be in an open registry (a support method, prune score or selector that
    code may add with its register decorator), checked when the config is made."""
    def check(name: str) -> str:
        if name not in registry():
            raise ValueError(f"unknown {what} {name!r}: choose one of {', '.join(registry())}")
        return name
    return AfterValidator(check)


def _support_methods() -> dict:
    from dsee_scale.support import SUPPORT_METHODS

    return SUPPORT_METHODS


def _prune_scores() -> dict:
    from dsee_scale.prune import PRUNE_SCORES

    return PRUNE_SCORES


def _prune_selectors() -> dict:
    from dsee_scale.prune import PRUNE_SELECTORS

    return PRUNE_SELECTORS


InitMethod = Literal["lora", "normal"]
SupportMethod = Annotated[str, _registered(_support_methods, "support method")]
PruneScore = Annotated[str, _registered(_prune_scores, "prune.score")]
PruneScope = Annotated[str, _registered(_prune_selectors, "prune.scope")]
StructuredScore = Literal["gradient", "dsee", "weight"]
StructuredScope = Literal["global", "layer"]
Stage = Literal["tune", "prune", "retune", "export", "evaluate"]
Task = Literal["lm", "cls", "reg"]
DataFormat = Literal["auto", "text", "prompt_completion", "chat", "e2e"]
Method = Literal["dsee", "peft_lora", "full"]  # the last two: baselines.py, on the same Recipe
ExportFormat = Literal["hf", "compressed"]
Metric = Literal["accuracy", "mcc", "acc_f1", "pearson_spearman"]
# transformers.get_scheduler names that need no arguments beyond warm-up and length.
LRScheduler = Literal["linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup", "inverse_sqrt"]
STAGES: tuple[str, ...] = typing.get_args(Stage)
TASKS: tuple[str, ...] = typing.get_args(Task)
Fraction = Annotated[float, Field(ge=0.0, lt=1.0)]  # [0, 1)
Weight = Annotated[float, Field(ge=0.0, le=1.0)]  # [0, 1]
PositiveInt = Annotated[int, Field(ge=1)]
PositiveFloat = Annotated[float, Field(gt=0.0)]
Count = Annotated[int, Field(ge=0)]


@dataclass(config={"extra": "forbid"})  # unknown recipe keys are errors, not ignored
class DSEEConfig:
    """What DSEE adds to a frozen model: ΔW = (alpha/rank)·B·A + S on every targeted weight."""

    rank: PositiveInt = field(default=8, metadata={"help": "rank r of the low-rank update B·A"})
    alpha: float = field(default=16.0, metadata={"help": "scale: the low-rank update is multiplied by alpha/rank"})
    dropout: Fraction = field(default=0.0, metadata={"help": "dropout on the adapter input"})
    nnz: Count = field(default=64, metadata={"help": "entries of the sparse residual S per adapted matrix (|Ω|)"})
    targets: list[str] | None = field(
        default=None,
        metadata={
            "help": "module-name suffixes to adapt; 'name:q,v' adapts only those parts of a fused "
            "projection (GPT-2 c_attn = q,k,v). None: the architecture's default"
        },
    )
    target_regex: str | None = field(
        default=None, metadata={"help": "regex on full module names, instead of targets"}
    )
    init: InitMethod = field(
        default="lora",
        metadata={"help": "'lora': A random, B = S = 0 (model unchanged at step 0); 'normal': A, B, S ~ N(0, 0.02) as the released DSEE code"},
    )
    support: SupportMethod = field(
        default="grebsmo",
        metadata={"help": "how Ω is chosen: grebsmo (the paper's GreBsmo), grebsmo_released (the released code's), magnitude, random"},
    )
    trainable_modules: list[str] | None = field(
        default=None,
        metadata={"help": "module-name suffixes trained in full (the task head). None: 'classifier'/'score' when present. "
                 "Add 'pooler' for a BERT whose pooler was never trained (sentence-transformers checkpoints such as MiniLM: "
                 "the glue-*.yaml recipes do; frozen, PEFT LoRA and DSEE scored MCC 0 on CoLA)"},
    )
    seed: int = field(default=0, metadata={"help": "seed for adapter init and random support"})

    def __post_init__(self) -> None:
        if self.targets is not None and self.target_regex is not None:
            raise ValueError("give DSEEConfig.targets or DSEEConfig.target_regex, not both")

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass(config={"extra": "forbid"})
class PruneConfig:
    """Sparsity after tuning: unstructured pruning (by score, over all weights, per matrix, per row or per block's OWL ratio, or N:M) and/or removal of heads and FFN neurons."""

    sparsity: Fraction = field(default=0.0, metadata={"help": "fraction of selected weights set to zero (0 disables unstructured pruning)"})
    scope: PruneScope | None = field(default=None, metadata={"help": "which weights compete for pruning: 'global': all selected weights against one threshold (the paper's, for BERT; scores of "
                              "different scales across layers can empty a decoder's layer); 'layer': the same fraction of every matrix (magnitude and SparseGPT baselines); "
                              "'row': the same fraction of every output row (Wanda's comparison group); 'owl': per row at each transformer block's own sparsity, higher "
                              "where the block has more outlier scores (OWL, Yin et al. 2024; prune.owl_m, prune.owl_lambda). Unset: by the model's family, 'row' for "
                              "decoders (GPT-2, LLaMA, Mistral, Qwen, Gemma, Phi-3) and for language models of other families, 'global' for encoders (dsee_scale/arch.py)"})
    owl_m: PositiveFloat = field(default=OWL_M, metadata={"help": "scope owl: a score is an outlier above owl_m × its block's mean score (the paper's M)"})
    owl_lambda: Fraction = field(default=OWL_LAMBDA, metadata={"help": "scope owl: the blocks' sparsities spread over 2 × owl_lambda around prune.sparsity, their mean (the paper's λ)"})
    score: PruneScore = field(default="activation", metadata={"help": "'activation': |W + ΔW|·‖x_j‖, Wanda's, with x_j's norm over calibration_batches (the most accurate in benchmarks/RESULTS.md); 'weight': |W| (the paper's, data-free); 'merged': |W + ΔW|; 'delta': |ΔW| (the released DSEE code)"})
    include: list[str] = field(
        default_factory=lambda: list(DEFAULT_INCLUDE),
        metadata={"help": "regexes on parameter names to prune (2-D weights of the transformer blocks by default)"},
    )
    exclude: list[str] = field(default_factory=lambda: list(DEFAULT_EXCLUDE), metadata={"help": "regexes never pruned"})
    pattern: str | None = field(default=None, metadata={"help": "N:M semi-structured pruning instead, e.g. 2:4 (sparse tensor cores) or 4:8: every M consecutive weights along the input dimension keep the N highest scores"})
    keep_sparse: bool = field(default=True, metadata={"help": "re-tune and merge ΔW ⊙ M (M: the pruning mask), so the merged model is exactly as sparse as the pruned backbone; false: dense ΔW (the paper's), adapted matrices become dense when merged"})
    reconstruct: bool | None = field(default=None, metadata={"help": "re-fit each pruned matrix's kept weights so its output on the calibration inputs changes least (SparseGPT's update): the backbone absorbs what the pruned weights did. Unstructured: the mask is the score's; with a pattern, the re-fit also chooses which N of every M stay (score unused). Unset: on with a pattern (+2.0 pt at 2:4 on MiniLM/SST-2, 3 seeds, benchmarks/RESULTS.md), off for unstructured. Costs calibration_batches forwards and one in × in float32 matrix per pruned weight (up to 1 GiB at a time); the re-fitted weights are saved once in <output_dir>/refitted for a resume"})
    heads: Fraction = field(default=0.0, metadata={"help": "structured: fraction of attention heads to remove"})
    ffn: Fraction = field(default=0.0, metadata={"help": "structured: fraction of FFN neurons to remove"})
    structured_score: StructuredScore = field(default="gradient", metadata={"help": "head/neuron importance: gradient (gate gradients over calibration_batches; +1.9 pt over |ΔW| on MiniLM/SST-2, benchmarks/RESULTS.md), dsee (Σ|ΔW|, the paper's, data-free) or weight (|W|)"})
    structured_scope: StructuredScope = field(default="global", metadata={"help": "'global' budget across layers, or 'layer': the same count in every layer"})
    calibration_batches: PositiveInt = field(default=16, metadata={"help": "global batches (micro_batch_size × grad_accum × ranks rows, each rank its share) for structured_score 'gradient', score 'activation' and reconstruct"})
    distill: bool = field(default=False, metadata={"help": "self-distilled re-tune (method dsee): before pruning, the tuned model labels every re-tune batch in eval mode "
                          "(stored once in <output_dir>/teacher, one file per step), and the re-tune's loss becomes (1 − distill_alpha)·task + distill_alpha·T²·KL(teacher ‖ student) "
                          "on the same rows: over the class logits (cls); over each target token's teacher top-distill_topk tokens, renormalised, one mean over the global batch's "
                          "target tokens as the task loss's (lm); reg: distill_alpha·MSE to the teacher's prediction (T unused). Decided at pruning, as the masks: a resumed "
                          "re-tune keeps the checkpoint's distill, distill_alpha and distill_t"})
    distill_alpha: Weight = field(default=0.5, metadata={"help": "weight of the distillation term, in [0, 1]; 0 gives the plain re-tune exactly"})
    distill_t: Annotated[float, Field(gt=0.0)] = field(default=2.0, metadata={"help": "distillation temperature T > 0: teacher and student distributions are softmax(logits / T); the term is scaled by T² so its gradient keeps the task loss's scale"})
    distill_topk: PositiveInt = field(default=32, metadata={"help": "task lm: the teacher's largest logits kept per target token, in bf16 with their int32 ids (6·k bytes per target token on disk, for every re-tune step)"})

    def scope_options(self, scope: str) -> dict[str, float]:
        """A scope's own settings, its selector's keywords: the fields named '<scope>_...'."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name.startswith(f"{scope}_")}

    @property
    def refits(self) -> bool:
        """reconstruct as it applies (unset: with a pattern)."""
        return self.pattern is not None if self.reconstruct is None else self.reconstruct

    def __post_init__(self) -> None:
        from dsee_scale.semistructured import parse_pattern

        if self.pattern is not None:
            n, m = parse_pattern(self.pattern)
            if self.sparsity not in (0.0, 1 - n / m):
                raise ValueError(f"prune.pattern {self.pattern} prunes {1 - n / m:.0%} of every group: set prune.sparsity to {1 - n / m:g} or 0")
            if self.scope is not None:
                raise ValueError(f"prune.scope {self.scope} chooses which weights compete in unstructured pruning; prune.pattern {self.pattern} keeps N of every M "
                                 f"in each group instead: leave prune.scope unset")
        elif self.scope == "owl" and self.sparsity > 0:
            check_owl(self.sparsity, self.owl_lambda)

        if self.reconstruct and not (self.pattern or self.sparsity > 0):
            raise ValueError("prune.reconstruct re-fits the weights that unstructured or N:M pruning keeps: set prune.sparsity or prune.pattern too")


# Unknown recipe keys are errors, not ignored; `text_column: 3` (a headerless file's column) is the text "3".
@dataclass(config={"extra": "forbid", "coerce_numbers_to_str": True})
class TrainConfig:
    """One run of launch/train.py. Recipe files (YAML/JSON) fill it; CLI flags win."""

    model: str = field(default="builtin:tiny-llama", metadata={"help": "local folder, hub name (online), or builtin:<tiny-llama|tiny-gpt2|tiny-bert|bert-base|gpt2|gpt2-medium|gpt2-xl|...> (random init)"})
    task: Task = field(default="lm", metadata={"help": "'lm' (causal LM), 'cls' (sequence classification) or 'reg' (regression: one output, MSE loss, e.g. STS-B)"})
    method: Method = field(default="dsee", metadata={"help": "what trains: 'dsee'; or the baselines on the same engine and stages: 'peft_lora' (PEFT's LoRA with dsee.rank, alpha, dropout on dsee's targets, whole modules) or 'full' (every weight); the baselines do not prune"})
    tokenizer: str | None = field(default=None, metadata={"help": "tokenizer folder or hub name; default: the model's; builtin models train a SentencePiece tokenizer"})
    train_file: str | None = field(default=None, metadata={"help": "training data: .tsv/.csv/.json/.jsonl/.txt, or E2E 'source||target' lines (.txt with ||)"})
    eval_file: str | None = field(default=None, metadata={"help": "evaluation data (same formats)"})
    dataset: str | None = field(default=None, metadata={"help": "HF hub dataset name instead of files (online), e.g. 'glue'"})
    dataset_config: str | None = field(default=None, metadata={"help": "hub dataset configuration, e.g. 'sst2'"})
    eval_split: str = field(default="validation", metadata={"help": "hub dataset split to evaluate on"})
    text_column: str = field(default="text", metadata={"help": "column with the input text (classification, JSON LM data)"})
    text_pair_column: str | None = field(default=None, metadata={"help": "second text column for pair tasks"})
    label_column: str = field(default="label", metadata={"help": "label column: class names or integers (cls), numbers (reg)"})
    data_format: DataFormat = field(default="auto", metadata={"help": "task lm: how rows become tokens and where the loss is. 'text': documents, EOS after each (loss on all); 'prompt_completion': "
                                    "'prompt' and 'completion' columns (TRL's format; loss on the completion); 'chat': 'messages' lists of {role, content} rendered with the chat template "
                                    "(loss on assistant turns); 'e2e': 'source' and 'target' (source||target lines; loss on the target). 'auto': by the columns, in that order: messages, "
                                    "prompt+completion, source+target, the text column. Chat and prompt_completion rows longer than max_length lose the start of their prompt, and are dropped "
                                    "where the answer alone is longer; text and e2e rows lose their end"})
    chat_template: str | None = field(default=None, metadata={"help": "chat template for data_format chat: 'chatml' (built in) or a file holding a Jinja template; its <|...|> tokens missing "
                                      "from the vocabulary are added (a pretrained model's embeddings grow to match). Default: the tokenizer's own"})
    header: bool = field(default=True, metadata={"help": "TSV/CSV files start with a row of column names; false: every row is data and columns are named by position, '0', '1', ... (GLUE's CoLA: --text_column 3 --label_column 1)"})
    metric: Metric | None = field(default=None, metadata={"help": "evaluation metrics of cls/reg runs: accuracy, mcc (Matthews correlation and accuracy; CoLA), acc_f1 (accuracy and F1 of class 1; MRPC), pearson_spearman (with the MSE eval_loss; STS-B); default: accuracy for cls, pearson_spearman for reg"})
    max_length: PositiveInt = field(default=128, metadata={"help": "tokens per example (longer ones are truncated)"})
    packing: bool = field(default=False, metadata={"help": "task lm: train on the rows concatenated into --max_length windows (best-fit, fixed by the data and --seed) instead of padded "
                          "rows, for throughput on rows of varied length; each row keeps its own position ids, attention (no row sees another) and loss, as unpacked. "
                          "--micro_batch_size then counts windows; evaluation and pruning's calibration read the rows unpacked (docs/design.md, Packing)"})
    max_train_samples: int | None = field(default=None, metadata={"help": "use only the first N training examples"})
    max_eval_samples: int | None = field(default=None, metadata={"help": "evaluate on the first N examples"})
    eval_perplexity: str | None = field(default=None, metadata={"help": "a plain text file (e.g. ../shared/data/wikitext2/test.txt) whose perplexity is measured before "
                                        "the first stage and after tune, prune, retune and evaluate (summary.json's perplexity), as SparseGPT and Wanda measure it: "
                                        "the text tokenized once, in windows of max_length tokens"})
    support_file: str | None = field(default=None, metadata={"help": "reuse Ω: another run's support.safetensors or a dsee_adapter.safetensors"})
    ds_config: str | None = field(default=None, metadata={"help": "DeepSpeed config: a JSON file or a built-in name (zero3, zero3_bf16, zero3_offload, zero2, zero3_nvme, ...: "
                                                         "dsee_scale/ds_configs/). Unset: chosen by device: zero3_bf16 on a GPU with native bf16 (Ampere or newer), zero3 (fp32) otherwise"})
    output_dir: str = field(default="runs/default", metadata={"help": "run folder: config, metrics, checkpoints, exports"})
    overwrite: bool = field(default=False, metadata={"help": "replace an existing run folder"})
    resume: bool = field(default=False, metadata={"help": "continue the run in output_dir from its latest checkpoint"})
    stages: list[Stage] = field(default_factory=lambda: list(STAGES), metadata={"help": f"stages to run, in order: {', '.join(STAGES)} (evaluate after export measures the exported model)"})
    steps: Count = field(default=300, metadata={"help": "tuning steps (optimizer updates)"})
    retune_steps: Count = field(default=50, metadata={"help": "re-tuning steps after pruning, masks fixed"})
    lr: Annotated[float, Field(gt=0.0)] = field(default=1e-2, metadata={"help": "peak learning rate (AdamW); about 1e-3 suits pretrained models"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay"})
    warmup_steps: Count = field(default=10, metadata={"help": "warm-up steps of each training stage's schedule"})
    lr_scheduler: LRScheduler = field(default="linear", metadata={"help": f"schedule of each training stage, by transformers.get_scheduler: {', '.join(typing.get_args(LRScheduler))}; a DeepSpeed config with a 'scheduler' block uses that instead"})
    micro_batch_size: int | None = field(default=None, metadata={"help": "per-rank batch; default: the DeepSpeed config's"})
    grad_accum: int | None = field(default=None, metadata={"help": "gradient accumulation steps; default: the DeepSpeed config's"})
    eval_every: int = field(default=0, metadata={"help": "evaluate every N steps during tuning (0: only at stage ends)"})
    save_every: int = field(default=100, metadata={"help": "checkpoint every N steps (0: only at stage ends)"})
    log_every: PositiveInt = field(default=10, metadata={"help": "log metrics every N steps"})
    skip_nonfinite: Count = field(default=0, metadata={"help": "steps with a NaN/inf loss that may be skipped (DeepSpeed discards their update) before the run stops; 0: stop at the first"})
    seed: int = field(default=42, metadata={"help": "seed for data order, init and random support"})
    dist_timeout_min: float = field(default=30.0, metadata={"help": "a collective that waits longer than this fails the run instead of hanging"})
    keep_checkpoints: int = field(default=2, metadata={"help": "most recent checkpoints kept in output_dir/checkpoints"})
    export_merged: bool = field(default=True, metadata={"help": "export stage: also merge the adapters and write a plain HF folder (false: adapter file only)"})
    export_remask: bool = field(default=False, metadata={"help": "with prune.keep_sparse false: merge with re-masking, so the exported weights are exactly as sparse as the masks but ΔW at pruned entries is dropped (costs accuracy); default: the exact adapted function"})
    export_format: ExportFormat = field(default="hf", metadata={"help": "export stage: 'hf' (the merged HF folder) or 'compressed': also export/compressed, that folder in the compressed-tensors format (pruned weights as non-zeros + bitmask; sparse-24-bitmask for prune.pattern 2:4, sparse-bitmask otherwise)"})
    row_dropout: bool = field(default=True, metadata={"help": "draw dropout per global row (dsee_scale/dropout.py), so that losses and gradients do not depend on the world size, micro-batch or accumulation, and resume exactly on another world size; attention dropout then runs through an eager attention (more activation memory than fused attention on GPUs). false: torch's own dropout, per rank"})
    gradient_checkpointing: bool = field(default=False, metadata={"help": "activation checkpointing (non-reentrant) to trade compute for activation memory"})
    gen_samples: int = field(default=32, metadata={"help": "LM with source||target data: examples generated for BLEU"})
    gen_max_new_tokens: int = field(default=40, metadata={"help": "tokens generated per example for BLEU"})
    gen_whole_model: bool = field(default=True, metadata={"help": "under ZeRO-3, gather the whole model on every rank for BLEU's generation when it fits in memory (checked first), so ranks generate independently; false: every token's forward fetches each layer, ranks in step (synced_gpus)"})
    share_frozen_weights: bool = field(default=True, metadata={"help": "ZeRO-3 ranks on one CPU machine: each frozen weight's partitions lie side by side in /dev/shm, so every rank reads the weight whole with no fetch, and the machine still holds it once; false: ZeRO-3 gathers it at every use"})
    zero3_hook_per_block: bool = field(default=True, metadata={"help": "where frozen weights are shared (share_frozen_weights: ZeRO-3 CPU ranks on one machine, weights not on NVMe), ZeRO-3 hooks each transformer block as a whole (DeepSpeed's leaf modules): one fetch and one gradient reduction per block instead of hooks on each of its layers and tensors; false: hooks per layer"})
    dsee: DSEEConfig = field(default_factory=DSEEConfig)
    prune: PruneConfig = field(default_factory=lambda: PruneConfig(sparsity=0.5))

    def __post_init__(self) -> None:
        self._resolve_metric()
        p = self.prune
        if p.distill and self.method != "dsee":
            raise ValueError(f"prune.distill teaches the pruned model its own outputs from before pruning, and method {self.method} does not prune: drop --prune.distill")
        if self.method != "dsee" and "prune" in self.stages and (p.sparsity or p.pattern or p.heads or p.ffn):
            raise ValueError(f"method {self.method} does not prune (pruning with a re-tune of the adapters is DSEE's): set --prune.sparsity 0 "
                             "(and no prune.pattern, heads or ffn), or leave prune out of --stages")
        if p.distill and ("retune" not in self.stages or not self.retune_steps):
            raise ValueError("prune.distill labels the re-tune's batches for the re-tune to learn from: keep retune in --stages with --retune_steps above 0, or drop --prune.distill")
        order = [STAGES.index(s) for s in self.stages]
        if order != sorted(set(order)):
            raise ValueError(f"stages {','.join(self.stages)} are out of order: give each at most once, in the order {','.join(STAGES)} (e.g. retune after export would train merged layers)")
        if self.export_format == "compressed":
            extras.require("compressed_tensors")
            if not self.export_merged:
                raise ValueError("export_format compressed converts the merged folder: set export_merged true")
            if not (self.prune.pattern or self.prune.sparsity > 0):
                raise ValueError("export_format compressed stores pruned weights as their non-zeros, and this run prunes none: set prune.sparsity or prune.pattern, or use export_format hf")
            if not (self.prune.keep_sparse or self.export_remask):
                raise ValueError("export_format compressed needs sparse merged weights, but prune.keep_sparse false merges a dense ΔW: keep prune.keep_sparse true or set export_remask true")
        if self.task != "lm" and self.packing:
            raise ValueError(f"packing concatenates causal-LM rows (--task lm); a task {self.task} row is one example with its own label: drop --packing")
        if self.task != "lm" and (self.data_format != "auto" or self.chat_template):
            raise ValueError(f"data_format and chat_template are for --task lm; task {self.task} reads --text_column and --label_column")
        if self.eval_perplexity and self.task != "lm":
            raise ValueError(f"eval_perplexity measures a language model's perplexity: it is for --task lm, not {self.task}")
        if self.resume and self.overwrite:
            raise ValueError("choose --resume or --overwrite, not both")

    def _resolve_metric(self) -> None:
        """The task's default metric, or a chosen one that belongs to the task."""
        from dsee_scale.metrics import DEFAULT_METRIC, METRICS

        if self.metric is None:
            self.metric = DEFAULT_METRIC.get(self.task)
        elif self.task == "lm":
            raise ValueError(f"metric {self.metric} is for --task cls or reg; task lm reports eval_loss and perplexity (and BLEU)")
        elif METRICS[self.metric].task != self.task:
            fits = [name for name, m in METRICS.items() if m.task == self.task]
            raise ValueError(f"metric {self.metric} is for --task {METRICS[self.metric].task}, not {self.task}: choose one of {', '.join(fits)}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _flat_fields(cls, prefix: str = ""):
    """(dotted name, field, type) of a config dataclass, nested dataclasses flattened."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        kind = hints[f.name]
        if dataclasses.is_dataclass(kind):
            yield from _flat_fields(kind, f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", f, kind


def _flag_syntax(kind, value):
    """What a flag's text means before typing: comma-separated lists, 'none' for optional fields.
    YAML reads `stages: tune` as a string too, so recipe strings go through the same rule."""
    if not isinstance(value, str):
        return value
    if value.lower() in ("none", "null") and type(None) in typing.get_args(kind):
        return None
    if list in (typing.get_origin(kind), *map(typing.get_origin, typing.get_args(kind))):
        return [] if value == "" else value.split(",")
    return value


def config_parser() -> argparse.ArgumentParser:
    """Every TrainConfig field as a flag (--dsee.rank 16, --prune.sparsity 0.5, ...)."""
    parser = argparse.ArgumentParser(
        description="DSEE fine-tuning on DeepSpeed: choose Ω → tune → prune → re-tune → evaluate → export.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--config", help="recipe file (YAML or JSON) with TrainConfig fields; flags override it")
    parser.add_argument("--local_rank", type=int, default=-1, help=argparse.SUPPRESS)
    defaults = TrainConfig()
    for name, f, kind in _flat_fields(TrainConfig):
        value = defaults
        for part in name.split("."):
            value = getattr(value, part)
        flag_help = f.metadata.get("help", "")
        if value is not None:
            flag_help += f" (default: {','.join(map(str, value)) if isinstance(value, list) else value})"
        extra = {"nargs": "?", "const": "true"} if kind in (bool, bool | None) else {}
        parser.add_argument(f"--{name}", dest=name, default=None, metavar=name.rsplit(".", 1)[-1].upper(), help=flag_help, **extra)
    parser.formatter_class = argparse.HelpFormatter
    return parser


def load_recipe(path: str) -> dict:
    text = Path(path).read_text()
    if path.endswith((".yaml", ".yml")):
        import yaml

        data = yaml.safe_load(text) or {}
    else:
        data = json.loads(text)
    if not isinstance(data, dict):
        raise ValueError(f"recipe {path} must hold a mapping of TrainConfig fields")
    return data


def _validation_message(error: dict, flags: set[str], recipe: str | None) -> str:
    """One pydantic error as the user wrote it: the flag or the recipe key, and the value."""
    if error["type"] == "value_error":  # a check in __post_init__: its message names the field
        return error["msg"].removeprefix("Value error, ")
    name = ".".join(str(part) for part in error["loc"] if not isinstance(part, int))  # stages.1 is --stages
    where = f"--{name}" if name in flags or recipe is None else f"{recipe}: {name}"
    if error["type"] in ("unexpected_keyword_argument", "extra_forbidden"):
        return f"{where}: unknown TrainConfig field (see launch/train.py --help)"
    return f"{where}: {error['msg']} (got {error['input']!r})"


def train_config_from_argv(argv: list[str] | None = None) -> TrainConfig:
    """Recipe file first, then flags, typed and checked by pydantic against the dataclasses
    (`lr: 1e-3` in YAML is the float that `--lr 1e-3` is); argparse keeps the flag syntax users
    know (`--stages tune,prune`, a bare `--overwrite`)."""
    import pydantic

    args = config_parser().parse_args(argv)
    kinds = {name: kind for name, _, kind in _flat_fields(TrainConfig)}
    merged = load_recipe(args.config) if args.config else {}
    flags = {name for name in kinds if getattr(args, name) is not None}
    for name in flags:
        *parents, leaf = name.split(".")
        node = merged
        for part in parents:
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node = node[part]
        node[leaf] = getattr(args, name)

    defaults = TrainConfig()
    for f in dataclasses.fields(TrainConfig):  # a section given in part keeps TrainConfig's defaults for the rest
        if dataclasses.is_dataclass(getattr(defaults, f.name)) and isinstance(merged.get(f.name), dict):
            merged[f.name] = {**dataclasses.asdict(getattr(defaults, f.name)), **merged[f.name]}

    def syntax(data: dict, prefix: str = "") -> dict:
        return {k: syntax(v, f"{prefix}{k}.") if isinstance(v, dict) else _flag_syntax(kinds.get(prefix + k), v) for k, v in data.items()}

    try:
        return pydantic.TypeAdapter(TrainConfig).validate_python(syntax(merged))
    except pydantic.ValidationError as err:
        raise ValueError("; ".join(_validation_message(e, flags, args.config) for e in err.errors())) from None
