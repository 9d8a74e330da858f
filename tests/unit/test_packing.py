"""--packing: rows concatenated into max_length windows are computed as they are alone. Each
row's loss is its unpacked loss, its logits do not depend on the other rows of its window,
position ids restart at each row, and the packer is a function of the data and the seed; on
tiny random-init LLaMA-family models and GPT-2 (learned absolute positions), through every
attention implementation that packing takes here (flash attention: its inputs only, as flash-attn
is not installed on CPU). Split invariance with dropout: tests/unit/test_row_dropout.py; two
ranks against one process: tests/multirank/test_packing_runs.py."""
import random

import pytest
import torch
from conftest import tiny_model
from datasets import Dataset

from dsee_scale import dropout, packing
from dsee_scale.config import TrainConfig
from dsee_scale.data import GlobalBatches, batch_counts, collate

MAX_LENGTH = 48


class Tokenizer:
    """What collate needs of a tokenizer (padding with 0), without loading one."""

    def pad(self, features: dict, **_) -> dict:
        from transformers import BatchEncoding

        width = max(map(len, features["input_ids"]))
        ids = [row + [0] * (width - len(row)) for row in features["input_ids"]]
        mask = [[1] * len(row) + [0] * (width - len(row)) for row in features["input_ids"]]
        return BatchEncoding({"input_ids": ids, "attention_mask": mask, "labels": features["labels"]}, tensor_type="pt")


def model(kind: str, attention: str = "sdpa"):
    """A tiny random-init causal LM: llama and gpt2 (conftest), mistral and qwen2 (LLaMA's family, their own code);
    dropout.ATTENTION: the row-dropout attention, in training mode, dropping nothing."""
    if kind in ("llama", "gpt2"):
        m = tiny_model(kind)
    else:
        from transformers import AutoModelForCausalLM, MistralConfig, Qwen2Config

        config = (MistralConfig if kind == "mistral" else Qwen2Config)(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                                                         num_key_value_heads=2, max_position_embeddings=64)
        torch.manual_seed(0)
        m = AutoModelForCausalLM.from_config(config).eval()
    if attention != dropout.ATTENTION:
        m.config._attn_implementation = attention
        return m
    m.config.update({"attn_pdrop": 1e-9} if kind == "gpt2" else {"attention_dropout": 1e-9})  # the row-dropout attention, dropping nothing
    dropout.install(m)
    return m.train()


def make_rows(n: int, seed: int = 0) -> list[dict]:
    """Prompt/answer-like rows of varied lengths: the loss on each row's end only."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        ids = [rng.randrange(1, 128) for _ in range(rng.randrange(4, 30))]
        prompt = rng.randrange(1, len(ids) - 1)
        rows.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]})
    return rows


def packed(rows: list[dict], seed: int = 0) -> Dataset:
    return packing.pack(Dataset.from_list(rows), MAX_LENGTH, seed)


def token_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Each position's loss on the next token (as the model shifts labels), 0 where there is none."""
    return torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), labels[:, 1:], ignore_index=-100, reduction="none")


@pytest.mark.parametrize("kind, attention", [("llama", "sdpa"), ("llama", "eager"), ("gpt2", "sdpa"), ("gpt2", "eager"), ("mistral", "sdpa"), ("qwen2", "sdpa"),
                                             ("llama", dropout.ATTENTION), ("gpt2", dropout.ATTENTION)])
