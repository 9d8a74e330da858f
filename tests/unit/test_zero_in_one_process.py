"""dsee_scale.zero's helpers that need no process group, and the DeepSpeed source its fetch through
shared memory (zero/single_host.py) relies on (ZeRO-3 on 2 real ranks: tests/multirank/test_zero3_on_2_ranks.py)."""
import inspect
import re
import types

import deepspeed
import pytest
import torch
from deepspeed.utils import set_z3_leaf_module, z3_leaf_module
from torch import nn

from dsee_scale import zero


def test_keep_whole_refuses_a_deepspeed_without_its_persistence_internals():
    param = nn.Parameter(torch.zeros(3))
    param.ds_id, param.ds_persist = 0, False  # looks partitioned, not yet persistent
    engine = types.SimpleNamespace(optimizer=object())  # no persistent_parameters list
    with pytest.raises(RuntimeError, match=f"deepspeed {deepspeed.__version__}"):
        zero.keep_whole(engine, [param])
    zero.keep_whole(engine, [nn.Parameter(torch.zeros(3))])  # nothing partitioned: nothing to do


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(4, 4)

    def forward(self, hidden_states):
        return self.linear(hidden_states)


def test_hook_per_block_gives_the_blocks_input_a_gradient_or_refuses_a_block_without_one():
    """ZeRO-3 reduces a leaf block's gradients from a full backward hook, which would fire before
    they exist if no positional input needed a gradient: the input is made to need one, and a
    block called with its hidden states as a keyword is refused (the fix named). A block with no
    frozen weight (full fine-tuning) is left alone."""
    block, trained = _Block(), _Block()
    block.linear.weight.requires_grad_(False)  # frozen, as DSEE leaves it; the bias trains
    zero.hook_per_block([block, block, trained])  # block twice: one input hook
    assert z3_leaf_module(block) and len(block._forward_pre_hooks) == 1
    assert not z3_leaf_module(trained) and not trained._forward_pre_hooks
    frozen_input = torch.randn(2, 4)
    seen = []
    block.register_forward_pre_hook(lambda _module, args: seen.append(bool(args) and args[0].requires_grad))
    block(frozen_input).sum().backward()
    assert seen == [True] and not frozen_input.requires_grad  # a detached copy needs it; the caller's tensor is untouched
    with torch.no_grad():
        block(hidden_states=frozen_input)  # no gradients, nothing to reduce
    assert seen == [True, False]
    with pytest.raises(RuntimeError, match="hidden states as the first positional argument.*zero3_hook_per_block"):
        block(hidden_states=frozen_input)


def test_hook_per_layer_undoes_hook_per_block_only():
    """A second engine on the same model, fetching its weights, must not inherit hooks per block
    from the first; a leaf module someone else set (a MoE layer, say) stays one."""
    ours, theirs = _Block(), _Block()
    ours.linear.weight.requires_grad_(False)
    zero.hook_per_block([ours])
    set_z3_leaf_module(theirs, True)
    zero.hook_per_layer([ours, theirs])
    assert not z3_leaf_module(ours) and z3_leaf_module(theirs)
    ours(torch.randn(2, 4)).sum().backward()  # the input hook is inert once the block is not a leaf
    zero.hook_per_block([ours])  # and hooks per block can come back
    assert z3_leaf_module(ours) and len(ours._forward_pre_hooks) == 1


def test_torch_linear_only_where_every_weight_stays_whole_and_back_when_not(monkeypatch):
    """A linear layer whose weights ZeRO-3 keeps whole (ds_persist: shared frozen weights, adapters,
    small tensors) skips the re-fetching F.linear zero.Init installs; one with a released weight,
    or a subclass with its own forward, keeps it; a layer that stops qualifying goes back."""
    whole, released, plain = torch.nn.Linear(4, 3), torch.nn.Linear(4, 3), torch.nn.Linear(4, 3, bias=False)
    for i, param in enumerate([*whole.parameters(), *released.parameters()]):
        param.ds_id, param.ds_persist = i, True
    released.bias.ds_persist = False  # one released tensor is enough to need the re-fetch

    class OwnForward(torch.nn.Linear):
        def forward(self, x):
            return 2 * super().forward(x)

    model = torch.nn.Sequential(whole, released, plain, OwnForward(3, 3))
    x = torch.randn(2, 5, 4)
    expected = whole(x)
    assert zero.torch_linear_where_whole(model) == 2  # `plain` is not ZeRO's: whole by itself
    assert [type(m) for m in model] == [zero.TorchLinear, torch.nn.Linear, zero.TorchLinear, OwnForward]

    def zero_init_linear(*args):  # stands in for what zero.Init makes of F.linear
        raise AssertionError("F.linear called")

    monkeypatch.setattr(torch.nn.functional, "linear", zero_init_linear)
    assert torch.equal(whole(x), expected)  # torch's own linear, whatever F.linear now is
    with pytest.raises(AssertionError, match="F.linear called"):
        released(x)
    whole.weight.ds_persist = False
    assert zero.torch_linear_where_whole(model) == 1 and type(whole) is torch.nn.Linear


def test_zero3_sums_only_in_its_fetch_by_all_reduce():
    """zero.single_host._FetchThroughSharedMemory sums by bitwise OR, which is right only for ZeRO-3's fetch
    by all-reduce (every slot zeros but on its owner): a DeepSpeed whose parameter code sums
    anything else through `dist.all_reduce` must fail here, not train on wrong weights."""
    import deepspeed.comm
    from deepspeed.runtime.zero import parameter_offload, partition_parameters, partitioned_param_coordinator, stage3

    source = inspect.getsource(partition_parameters)
    calls = re.findall(r"dist\.all_reduce\((.*)\)", source)
    assert calls == ["flat_tensor, group=ds_process_group, async_op=True", "modified_flag, op=dist.ReduceOp.MAX, group=self.params[0].ds_process_group"]
    assert len(re.findall(r"\bdist\.all_reduce\b", source)) == 2  # nor calls the pattern above misses: split over lines, or through a wrapper
    # these star-import partition_parameters: they must keep their own deepspeed.comm, as they do
    # when imported before the wrapper is installed
    assert all(module.dist is deepspeed.comm for module in (parameter_offload, partitioned_param_coordinator, stage3))


def test_blocks_are_hooked_whole_only_where_frozen_weights_will_be_shared(monkeypatch):
    """engine.hooks_per_block: full fine-tuning freezes nothing, so nothing is shared and hooks stay
    per layer (it once hooked per block, then warned that frozen weights 'could not be shared')."""
    from dsee_scale.engine import hooks_per_block

    monkeypatch.setattr(zero, "can_share_frozen_weights", lambda: True)
    zero3, zero2 = {"zero_optimization": {"stage": 3}}, {"zero_optimization": {"stage": 2}}
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    assert not hooks_per_block(model, zero3, hook_per_block=True, share_frozen=True)  # everything trainable
    model[0].weight.requires_grad_(False)
    assert hooks_per_block(model, zero3, hook_per_block=True, share_frozen=True)
    assert not hooks_per_block(model, zero2, hook_per_block=True, share_frozen=True)
    assert not hooks_per_block(model, zero3, hook_per_block=False, share_frozen=True)
    assert not hooks_per_block(model, zero3, hook_per_block=True, share_frozen=False)
    monkeypatch.setattr(zero, "can_share_frozen_weights", lambda: False)
    assert not hooks_per_block(model, zero3, hook_per_block=True, share_frozen=True)
