"""Every other private DeepSpeed attribute dsee_scale reads, and the start-up probe for all of them.

dsee_scale was written against one DeepSpeed (WRITTEN_FOR). The rest of the package uses its
public API; what it cannot do without DeepSpeed's internals lives in `dsee_scale.zero` (shards,
patches, single_host) and here. `check_deepspeed` runs once per process before any engine: a
DeepSpeed without one of them fails then, naming what is missing and the version to install,
rather than mid-run with an AttributeError.
"""
from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import importlib
import logging
import sys
import types
from collections.abc import Iterator

import torch

log = logging.getLogger(__name__)
WRITTEN_FOR = "0.19.8"  # constraints.txt pins it; pyproject bounds what this module accepts
MUON_MODULE = "deepspeed.runtime.zero.muon.muon_optimizer"

# (module, attribute) pairs the zero package reads: private, so they can change in any release.
PRIVATE_ATTRIBUTES = (
    ("deepspeed.runtime.zero.partition_parameters", "dist"),  # single_host wraps ZeRO-3's comm
    ("deepspeed.runtime.zero.partition_parameters", "ZeroParamStatus"),
    ("deepspeed.runtime.zero.partition_parameters", "PartitionedParamStatus"),
    ("deepspeed.runtime.zero.partition_parameters", "AllReduceCoalescedHandle"),
    ("deepspeed.runtime.zero.partition_parameters", "MultipleAllGatherHandles"),
    ("deepspeed.runtime.zero.stage3", "DeepSpeedZeroOptimizer_Stage3"),
    ("deepspeed.runtime.zero.parameter_offload", "DeepSpeedZeRoOffload"),
    ("deepspeed.utils", "set_z3_leaf_module"),
    ("deepspeed.utils", "z3_leaf_module"),
    ("deepspeed.utils", "safe_set_local_fp32_param"),
    ("deepspeed.utils", "safe_set_local_optimizer_state"),
)
# Methods of those classes that patches call or replace.
PRIVATE_METHODS = (
    ("deepspeed.runtime.zero.stage3", "DeepSpeedZeroOptimizer_Stage3", "_post_step"),  # re-gathers persistent_parameters
    ("deepspeed.runtime.zero.parameter_offload", "DeepSpeedZeRoOffload", "_remove_module_hooks"),
    ("deepspeed.runtime.zero.parameter_offload", "DeepSpeedZeRoOffload", "setup_zero_stage3_hooks"),
)


def missing_internals() -> list[str]:
    """The private DeepSpeed names this package reads that the installed DeepSpeed lacks."""
    missing = []
    for module, attribute in PRIVATE_ATTRIBUTES:
        if not hasattr(importlib.import_module(module), attribute):
            missing.append(f"{module}.{attribute}")
    for module, cls, method in PRIVATE_METHODS:
        if not hasattr(getattr(importlib.import_module(module), cls, None), method):
            missing.append(f"{module}.{cls}.{method}")
    return missing


def check_deepspeed() -> None:
    """Refuse a DeepSpeed without the internals dsee_scale uses, naming the version it was
    written for; a different version that has them all is used, with one warning."""
    import deepspeed

    missing = missing_internals()
    if missing:
        raise RuntimeError(f"deepspeed {deepspeed.__version__} lacks internals dsee_scale relies on ({', '.join(missing)}): "
                           f"dsee_scale was written for deepspeed {WRITTEN_FOR}; install it (pip install deepspeed=={WRITTEN_FOR}, "
                           f"as constraints.txt pins it)")
    if deepspeed.__version__ != WRITTEN_FOR:
        log.warning("deepspeed %s: dsee_scale was written and tested for %s (its internals are all there)", deepspeed.__version__, WRITTEN_FOR)


class _NotMuon:
    """Stands in for DeepSpeed's MuonWithAuxAdam while an engine is created: nothing is one."""


@contextlib.contextmanager
def muon_not_imported() -> Iterator[None]:
    """deepspeed.initialize under ZeRO-3 imports DeepSpeed's Muon optimizer only to ask whether the
    client's optimizer is one (the support check, stage 3's set-up). Importing it wraps Muon's
    kernels in torch.compile, which imports dynamo's compiler and inductor: 2-3 s of CPU per rank,
    a third of a small run's start. Ours is AdamW or CPU Adam, never Muon, so for this call the
    module is a stand-in; later imports (ZeRO-1/2 import it again in backward) get the real one."""
    if MUON_MODULE in sys.modules:
        yield
        return
    stand_in = types.ModuleType(MUON_MODULE)
    stand_in.MuonWithAuxAdam = _NotMuon
    sys.modules[MUON_MODULE] = stand_in
    try:
        yield
    finally:
        if sys.modules.get(MUON_MODULE) is stand_in:
            del sys.modules[MUON_MODULE]


def zero3_fp32_partitions(engine) -> list[torch.Tensor]:
    """The flat fp32 partitions ZeRO-3 hands its torch optimizer during a step (empty otherwise):
    where that optimizer's state lives under ZeRO-3."""
    return list(getattr(engine.optimizer, "fp32_partitioned_groups_flat", None) or [])


def holds_fp32_copy(param: torch.Tensor) -> bool:
    """DeepSpeed keeps this parameter's fp32 copy and moments in its own flat buffers (ZeRO-1/2,
    the bf16 optimizer): its fragment mapping is set."""
    return hasattr(param, "_hp_mapping")


def preload_libaio() -> None:
    """make setup builds DeepSpeed's async_io op in (JIT-compiling it inside a run takes minutes),
    but DeepSpeed 0.19.8's CPU op builder links it without -laio: load libaio globally before
    DeepSpeed loads the op (ZeRO-Infinity's NVMe offload)."""
    if libaio := ctypes.util.find_library("aio"):
        ctypes.CDLL(libaio, mode=ctypes.RTLD_GLOBAL)

