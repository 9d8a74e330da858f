"""The DeepSpeed config: loaded, checked and resolved (batch sizes, NVMe offload) before any heavy
work. A leaf module: it imports nothing else of dsee_scale, so every other module may use it."""
from __future__ import annotations

import json
import os
from pathlib import Path


class ConfigError(ValueError):
    """Bad input found before launch; the message says what to change."""


BUILTIN_DIR = Path(__file__).resolve().parent / "ds_configs"  # package data; a checkout's top-level ds_configs/ links here


def builtin_names() -> list[str]:
    """The DeepSpeed configs dsee_scale ships, by the name --ds_config accepts (zero3, zero3_bf16, ...)."""
    return sorted(file.stem for file in BUILTIN_DIR.glob("*.json"))


def resolve_ds_config(given: str) -> tuple[str, Path]:
    """--ds_config as (the name a run records, its file): a JSON file, else a built-in config by
    name (zero3, zero3.json or ds_configs/zero3.json, from any working directory). A built-in is
    recorded by its bare name however it was given, so that a resume that names it another way,
    or leaves the device to choose it, is recognised as the same run."""
    file = Path(given)
    if file.is_file():
        return (file.stem if file.resolve().parent == BUILTIN_DIR else given), file
    name = given.removeprefix("ds_configs/").removesuffix(".json")
    if name in builtin_names():
        return name, BUILTIN_DIR / f"{name}.json"
    raise ConfigError(f"DeepSpeed config {given} does not exist: pass --ds_config a JSON file or a built-in name: {', '.join(builtin_names())} "
                      f"(or leave it out: chosen by device)")


def load_ds_config(given: str) -> dict:
    """The DeepSpeed config `given` names (resolve_ds_config), refused with the reason when
    dsee_scale cannot run it."""
    path, file = resolve_ds_config(given)
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
    if not libaio_ready():
        raise ConfigError(f"DeepSpeed config {path}: offload_param to nvme needs DeepSpeed's async_io op, which needs libaio: "
                          f"apt-get install libaio-dev (make setup does), then run again")


def libaio_ready() -> bool:
    """Whether libaio and its header are installed: what DeepSpeed's AsyncIOBuilder (the async_io
    op of NVMe offload) compiles against; its own probe needs a real stderr."""
    import ctypes.util

    return ctypes.util.find_library("aio") is not None and any(Path(d, "libaio.h").exists() for d in ("/usr/include", "/usr/local/include"))


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


def resolve_batch_sizes(config: dict, micro_batch_size: int | None, grad_accum: int | None, world: int, source: str) -> None:
    """Fill micro-batch / accumulation / global batch so that global = micro × accum × world,
    from the config, the CLI's micro_batch_size / grad_accum (which win) or each other; refuse
    numbers that disagree."""
    def number(key):
        value = config.get(key)
        return None if value in (None, "auto") else value

    micro = micro_batch_size or number("train_micro_batch_size_per_gpu")
    accum = grad_accum or number("gradient_accumulation_steps")
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


def is_zero3(ds_config: dict | None) -> bool:
    return bool(ds_config) and ds_config.get("zero_optimization", {}).get("stage", 0) == 3
