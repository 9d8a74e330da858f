"""Checks that run before any heavy work (model loading, process-group collectives).

Each failure is a ConfigError whose message names the problem and the fix. Every rank runs the
same checks on the same inputs, so all of them fail together, before any collective.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from dsee_scale.config import TrainConfig

RUN_MARKER = "dsee_run.json"


class ConfigError(ValueError):
    """Bad input found before launch; the message says what to change."""


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


def on_cpu() -> bool:
    from deepspeed.accelerator import get_accelerator

    return get_accelerator().device_name() == "cpu"


def load_ds_config(path: str) -> dict:
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"DeepSpeed config {path} does not exist: pass --ds_config ds_configs/zero3.json (or another file in ds_configs/)")
    try:
        config = json.loads(file.read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(f"DeepSpeed config {path} is not valid JSON ({err.msg} at line {err.lineno}, column {err.colno})") from None
    if not isinstance(config, dict):
        raise ConfigError(f"DeepSpeed config {path} must be a JSON object")
    zero = config.get("zero_optimization", {})
    stage = zero.get("stage", 0)
    if stage not in (0, 1, 2, 3):
        raise ConfigError(f"DeepSpeed config {path}: zero_optimization.stage must be 0, 1, 2 or 3, got {stage!r}")
    if zero.get("zero_hpz_partition_size", 1) not in (1, None):
        raise ConfigError(
            f"DeepSpeed config {path}: zero_optimization.zero_hpz_partition_size is not supported: hpZ refuses the second "
            f"zero.Init that creates the adapters, and pruning would edit the primary shards but not hpZ's secondary copy "
            f"that backward reads; remove it (or set it to 1)"
        )
    if zero.get("zero_quantized_nontrainable_weights"):
        raise ConfigError(
            f"DeepSpeed config {path}: zero_optimization.zero_quantized_nontrainable_weights is not supported: DeepSpeed "
            f"quantizes only weights frozen when they are first partitioned, and the backbone is frozen after it is built, "
            f"so nothing would be quantized; remove it (or set it to false)"
        )
    check_nvme_offload(config, path)
    return config


def nvme_offload(config: dict) -> dict | None:
    """The offload_param block when it sends the backbone to NVMe (ZeRO-Infinity), else None."""
    block = config.get("zero_optimization", {}).get("offload_param") or {}
    return block if block.get("device") == "nvme" else None


def check_nvme_offload(config: dict, path: str) -> None:
    """offload_param to NVMe needs a writable nvme_path and DeepSpeed's async_io op (libaio)."""
    block = nvme_offload(config)
    if block is None:
        return
    if config.get("zero_optimization", {}).get("stage") != 3:
        raise ConfigError(f"DeepSpeed config {path}: offload_param to nvme needs zero_optimization.stage 3")
    if config["zero_optimization"].get("stage3_prefetch_bucket_size", 50_000_000):
        raise ConfigError(f"DeepSpeed config {path}: set zero_optimization.stage3_prefetch_bucket_size to 0 with offload_param to nvme: "
                          f"DeepSpeed 0.19.8's NVMe prefetch hands one weight two swap buffers from the second step on and stops "
                          f"('param N already assigned swap buffer id'); ds_configs/zero3_nvme.json has it")
    folder = block.get("nvme_path")
    if not folder:
        raise ConfigError(f"DeepSpeed config {path}: offload_param.device nvme needs offload_param.nvme_path, a folder on a fast local disk")
    try:
        Path(folder).mkdir(parents=True, exist_ok=True)
        probe = Path(folder) / f".dsee_write_probe_{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise ConfigError(f"DeepSpeed config {path}: offload_param.nvme_path {folder} is not a writable folder ({err.strerror}): choose a folder on a local disk you can write") from None
    import ctypes.util

    # What DeepSpeed's AsyncIOBuilder compiles against (its own probe needs a real stderr).
    if ctypes.util.find_library("aio") is None or not any(Path(d, "libaio.h").exists() for d in ("/usr/include", "/usr/local/include")):
        raise ConfigError(f"DeepSpeed config {path}: offload_param to nvme needs DeepSpeed's async_io op, which needs libaio: "
                          f"apt-get install libaio-dev (make setup does), then run again")


