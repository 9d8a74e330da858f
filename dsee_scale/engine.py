"""DeepSpeed engine for a DSEE model: only adapters (and the head) reach the optimizer."""
from __future__ import annotations

import atexit
import contextlib
import ctypes.util
import glob
import logging
import os
import sys
import types
from datetime import timedelta

import torch
from torch import nn

from dsee_scale import arch, dist, zero
from dsee_scale.inject import adapter_parameters
from dsee_scale.models import is_zero3
from dsee_scale.validate import nvme_offload

log = logging.getLogger(__name__)


def init_distributed(timeout_min: float = 30.0) -> None:
    """Join (or create) the process group with the accelerator's backend: NCCL on GPUs, gloo on CPU.

    Ranks are discovered from the launcher's environment (deepspeed, torchrun, accelerate) or,
    failing that, through mpi4py (mpirun, srun).
    """
    import warnings

    import deepspeed
    from deepspeed.accelerator import get_accelerator

    # DeepSpeed calls collectives that torch marks deprecated, once per call: keep logs readable.
    warnings.filterwarnings("ignore", category=FutureWarning, module="torch.distributed")
    deepspeed.init_distributed(dist_backend=get_accelerator().communication_backend_name(), timeout=timedelta(minutes=timeout_min))
    atexit.register(end_process_group_at_exit)
    if get_accelerator().device_name() != "cpu":  # one device per rank before the first collective (Ω's broadcasts)
        get_accelerator().set_device(dist.local_rank())
    else:
        unlink_shm_buffers()
        if zero.fetch_through_shared_memory() and dist.is_main():
            log.info("ZeRO-3 fetches weights through shared memory")
        # make setup builds DeepSpeed's async_io op in (JIT-compiling it inside a run takes
        # minutes), but DeepSpeed 0.19.8's CPU op builder links it without -laio: load libaio
        # globally before DeepSpeed loads the op (ZeRO-Infinity's NVMe offload).
        if libaio := ctypes.util.find_library("aio"):
            ctypes.CDLL(libaio, mode=ctypes.RTLD_GLOBAL)


def end_process_group_at_exit() -> None:
    """A process that leaves with its gloo process group alive can abort in the C++ runtime while
    the interpreter finalizes ("terminate called without an active exception", pytorch#190489;
    here 3 exits of 30 under load): end it while Python still runs. Not after an uncaught
    exception: ending waits for this rank's unfinished collectives (ZeRO-3 prefetches), whose
    peers may never join; the launcher stops them once this rank is gone."""
    if torch.distributed.is_initialized() and getattr(sys, "last_value", None) is None:
        torch.distributed.destroy_process_group()


def unlink_shm_buffers() -> None:
    """DeepSpeed's CPU shared-memory collectives create a 69 MB /dev/shm buffer per rank and run
    (tmpfs: it is RAM) and never remove it; a killed run left them behind (19 GB after one test
    suite). Once every rank has mapped them, the names can go: the memory stays mapped while the
    ranks live and is freed with the last of them, however it ends. Collective: every rank calls it
    once the process group (and with it DeepSpeed's shm_initialize) is up."""
    dist.barrier()  # every rank has mapped every peer's buffer
    pattern = f"/dev/shm/deepspeed_*_{os.environ.get('MASTER_ADDR', '*')}_{os.environ.get('MASTER_PORT', '*')}_{dist.rank()}"
    for path in glob.glob(pattern):
        with contextlib.suppress(OSError):
            os.unlink(path)


def create_engine(model: nn.Module, ds_config: dict, lr: float, weight_decay: float = 0.0, betas=(0.9, 0.999), share_frozen: bool = True,
                  hook_per_block: bool = True):
    """deepspeed.initialize with a torch AdamW over the trainable parameters only.

    Frozen weights therefore get no gradient buffers, no fp32 master copy and no optimizer state;
    adapters are kept whole on every rank (see zero.keep_whole). With share_frozen, so are frozen
    weights where the ranks share a CPU machine: one copy in shared memory, read by all
    (zero.share_frozen_weights). There, with hook_per_block, ZeRO-3 hooks each transformer block
    rather than each layer in it (zero.hook_per_block). Linear layers whose weights all stay whole
    skip ZeRO-3's re-fetching linear (zero.torch_linear_where_whole). A torch AdamW needs no op compile, unlike the config optimizer "AdamW" (FusedAdam) on CPU.
    """
    import deepspeed

    trainable = [p for p in model.parameters() if p.requires_grad]
    if not trainable:
        raise ValueError("the model has no trainable parameters: call apply_dsee first")
    per_block = hook_per_block and share_frozen and is_zero3(ds_config) and not nvme_offload(ds_config) and zero.can_share_frozen_weights()
    if per_block:  # (weights on NVMe are not shared)
        zero.hook_per_block(arch.blocks(model))
    else:  # a model's earlier engine may have hooked it per block
        zero.hook_per_layer(arch.blocks(model))
    offload = ds_config.get("zero_optimization", {}).get("offload_optimizer", {}).get("device", "none") not in ("none", None)
    if "optimizer" in ds_config:
        engine, *_ = deepspeed.initialize(model=model, model_parameters=trainable, config=ds_config)
    else:
        if offload:  # optimizer state lives on the CPU: DeepSpeed's vectorised CPU Adam (pre-built op)
            from deepspeed.ops.adam import DeepSpeedCPUAdam

            optimizer = DeepSpeedCPUAdam(trainable, lr=lr, weight_decay=weight_decay, betas=betas, adamw_mode=True)
        else:
            optimizer = torch.optim.AdamW(trainable, lr=lr, weight_decay=weight_decay, betas=betas)
        with _muon_not_imported():
            engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
    zero.keep_whole(engine, adapter_parameters(model))
    if zero.share_frozen_weights(model, share_new=share_frozen) and dist.is_main():
        log.info("frozen weights are whole on every rank through shared memory, held once on this machine")
    if is_zero3(ds_config) and zero.torch_linear_where_whole(model) and dist.is_main():
        log.info("linear layers whose weights stay whole run through torch's own linear")
    if per_block and not any(map(zero.shares_memory, model.parameters())) and dist.is_main():
        log.warning("frozen weights could not be shared (too little room in /dev/shm?), so ZeRO-3 fetches them a block at a time, "
                    "which holds more memory than per layer: set zero3_hook_per_block to false, or free /dev/shm")
    return engine


MUON_MODULE = "deepspeed.runtime.zero.muon.muon_optimizer"


class _NotMuon:
    """Stands in for DeepSpeed's MuonWithAuxAdam while an engine is created: nothing is one."""


@contextlib.contextmanager
def _muon_not_imported():
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


def torch_optimizer(engine) -> torch.optim.Optimizer:
    """The torch optimizer that holds the state: inside ZeRO's wrapper, or the engine's own."""
    return getattr(engine.optimizer, "optimizer", engine.optimizer)


def optimizer_state_numel(engine) -> int:
    """Elements of optimizer state held by this rank (all tensors of every state entry)."""
    return sum(t.numel() for state in torch_optimizer(engine).state.values() for t in state.values() if torch.is_tensor(t) and t.dim() > 0)
