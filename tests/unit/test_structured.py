"""Structured DSEE in one process: removal of heads/neurons whose output is zero keeps the logits;
exports reload with plain from_pretrained; FLOPs equal a hand count; selection rules (2-rank
ZeRO-3 removal, the recipe's runs, the evaluate CLI: tests/multirank/test_structured_runs.py)."""
import pytest
import torch
from transformers import AutoConfig
from conftest import tiny_model

from dsee_scale import DSEEConfig, apply_dsee
from dsee_scale.config import PruneConfig
from dsee_scale.export import export_hf
from dsee_scale.flops import inference_flops
from dsee_scale.layer import weight_is_transposed
from dsee_scale.structured import attention_layers, compact, dense_config, ffn_layers, remove, select, structured_prune


def adapted(kind):
    return apply_dsee(tiny_model(kind), DSEEConfig(rank=4, nnz=16, init="normal", support="magnitude"))


def _base(m):
    return getattr(m, "base", m)


@torch.no_grad()
def silence(model, heads: list[int], neurons: int):
    """Zero the o-projection columns of `heads` and the down-projection columns of the first
    `neurons` neurons in every layer: those units then contribute nothing."""
    for attn in attention_layers(model):
        o = _base(attn.o)
        for h in heads:
            cols = slice(h * attn.head_dim, (h + 1) * attn.head_dim)
            (o.weight[cols, :] if weight_is_transposed(o) else o.weight[:, cols]).zero_()
    for ffn in ffn_layers(model):
        down = _base(ffn.down)
        (down.weight[:neurons, :] if weight_is_transposed(down) else down.weight[:, :neurons]).zero_()


# The grouped-KV tiny configs have 2 KV groups of 2 query heads: silence a whole group (heads 0 and 1).
SILENT = {"gpt2": [1, 3], "bert": [2], "llama": [0, 1], "deberta-v2": [0, 2], "qwen3": [0, 1], "gemma2": [0, 1], "gemma3": [0, 1], "phi3": [0, 1]}
KINDS = list(SILENT)


@pytest.mark.parametrize("kind", KINDS)
def test_removing_silent_heads_and_neurons_keeps_logits(kind):
    model = adapted(kind)
    silence(model, SILENT[kind], 7)
    ids = torch.randint(1, 128, (2, 12), generator=torch.Generator().manual_seed(1))
    expected = model(input_ids=ids).logits
    keep_heads = [torch.tensor([h for h in range(a.heads) if h not in SILENT[kind]]) for a in attention_layers(model)]
    sizes = [f.size for f in ffn_layers(model)]
    keep_neurons = [torch.arange(7, size) for size in sizes]
    remove(model, keep_heads, keep_neurons)
    assert [a.heads for a in attention_layers(model)] == [4 - len(SILENT[kind])] * 2
    assert [f.size for f in ffn_layers(model)] == [size - 7 for size in sizes]
    torch.testing.assert_close(model(input_ids=ids).logits, expected, atol=1e-5, rtol=0)


