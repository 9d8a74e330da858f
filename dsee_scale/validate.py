"""Checks that run before any heavy work (model loading, process-group collectives).

Each failure is a ConfigError whose message names the problem and the fix. Every rank runs the
same checks on the same inputs, so all of them fail together, before any collective.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from dsee_scale import host
from dsee_scale.config import TrainConfig
from dsee_scale.ds_config import ConfigError, check_nvme_buffers, load_ds_config, nvme_offload, resolve_batch_sizes, resolve_ds_config
from dsee_scale.run_folder import RUN_MARKER, identity_differences, run_identity, run_marker


def launched_world_size() -> int:
    """World size announced by the launcher (torchrun/deepspeed/accelerate, Open MPI, MPICH/srun)."""
    for key in ("WORLD_SIZE", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "SLURM_NTASKS"):
        if os.environ.get(key):
            return int(os.environ[key])
    return 1


def launched_rank() -> int:
    """This process's global rank as the launcher announced it (0 when launched alone)."""
    for key in ("RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK", "SLURM_PROCID"):
        if os.environ.get(key):
            return int(os.environ[key])
    return 0


def check_output_dir(cfg: TrainConfig, ds_config: dict, world: int) -> None:
    folder = Path(cfg.output_dir)
    if not folder.exists() or cfg.overwrite:
        return
    if cfg.resume:
        if not (folder / RUN_MARKER).exists():
            raise ConfigError(f"--resume: {folder} holds no dsee_scale run ({RUN_MARKER} missing)")
        check_resumable(cfg, ds_config)
        return
    if not any(folder.iterdir()):
        return
    if cfg.output_dir == TrainConfig.output_dir and (folder / RUN_MARKER).exists():
        manage_default_folder(cfg, ds_config, world)
        return
    raise ConfigError(f"output folder {folder} exists and holds another run: pass --resume to continue it, --overwrite to replace it, or choose another --output_dir")


def check_resumable(cfg: TrainConfig, ds_config: dict) -> None:
    """A checkpoint of another model, data, DSEE shape or global batch is refused here, before
    anything is built; another world size is fine when the global batch is the same."""
    from dsee_scale.checkpoint import latest_state, unreadable_reason

    state = latest_state(Path(cfg.output_dir) / "checkpoints")
    if state is None:
        return
    if reason := unreadable_reason(state):
        raise ConfigError(f"--resume: the checkpoint in {cfg.output_dir} cannot be resumed: {reason}; start again with --overwrite")
    differences = identity_differences(state["identity"], run_identity(cfg, ds_config))
    if differences:
        hint = " (set --micro_batch_size / --grad_accum so that micro × accumulation × world size matches)" if any(d.startswith("global_batch") for d in differences) else ""
        if any(d.startswith("ds_config") for d in differences):
            hint += " (pass the checkpoint's --ds_config: one left out is chosen by this machine's device)"
        raise ConfigError(f"--resume: the checkpoint in {cfg.output_dir} is of another run: {'; '.join(differences)}{hint}")


def manage_default_folder(cfg: TrainConfig, ds_config: dict, world: int) -> None:
    """The default folder belongs to dsee_scale, so running the demo again just works: an
    unfinished run of the same configuration (and world size) that has a checkpoint continues;
    another run is replaced. Folders the user names are never replaced without --overwrite.
    Every rank decides here, before any collective; Recipe.setup then acts on rank 0's decision."""
    folder = Path(cfg.output_dir)
    try:
        previous = json.loads((folder / RUN_MARKER).read_text())
    except (OSError, ValueError):
        previous = {}
    from dsee_scale.checkpoint import latest_state, unreadable_reason

    same = {k: previous.get(k) for k in ("config", "ds_config", "world_size")} == run_marker(cfg, ds_config, world)
    state = None if (folder / "summary.json").exists() else latest_state(folder / "checkpoints")
    unfinished = state is not None and unreadable_reason(state) is None  # another version's checkpoint: start over
    if same and unfinished:
        cfg.resume = True
        note = f"{folder} holds an unfinished run of this configuration: continuing it from its latest checkpoint (--overwrite starts over)"
    else:
        cfg.overwrite = True
        note = f"replacing the previous run in {folder} (pass --output_dir to keep runs side by side)"
    if launched_rank() == 0:
        print(f"dsee_scale: {note}", flush=True)


