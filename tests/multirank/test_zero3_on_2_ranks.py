"""ZeRO-3 with 2 real CPU ranks: equivalence with one plain process, shards, optimizer state,
checkpoint resume, HF export. Each launch is a real `deepspeed --num_gpus 2` job (gloo)."""
import json
import math
from pathlib import Path

import pytest
import torch
from conftest import tiny_model
from launch_utils import RANKS, SIMULATED_HOSTS, run_launcher
from ranks.common import eval_batch, reference_run
from safetensors.torch import load_file

SCRIPT = RANKS / "zero3_tiny.py"
KINDS = {"gpt2": "lm", "bert": "cls", "llama": "lm"}
# DeepSpeed keeps the tiny models' small frozen tensors and the S values whole itself, beside
# zero.keep_whole's A and B: both kinds in its re-gather after each step and checkpoint load
PERSISTENCE = ["--persistence", 100]


@pytest.fixture(scope="module", params=list(SIMULATED_HOSTS))
def runs(request, tmp_path_factory):
    """One 20-step 2-rank run per architecture (saved and exported), shared by the tests below;
    all of it once per kind of host (what DeepSpeed's accelerator says it supports)."""
    root = tmp_path_factory.mktemp(f"zero3-{request.param}")
    result = {}
    for kind, task in KINDS.items():
        base = root / f"base_{kind}"
        tiny_model(kind, task).save_pretrained(base)
        out = root / f"run_{kind}"
        args = ["--base", base, "--task", task, "--out", out, "--steps", 20, "--export", *PERSISTENCE]
        if kind == "gpt2":
            args += ["--save", root / "ckpt20"]
        run_launcher("ranks", SCRIPT, args, host=request.param)
        report = json.loads((out / "report_rank0.json").read_text())
        result[kind] = dict(base=base, out=out, report=report, reports=[json.loads((out / f"report_rank{r}.json").read_text()) for r in range(2)])
    result["root"], result["host"] = root, request.param
    return result


@pytest.mark.parametrize("kind", list(KINDS))
def test_adapters_take_the_backbone_dtype_whatever_the_accelerator_reports(runs, kind):
    expected = {"fp16": runs["host"] == "fp16", "bf16": True}
    for report in runs[kind]["reports"]:
        assert report["accelerator"] == expected  # the simulation reached every rank
        assert report["dtypes"] == ["torch.float32"]


@pytest.mark.parametrize("kind", list(KINDS))
def test_zero3_two_ranks_equal_one_plain_process(runs, kind):
    run = runs[kind]
    ref_losses, ref_state, _ = reference_run(run["base"], KINDS[kind], 20)
    torch.testing.assert_close(torch.tensor(run["report"]["losses"]), torch.tensor(ref_losses), rtol=1e-4, atol=0)
    saved = load_file(str(run["out"] / "adapter" / "dsee_adapter.safetensors"))
    assert set(saved) == set(ref_state)
    for name, tensor in ref_state.items():
        torch.testing.assert_close(saved[name], tensor, rtol=1e-4, atol=1e-6, msg=name)
    assert ref_losses[-1] < ref_losses[0] or kind != "bert"


@pytest.mark.parametrize("kind", list(KINDS))
def test_frozen_weights_stay_partitioned_unchanged_and_outside_the_optimizer(runs, kind):
    for report in runs[kind]["reports"]:
        for name, numel in report["full_numel"].items():
            assert report["shard_numel_during"][name] in (math.ceil(numel / 2), numel - math.ceil(numel / 2)), name
            assert report["shard_numel_after"][name] == report["shard_numel_during"][name]
        big = {n: v for n, v in report["full_numel"].items() if v > 1}
        assert all(report["shard_numel_after"][n] < v for n, v in big.items())
        assert report["frozen_checksum_before"] == report["frozen_checksum_after"] != 0.0
        assert report["optimizer_state_numel"] == 2 * report["trainable"] // 2
        assert report["adapters_whole"] and report["frozen_grads"] == 0
        assert report["param_collectives_in_step"] == 1 < report["adapter_tensors"], report  # zero.keep_whole: one re-gather


@pytest.mark.parametrize("kind", list(KINDS))
def test_exported_hf_folder_reloads_without_deepspeed(runs, kind):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    auto = AutoModelForSequenceClassification if KINDS[kind] == "cls" else AutoModelForCausalLM
    model = auto.from_pretrained(runs[kind]["out"] / "hf").eval()
    expected = torch.load(runs[kind]["out"] / "logits.pt", weights_only=True)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=eval_batch()).logits, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("runs", ["no-fp16"], indirect=True)  # one host is enough here: the suite's time
def test_full_checkpoint_resume_continues_the_same_run(runs):
    root, base = runs["root"], runs["gpt2"]["base"]
    common = ["--base", base, "--task", "lm", *PERSISTENCE]
    run_launcher("ranks", SCRIPT, common + ["--out", root / "first10", "--steps", 10, "--save", root / "ckpt10"], host=runs["host"])
    run_launcher("ranks", SCRIPT, common + ["--out", root / "last10", "--steps", 10, "--start", 10, "--resume", root / "ckpt10"], host=runs["host"])
    first = json.loads((root / "first10" / "report_rank0.json").read_text())["losses"]
    last = json.loads((root / "last10" / "report_rank0.json").read_text())["losses"]
    assert first + last == runs["gpt2"]["report"]["losses"]


