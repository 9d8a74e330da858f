"""Training is a function of the global batch alone: with dropout on (the backbone's, the
attention's, the adapters' and the head's), one global batch split over any world size,
micro-batch and accumulation gives the same loss and the same adapter gradients, as the
trainer computes them (GlobalBatches' rows and loss share, dropout.rows, DeepSpeed's averaging
over micro-steps and ranks), in one process; packed windows (--packing) are keyed as rows."""
import random
from collections.abc import Callable

import pytest
import torch
from conftest import tiny_model

from dsee_scale import DSEEConfig, apply_dsee, dropout, packing
from dsee_scale.data import GlobalBatches

GLOBAL = 12
SPLITS = [(1, 6, 2), (1, 4, 3), (2, 6, 1), (2, 3, 2), (3, 4, 1), (3, 2, 2)]  # world, micro-batch, accumulation
FAMILIES = {
    "gpt2": ("lm", dict(resid_pdrop=0.1, embd_pdrop=0.1, attn_pdrop=0.1)),
    "llama": ("lm", dict(attention_dropout=0.1)),
    "bert": ("cls", dict(hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1)),
    "deberta-v2": ("cls", dict(hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1)),
    "qwen3": ("lm", dict(attention_dropout=0.1)),
    "gemma3": ("lm", dict(attention_dropout=0.1)),  # and a sliding-window layer
    "phi3": ("lm", dict(attention_dropout=0.1, resid_pdrop=0.1, embd_pdrop=0.1)),
}


def make_rows(task: str, n: int = 2 * GLOBAL) -> list[dict]:
    """Rows of varied lengths, so that every split pads its micro-batches differently."""
    rng = random.Random(0)
    rows = []
    for _ in range(n):
        ids = [rng.randrange(1, 128) for _ in range(rng.randrange(3, 17))]
        rows.append({"input_ids": ids, "labels": list(ids) if task == "lm" else rng.randrange(2)})
    return rows


def pad(rows: list[dict], task: str) -> dict:
    """Right padding, as data.collate pads (packed windows: with their position ids)."""
    width = max(len(r["input_ids"]) for r in rows)
    ids = torch.tensor([r["input_ids"] + [0] * (width - len(r["input_ids"])) for r in rows])
    mask = torch.tensor([[1] * len(r["input_ids"]) + [0] * (width - len(r["input_ids"])) for r in rows])
    labels = torch.tensor([r["labels"] + [-100] * (width - len(r["labels"])) for r in rows]) if task == "lm" else torch.tensor([r["labels"] for r in rows])
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    if "lengths" in rows[0]:
        batch["position_ids"] = packing.position_ids([r["lengths"] for r in rows], width)
    return batch


def model_with_adapters(kind: str):
    task, overrides = FAMILIES[kind]
    model = tiny_model(kind, task, **overrides)
    apply_dsee(model, DSEEConfig(rank=4, nnz=8, dropout=0.1, support="magnitude", init="normal"))
    assert dropout.install(model) > 0
    return model.train(), task


def one_step(model, task: str, rows: list[dict], world: int, micro: int, accum: int, step: int = 0, inputs: Callable[[dict], dict] = lambda b: b) -> tuple[float, dict]:
    """The loss the trainer logs and the gradient DeepSpeed applies for one step of this split;
    `inputs`: a micro-batch as the model takes it (the trainer's _model_inputs)."""
    batches = GlobalBatches(len(rows), micro, accum, world, seed=3)
    share = batches.loss_share([rows[i]["labels"] for i in batches.global_indices(step)]) if task == "lm" else {}
    model.zero_grad()
    losses = []
    for rank in range(world):
        for a in range(accum):
            batch = pad([rows[i] for i in batches.micro_indices(step, a, rank)], task)
            with dropout.rows(7, "tune", step, batches.micro_positions(a, rank), batch["attention_mask"]):
                loss = model(**inputs(batch), **share).loss
                (loss / (accum * world)).backward()  # DeepSpeed: the loss over accumulation, gradients averaged over ranks
            losses.append(loss.item())
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return sum(losses) / len(losses), grads


def assert_every_split_alike(model, task: str, rows: list[dict], inputs: Callable[[dict], dict] = lambda b: b) -> None:
    reference_loss, reference = one_step(model, task, rows, 1, GLOBAL, 1, inputs=inputs)
    model.eval()
    undropped = one_step(model, task, rows, 1, GLOBAL, 1, inputs=inputs)[0]
    model.train()
    assert abs(reference_loss - undropped) > 1e-5  # dropout is on
    for world, micro, accum in SPLITS:
        loss, grads = one_step(model, task, rows, world, micro, accum, inputs=inputs)
        assert loss == pytest.approx(reference_loss, rel=1e-6, abs=0), (world, micro, accum)
        for name, grad in grads.items():
            scale = reference[name].abs().max().item()  # rtol 1e-6 of the tensor's scale: sums over rows regroup by split
            torch.testing.assert_close(grad, reference[name], rtol=1e-6, atol=1e-6 * scale, msg=lambda m, name=name: f"{name}, split {(world, micro, accum)}: {m}")


