"""What dsee_scale knows about each model family, in one place.

An `Arch` says where a family keeps its blocks, attention and FFN, which layers DSEE adapts by
default, how an attention module is told its new head count after heads are removed, and how a
structured export writes its config. `inject` (targets), `structured` (scores, removal, export
layout), `flops` (attention widths) and `plan` (sizes) read it; a new family is one entry here.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from torch import nn

from dsee_scale.layer import DSEELayer, base_dims


@dataclass
class Attention:
    """One layer's attention: (module, first output row) of q, k, v; o takes heads·head_dim inputs."""

    module: nn.Module
    q: tuple[nn.Module, int]
    k: tuple[nn.Module, int]
    v: tuple[nn.Module, int]
    o: nn.Module
    heads: int
    kv_heads: int
    head_dim: int
    more: list[nn.Module] = field(default_factory=list)  # other projections with one block of rows per query head


@dataclass
class FFN:
    ups: list[nn.Module]  # outputs are neurons (LLaMA: gate and up)
    down: nn.Module  # inputs are neurons
    size: int


@dataclass(frozen=True)
class Arch:
    model_types: tuple[str, ...]
    targets: tuple[str, ...]  # default DSEE targets: the paper's q and v projections
    blocks: Callable[[nn.Module], list[nn.Module]]
    attention: Callable[[nn.Module], Attention]  # of one block
    ffn: Callable[[nn.Module], FFN]  # of one block
    set_heads: Callable[[nn.Module, int, int, int], None]  # (attention module, heads, kv heads, head_dim) after removal
    ffn_field: str  # the config field of the FFN size
    head_dim_in_config: bool  # True: exports store head_dim and the kept head count; False: heads are padded back
    fused: dict[str, tuple[str, ...]] = field(default_factory=dict)  # fused projections and their equal parts


ARCHS: dict[str, Arch] = {}


def register(arch: Arch) -> Arch:
    for model_type in arch.model_types:
        ARCHS[model_type] = arch
    return arch


def model_type(model: nn.Module) -> str | None:
    return getattr(getattr(model, "config", None), "model_type", None)


def arch_of(model: nn.Module) -> Arch:
    if model_type(model) not in ARCHS:
        raise ValueError(f"model type {model_type(model)!r} is not one dsee_scale knows ({', '.join(sorted(ARCHS))}): add an Arch in dsee_scale/arch.py")
    return ARCHS[model_type(model)]


def logits_are_head_output(model: nn.Module) -> bool:
    """Whether a causal LM's logits are what its output embeddings return, nothing applied after
    them (no soft-capping or scaling, as some other families have): true of every family here.
    Evaluation then runs the head itself on a chunk of positions at a time (evaluate.lm_sums)."""
    return model_type(model) in ARCHS


