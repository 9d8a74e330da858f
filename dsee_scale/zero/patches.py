"""What an engine build applies to ZeRO-3 (DeepSpeed's private parameter and hook machinery):
adapters kept whole and re-gathered in one collective, whole-model generation, one hook per
transformer block, and torch's own linear where weights stay whole."""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence

import torch
from torch import nn

from dsee_scale import dist
from dsee_scale.zero.shards import full_dtype, full_numel, gathered, is_partitioned, on_nvme_count, shares_memory
from dsee_scale.zero.single_host import view_whole


def whole_model_fits(module: nn.Module) -> bool:
    """Every rank can hold a whole copy of `module` (decided on all ranks together): on a GPU
    within 80% of its free memory, on a CPU host within 80% of what is free for its local ranks."""
    from deepspeed.accelerator import get_accelerator

    if on_nvme_count(module):  # its whole copy would need a swap buffer per NVMe weight at once
        return False
    accelerator = get_accelerator()
    need = sum(full_numel(p) * full_dtype(p).itemsize for p in module.parameters() if not shares_memory(p))  # shared: whole already
    sharing = dist.local_world_size() if accelerator.device_name() == "cpu" else 1  # a CPU host's memory serves all its ranks
    fits = need * sharing <= 0.8 * accelerator.available_memory()
    return bool(dist.all_reduce(torch.tensor([int(fits)], device=next(module.parameters()).device), op="min").item())


@contextlib.contextmanager
def whole_model(engine) -> Iterator[None]:
    """The engine's model gathered whole on every rank, ZeRO-3's fetch hooks removed: forwards
    without collectives, so each rank generates at its own pace (no synced_gpus, no per-token
    layer fetches); partitioned and hooked again after. What TRL and DeepSpeed-Chat do for RLHF
    generation; the hooks are DeepSpeed's private parameter_offload API. Check whole_model_fits first."""
    offload = getattr(engine.optimizer, "parameter_offload", None)
    if offload is None:  # not ZeRO-3: the model is whole already
        yield
        return
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    module = offload.module
    engine.empty_partition_cache()  # nothing prefetched or half-released from the last forward
    view_whole([p for p in module.parameters() if shares_memory(p)], ZeroParamStatus.AVAILABLE)
    with gathered(list(module.parameters())):
        for param in module.parameters():
            param.ds_active_sub_modules.clear()
        offload._remove_module_hooks()
        offload.forward_hooks.clear()
        offload.backward_hooks.clear()
        try:
            yield
        finally:
            offload.setup_zero_stage3_hooks()


def keep_whole(engine, params: Sequence[torch.Tensor]) -> None:
    """Keep small trainable parameters (the adapters) whole on every rank, whatever the
    persistence threshold: no rank ever waits on a gather for them.

    DeepSpeed 0.19.8 has no public way to make chosen parameters persistent: its
    stage3_param_persistence_threshold is one size limit for every parameter, frozen ones too.
    So they are marked as its own threshold marks them (ds_persist) and added to the ZeRO-3
    optimizer's persistent_parameters, which it re-gathers after every step and checkpoint; a
    later engine on the same model gets them added again. Every parameter of that list, DeepSpeed's
    own too, is then re-gathered in one collective (_regather_coalesced). Both are private: a
    DeepSpeed without them is refused rather than left with gathers.
    """
    params = [p for p in params if is_partitioned(p)]
    registry = getattr(getattr(engine, "optimizer", None), "persistent_parameters", None)
    if params and (registry is None or not all(hasattr(p, "ds_persist") for p in params)):
        import deepspeed

        raise RuntimeError(
            f"deepspeed {deepspeed.__version__} has no ZeRO-3 persistent_parameters / ds_persist: dsee_scale cannot keep "
            f"the adapters whole on every rank; use deepspeed 0.19.8 (constraints.txt)"
        )
    registered = {id(p) for p in registry or []}
    added = [p for p in params if id(p) not in registered]
    for p in added:
        p.ds_persist = True
        registry.append(p)
    _regather_coalesced(registry or [])
    if added:
        added[0].all_gather(added)


def _regather_coalesced(params: Sequence[torch.Tensor]) -> None:
    """ZeRO-3 gathers its persistent parameters again after every optimizer step with one
    collective per tensor (stage 3's _post_step; on CPU ranks each a gloo round trip, see
    RESULTS.md). Their synchronous all_gather is made one coalesced fetch per dtype."""
    for param in params:
        if not hasattr(param, "ds_gather_each"):
            param.ds_gather_each = param.all_gather
            param.all_gather = _coalesced_all_gather(param)


