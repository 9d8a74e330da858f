"""The baselines on DSEE's own Recipe (issue #18): PEFT LoRA trains only LoRA and the head and
merges exactly, full fine-tuning trains every weight, a baseline asked to prune is refused (their
2-rank runs through launch/train.py: tests/multirank/test_baselines_runs.py)."""
import pytest
import torch
from conftest import tiny_model
from dsee_scale.cli import main

from dsee_scale.baselines import apply_peft_lora, merge_peft_lora, train_everything
from dsee_scale.config import DSEEConfig
from dsee_scale.inject import count_parameters


@pytest.mark.parametrize("kind, targets, lora_layers", [("bert", None, ["query", "value"]), ("gpt2", None, ["c_attn"]), ("llama", ["q_proj", "v_proj"], ["q_proj", "v_proj"])])
def test_peft_lora_trains_only_lora_and_the_head_and_merges_exactly(kind, targets, lora_layers):
    """LoRA on DSEE's targets (a fused GPT-2 c_attn:q,v whole), the head trainable as under DSEE;
    after training, the merge gives the same logits and leaves a plain model."""
    model = tiny_model(kind, task="cls")
    apply_peft_lora(model, DSEEConfig(rank=4, alpha=8, targets=targets))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or ".score." in f".{n}" or "classifier" in n for n in trainable)
    assert {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in trainable if "lora_" in n} == set(lora_layers)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.randint(1, 100, (2, 12))
    for _ in range(3):
        model(input_ids=ids, labels=torch.tensor([0, 1])).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    with torch.no_grad():
        before = model(input_ids=ids).logits
        merge_peft_lora(model)
        after = model(input_ids=ids).logits
    assert not any("lora_" in n for n, _ in model.named_parameters())
    torch.testing.assert_close(after, before, atol=1e-5, rtol=0)


def test_full_fine_tuning_trains_every_weight():
    model = train_everything(tiny_model("bert", task="cls"))
    trainable, total = count_parameters(model)
    assert trainable == total


def test_a_baseline_asked_to_prune_is_refused_before_launch(tmp_path, capsys):
    assert main(["--method", "full", "--prune.sparsity", "0.5", "--output_dir", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "method full does not prune" in err
