"""What dsee_scale knows about each model family, in one place.

An `Arch` says where a family keeps its blocks, attention and FFN, which layers DSEE adapts by
default, how an attention module is told its new head count after heads are removed, and how a
structured export writes its config. `inject` (targets), `structured` (scores, removal, export
layout), `flops` (attention widths and windows) and `plan` (sizes) read it; a new family is one entry here.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from torch import nn

from dsee_scale.layer import DSEELayer, base_dims


@dataclass
class Attention:
    """One layer's attention: (module, first output row) of q, k, v (one module for all three
    where they are fused); o takes heads·head_dim inputs; `window`: the most keys a query sees
    (a sliding-window layer), None for all of them."""

    module: nn.Module
    q: tuple[nn.Module, int]
    k: tuple[nn.Module, int]
    v: tuple[nn.Module, int]
    o: nn.Module
    heads: int
    kv_heads: int
    head_dim: int
    more: list[nn.Module] = field(default_factory=list)  # other projections with one block of rows per query head
    window: int | None = None


@dataclass
class FFN:
    ups: list[tuple[nn.Module, int]]  # (module, first output row) of each projection whose outputs are neurons (LLaMA: gate and up)
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
    # fused projections by name → their parts' output rows, in order, read off the module that holds the projection
    fused: dict[str, Callable[[nn.Module], dict[str, int]]] = field(default_factory=dict)
    # the model types of this entry whose causal LM takes position ids and a 4-D attention mask as given,
    # verified by tests/unit/test_packing.py: packed rows can be kept apart (packing.py)
    packs: tuple[str, ...] = ()
    # prune.scope when unset: the comparison group that keeps this family's quality. Decoders prune
    # per output row (Wanda's; the global threshold empties a decoder's early layers: the LM table in
    # benchmarks/RESULTS.md); encoders keep the paper's global threshold (the GLUE table).
    prune_scope: str = "global"


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


def prune_scope_of(model: nn.Module, task: str) -> str:
    """prune.scope when the run leaves it unset: its family's (Arch.prune_scope); for a family
    dsee_scale does not know, 'row' for a language model and the paper's 'global' otherwise."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if model_type(base) in ARCHS:
        return ARCHS[model_type(base)].prune_scope
    return "row" if task == "lm" else "global"


def logits_are_head_output(model: nn.Module) -> bool:
    """Whether a causal LM's logits are what its output embeddings return, nothing applied after
    them: a family dsee_scale knows without final logit soft-capping (Gemma 2 caps its logits).
    Evaluation then runs the head itself on a chunk of positions at a time (evaluate.lm_sums)."""
    config = model.config.get_text_config() if hasattr(model, "config") else None
    return model_type(model) in ARCHS and not getattr(config, "final_logit_softcapping", None)


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


def _qkv_parts(attn: Attention) -> dict[str, int]:
    """The rows of q, k and v in a fused projection."""
    return {"q": attn.heads * attn.head_dim, "k": attn.kv_heads * attn.head_dim, "v": attn.kv_heads * attn.head_dim}


# ---- GPT-2 ------------------------------------------------------------------------------------
GPT2_SIZES = {"gpt2": (768, 12, 12), "gpt2-medium": (1024, 24, 16), "gpt2-large": (1280, 36, 20), "gpt2-xl": (1600, 48, 25)}  # hidden, layers, heads
# hidden, layers, heads, FFN: LLaMA-7B's shape (6.7B parameters); the smallest LLaMA whose
# weight shards ZeRO-Infinity sends to NVMe at 2 ranks (DeepSpeed swaps only shards of >= 1 MB);
# GPT-2-medium's blocks in LLaMA's shape (3 FFN matrices of 2816 hold what GPT-2's 2 of 4096 do;
# LLaMA's untied output layer adds a vocabulary × hidden matrix).
LLAMA_SIZES = {"llama-7b": (4096, 32, 32, 11008), "small-llama": (768, 2, 12, 2048), "medium-llama": (1024, 24, 16, 2816)}


def _gpt2_attention(attn: nn.Module) -> Attention:
    width = _out(attn.c_attn) // 3
    heads = width // attn.head_dim
    return Attention(attn, (attn.c_attn, 0), (attn.c_attn, width), (attn.c_attn, 2 * width), attn.c_proj, heads, heads, attn.head_dim)


def _gpt2_set_heads(module: nn.Module, heads: int, kv_heads: int, head_dim: int) -> None:
    module.split_size, module.num_heads = heads * head_dim, heads


register(Arch(
    model_types=("gpt2",), targets=("c_attn:q,v",), blocks=lambda m: list(m.transformer.h), attention=lambda b: _gpt2_attention(b.attn),
    ffn=lambda b: FFN([(b.mlp.c_fc, 0)], b.mlp.c_proj, _out(b.mlp.c_fc)), set_heads=_gpt2_set_heads,
    ffn_field="n_inner", head_dim_in_config=False, fused={"c_attn": lambda a: _qkv_parts(_gpt2_attention(a))}, packs=("gpt2",), prune_scope="row",
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
    attention=_bert_attention, ffn=lambda b: FFN([(b.intermediate.dense, 0)], b.output.dense, _out(b.intermediate.dense)),
    set_heads=_bert_set_heads, ffn_field="intermediate_size", head_dim_in_config=False,
))