@pytest.mark.parametrize("kind", list(FAMILIES))
def test_every_split_of_a_global_batch_gives_the_same_loss_and_gradients(kind):
    model, task = model_with_adapters(kind)
    assert_every_split_alike(model, task, make_rows(task))


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_packed_windows_are_keyed_as_rows_in_every_split(kind):
    """--packing: a window is one row of the global batch, its dropout drawn from its place there
    over its real tokens (its rows together), so every split gives the same loss and gradients."""
    from datasets import Dataset

    model, task = model_with_adapters(kind)
    windows = packing.pack(Dataset.from_list(make_rows(task, 6 * GLOBAL)), 32, seed=0).to_list()
    assert len(windows) >= 2 * GLOBAL and any(len(w["lengths"]) > 1 for w in windows)
    assert_every_split_alike(model, task, windows, lambda batch: packing.model_inputs(batch, model.config._attn_implementation, torch.float32))


def test_masks_differ_by_step_and_row_and_keep_the_rate():
    layer = dropout.RowDropout(0.25, "site").train()
    x = torch.ones(4, 50, 64)
    attention = torch.ones(4, 50, dtype=torch.long)
    with dropout.rows(1, "tune", 0, range(4), attention):
        step0 = layer(x)
    with dropout.rows(1, "tune", 1, range(4), attention):
        step1 = layer(x)
    assert not torch.equal(step0, step1) and not torch.equal(step0[0], step0[1])
    assert (step0 == 0).float().mean().item() == pytest.approx(0.25, abs=0.01)
    assert step0[step0 != 0].unique().tolist() == pytest.approx([1 / 0.75])
    torch.manual_seed(0)
    plain = layer(x)  # outside a keyed step: torch's own dropout
    torch.manual_seed(0)
    assert torch.equal(plain, torch.nn.functional.dropout(x, 0.25, training=True))


def test_a_row_gets_its_mask_whatever_its_padding():
    layer = dropout.RowDropout(0.5, "site").train()
    short = torch.randn(1, 7, 16)
    padded = torch.cat([short, torch.randn(1, 5, 16)], dim=1)
    with dropout.rows(1, "tune", 0, [3], torch.ones(1, 7, dtype=torch.long)):
        alone = layer(short)
    with dropout.rows(1, "tune", 0, [3], torch.tensor([[1] * 7 + [0] * 5])):
        in_padding = layer(padded)
    assert torch.equal(alone, in_padding[:, :7])


@pytest.mark.parametrize("kind", ["gpt2", "llama", "bert", "qwen3", "gemma3", "phi3"])
def test_keyed_attention_computes_the_models_own_attention(kind):
    """The keyed attention (eager, with row-keyed dropout) gives the logits of the model's own
    attention when it drops nothing (p = 1e-9): the same masks (causal, padding) and scaling."""
    task, overrides = FAMILIES[kind]
    reference = tiny_model(kind, task)
    keyed = tiny_model(kind, task)
    keyed.config.update(overrides)  # attention dropout > 0 routes attention through dropout._attention
    dropout.install(keyed)
    assert keyed.config._attn_implementation == dropout.ATTENTION
    keyed.load_state_dict(reference.state_dict())
    for module in keyed.modules():  # nothing dropped, but every dropout (attention's too) keyed
        if isinstance(module, torch.nn.Dropout):
            module.p = 1e-9
        if isinstance(getattr(module, "attention_dropout", None), float):
            module.attention_dropout = 1e-9
    batch = pad(make_rows(task, 4), task)
    with torch.no_grad(), dropout.rows(0, "tune", 0, range(4), batch["attention_mask"]):
        expected = reference(**batch).logits
        got = keyed.train()(**batch).logits
    real = batch["attention_mask"].bool() if task == "lm" else slice(None)
    torch.testing.assert_close(got[real], expected[real], rtol=1e-5, atol=1e-5)


def test_attention_dropout_alone_is_applied_and_keyed():
    """LLaMA's only dropout is in its attention: through the keyed attention it drops (train and
    eval differ), and the same rows of the same step get the same masks."""
    model = tiny_model("llama", "lm", attention_dropout=0.3)
    assert dropout.install(model) == 0  # no nn.Dropout anywhere: attention alone
    batch = pad(make_rows("lm", 4), "lm")
    real = batch["attention_mask"].bool()

    def logits(step: int, train: bool = True) -> torch.Tensor:
        with torch.no_grad(), dropout.rows(0, "tune", step, range(4), batch["attention_mask"]):
            return model.train(train)(**batch).logits[real]

    assert not torch.allclose(logits(0), logits(0, train=False))
    assert torch.equal(logits(0), logits(0)) and not torch.equal(logits(0), logits(1))


def test_attention_dropout_on_a_soft_capped_model_is_refused():
    """The keyed attention has no soft-capping (Gemma 2): it would change the model's function."""
    with pytest.raises(ValueError, match="soft-capping .*attention_dropout to 0, or row_dropout false"):
        dropout.install(tiny_model("gemma2", "lm", attention_dropout=0.1))


def test_left_padding_is_refused():
    with pytest.raises(ValueError, match="right-padded"):
        with dropout.rows(0, "tune", 0, range(2), torch.tensor([[0, 1, 1], [1, 1, 1]])):
            pass
