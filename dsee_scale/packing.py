"""Packing (--packing): tokenized LM rows concatenated into max_length windows, each row still alone.

Instruction rows vary in length, so a padded micro-batch spends much of its compute on padding;
packed windows carry little. A window is one row of the global batch everywhere downstream
(GlobalBatches, loss_share, dropout.rows), so a packed run stays a function of the global batch
alone. Inside a window every row is computed as it would be alone:
- position ids restart at each row (RoPE and GPT-2's learned positions alike);
- attention stays within each row: a 4-D block-diagonal causal mask for eager, sdpa and the
  row-dropout attention; cu_seqlens for flash attention (transformers' varlen path);
- each row's first label is -100, so no token is predicted from the row before it; the loss
  keeps its normalisation (one mean over the global batch's target tokens: the same count).
transformers' own packed-sequence detection (position ids with no attention mask) is not used:
it is skipped whenever the model makes a cache (use_cache, e.g. in eval mode), and the rows
then attend to each other silently.
"""
from __future__ import annotations

import bisect
import random
from typing import TYPE_CHECKING

import torch

from dsee_scale.dropout import ATTENTION

if TYPE_CHECKING:
    from datasets import Dataset
    from transformers import PretrainedConfig

MASKED = ("eager", "sdpa", ATTENTION)  # attention implementations that take a 4-D additive mask as given
FLASH = ("flash_attention_2", "flash_attention_3")  # varlen kernels: rows apart by cu_seqlens


def windows(lengths: list[int], max_length: int, seed: int) -> list[list[int]]:
    """Rows (by index) grouped into windows of at most max_length tokens: best-fit decreasing
    (longest rows first, each into the fullest window it fits, else a new one), ties in a
    seeded shuffle's order, so the windows are a function of the data and the seed alone.
    Rows keep that order inside a window."""
    order = list(range(len(lengths)))
    random.Random(seed).shuffle(order)
    order.sort(key=lambda i: -lengths[i])  # stable: equal lengths keep the shuffle's order
    groups: list[list[int]] = []
    room: list[tuple[int, int]] = []  # (free tokens, window), sorted
    for i in order:
        n = lengths[i]
        if n > max_length:
            raise ValueError(f"a row of {n} tokens does not fit a --max_length {max_length} window (rows are fitted to max_length first)")
        at = bisect.bisect_left(room, (n, -1))
        if at == len(room):
            groups.append([i])
            bisect.insort(room, (max_length - n, len(groups) - 1))
        else:
            free, w = room.pop(at)
            groups[w].append(i)
            bisect.insort(room, (free - n, w))
    return groups


def pack(rows: Dataset, max_length: int, seed: int) -> Dataset:
    """Tokenized LM rows (input_ids, labels) as windows: input_ids and labels concatenated (each
    row's first label -100), and `lengths`, the rows' lengths, from which collate makes the
    position ids. Every rank packs the same rows the same way."""
    from datasets import Dataset

    ids, labels = rows["input_ids"], rows["labels"]
    groups = windows([len(r) for r in ids], max_length, seed)
    return Dataset.from_dict({
        "input_ids": [[t for i in g for t in ids[i]] for g in groups],
        "labels": [[t for i in g for t in [-100, *labels[i][1:]]] for g in groups],
        "lengths": [[len(ids[i]) for i in g] for g in groups],
    })


def position_ids(lengths: list[list[int]], width: int) -> torch.Tensor:
    """Each window's position ids, restarting at every row; its right padding counts as one more
    row (its outputs reach no loss, and no real token attends to it)."""
    out = []
    for rows in lengths:
        ids = [p for n in rows for p in range(n)]
        out.append(ids + list(range(width - len(ids))))
    return torch.tensor(out, device="cpu")  # cpu: part of collate's host batch, which the caller moves in one copy


def block_causal_mask(position_ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(batch, 1, tokens, tokens) additive mask, as eager attention adds it and sdpa takes it: a
    token attends to itself and the earlier tokens of its own row (a row starts where its
    position id is 0); dtype's lowest value elsewhere."""
    row = (position_ids == 0).cumsum(-1)
    places = torch.arange(position_ids.shape[1], device=position_ids.device)
    allowed = (row[:, :, None] == row[:, None, :]) & (places[:, None] >= places[None, :])
    return torch.zeros(allowed.shape, dtype=dtype, device=position_ids.device).masked_fill_(~allowed, torch.finfo(dtype).min)[:, None]


def model_inputs(batch: dict[str, torch.Tensor], attention: str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """A collated packed micro-batch (its attention_mask: the real tokens) as the model takes it
    under the `attention` implementation: the block-diagonal mask in place of the 2-D one, or,
    for flash attention, no mask and the rows' cumulative lengths (flattened over the batch, as
    transformers' varlen path reads them; untested here: flash-attn is not installed on CPU)."""
    if attention in FLASH:
        from transformers.modeling_flash_attention_utils import prepare_fa_kwargs_from_position_ids

        (cu_q, cu_k), (max_q, max_k) = prepare_fa_kwargs_from_position_ids(batch["position_ids"])
        rest = {k: v for k, v in batch.items() if k != "attention_mask"}
        return {**rest, "cu_seq_lens_q": cu_q, "cu_seq_lens_k": cu_k, "max_length_q": int(max_q), "max_length_k": int(max_k)}
    return {**batch, "attention_mask": block_causal_mask(batch["position_ids"], dtype)}


def check_model(config: PretrainedConfig, max_length: int) -> None:
    """A ValueError naming why packed rows could not be kept apart in this model: a family whose
    forward is not known to take position ids and a 4-D mask as given, an attention
    implementation that takes neither, or a sliding window shorter than a row may be (a full
    causal mask per row would not be that model's attention)."""
    from dsee_scale.arch import ARCHS  # here: arch's imports (transformers' layers) are heavy for collate's users

    kind, attention = config.model_type, config._attn_implementation
    if kind not in ARCHS or kind not in ARCHS[kind].packs:
        known = ", ".join(sorted(t for t, a in ARCHS.items() if t in a.packs))
        raise ValueError(f"--packing: model type {kind!r} is not one whose rows dsee_scale keeps apart in a packed window (known: {known}): drop --packing")
    if attention not in MASKED + FLASH:
        raise ValueError(f"--packing: the model's attention implementation {attention!r} takes neither a 4-D mask nor cu_seqlens, so packed rows would "
                         f"attend to each other: set its config's attn_implementation to one of {', '.join(MASKED[:2] + FLASH)}, or drop --packing")
    window = getattr(config, "sliding_window", None)
    sliding = window is not None and "sliding_attention" in (getattr(config, "layer_types", None) or ["sliding_attention"])
    if sliding and window < max_length:
        raise ValueError(f"--packing: this model's sliding window ({window} tokens) is shorter than --max_length {max_length}, and a packed "
                         f"window's mask is a full causal one per row: set --max_length {window} or less, or drop --packing")
