"""Dropout drawn per global row, so training is a function of the global batch alone.

A mask drawn from the process's generator depends on how a global batch is split: which rows
share a micro-batch, which rank draws them, how long the micro-batch is padded. Here each row's
mask comes from its own generator, seeded by (seed, stage, step, the row's place in the global
batch, the dropout site), and is drawn over the row's real tokens only: the same row gets the
same mask on any number of ranks, with any micro-batch and accumulation, and after a resume.

`install(model)` makes every nn.Dropout of a model (the backbone's, the adapters', the task
head's) a RowDropout, and where the model's attention drops attention probabilities inside its
attention function (GPT-2, BERT), routes it through `_attention`, the eager computation with the
same keyed masks. Same rates, same places. The trainer names the rows of each micro-batch with
`rows(...)`; outside it (evaluation, a user's own loop) dropout is torch's own.
"""
from __future__ import annotations

import contextlib
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn

ATTENTION = "dsee_row_dropout"  # the attention implementation `install` registers
SHARED_SITES = ("pos_dropout",)  # inputs without a batch dimension (DeBERTa's relative position embeddings)
ATTENTION_DROPOUT_KEYS = ("attn_pdrop", "attention_probs_dropout_prob", "attention_dropout")


@dataclass
class Rows:
    """The micro-batch being computed: a seed per row, its real length, the padded length, and a
    seed for inputs that no row owns (SHARED_SITES)."""

    seeds: list[int]
    lengths: list[int]
    padded: int
    step_seed: int


_current: Rows | None = None


def seed_of(*where) -> int:
    """A seed from where the run is, e.g. (seed, stage, step, rank): a function of the place in
    the run, not of what ran before, so a resumed run draws what the uninterrupted one drew."""
    return zlib.crc32("/".join(map(str, where)).encode())


@contextlib.contextmanager
def rows(seed: int, stage: str, step: int, positions: Sequence[int], attention_mask: torch.Tensor) -> Iterator[None]:
    """Dropout in the block draws the masks of the rows at `positions` of the global batch of
    `stage` step `step` (the micro-batch's rows, in order) from (seed, stage, step, position),
    over their real tokens: right padding, as data.collate makes it (refused otherwise). Forward
    and backward both belong in the block: activation checkpointing draws again in backward."""
    global _current
    lengths = attention_mask.sum(1)
    if not torch.equal(attention_mask.bool(), torch.arange(attention_mask.shape[1], device=attention_mask.device) < lengths[:, None]):
        raise ValueError("dropout drawn per row needs right-padded rows (each row's tokens first, then its padding): pad on the right")
    previous = _current
    _current = Rows([seed_of(seed, stage, step, f"row{p}") for p in positions], lengths.tolist(), attention_mask.shape[1], seed_of(seed, stage, step))
    try:
        yield
    finally:
        _current = previous


def _site_seed(seed: int, site: int) -> int:
    return (seed * 1_000_003 + site) % (1 << 63)


def keep_mask(shape: torch.Size, p: float, site: int, device: torch.device) -> torch.Tensor:
    """Where dropout keeps values of a `shape` tensor computed for the current rows (True: kept).
    A row's dimensions that run over tokens (dim 1 of a (batch, tokens, features) tensor;
    dims 2 and 3 of (batch, heads, queries, keys) attention) are drawn for its real tokens
    only; padding is kept (it reaches no real token nor the loss)."""
    current = _current
    if shape[0] != len(current.seeds):
        raise RuntimeError(f"dropout on a tensor of shape {tuple(shape)} in a micro-batch of {len(current.seeds)} rows: "
                           "dsee_scale's row-keyed dropout needs the batch dimension first")
    token_dims = {2: (), 3: (1,), 4: (2, 3)}.get(len(shape))
    if token_dims is None or any(shape[d] != current.padded for d in token_dims):
        raise RuntimeError(f"dropout on a tensor of shape {tuple(shape)}: dsee_scale's row-keyed dropout knows (batch, features), "
                           f"(batch, tokens, features) and (batch, heads, tokens, tokens) with {current.padded} tokens")
    mask = torch.ones(shape, dtype=torch.bool, device=device)
    for i, (seed, length) in enumerate(zip(current.seeds, current.lengths)):
        real = tuple(length if d in token_dims else shape[d] for d in range(1, len(shape)))
        generator = torch.Generator(device=device).manual_seed(_site_seed(seed, site))
        mask[(i, *(slice(0, n) for n in real))] = torch.rand(real, generator=generator, device=device) >= p
    return mask


