"""apply_dsee on whole HF models: targets, trainable counts, adapter files, errors."""
import pytest
import torch
from conftest import tiny_model

from dsee_scale import DSEEConfig, apply_dsee, count_parameters, dsee_layers, load_adapter, save_adapter

# (kind, adapted matrices (or slices of a fused one) as (d_out, d_in) per layer, head parameter
# count) for the tiny configs (hidden 32, 2 layers, 4 heads; the grouped-KV families have 2 KV
# heads so LLaMA's v_proj is 16 × 32; Qwen3 and Gemma have head_dim 16; Phi-3 adapts the q and v
# rows of its fused qkv_proj).
EXPECTED = {
    "gpt2": ([(32, 32), (32, 32)], 32 * 2),
    "bert": ([(32, 32), (32, 32)], 32 * 2 + 2),
    "llama": ([(32, 32), (16, 32)], 32 * 2),
    "deberta-v2": ([(32, 32), (32, 32)], 32 * 2 + 2),
    "qwen3": ([(64, 32), (32, 32)], 32 * 2),
    "gemma2": ([(64, 32), (32, 32)], 32 * 2),
    "gemma3": ([(64, 32), (32, 32)], 32 * 2),
    "phi3": ([(32, 32), (16, 32)], 32 * 2),
}
FUSED = ("gpt2", "phi3")  # one adapted matrix per layer


@pytest.mark.parametrize("kind", list(EXPECTED))
def test_trainable_count_matches_closed_form(kind):
    model = tiny_model(kind, task="cls")
    cfg = DSEEConfig(rank=4, nnz=16, support="magnitude")
    apply_dsee(model, cfg)
    matrices, head = EXPECTED[kind]
    n_layers = model.config.num_hidden_layers
    expected = n_layers * sum(cfg.rank * (d_out + d_in) + cfg.nnz for d_out, d_in in matrices) + head
    trainable, total = count_parameters(model)
    assert trainable == expected
    assert trainable == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert total == sum(p.numel() for p in model.parameters())
    assert len(dsee_layers(model)) == n_layers * (1 if kind in FUSED else 2)


def test_gpt2_default_targets_q_and_v_of_c_attn():
    model = apply_dsee(tiny_model("gpt2"), DSEEConfig(rank=2, nnz=4, support="random"))
    layer = dsee_layers(model)["transformer.h.0.attn.c_attn"]
    assert layer.slices == [(0, 32), (64, 96)]
    rows = layer.sparse_index // layer.in_features
    assert ((rows < 32) | (rows >= 64)).all() and ((rows < 32).sum() == 4)


def test_phi3_fused_parts_follow_its_grouped_kv_layout():
    """qkv_proj holds q (4 heads of 8), k and v (2 KV heads of 8 each); gate_up_proj gate, then up."""
    model = apply_dsee(tiny_model("phi3"), DSEEConfig(rank=2, nnz=4, support="random"))
    assert dsee_layers(model)["model.layers.0.self_attn.qkv_proj"].slices == [(0, 32), (48, 64)]
    model = apply_dsee(tiny_model("phi3"), DSEEConfig(targets=["gate_up_proj:up"], rank=2, nnz=4, support="random"))
    assert dsee_layers(model)["model.layers.0.mlp.gate_up_proj"].slices == [(64, 128)]
    with pytest.raises(ValueError, match="choose from q, k, v"):
        apply_dsee(tiny_model("phi3"), DSEEConfig(targets=["qkv_proj:q,o"], support="random"))


@pytest.mark.parametrize("kind", list(EXPECTED))
def test_adapter_save_load_on_fresh_model_gives_identical_logits(kind, tmp_path):
    cfg = DSEEConfig(rank=4, nnz=8, init="normal", support="magnitude")
    model = apply_dsee(tiny_model(kind, task="cls"), cfg)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)
    ids = torch.randint(1, 128, (2, 10))
    expected = model(input_ids=ids).logits
    path = save_adapter(model, tmp_path, cfg)
    assert path.stat().st_size < 64 * 1024
    fresh = load_adapter(tiny_model(kind, task="cls"), tmp_path)
    torch.testing.assert_close(fresh(input_ids=ids).logits, expected, atol=0, rtol=0)


def test_adapter_from_another_model_is_refused(tmp_path):
    cfg = DSEEConfig(rank=2, nnz=4, support="magnitude")
    save_adapter(apply_dsee(tiny_model("gpt2"), cfg), tmp_path, cfg)
    with pytest.raises(ValueError, match="saved from a 'gpt2' model"):
        load_adapter(tiny_model("bert"), tmp_path)
    with pytest.raises(ValueError, match="shape"):
        load_adapter(tiny_model("gpt2", n_embd=64), tmp_path)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(targets=["nope"]), "no module matched the DSEE targets"),
        (dict(target_regex=r".*\.missing"), "no module matched the DSEE targets"),
        (dict(targets=["c_attn:q,x"]), "target parts"),
        (dict(rank=33), "rank 33 is larger than a dimension"),
        (dict(nnz=32 * 32 + 1), "nnz 1025 is larger than the 32×32 matrix"),
    ],
)
def test_bad_targets_and_sizes_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        apply_dsee(tiny_model("gpt2"), DSEEConfig(**{"support": "random", **kwargs}))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(init="xavier"), r"init\n  Input should be 'lora' or 'normal'"),
        (dict(support="svd"), "unknown support method 'svd'"),
        (dict(rank=0), r"rank\n  Input should be greater than or equal to 1"),
        (dict(nnz=-1), r"nnz\n  Input should be greater than or equal to 0"),
    ],
)
def test_bad_config_is_refused_at_construction(kwargs, message):
    with pytest.raises(ValueError, match=message):
        DSEEConfig(**kwargs)


def test_unknown_architecture_asks_for_targets():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    with pytest.raises(ValueError, match="no default DSEE targets"):
        apply_dsee(model, DSEEConfig())
    apply_dsee(model, DSEEConfig(targets=["0"], rank=2, nnz=2, support="random"))
    assert count_parameters(model)[0] == 2 * 8 + 2
