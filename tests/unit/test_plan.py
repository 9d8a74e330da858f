"""The memory planner agrees with DeepSpeed's own estimator and with parameter counts."""
import pytest
from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
from transformers import GPT2Config, GPT2LMHeadModel

from dsee_scale.plan import main, plan, shape_of


@pytest.mark.parametrize("model", ["gpt2", "gpt2-xl"])
@pytest.mark.parametrize("nodes, gpus_per_node", [(1, 8), (2, 8), (4, 4)])
def test_full_finetuning_model_states_equal_deepspeeds_estimator(model, nodes, gpus_per_node):
    shape = shape_of(model)
    _, gpu_bytes, _ = estimate_zero3_model_states_mem_needs(shape.params, shape.largest_layer, gpus_per_node, nodes, cpu_offload=False)
    row = plan(shape, "full", nodes * gpus_per_node, gpus_per_node, seq=1024, micro=4, checkpointing=True)
    assert row["model_states_gib"] == pytest.approx(gpu_bytes / 2**30, abs=1e-3)


def test_parameter_count_matches_the_hf_model():
    import torch

    with torch.device("meta"):
        model = GPT2LMHeadModel(GPT2Config(n_embd=768, n_layer=12, n_head=12))
    assert shape_of("gpt2").params == sum(p.numel() for p in model.parameters())


def test_dsee_needs_far_less_than_full_and_cuts_gradient_traffic():
    shape = shape_of("gpt2-xl")
    full = plan(shape, "full", 16, 8, 1024, 4, True)
    dsee = plan(shape, "dsee", 16, 8, 1024, 4, True)
    assert dsee["model_states_gib"] < 0.3 * full["model_states_gib"]  # the gathered-layer buffer stays
    assert dsee["reduce_scatter_gib_per_step"] < 0.01 * full["reduce_scatter_gib_per_step"]
    assert dsee["allgather_gib_per_step"] == pytest.approx(2 * 2 * shape.params * 15 / 16 / 2**30, rel=1e-3)
    assert dsee["inter_node_allgather_gib_per_step"] == dsee["allgather_gib_per_step"]
    assert plan(shape, "dsee", 8, 8, 1024, 4, True)["inter_node_allgather_gib_per_step"] == 0.0


def test_command_prints_a_table_and_a_recommendation(capsys):
    main(["--model", "gpt2-xl", "--nodes", "2", "--gpus-per-node", "8", "--seq", "1024", "--micro-batch", "4"])
    out = capsys.readouterr().out
    assert "recommendation: DSEE" in out and "1,557,611,200 parameters" in out


def test_llama_7b_count_and_the_nvme_row(capsys):
    """LLaMA-7B's shape has 6.7B parameters (the HF model's count); with its frozen weights on
    NVMe a GPU holds only the gathered layer, the host the swap buffers (5 × the embedding's
    partition), and the partition moves to disk, read twice a step (three times with activation
    checkpointing)."""
    import torch
    from transformers import LlamaForCausalLM

    from dsee_scale.models import builtin_config

    with torch.device("meta"):
        model = LlamaForCausalLM(builtin_config("builtin:llama-7b"))
    shape = shape_of("llama-7b")
    assert shape.params == sum(p.numel() for p in model.parameters()) == 6_738_415_616
    memory, nvme = plan(shape, "dsee", 2, 2, 64, 1, False), plan(shape, "dsee", 2, 2, 64, 1, False, nvme=True)
    assert nvme["method"] == "dsee+nvme" and nvme["weights_gib"] == pytest.approx(4 * shape.largest_layer / 2**30, abs=1e-3)
    assert nvme["weights_gib"] < 0.2 * memory["weights_gib"]
    assert nvme["host_swap_gib"] == pytest.approx(5 * 2 * 32000 * 4096 / 2 / 2**30, abs=1e-3)
    assert nvme["disk_gib"] == pytest.approx(2 * shape.params / 2 / 2**30, abs=1e-3) and nvme["nvme_read_gib_per_step"] == pytest.approx(2 * nvme["disk_gib"], abs=2e-3)
    assert plan(shape, "dsee", 2, 2, 64, 1, True, nvme=True)["nvme_read_gib_per_step"] == pytest.approx(3 * nvme["disk_gib"], abs=3e-3)
    assert memory["disk_gib"] == 0.0 and nvme["trainable"] == memory["trainable"]
    main(["--model", "llama-7b", "--nodes", "1", "--gpus-per-node", "1", "--seq", "64", "--micro-batch", "1", "--gpu-gib", "12"])
    assert "recommendation: DSEE, frozen weights on NVMe, without activation checkpointing" in capsys.readouterr().out