def blocks(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks of a model of a family dsee_scale knows, PEFT's wrapper looked
    through; none for another model."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return arch_of(base).blocks(base) if model_type(base) in ARCHS else []


def attention_layers(model: nn.Module) -> list[Attention]:
    arch = arch_of(model)
    return [arch.attention(block) for block in arch.blocks(model)]


def ffn_layers(model: nn.Module) -> list[FFN]:
    arch = arch_of(model)
    return [arch.ffn(block) for block in arch.blocks(model)]


def frozen_layer(module: nn.Module) -> nn.Module:
    """The frozen layer inside an adapter (or the module itself)."""
    return module.base if isinstance(module, DSEELayer) else module


def _out(module: nn.Module) -> int:
    return base_dims(frozen_layer(module))[0]


# ---- GPT-2 ------------------------------------------------------------------------------------
GPT2_SIZES = {"gpt2": (768, 12, 12), "gpt2-medium": (1024, 24, 16), "gpt2-large": (1280, 36, 20), "gpt2-xl": (1600, 48, 25)}  # hidden, layers, heads
# hidden, layers, heads, FFN: LLaMA-7B's shape (6.7B parameters); the smallest LLaMA whose
# weight shards ZeRO-Infinity sends to NVMe at 2 ranks (DeepSpeed swaps only shards of >= 1 MB);
# GPT-2-medium's blocks in LLaMA's shape (3 FFN matrices of 2816 hold what GPT-2's 2 of 4096 do;
# LLaMA's untied output layer adds a vocabulary × hidden matrix).
LLAMA_SIZES = {"llama-7b": (4096, 32, 32, 11008), "small-llama": (768, 2, 12, 2048), "medium-llama": (1024, 24, 16, 2816)}


def _gpt2_attention(block: nn.Module) -> Attention:
    attn = block.attn
    width = _out(attn.c_attn) // 3
    heads = width // attn.head_dim
    return Attention(attn, (attn.c_attn, 0), (attn.c_attn, width), (attn.c_attn, 2 * width), attn.c_proj, heads, heads, attn.head_dim)


def _gpt2_set_heads(module: nn.Module, heads: int, kv_heads: int, head_dim: int) -> None:
    module.split_size, module.num_heads = heads * head_dim, heads


register(Arch(
    model_types=("gpt2",), targets=("c_attn:q,v",), blocks=lambda m: list(m.transformer.h), attention=_gpt2_attention,
    ffn=lambda b: FFN([b.mlp.c_fc], b.mlp.c_proj, _out(b.mlp.c_fc)), set_heads=_gpt2_set_heads,
    ffn_field="n_inner", head_dim_in_config=False, fused={"c_attn": ("q", "k", "v")},
))


# ---- BERT / RoBERTa ---------------------------------------------------------------------------
def _bert_attention(block: nn.Module) -> Attention:
    s = block.attention.self
    heads = _out(s.query) // s.attention_head_size
    return Attention(s, (s.query, 0), (s.key, 0), (s.value, 0), block.attention.output.dense, heads, heads, s.attention_head_size)


def _bert_set_heads(module: nn.Module, heads: int, kv_heads: int, head_dim: int) -> None:
    module.num_attention_heads, module.all_head_size = heads, heads * head_dim


register(Arch(
    model_types=("bert", "roberta"), targets=("query", "value"), blocks=lambda m: list(getattr(m, m.config.model_type).encoder.layer),
    attention=_bert_attention, ffn=lambda b: FFN([b.intermediate.dense], b.output.dense, _out(b.intermediate.dense)),
    set_heads=_bert_set_heads, ffn_field="intermediate_size", head_dim_in_config=False,
))


# ---- LLaMA-style (grouped KV heads) -----------------------------------------------------------
def _llama_attention(block: nn.Module) -> Attention:
    a = block.self_attn
    return Attention(a, (a.q_proj, 0), (a.k_proj, 0), (a.v_proj, 0), a.o_proj, _out(a.q_proj) // a.head_dim, _out(a.k_proj) // a.head_dim, a.head_dim)


def _llama_set_heads(module: nn.Module, heads: int, kv_heads: int, head_dim: int) -> None:
    module.num_key_value_groups = heads // kv_heads


register(Arch(
    model_types=("llama", "mistral", "qwen2"), targets=("q_proj", "v_proj"), blocks=lambda m: list(m.model.layers), attention=_llama_attention,
    ffn=lambda b: FFN([b.mlp.gate_proj, b.mlp.up_proj], b.mlp.down_proj, _out(b.mlp.gate_proj)), set_heads=_llama_set_heads,
    ffn_field="intermediate_size", head_dim_in_config=True,
))


# ---- DeBERTa-v2 / v3 (disentangled attention) -------------------------------------------------
def _deberta_attention(block: nn.Module) -> Attention:
    s = block.attention.self
    heads = _out(s.query_proj) // s.attention_head_size
    # Without share_att_key, relative positions have their own projections, laid out by head.
    more = [getattr(s, name) for name in ("pos_key_proj", "pos_query_proj") if hasattr(s, name)]
    return Attention(s, (s.query_proj, 0), (s.key_proj, 0), (s.value_proj, 0), block.attention.output.dense, heads, heads, s.attention_head_size, more)


register(Arch(
    model_types=("deberta-v2",), targets=("query_proj", "value_proj"), blocks=lambda m: list(m.deberta.encoder.layer),
    attention=_deberta_attention, ffn=lambda b: FFN([b.intermediate.dense], b.output.dense, _out(b.intermediate.dense)),
    set_heads=_bert_set_heads, ffn_field="intermediate_size", head_dim_in_config=False,
))
