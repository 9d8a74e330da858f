"""DeepSpeed engine for a DSEE model: only adapters (and the head) reach the optimizer."""
from __future__ import annotations

import atexit
import logging
import sys
from datetime import timedelta

import torch
from torch import nn

from dsee_scale import arch, dist, extras, zero
from dsee_scale.zero import compat, single_host
from dsee_scale.inject import adapter_parameters
from dsee_scale.ds_config import is_zero3, nvme_offload

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
    compat.check_deepspeed()
    try:
        deepspeed.init_distributed(dist_backend=get_accelerator().communication_backend_name(), timeout=timedelta(minutes=timeout_min))
    except ModuleNotFoundError as err:  # mpi4py is the 'mpi' extra: DeepSpeed imports it only without a launcher's environment
        if err.name != "mpi4py":
            raise
        raise extras.missing("mpi4py") from err
    atexit.register(end_process_group_at_exit)
    if get_accelerator().device_name() != "cpu":  # one device per rank before the first collective (Ω's broadcasts)
        get_accelerator().set_device(dist.local_rank())
    else:
        single_host.on_process_group_start()
        compat.preload_libaio()


def end_process_group_at_exit() -> None:
    """A process that leaves with its gloo process group alive can abort in the C++ runtime while
    the interpreter finalizes ("terminate called without an active exception", pytorch#190489;
    here 3 exits of 30 under load): end it while Python still runs. Not after an uncaught
    exception: ending waits for this rank's unfinished collectives (ZeRO-3 prefetches), whose
    peers may never join; the launcher stops them once this rank is gone."""
    if torch.distributed.is_initialized() and getattr(sys, "last_value", None) is None:
        torch.distributed.destroy_process_group()


def hooks_per_block(model: nn.Module, ds_config: dict, hook_per_block: bool, share_frozen: bool) -> bool:
    """Whether ZeRO-3 should hook whole transformer blocks: only where frozen weights will be
    shared whole (ZeRO-3, not on NVMe, shared memory available). A model with nothing frozen (full
    fine-tuning) has nothing to share, and keeps hooks per layer without a warning."""
    frozen = any(not p.requires_grad for p in model.parameters())
    return frozen and hook_per_block and share_frozen and is_zero3(ds_config) and not nvme_offload(ds_config) and zero.can_share_frozen_weights()


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
    per_block = hooks_per_block(model, ds_config, hook_per_block, share_frozen)
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
        with compat.muon_not_imported():
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


def torch_optimizer(engine) -> torch.optim.Optimizer:
    """The torch optimizer that holds the state: inside ZeRO's wrapper, or the engine's own."""
    return getattr(engine.optimizer, "optimizer", engine.optimizer)


def optimizer_state_numel(engine) -> int:
    """Elements of optimizer state held by this rank (all tensors of every state entry)."""
    return sum(t.numel() for state in torch_optimizer(engine).state.values() for t in state.values() if torch.is_tensor(t) and t.dim() > 0)