def test_each_rows_packed_loss_is_its_unpacked_loss(kind, attention):
    """Per row: the mean token loss of its answer, packed and alone, within 1e-5 in fp32; and the
    batch's loss as the trainer takes it (one mean over its target tokens) the same too."""
    m = model(kind, attention)
    rows = make_rows(24)
    windows = packed(rows)
    assert len(windows) < len(rows) / 2  # rows of 4 to 29 tokens: several to a window
    padded, batch = collate(Dataset.from_list(rows)[:], Tokenizer()), collate(windows[:], Tokenizer())
    inputs = packing.model_inputs(batch, attention, torch.float32)
    with torch.no_grad(), dropout.rows(0, "tune", 0, range(len(windows)), batch["attention_mask"]):
        alone = token_losses(m(**{k: padded[k] for k in ("input_ids", "attention_mask")}).logits, padded["labels"])
        together = token_losses(m(**{k: v for k, v in inputs.items() if k != "labels"}).logits, batch["labels"])
        targets = int((padded["labels"][:, 1:] != -100).sum())
        assert targets == int((batch["labels"][:, 1:] != -100).sum())  # no target added across a row boundary
        loss_padded = m(**padded, num_items_in_batch=targets).loss
        loss_packed = m(**inputs, num_items_in_batch=targets).loss
    per_row_alone, per_row_packed = {}, {}
    for w, lengths in enumerate(windows["lengths"]):
        start = 0
        for n in lengths:
            index = next(i for i, r in enumerate(rows) if r["input_ids"] == batch["input_ids"][w, start : start + n].tolist())
            counted = padded["labels"][index, 1:n] != -100
            per_row_alone[index] = alone[index, : n - 1][counted].mean()
            per_row_packed[index] = together[w, start : start + n - 1][counted].mean()  # the token before the row (the last row's) predicts nothing
            start += n
    assert sorted(per_row_packed) == list(range(len(rows)))
    torch.testing.assert_close(torch.stack([per_row_packed[i] for i in range(len(rows))]), torch.stack([per_row_alone[i] for i in range(len(rows))]), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loss_packed, loss_padded, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["llama", "gpt2", "mistral", "qwen2"])
def test_no_row_attends_to_another_in_its_window(kind):
    """Changing the first row's tokens leaves the logits of the rows after it unchanged; the same
    window with a plain causal mask (position ids and a 2-D mask) would not."""
    m = model(kind)
    rows = [{"input_ids": list(range(1, 9)), "labels": list(range(1, 9))}, {"input_ids": list(range(20, 31)), "labels": list(range(20, 31))},
            {"input_ids": list(range(40, 46)), "labels": list(range(40, 46))}]
    window = packing.pack(Dataset.from_list(rows), 32, seed=0)
    assert len(window) == 1
    first = window["lengths"][0][0]
    batch = collate(window[:], Tokenizer())
    changed = {**batch, "input_ids": batch["input_ids"].clone()}
    changed["input_ids"][0, :first] = torch.arange(100, 100 + first)
    with torch.no_grad():
        logits = [m(**packing.model_inputs({k: b[k] for k in ("input_ids", "attention_mask", "position_ids")}, "sdpa", torch.float32)).logits for b in (batch, changed)]
        plain = [m(input_ids=b["input_ids"], position_ids=b["position_ids"], attention_mask=torch.ones_like(b["input_ids"])).logits for b in (batch, changed)]
    assert torch.equal(logits[0][:, first:], logits[1][:, first:])
    assert not torch.allclose(logits[0][:, :first], logits[1][:, :first])
    assert not torch.allclose(plain[0][:, first:], plain[1][:, first:])  # the test would see attention across rows


def test_position_ids_restart_at_each_row_and_the_padding():
    batch = collate({"input_ids": [[5] * 5, [6] * 6], "labels": [[-100, 5, 5, -100, 5], [-100] + [6] * 5], "lengths": [[3, 2], [4, 2]]}, Tokenizer())
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 0, 1]]
    assert batch_counts(batch).tolist() == [4, 11]  # examples (rows starting on a real token), real tokens
    unpacked = collate({"input_ids": [[5] * 3, [6] * 6], "labels": [[5] * 3, [6] * 6]}, Tokenizer())
    assert "position_ids" not in unpacked and batch_counts(unpacked).tolist() == [2, 9]
    mask = packing.block_causal_mask(batch["position_ids"][:1], torch.float32)[0, 0] == 0
    assert mask.tolist() == [[1, 0, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0], [1, 1, 1, 0, 0, 0], [0, 0, 0, 1, 0, 0], [0, 0, 0, 1, 1, 0], [0, 0, 0, 0, 0, 1]]