def check_model(cfg: TrainConfig) -> None:
    from dsee_scale.models import BUILTIN_MODELS

    if cfg.model.startswith("builtin:"):
        if cfg.model.removeprefix("builtin:") not in BUILTIN_MODELS:
            raise ConfigError(f"unknown builtin model {cfg.model!r}: choose builtin:{', builtin:'.join(BUILTIN_MODELS)}")
        return
    from dsee_scale.models import resolve_model_path

    try:
        path = Path(resolve_model_path(cfg.model))
    except ValueError as err:
        raise ConfigError(str(err)) from None
    if path.exists():
        if not (path / "config.json").is_file():
            raise ConfigError(f"model folder {path} has no config.json: point --model at a save_pretrained folder")
        return
    looks_local = cfg.model.startswith((".", "/", "~")) or cfg.model.count("/") > 1
    offline = os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("TRANSFORMERS_OFFLINE") == "1"
    if looks_local or offline:
        raise ConfigError(f"unknown model {cfg.model!r}: no such folder{' and the hub is offline (HF_HUB_OFFLINE=1)' if offline else ''}; use a local folder or builtin:<name>")


def check_data(cfg: TrainConfig) -> None:
    formats = set()
    for flag, path in (("--train_file", cfg.train_file), ("--eval_file", cfg.eval_file)):
        if path is None:
            continue
        file = Path(path)
        if not file.exists():
            raise ConfigError(f"{flag} {path} does not exist")
        if not file.is_file():
            raise ConfigError(f"{flag} {path} is not a file")
        if not os.access(file, os.R_OK):
            raise ConfigError(f"{flag} {path} is not readable (check its permissions)")
        from dsee_scale.data import TABLE_SUFFIXES, check_columns, check_labels, check_row, data_format, peek_columns

        try:
            columns, examples = peek_columns(path, cfg.header)
            if examples == []:
                raise ConfigError(f"{flag} {path} holds no examples (empty dataset)")
            tabular = file.suffix.lower() in TABLE_SUFFIXES
            if columns:
                check_columns(columns, cfg, f"{flag} {path}", first_row=examples[0] if tabular else None)
            if examples and cfg.task != "lm":
                check_labels([e.get(cfg.label_column) for e in examples], cfg, f"{flag} {path}")
            if columns and cfg.task == "lm":
                fmt = data_format(columns, cfg)
                formats.add(fmt)
                for row, example in enumerate(examples or [], 1):
                    try:
                        check_row(fmt, example, row)
                    except ValueError as err:
                        raise ConfigError(f"{flag} {path}: {err}") from None
        except UnicodeDecodeError:
            raise ConfigError(f"{flag} {path} cannot be read as UTF-8 text (is it a binary file?)") from None
        except ValueError as err:
            raise ConfigError(str(err)) from None
    check_chat_template(cfg, formats)
    if cfg.eval_perplexity and not Path(cfg.eval_perplexity).is_file():
        raise ConfigError(f"--eval_perplexity {cfg.eval_perplexity} is not a file (a plain text file, e.g. ../shared/data/wikitext2/test.txt)")
    if cfg.support_file and not Path(cfg.support_file).is_file():
        raise ConfigError(f"--support_file {cfg.support_file} does not exist (a run's support.safetensors or an adapter file)")
    if cfg.task != "lm" and not (cfg.train_file or cfg.dataset):
        raise ConfigError(f"task '{cfg.task}' needs data: pass --train_file (TSV/CSV/JSON with text and label columns) or --dataset")
    if cfg.eval_file is None and cfg.train_file and "evaluate" in cfg.stages:
        raise ConfigError("the evaluate stage needs --eval_file (or drop 'evaluate' from --stages)")


