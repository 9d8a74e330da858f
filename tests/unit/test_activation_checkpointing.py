"""Activation checkpointing with DSEE adapters: the same gradients, reentrant or not."""
import pytest
import torch
from conftest import tiny_model

from dsee_scale import DSEEConfig, apply_dsee


def adapter_grads(kind: str, checkpointing: str | None) -> dict[str, torch.Tensor]:
    model = apply_dsee(tiny_model(kind), DSEEConfig(rank=4, nnz=8, init="normal", support="magnitude"))
    model.train()
    if checkpointing:
        reentrant = checkpointing == "reentrant"
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": reentrant})
        if reentrant:
            model.enable_input_require_grads()  # frozen embeddings: make the block inputs require grad
    ids = torch.randint(1, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    model(input_ids=ids, labels=ids).loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("kind", ["gpt2", "llama", "bert"])
@pytest.mark.parametrize("mode", ["reentrant", "non_reentrant"])
def test_checkpointed_gradients_equal_plain_gradients(kind, mode):
    plain, checkpointed = adapter_grads(kind, None), adapter_grads(kind, mode)
    assert set(plain) == set(checkpointed) and plain
    for name in plain:
        assert checkpointed[name].abs().sum() > 0, name
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=1e-5, atol=1e-7, msg=name)