def shared_keep_mask(shape: torch.Size, p: float, site: int, device: torch.device) -> torch.Tensor:
    """A mask for an input that no row owns: one draw per step and site, so the same in any split."""
    generator = torch.Generator(device=device).manual_seed(_site_seed(_current.step_seed, site))
    return torch.rand(shape, generator=generator, device=device) >= p


def _apply(x: torch.Tensor, keep: torch.Tensor, p: float) -> torch.Tensor:
    return x.masked_fill(~keep, 0) / (1 - p)


class RowDropout(nn.Dropout):
    """nn.Dropout whose masks are keyed by row (see the module's docstring)."""

    def __init__(self, p: float, site: str, shared: bool = False) -> None:
        super().__init__(p)
        self.site, self.shared = zlib.crc32(site.encode()), shared

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0 or _current is None:
            return super().forward(x)
        draw = shared_keep_mask if self.shared else keep_mask
        return _apply(x, draw(x.shape, self.p, self.site, x.device), self.p)


def _attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask: torch.Tensor | None,
               scaling: float | None = None, dropout: float = 0.0, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """Eager attention (softmax in fp32, as transformers' eager) with row-keyed dropout of the
    attention probabilities; without dropout (evaluation, generation) torch's fused attention.
    The mask is eager's: additive, causal included, which both take."""
    if not (module.training and dropout > 0):
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=0.0, **kwargs)
    groups = query.shape[1] // key.shape[1]  # grouped-query attention: each key/value head serves `groups` query heads
    if groups > 1:
        key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    scores = torch.matmul(query, key.transpose(2, 3)) * (query.shape[-1] ** -0.5 if scaling is None else scaling)
    if attention_mask is not None:
        scores = scores + attention_mask[:, :, :, : key.shape[-2]]
    probs = nn.functional.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    if _current is None:
        probs = nn.functional.dropout(probs, p=dropout, training=True)
    else:
        probs = _apply(probs, keep_mask(probs.shape, dropout, module.dsee_dropout_site, probs.device), dropout)
    return torch.matmul(probs, value).transpose(1, 2).contiguous(), probs


def _attention_dropout(config) -> float:
    return max((getattr(config, k, 0.0) or 0.0 for k in ATTENTION_DROPOUT_KEYS), default=0.0)


def install(model: nn.Module) -> int:
    """Row-keyed dropout everywhere in `model` (idempotent); returns the dropout sites keyed."""
    count = 0
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if type(child) is nn.Dropout:
                site = f"{name}.{child_name}" if name else child_name
                setattr(module, child_name, RowDropout(child.p, site, shared=child_name in SHARED_SITES))
                count += 1
        module.dsee_dropout_site = zlib.crc32(f"{name}#attention".encode())  # read by _attention
    config = getattr(model, "config", None)
    if config is not None and _attention_dropout(config) > 0 and getattr(config, "attn_logit_softcapping", None) is not None:
        raise ValueError(f"attention dropout {_attention_dropout(config)} drawn per row would run without this {config.model_type} model's attention logit "
                         "soft-capping (attn_logit_softcapping): set the model's attention_dropout to 0, or row_dropout false (torch's dropout, per rank)")
    if config is not None and _attention_dropout(config) > 0 and config._attn_implementation != ATTENTION:
        from transformers import AttentionInterface
        from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, eager_mask

        AttentionInterface.register(ATTENTION, _attention)
        ALL_MASK_ATTENTION_FUNCTIONS.register(ATTENTION, eager_mask)
        config._attn_implementation = ATTENTION
    return count