def check_chat_template(cfg: TrainConfig, formats: set[str]) -> None:
    """--chat_template names a template, or chat data has one from its tokenizer: a builtin
    model's SentencePiece tokenizer has none; a hub tokenizer is checked once downloaded."""
    from dsee_scale.chat import NO_TEMPLATE, template_text
    from dsee_scale.models import resolve_model_path

    if cfg.chat_template:
        try:
            template_text(cfg.chat_template)
        except ValueError as err:
            raise ConfigError(str(err)) from None
        return
    if "chat" not in formats:
        return
    source = cfg.tokenizer or (None if cfg.model.startswith("builtin:") else resolve_model_path(cfg.model))
    if source is None:
        raise ConfigError(f"chat data with --model {cfg.model}: {NO_TEMPLATE}")
    if Path(source).exists():
        from transformers import AutoTokenizer

        if AutoTokenizer.from_pretrained(source).chat_template is None:
            raise ConfigError(f"chat data with the tokenizer of {source}: {NO_TEMPLATE}")


def check_model_fits(cfg: TrainConfig, ds_config: dict | None = None, world: int = 1) -> None:
    """Targets, rank and nnz against the model's shapes, the tokenizer against its vocabulary,
    NVMe swap buffers against its shards, --packing against its attention and OWL's pruning
    against its blocks, on a model built on the meta device (no weights are loaded or allocated)."""
    import torch
    from transformers import AutoConfig, AutoTokenizer

    from dsee_scale.inject import check_targets
    from dsee_scale.models import TASK_MODELS, builtin_config, resolve_model_path
    from dsee_scale.packing import check_model as check_packing
    from dsee_scale.prune.rows import check_blocks
    from dsee_scale.prune.targets import default_targets

    builtin = cfg.model.startswith("builtin:")
    if not builtin and not Path(resolve_model_path(cfg.model)).exists():
        if ds_config and (nvme_offload(ds_config) or {}).get("buffer_size") == "auto":
            raise ConfigError(f"offload_param.buffer_size auto is sized from the model's shapes, and {cfg.model} is not a local folder: "
                              f"set buffer_size to the largest weight's elements divided by the number of ranks")
        return  # a hub name: checked once downloaded
    source = cfg.tokenizer or (None if builtin else resolve_model_path(cfg.model))
    tokenizer = AutoTokenizer.from_pretrained(source) if source is not None and Path(source).exists() else None
    vocab = len(tokenizer) if tokenizer is not None else None
    # built as the trainer builds it: a builtin model takes its tokenizer's vocabulary
    config = builtin_config(cfg.model, vocab_size=vocab) if builtin else AutoConfig.from_pretrained(resolve_model_path(cfg.model))
    if cfg.task != "lm":
        config.num_labels = 2 if cfg.task == "cls" else 1
    from transformers.models.auto.auto_factory import _get_model_class

    model_class = _get_model_class(config, TASK_MODELS[cfg.task]._model_mapping)
    with torch.device("meta"):  # the class itself: from_config would follow a live ZeRO-3 config
        model = model_class(config)
    try:
        check_targets(model, cfg.dsee)
        if cfg.prune.scope == "owl" and cfg.prune.sparsity > 0 and "prune" in cfg.stages:
            check_blocks(default_targets(model, cfg.prune.include, cfg.prune.exclude, frozen_only=False))
        if cfg.packing:
            check_packing(model.config, cfg.max_length)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    check_nvme_buffers(ds_config or {}, model, world)
    if tokenizer is not None and not builtin and cfg.chat_template:
        check_template_tokens_train(cfg, tokenizer, model)
    if vocab is not None and vocab > config.vocab_size:
        raise ConfigError(f"tokenizer {source} has {vocab} tokens but the model's vocabulary is {config.vocab_size}: use the model's own tokenizer (--tokenizer)")


