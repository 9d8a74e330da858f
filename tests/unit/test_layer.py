"""The adapter layer against the dense formula x·(W + (α/r)·B·A + S)ᵀ + b."""
import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from dsee_scale.layer import DSEELayer
from dsee_scale.support import choose_support


def dense_reference(layer: DSEELayer, x: torch.Tensor) -> torch.Tensor:
    w = layer.base.weight.detach()
    w = w.t() if layer.transposed else w
    delta = torch.zeros_like(w)
    row = 0
    for i, (start, stop) in enumerate(layer.slices):
        a = layer.lora_A[i * layer.rank : (i + 1) * layer.rank]
        delta[start:stop] = layer.lora_B[row : row + stop - start] @ a * layer.scaling
        row += stop - start
    s_dense = torch.zeros(w.numel(), dtype=w.dtype)
    s_dense[layer.sparse_index] = layer.sparse_values
    return x @ (w + delta + s_dense.view_as(w)).t() + layer.base.bias


def make_layer(kind: str, init: str = "normal", dropout: float = 0.0) -> DSEELayer:
    torch.manual_seed(1)
    if kind == "linear":
        base, slices = nn.Linear(24, 40), None
        out = 40
    elif kind == "conv1d":
        base, slices = Conv1D(40, 24), None  # Conv1D(nf=out, nx=in): weight is (in, out)
        out = 40
    else:  # q and v of a fused c_attn with hidden 24: out = 3 × 24
        base, slices = Conv1D(72, 24), [(0, 24), (48, 72)]
        out = 72
    nn.init.normal_(base.bias)
    rows = slices or [(0, out)]
    index = torch.cat([choose_support(torch.randn(stop - start, 24), 10, "random", seed=i) + start * 24 for i, (start, stop) in enumerate(rows)])
    return DSEELayer(base.requires_grad_(False), rank=4, alpha=8.0, support=index, slices=slices, init=init, dropout=dropout)


@pytest.mark.parametrize("kind", ["linear", "conv1d", "fused_qv"])
def test_forward_matches_dense_formula(kind):
    layer = make_layer(kind)
    x = torch.randn(3, 5, 24)
    torch.testing.assert_close(layer(x), dense_reference(layer, x), atol=1e-6, rtol=1e-6)


def test_fused_slice_leaves_k_untouched():
    layer = make_layer("fused_qv")
    x = torch.randn(2, 24)
    torch.testing.assert_close(layer(x)[:, 24:48], layer.base(x)[:, 24:48], atol=0, rtol=0)
    assert not torch.allclose(layer(x)[:, :24], layer.base(x)[:, :24])


@pytest.mark.parametrize("kind", ["linear", "conv1d", "fused_qv"])
def test_gradients_reach_only_adapter_values(kind):
    layer = make_layer(kind)
    layer(torch.randn(4, 24)).pow(2).sum().backward()
    grads = {n: p.grad for n, p in layer.named_parameters()}
    assert set(n for n, g in grads.items() if g is not None) == {"lora_A", "lora_B", "sparse_values"}
    assert all(grads[n].abs().sum() > 0 for n in ("lora_A", "lora_B", "sparse_values"))
    assert layer.sparse_index.dtype == torch.int64 and layer.sparse_values.shape == layer.sparse_index.shape


@pytest.mark.parametrize("kind", ["linear", "conv1d", "fused_qv"])
def test_merge_unmerge_round_trip(kind):
    layer = make_layer(kind)
    w0 = layer.base.weight.detach().clone()
    x = torch.randn(3, 24)
    expected = layer(x)
    layer.merge()
    assert layer.merged
    torch.testing.assert_close(layer(x), expected, atol=1e-6, rtol=1e-6)
    layer.unmerge()
    torch.testing.assert_close(layer.base.weight, w0, atol=1e-6, rtol=0)
    torch.testing.assert_close(layer(x), expected, atol=1e-6, rtol=1e-6)


def test_lora_init_leaves_model_unchanged_and_normal_init_does_not():
    x = torch.randn(3, 24)
    lora = make_layer("linear", init="lora")
    assert torch.equal(lora(x), lora.base(x))
    assert lora.lora_A.abs().sum() > 0 and lora.lora_B.abs().sum() == 0 and lora.sparse_values.abs().sum() == 0
    normal = make_layer("linear", init="normal")
    assert not torch.allclose(normal(x), normal.base(x))
    assert 0.01 < normal.lora_B.std().item() < 0.04