# ---- LLaMA-style (grouped KV heads): LLaMA, Mistral, Qwen2, Qwen3, Gemma 2, Gemma 3 (text) ------
# Qwen3's and Gemma 3's q_norm / k_norm normalise each head over head_dim with one weight shared
# by all heads: removing heads leaves them as they are. Gemma's head_dim need not be
# hidden / heads: exports store it (head_dim_in_config), and query_pre_attn_scalar, soft-capping
# and sliding windows do not depend on the head count. Gemma ties its LM head to the embeddings.
def _sliding_window(a: nn.Module) -> int | None:
    """The window of this layer: Qwen2/3 and Gemma keep one per layer, Mistral and Phi-3 one in the config."""
    return getattr(a, "sliding_window", getattr(a.config, "sliding_window", None))


def _llama_attention(block: nn.Module) -> Attention:
    a = block.self_attn
    return Attention(a, (a.q_proj, 0), (a.k_proj, 0), (a.v_proj, 0), a.o_proj, _out(a.q_proj) // a.head_dim, _out(a.k_proj) // a.head_dim, a.head_dim,
                     window=_sliding_window(a))


def _llama_set_heads(module: nn.Module, heads: int, kv_heads: int, head_dim: int) -> None:
    module.num_key_value_groups = heads // kv_heads


def _llama_ffn(block: nn.Module) -> FFN:
    mlp = block.mlp
    return FFN([(mlp.gate_proj, 0), (mlp.up_proj, 0)], mlp.down_proj, _out(mlp.gate_proj))


register(Arch(
    model_types=("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text"), targets=("q_proj", "v_proj"), blocks=lambda m: list(m.model.layers),
    attention=_llama_attention, ffn=_llama_ffn, set_heads=_llama_set_heads, ffn_field="intermediate_size", head_dim_in_config=True, packs=("llama", "mistral", "qwen2"),
    prune_scope="row",
))


# ---- Phi-3 (fused qkv_proj and gate_up_proj) ---------------------------------------------------
def _phi3_attention(a: nn.Module) -> Attention:
    """qkv_proj's rows: q of every query head, then k and v of every KV head (grouped KV heads)."""
    heads, kv_heads, d = a.config.num_attention_heads, a.num_key_value_heads, a.head_dim
    return Attention(a, (a.qkv_proj, 0), (a.qkv_proj, heads * d), (a.qkv_proj, (heads + kv_heads) * d), a.o_proj, heads, kv_heads, d,
                     window=_sliding_window(a))


class _LayerConfig:
    """The model's config as one layer sees it, with that layer's own head counts: everything
    else (the attention implementation, which dropout.install and HF switch) read from the
    model's config as it is now."""

    def __init__(self, model_config, heads: int, kv_heads: int) -> None:
        self.model_config, self.num_attention_heads, self.num_key_value_heads = model_config, heads, kv_heads

    def __getattr__(self, name: str):  # called for the attributes not set in __init__
        if name == "model_config":  # not yet set (copy, pickle): no recursion
            raise AttributeError(name)
        return getattr(self.model_config, name)


def _phi3_set_heads(module: nn.Module, heads: int, kv_heads: int, head_dim: int) -> None:
    """Phi-3's attention splits qkv_proj at config.num_attention_heads · head_dim, read from the
    config the whole model shares: each layer gets its own head counts in front of it."""
    shared = module.config.model_config if isinstance(module.config, _LayerConfig) else module.config
    module.config = _LayerConfig(shared, heads, kv_heads)
    module.num_key_value_heads, module.num_key_value_groups = kv_heads, heads // kv_heads


def _phi3_ffn(mlp: nn.Module) -> FFN:
    """gate_up_proj's rows: the gate of every neuron, then its up projection."""
    size = _out(mlp.gate_up_proj) // 2
    return FFN([(mlp.gate_up_proj, 0), (mlp.gate_up_proj, size)], mlp.down_proj, size)


register(Arch(
    model_types=("phi3",), targets=("qkv_proj:q,v",), blocks=lambda m: list(m.model.layers), attention=lambda b: _phi3_attention(b.self_attn),
    ffn=lambda b: _phi3_ffn(b.mlp), set_heads=_phi3_set_heads, ffn_field="intermediate_size", head_dim_in_config=True,
    fused={"qkv_proj": lambda a: _qkv_parts(_phi3_attention(a)), "gate_up_proj": lambda m: dict.fromkeys(("gate", "up"), _phi3_ffn(m).size)},
    prune_scope="row",
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
    attention=_deberta_attention, ffn=lambda b: FFN([(b.intermediate.dense, 0)], b.output.dense, _out(b.intermediate.dense)),
    set_heads=_bert_set_heads, ffn_field="intermediate_size", head_dim_in_config=False,
))