def test_phi3_layers_keep_their_own_head_counts_and_follow_the_models_attention():
    """Phi-3 splits its fused qkv_proj at the config's head count: a layer that keeps fewer heads
    than another reads its own, and the rest of the config (the attention implementation) stays the model's."""
    model = adapted("phi3")
    silence(model, [0, 1], 0)
    ids = torch.randint(1, 128, (2, 12), generator=torch.Generator().manual_seed(3))
    expected = model(input_ids=ids).logits
    remove(model, [torch.tensor([2, 3]), torch.arange(4)], None)  # layer 0 loses KV group 0, layer 1 keeps all
    assert [a.heads for a in attention_layers(model)] == [2, 4]
    torch.testing.assert_close(model(input_ids=ids).logits, expected, atol=1e-5, rtol=0)
    model.set_attn_implementation("eager")
    assert model.model.layers[0].self_attn.config._attn_implementation == "eager"
    torch.testing.assert_close(model(input_ids=ids).logits, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("score", ["dsee", "weight", "gradient"])
def test_structured_prune_then_plain_reload_gives_same_logits(kind, score, tmp_path):
    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM

    model = adapted(kind)
    ids = torch.randint(1, 128, (2, 12), generator=torch.Generator().manual_seed(2))
    calibration = [{"input_ids": ids, "labels": ids}]
    report, _ = structured_prune(model, PruneConfig(heads=0.3, ffn=0.3, structured_score=score), calibration)
    assert report["flops_saved"] > 0.1 and all(h >= 1 for h in report["heads"])
    expected = model(input_ids=ids).logits
    export_hf(model, tmp_path, merge=True)
    auto = AutoModelForMaskedLM if kind in ("bert", "deberta-v2") else AutoModelForCausalLM
    plain = auto.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(plain(input_ids=ids).logits, expected, atol=1e-5, rtol=0)
    compact(plain)  # zero padding dropped: back to the per-layer sizes, same function
    assert [a.heads for a in attention_layers(plain)] == report["heads"] and [f.size for f in ffn_layers(plain)] == report["ffn"]
    torch.testing.assert_close(plain(input_ids=ids).logits, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_latency_report_compares_dense_exported_and_compacted(kind, tmp_path):
    from dsee_scale.evaluate import structured_latency

    model = adapted(kind)
    original = model.config.to_dict()
    report, _ = structured_prune(model, PruneConfig(heads=0.3, ffn=0.5, structured_scope="layer", structured_score="dsee"), ctx=12)
    export_hf(model, tmp_path, merge=True)
    batch = {"input_ids": torch.randint(1, 128, (4, 12)), "attention_mask": torch.ones(4, 12, dtype=torch.long)}
    latency = structured_latency(str(tmp_path), "lm", batch, repeats=3)
    assert latency["flops_saved"] == pytest.approx(report["flops_saved"])
    assert latency["flops_per_token_dense"] == report["flops_before"]
    assert all(latency[f"{name}_ms"] > 0 for name in ("dense", "exported", "compact")) and latency["batch_shape"] == [4, 12]
    dense = dense_config(AutoConfig.from_pretrained(tmp_path)).to_dict()
    assert all(dense[k] == original[k] for k in ("num_attention_heads", "intermediate_size", "n_inner", "n_head") if k in original)


def test_flops_report_equals_a_hand_count():
    model = tiny_model("llama")  # hidden 32, 4 heads of 8, 2 KV heads, FFN 64, vocab 128, 2 layers
    ctx = 16
    per_layer = 2 * (32 * 32 + 2 * 32 * 16 + 32 * 32) + 2 * 3 * 32 * 64 + 4 * ctx * 32
    assert inference_flops(model, ctx)["dense_model"] == 2 * per_layer + 2 * 128 * 32
    keep_heads = [torch.tensor([2, 3]), torch.tensor([0, 1, 2, 3])]  # layer 0 loses KV group 0
    remove(model, keep_heads, [torch.arange(40), torch.arange(64)])
    layer0 = 2 * (32 * 16 + 2 * 32 * 8 + 16 * 32) + 2 * 3 * 32 * 40 + 4 * ctx * 16
    assert inference_flops(model, ctx)["dense_model"] == layer0 + per_layer + 2 * 128 * 32


def test_selection_rules():
    scores = [torch.tensor([1.0, 5.0, 3.0, 2.0]), torch.tensor([9.0, 8.0, 7.0, 0.5])]
    assert [k.tolist() for k in select(scores, 0.5, "layer")] == [[1, 2], [0, 1]]
    glob = select(scores, 0.5, "global")
    assert sum(4 - k.numel() for k in glob) == 4 and all(k.numel() >= 1 for k in glob)
    assert all(k.numel() == 1 for k in select(scores, 0.99, "layer"))  # never the last unit
    grouped = select([torch.tensor([1.0, 1.0, 5.0, 5.0])], 0.5, "layer", group=[2])
    assert grouped[0].tolist() == [2, 3]