@pytest.mark.parametrize("kind", list(KINDS))
def test_support_chosen_on_two_ranks_is_identical_everywhere_and_equals_one_process(runs, kind):
    from dsee_scale import support_of

    per_rank = [load_file(str(runs[kind]["out"] / f"support_rank{r}.safetensors")) for r in range(2)]
    _, _, model = reference_run(runs[kind]["base"], KINDS[kind], 0)
    single = support_of(model)
    assert set(per_rank[0]) == set(per_rank[1]) == set(single) and len(single) >= 4
    for name, index in single.items():
        assert torch.equal(per_rank[0][name], index) and torch.equal(per_rank[1][name], index), name
        assert index.numel() == 8 and index.unique().numel() == 8


def test_random_init_gpt2_under_zero3_keeps_hf_initialisation(tmp_path):
    run_launcher("ranks", SCRIPT, ["--base", "config:tiny-gpt2", "--out", tmp_path, "--steps", 1])
    report = json.loads((tmp_path / "report_rank0.json").read_text())
    assert abs(report["losses"][0] - math.log(report["vocab"])) < 0.1, report["losses"][0]


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def test_adapter_only_checkpoint_is_under_one_percent_of_full(tmp_path):
    ckpt = tmp_path / "ckpt"
    run_launcher("ranks", SCRIPT, ["--base", "config:gpt2-small", "--out", tmp_path / "out", "--steps", 1, "--save", ckpt], timeout=600)
    full, adapter_only = folder_bytes(ckpt), folder_bytes(Path(str(ckpt) + "_adapter_only"))
    adapter_file = (tmp_path / "out" / "adapter" / "dsee_adapter.safetensors").stat().st_size
    assert full > 400e6  # 124M fp32 frozen shards
    assert adapter_only < 0.01 * full and adapter_file < 0.01 * full


def test_weights_fetched_through_shared_memory_equal_gloos_bit_for_bit(tmp_path):
    """On CPU ranks of one machine ZeRO-3 fetches through shared memory
    (zero.single_host.fetch_through_shared_memory): every gathered weight, padded shards and -0.0 included,
    also when shards pass in many small chunks, and a DSEE run's losses equal gloo's."""
    run_launcher("ranks", RANKS / "shm_fetch.py", [tmp_path])
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["installed"] and result["odd_sizes"] > 0 and result["largest_shard_in_chunks"] > 100
    # 2 ranks fetch coalesced weights by all-reduce by default (single weights still all-gather),
    # and the bytes went through shared memory, not gloo
    assert result["fetch_by_all_reduce_is_default"] and result["default_fetches"]["all_reduce"] > 0
    assert result["exchanged_chunks"]["default_step"] >= sum(result["default_fetches"].values())
    assert result["exchanged_chunks"]["in_chunks"] > 2 * result["largest_shard_in_chunks"]
    assert all(result["bitwise_equal"].values()) and all(result["negative_zero_kept"].values()) and result["bf16_bitwise_equal"], result
    default, by_all_gather, gloo = result["losses"]
    assert default == by_all_gather == gloo


def test_frozen_weights_shared_in_memory_train_as_zero3s_own_fetch(tmp_path):
    """On CPU ranks of one machine frozen weights lie once in shared memory, whole for every rank
    (zero.share_frozen_weights): losses equal ZeRO-3 fetching them itself, bit for bit, and the
    writes to them land once and are seen by every rank."""
    run_launcher("ranks", RANKS / "shared_weights.py", [tmp_path])
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["frozen"] > 0 and result["shared"] == result["frozen"] and result["trainable_shared"] == 0 and result["odd_sizes"] > 0
    assert len(result["mapped_files"]) >= result["frozen"] and all(name.endswith("(deleted)") for name in result["mapped_files"]), result["mapped_files"]
    assert result["mixed_group"] and result["shard_is_own_slice"] and result["losses_equal"] and result["fetch_is_view"]
    assert result["modify_lands_once"]
    assert result["peer_edits_seen"] == [[7.0], [8.0]]
    assert result["whole_model_equal"]
    # GPT-2's one nn.Linear is its lm_head, tied to the shared embedding; LLaMA: 7 per block (q and v inside DSEE) and lm_head
    layers = result["linear_layers"]
    assert layers["gpt2_gathered"] == {"Linear": 1, "TorchLinear": 0} and layers["gpt2_shared"] == {"Linear": 0, "TorchLinear": 1}
    assert layers["llama_gathered"] == {"Linear": 2 * 7 + 1, "TorchLinear": 0} and layers["llama_shared"] == {"Linear": 0, "TorchLinear": 2 * 7 + 1}
    gathered, shared = result["llama_losses"]
    assert len(shared) == 3 and shared == gathered


def test_hooks_per_block_train_as_hooks_per_layer(tmp_path):
    """Where frozen weights are shared, ZeRO-3 hooks whole transformer blocks (zero.hook_per_block)
    and trains as with its hooks on every layer, for GPT-2, BERT and LLaMA, with activation
    checkpointing and gradient accumulation; the first block, fed by frozen embeddings, gets its
    gradients too. Where ZeRO-3 fetches the weights, or nothing is frozen, its hooks stay on every layer."""
    run_launcher("ranks", RANKS / "block_hooks.py", [tmp_path])
    result = json.loads((tmp_path / "result.json").read_text())
    assert set(result) == {"gpt2", "gpt2_fetched", "gpt2_full", "gpt2_checkpointed", "gpt2_accumulating", "bert_cls", "llama"}
    for name, case in result.items():
        assert case["loss_diff"] <= 1e-6 and case["trained_diff"] <= 1e-6, (name, case)
        per_layer = case["hooked_per_layer"]
        assert per_layer["blocks"] == case["blocks"] and per_layer["in_blocks"] > 0, (name, case)
        per_block = per_layer if name in ("gpt2_fetched", "gpt2_full") else {"blocks": case["blocks"], "in_blocks": 0}
        assert case["hooked_per_block"] == per_block, (name, case)