def test_dropout_applies_to_adapter_input_only_in_training():
    layer = make_layer("linear", dropout=0.5)
    x = torch.randn(8, 24)
    layer.eval()
    torch.testing.assert_close(layer(x), dense_reference(layer, x), atol=1e-6, rtol=1e-6)
    layer.train()
    assert not torch.allclose(layer(x), dense_reference(layer, x))


@pytest.mark.parametrize("kind", ["linear", "conv1d", "fused_qv"])
def test_keep_rows_and_cols_give_the_kept_outputs_of_the_same_function(kind):
    layer = make_layer(kind)
    out_features = layer.out_features
    x = torch.randn(3, 24)
    rows = torch.arange(0, out_features, 3)  # every slice keeps some rows
    expected = layer(x)[:, rows]
    layer.keep_rows(rows)
    torch.testing.assert_close(layer(x), expected, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(layer(x), dense_reference(layer, x), atol=1e-6, rtol=1e-6)
    cols = torch.tensor([0, 2, 3, 7, 11, 12, 20, 23])
    expected = layer(x * torch.isin(torch.arange(24), cols))
    layer.keep_cols(cols)
    torch.testing.assert_close(layer(x[:, cols]), expected, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(layer(x[:, cols]), dense_reference(layer, x[:, cols]), atol=1e-6, rtol=1e-6)


def test_keep_rows_drops_a_slice_left_empty_with_its_block_of_a():
    layer = make_layer("fused_qv")
    x = torch.randn(3, 24)
    rows = torch.arange(24, 72)  # k and v: the q slice goes
    expected = layer(x)[:, rows]
    layer.keep_rows(rows)
    assert layer.slices == [(24, 48)] and layer.lora_A.shape == (layer.rank, 24)
    torch.testing.assert_close(layer(x), expected, atol=1e-6, rtol=1e-6)


def test_adapter_parameters_are_exactly_the_trainable_ones():
    layer = make_layer("fused_qv")
    assert {id(p) for p in layer.adapter_parameters()} == {id(p) for p in layer.parameters() if p.requires_grad}


@pytest.mark.parametrize("kind", ["linear", "conv1d", "fused_qv"])
def test_masked_retune_gradients_match_autograd_of_the_dense_masked_formula(kind):
    """keep_mask's forward keeps no dense ΔW ⊙ M for backward (MaskedDeltaLinear forms it again):
    its output and gradients are those of x·(W + ΔW ⊙ M)ᵀ + b differentiated by autograd, and
    gradcheck (float64) agrees."""
    from dsee_scale.layer import MaskedDeltaLinear

    layer = make_layer(kind).double()
    w = layer.base.weight.detach()
    mask = torch.rand(w.shape, generator=torch.Generator().manual_seed(3)) > 0.5  # storage layout
    layer.keep_mask(mask)
    params = layer.adapter_parameters()
    x = torch.randn(3, 5, 24, dtype=torch.float64, requires_grad=True)
    layer(x).pow(2).sum().backward()
    got = [x.grad, *(p.grad for p in params)]
    for t in (x, *params):
        t.grad = None
    m = mask.t() if layer.transposed else mask
    w_out_in = w.t() if layer.transposed else w
    eye = torch.eye(24, dtype=torch.float64)
    delta = (dense_reference(layer, eye) - layer.base.bias).t() - w_out_in  # ΔW = (α/r)·B·A + S, out × in
    reference = x @ (w_out_in + delta * m).t() + layer.base.bias
    reference.pow(2).sum().backward()
    for g, want in zip(got, [x.grad, *(p.grad for p in params)]):
        torch.testing.assert_close(g, want)
    pruned_support = ~m.flatten()[layer.sparse_index]
    assert pruned_support.any() and torch.all(got[3][pruned_support] == 0)  # S gets no gradient where W was pruned
    assert torch.autograd.gradcheck(lambda *t: MaskedDeltaLinear.apply(t[0], layer, *t[1:]), (x.detach()[:1, :2].requires_grad_(), *params))