def _coalesced_all_gather(param: torch.Tensor) -> Callable:
    """`param`'s all_gather (DeepSpeed's `_all_gather` for a list led by `param`) as one ZeRO-3
    fetch per dtype, by its own unwrapped all_gather_coalesced: a shared frozen weight in the
    list gets a private copy, as from DeepSpeed's. Asynchronous gathers, hpZ's secondary
    partitions (stale right after a step) and quantized weights keep DeepSpeed's path."""
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    def all_gather(param_list: Sequence[torch.Tensor] | None = None, async_op: bool = False, hierarchy: int = 0):
        params = list(dict.fromkeys([param] if param_list is None else param_list))
        if async_op or any(getattr(p, "ds_secondary_tensor", None) is not None or hasattr(p.ds_tensor, "ds_quant_scale") for p in params):
            return param.ds_gather_each(param_list, async_op=async_op, hierarchy=hierarchy)
        by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
        for p in params:
            if p.ds_status == ZeroParamStatus.NOT_AVAILABLE:
                by_dtype.setdefault(full_dtype(p), []).append(p)
        fetch = getattr(param, "ds_gather_unshared", param.all_gather_coalesced)
        for released in by_dtype.values():  # in the list's order, the same on every rank
            fetch(released).wait()
        return None

    return all_gather


def hook_per_block(blocks: Sequence[nn.Module]) -> None:
    """ZeRO-3 hooks each transformer block instead of each of its ~15 layers (DeepSpeed's leaf
    modules; before deepspeed.initialize): a block's weights are fetched in one go and its
    gradients reduced once, after its backward, instead of from a hook per tensor. Meant for
    frozen weights in shared memory, whose fetches are free, so that ZeRO-3's per-module and
    per-gradient Python is what is left of a step's overhead; so only blocks with frozen weights.
    Where ZeRO-3 fetches the weights, a block at a time gains nothing and holds more (GPT-2-medium
    on 2 CPU ranks: 1 GB more per rank, no faster). The first block also computes a
    gradient for its input that nothing uses (see _input_needs_grad)."""
    from deepspeed.utils import set_z3_leaf_module

    for block in blocks:
        if all(p.requires_grad for p in block.parameters()):
            continue
        set_z3_leaf_module(block, True)
        if not hasattr(block, "dsee_input_hook"):  # once, however many engines the model gets
            block.dsee_input_hook = block.register_forward_pre_hook(_input_needs_grad)


def hook_per_layer(blocks: Sequence[nn.Module]) -> None:
    """Undo hook_per_block on a model that gets another engine (ZeRO-3 fetching its weights, or
    hooks per layer asked for); leaf modules set by anyone else stay."""
    from deepspeed.utils import set_z3_leaf_module

    for block in blocks:
        if hasattr(block, "dsee_input_hook"):
            set_z3_leaf_module(block, False)


def _input_needs_grad(block: nn.Module, args: tuple):
    """DeepSpeed reduces a leaf block's gradients in a full backward hook, and torch fires that hook
    before the block's own gradients exist when no positional input needs a gradient (the first
    block, fed by frozen embeddings): its hidden states are made to need one."""
    from deepspeed.utils import z3_leaf_module

    if not (torch.is_grad_enabled() and z3_leaf_module(block) and any(p.requires_grad for p in block.parameters())):
        return None
    if not (args and isinstance(args[0], torch.Tensor) and args[0].is_floating_point()):
        raise RuntimeError(f"{type(block).__name__} was called without its hidden states as the first positional argument, so ZeRO-3 "
                           "would reduce its gradients before they exist: set zero3_hook_per_block to false for this model "
                           "(create_engine(..., hook_per_block=False))")
    if args[0].requires_grad:
        return None
    return (args[0].detach().requires_grad_(True), *args[1:])


class TorchLinear(nn.Linear):
    """nn.Linear through torch's own linear, whatever ZeRO-3 made of F.linear (torch_linear_where_whole)."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return torch._C._nn.linear(input, self.weight, self.bias)


def torch_linear_where_whole(module: nn.Module) -> int:
    """zero.Init swaps F.linear, for the whole process, for a Python autograd Function that
    fetches a released weight again in backward rather than keep it from forward (DeepSpeed's
    memory_efficient_linear): two Python calls per nn.Linear and step, 5-8% of a medium-LLaMA
    step on CPU ranks. A layer whose weights ZeRO-3 keeps from forward to backward (shared frozen
    weights, adapters kept whole, parameters under the persistence threshold) has nothing to
    fetch again: it becomes a TorchLinear, which autograd serves natively, and goes back to
    nn.Linear once it no longer qualifies. Decided when called (create_engine): whatever releases a
    kept weight later (a new engine's sharing, new partitions) must call it again, as create_engine
    does. Exact nn.Linear only (subclasses have their own forward); returns how many are TorchLinear."""
    count = 0
    for layer in module.modules():
        if type(layer) in (nn.Linear, TorchLinear):
            whole = all(not is_partitioned(p) or p.ds_persist for p in layer.parameters(recurse=False))
            layer.__class__ = TorchLinear if whole else nn.Linear
            count += whole
    return count