def check_nvme_buffers(config: dict, model, world: int) -> None:
    """DeepSpeed swaps each shard of at least 1 MB through a buffer of offload_param.buffer_size
    elements: a smaller buffer fails mid-build with an assertion, so name the size needed now
    ("auto": exactly the largest shard)."""
    block = nvme_offload(config)
    if block is None:
        return
    largest = max(-(-p.numel() // world) for p in model.parameters())
    if block.get("buffer_size") == "auto":  # just large enough: each of buffer_count buffers is this much memory
        block["buffer_size"] = largest
    size = int(float(block.get("buffer_size", 1e8)))
    if size < largest:
        raise ConfigError(f"offload_param.buffer_size {size:,} is smaller than this model's largest weight shard at {world} rank(s), "
                          f"{largest:,} elements: set buffer_size to at least {largest} (each of buffer_count buffers takes that many elements of memory)")


def resolve_batch_sizes(config: dict, cfg: TrainConfig, world: int, source: str) -> None:
    """Fill micro-batch / accumulation / global batch so that global = micro × accum × world,
    from the config, the CLI (which wins) or each other; refuse numbers that disagree."""
    def number(key):
        value = config.get(key)
        return None if value in (None, "auto") else value

    micro = cfg.micro_batch_size or number("train_micro_batch_size_per_gpu")
    accum = cfg.grad_accum or number("gradient_accumulation_steps")
    total = number("train_batch_size")
    if total is not None and micro is not None and accum is not None and total != micro * accum * world:
        raise ConfigError(
            f"batch sizes disagree: train_batch_size {total} in {source} != micro-batch {micro} × accumulation {accum} × world size {world}: "
            f"fix one of them or drop train_batch_size from the config (it is derived)"
        )
    if micro is None:
        micro = total // ((accum or 1) * world) if total else 8
    if accum is None:
        accum = max(1, total // (micro * world)) if total else 1
    if total is not None and total != micro * accum * world:
        raise ConfigError(f"train_batch_size {total} in {source} is not divisible into micro-batch {micro} × accumulation × world size {world}")
    for name, value in (("micro_batch_size", micro), ("grad_accum", accum)):
        if not isinstance(value, int) or value < 1:
            raise ConfigError(f"{name} must be a positive integer, got {value!r}")
    config["train_micro_batch_size_per_gpu"] = micro
    config["gradient_accumulation_steps"] = accum
    config["train_batch_size"] = micro * accum * world


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
    from dsee_scale.checkpoint import identity_differences, latest_state, run_identity

    state = latest_state(Path(cfg.output_dir) / "checkpoints")
    if state is None:
        return
    differences = identity_differences(state["run"], run_identity(cfg, ds_config))
    if differences:
        hint = " (set --micro_batch_size / --grad_accum so that micro × accumulation × world size matches)" if any(d.startswith("global_batch") for d in differences) else ""
        raise ConfigError(f"--resume: the checkpoint in {cfg.output_dir} is of another run: {'; '.join(differences)}{hint}")


def run_marker(cfg: TrainConfig, ds_config: dict, world: int) -> dict:
    """What identifies a run: its configuration, resolved DeepSpeed config and world size."""
    return {"config": {**cfg.to_dict(), "resume": False, "overwrite": False}, "ds_config": ds_config, "world_size": world}


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
    same = {k: previous.get(k) for k in ("config", "ds_config", "world_size")} == run_marker(cfg, ds_config, world)
    unfinished = not (folder / "summary.json").exists() and (folder / "checkpoints" / "latest").exists()
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
        from dsee_scale.data import TABLE_SUFFIXES, check_columns, check_labels, peek_columns

        try:
            columns, examples = peek_columns(path, cfg.header)
            if examples == []:
                raise ConfigError(f"{flag} {path} holds no examples (empty dataset)")
            tabular = file.suffix.lower() in TABLE_SUFFIXES
            if columns:
                check_columns(columns, cfg, f"{flag} {path}", first_row=examples[0] if tabular else None)
            if examples and cfg.task != "lm":
                check_labels([e.get(cfg.label_column) for e in examples], cfg, f"{flag} {path}")
        except UnicodeDecodeError:
            raise ConfigError(f"{flag} {path} cannot be read as UTF-8 text (is it a binary file?)") from None
        except ValueError as err:
            raise ConfigError(str(err)) from None
    if cfg.support_file and not Path(cfg.support_file).is_file():
        raise ConfigError(f"--support_file {cfg.support_file} does not exist (a run's support.safetensors or an adapter file)")
    if cfg.task != "lm" and not (cfg.train_file or cfg.dataset):
        raise ConfigError(f"task '{cfg.task}' needs data: pass --train_file (TSV/CSV/JSON with text and label columns) or --dataset")
    if cfg.eval_file is None and cfg.train_file and "evaluate" in cfg.stages:
        raise ConfigError("the evaluate stage needs --eval_file (or drop 'evaluate' from --stages)")


def check_model_fits(cfg: TrainConfig, ds_config: dict | None = None, world: int = 1) -> None:
    """Targets, rank and nnz against the model's shapes, the tokenizer against its vocabulary
    and NVMe swap buffers against its shards, on a model built on the meta device (no weights
    are loaded or allocated)."""
    import torch
    from transformers import AutoConfig, AutoTokenizer

    from dsee_scale.inject import check_targets
    from dsee_scale.models import TASK_MODELS, builtin_config, resolve_model_path

    builtin = cfg.model.startswith("builtin:")
    if not builtin and not Path(resolve_model_path(cfg.model)).exists():
        if ds_config and (nvme_offload(ds_config) or {}).get("buffer_size") == "auto":
            raise ConfigError(f"offload_param.buffer_size auto is sized from the model's shapes, and {cfg.model} is not a local folder: "
                              f"set buffer_size to the largest weight's elements divided by the number of ranks")
        return  # a hub name: checked once downloaded
    source = cfg.tokenizer or (None if builtin else resolve_model_path(cfg.model))
    vocab = len(AutoTokenizer.from_pretrained(source)) if source is not None and Path(source).exists() else None
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
    except ValueError as err:
        raise ConfigError(str(err)) from None
    check_nvme_buffers(ds_config or {}, model, world)
    if vocab is not None and vocab > config.vocab_size:
        raise ConfigError(f"tokenizer {source} has {vocab} tokens but the model's vocabulary is {config.vocab_size}: use the model's own tokenizer (--tokenizer)")


def validate_before_launch(cfg: TrainConfig) -> dict:
    """All cheap checks; returns the DeepSpeed config with batch sizes resolved (and fp32 on CPU)."""
    config = load_ds_config(cfg.ds_config)
    world = launched_world_size()
    resolve_batch_sizes(config, cfg, world, cfg.ds_config)
    if on_cpu():
        for key in ("bf16", "fp16"):
            if config.get(key, {}).get("enabled"):
                config[key]["enabled"] = False  # fp16 is refused and bf16 is ~10x slower on CPUs
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