def check_template_tokens_train(cfg: TrainConfig, tokenizer, model) -> None:
    """Tokens a chat template adds to a pretrained model's vocabulary start as near-copies of the
    embeddings' mean: frozen, <|im_start|> and <|im_end|> would stay one token to the model, which
    then never learns where a turn ends. Its embeddings must train (or the template be its own)."""
    from dsee_scale.chat import use_chat_template
    from dsee_scale.inject import DEFAULT_TRAINABLE_MODULES, is_trainable_module

    own_template = tokenizer.chat_template is not None
    new = use_chat_template(tokenizer, cfg.chat_template)
    if not new or cfg.method == "full":
        return
    embeddings = next(name for name, module in model.named_modules() if module is model.get_input_embeddings())
    if not is_trainable_module(embeddings, cfg.dsee.trainable_modules if cfg.dsee.trainable_modules is not None else DEFAULT_TRAINABLE_MODULES):
        own = "drop --chat_template to use the tokenizer's own template, or " if own_template else ""
        raise ConfigError(f"--chat_template {cfg.chat_template} adds {new} tokens to the vocabulary of {cfg.model}; their new embeddings start alike and "
                          f"would stay frozen, so the model could not tell them apart: {own}train the embeddings with --dsee.trainable_modules "
                          f"{embeddings.rsplit('.', 1)[-1]} (a tied LM head trains with them), or use a template made of tokens the model knows")


def choose_ds_config(cfg: TrainConfig) -> None:
    """cfg.ds_config as the run records it (resolve_ds_config): the device's default where none
    was given (host.default_ds_config), said once."""
    if cfg.ds_config is None:
        cfg.ds_config, why = host.default_ds_config()
        if launched_rank() == 0:
            print(f"dsee_scale: DeepSpeed config {cfg.ds_config}, chosen by device: {why} (--ds_config chooses another)", flush=True)
    cfg.ds_config = resolve_ds_config(cfg.ds_config)[0]


def validate_before_launch(cfg: TrainConfig) -> dict:
    """All cheap checks; returns the DeepSpeed config with batch sizes resolved (and fp32 on CPU).
    First of all, a machine with a GPU that the run would not use is refused."""
    if refusal := host.silent_cpu_fallback():
        raise ConfigError(refusal)
    choose_ds_config(cfg)
    config = load_ds_config(cfg.ds_config)
    world = launched_world_size()
    resolve_batch_sizes(config, cfg.micro_batch_size, cfg.grad_accum, world, cfg.ds_config)
    if host.on_cpu():
        for key in ("bf16", "fp16"):
            if config.get(key, {}).get("enabled"):
                config[key]["enabled"] = False  # fp16 is refused and bf16 is ~10x slower on CPUs
    elif problem := host.precision_problem(config, cfg.ds_config):
        raise ConfigError(problem)
    check_output_dir(cfg, config, world)
    if nvme_offload(config) and "prune" in cfg.stages and (cfg.prune.heads or cfg.prune.ffn):
        raise ConfigError(f"structured pruning (prune.heads / prune.ffn) with the backbone on NVMe ({cfg.ds_config}) is not supported: removing "
                          f"heads gathers a layer's q, k, v, o and MLP weights together, more than DeepSpeed's swap buffers hold; "
                          f"prune unstructured (prune.sparsity, prune.pattern) or keep the backbone in memory (ds_configs/zero3.json)")
    if block := nvme_offload(config):  # one swap folder per run: two runs on one disk must not share swap files
        block["nvme_path"] = str(Path(block["nvme_path"]) / f"dsee-{hashlib.sha1(str(Path(cfg.output_dir).resolve()).encode()).hexdigest()[:12]}")
    check_model(cfg)
    check_data(cfg)
    check_model_fits(cfg, config, world)
    return config