def test_flash_attention_gets_each_rows_cumulative_lengths_and_no_mask():
    batch = collate({"input_ids": [[5] * 5, [6] * 6], "labels": [[5] * 5, [6] * 6], "lengths": [[3, 2], [4, 2]]}, Tokenizer())
    inputs = packing.model_inputs(batch, "flash_attention_2", torch.bfloat16)
    assert "attention_mask" not in inputs and inputs["max_length_q"] == inputs["max_length_k"] == 4
    assert inputs["cu_seq_lens_q"].tolist() == inputs["cu_seq_lens_k"].tolist() == [0, 3, 5, 6, 10, 12]  # the padding is a row of its own


def test_windows_hold_every_row_once_within_max_length_and_depend_on_the_data_and_seed_alone():
    rows = make_rows(200)
    lengths = [len(r["input_ids"]) for r in rows]
    groups = packing.windows(lengths, MAX_LENGTH, seed=3)
    assert sorted(i for g in groups for i in g) == list(range(len(rows)))
    assert all(sum(lengths[i] for i in g) <= MAX_LENGTH for g in groups)
    assert sum(lengths) / (len(groups) * MAX_LENGTH) > 0.95  # best-fit decreasing fills the windows
    assert groups == packing.windows(lengths, MAX_LENGTH, seed=3) and groups != packing.windows(lengths, MAX_LENGTH, seed=4)
    window = packed(rows, seed=3)[0]
    first = groups[0][0]
    assert window["labels"][: lengths[first]] == [-100] + rows[first]["labels"][1:]  # a row's first label is never a target
    with pytest.raises(ValueError, match="a row of 49 tokens does not fit a --max_length 48 window"):
        packing.windows([49], MAX_LENGTH, seed=0)


def test_a_packed_window_is_one_row_of_the_global_batch():
    """GlobalBatches and the loss share see windows as rows: the share counts the rows' own targets."""
    rows = make_rows(40)
    windows = packed(rows)
    batches = GlobalBatches(len(windows), 2, 1, 2, seed=0)
    everything = GlobalBatches(len(windows), len(windows), 1, 1, seed=0)
    assert batches.global_batch == 4 and sorted(everything.global_indices(0)) == list(range(len(windows)))
    share = everything.loss_share(windows[everything.global_indices(0)]["labels"])["num_items_in_batch"]
    assert share == sum(sum(t != -100 for t in r["labels"][1:]) for r in rows)


def test_packing_is_refused_where_rows_cannot_be_kept_apart():
    with pytest.raises(ValueError, match="packing concatenates causal-LM rows .--task lm.; a task cls row"):
        TrainConfig(task="cls", packing=True)
    from transformers import BertConfig, MistralConfig

    with pytest.raises(ValueError, match="model type 'bert' is not one whose rows dsee_scale keeps apart.*known: gpt2, llama, mistral, qwen2"):
        packing.check_model(BertConfig(), 128)
    with pytest.raises(ValueError, match="attention implementation 'flex_attention' takes neither.*set its config's attn_implementation to one of eager, sdpa"):
        packing.check_model(model("llama", "flex_attention").config, 128)
    short, long = MistralConfig(sliding_window=64), MistralConfig(sliding_window=128)
    short._attn_implementation = long._attn_implementation = "sdpa"  # as a built model's config says
    with pytest.raises(ValueError, match=r"sliding window \(64 tokens\) is shorter than --max_length 128"):
        packing.check_model(short, 128)
    packing.check_model(long, 128)  # a window no row outgrows
    for kind in ("llama", "gpt2", "qwen2"):
        packing.check_model(model(kind).config, 4096)


def test_validation_refuses_packing_before_the_model_is_built():
    from dsee_scale.ds_config import ConfigError
    from dsee_scale.validate import check_model_fits

    check_model_fits(TrainConfig(model="builtin:tiny-gpt2", packing=True))
    with pytest.raises(ConfigError, match="--packing: model type 'bert'"):
        check_model_fits(TrainConfig(model="builtin:tiny-bert", packing=True))
