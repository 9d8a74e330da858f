"""The analytic FLOPs per token (flops.inference_flops) against PyTorch's own FLOP counter."""
import pytest
import torch
from conftest import tiny_model
from torch.utils.flop_counter import FlopCounterMode

from dsee_scale import DSEEConfig, apply_dsee, dsee_layers
from dsee_scale.flops import inference_flops

CTX = 16


def counted_per_token(model) -> float:
    """FLOPs per token that PyTorch counts (eager attention: the CPU SDPA kernel has no formula)."""
    model.set_attn_implementation("eager")
    ids = torch.randint(1, 100, (1, CTX), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(input_ids=ids)
    return counter.get_total_flops() / CTX


@pytest.mark.parametrize("kind", ["gpt2", "bert", "llama", "qwen3", "phi3"])
def test_analytic_flops_equal_torch_flop_counter(kind):
    model = tiny_model(kind)
    assert inference_flops(model, ctx=CTX)["dense_model"] == counted_per_token(model)


@pytest.mark.parametrize("kind", ["gemma2", "gemma3"])
def test_a_sliding_window_layer_counts_the_keys_in_its_window(kind):
    """Gemma's first tiny layer sees 4 keys, not CTX: eager attention computes all CTX scores
    and masks the rest, the analytic count (a decoding token's cost) only the window's. Queries
    are heads · head_dim = 4 · 16 wide, not hidden = 32."""
    model = tiny_model(kind)
    width, window = 4 * 16, model.config.sliding_window
    assert inference_flops(model, ctx=CTX)["dense_model"] == counted_per_token(model) - 4 * (CTX - window) * width
    assert inference_flops(model, ctx=2)["attention"] == 2 * 4 * 2 * width  # a context shorter than the window: all of it


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_unmerged_adapter_flops_equal_torch_flop_counter(kind):
    """The counter sees the low-rank matmuls; S·x is a gather and a scatter-add (no matmul)."""
    model = apply_dsee(tiny_model(kind), DSEEConfig(rank=4, nnz=8, support="magnitude")).eval()
    flops = inference_flops(model, ctx=CTX)
    sparse = sum(2 * layer.sparse_index.numel() for layer in dsee_layers(model).values())
    assert flops["total"] - sparse == counted_per_token(model)
