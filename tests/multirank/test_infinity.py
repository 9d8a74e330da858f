"""ZeRO-Infinity (issue #20): the frozen backbone's shards on NVMe (offload_param device nvme, a
temporary folder here), the whole recipe on 2 ranks: the same losses, masks and export as the
in-memory run, and an exact resume. The model is the built-in small LLaMA, whose weight shards
are large enough (>= 1 MB) for DeepSpeed to send them to NVMe."""
import json

import pytest
from launch_utils import launch, run_launcher
from safetensors.torch import load_file

from helpers.nvme import nvme_config

FLAGS = ["--model", "builtin:small-llama", "--steps", 3, "--retune_steps", 2, "--save_every", 1, "--micro_batch_size", 2, "--max_length", 64,
         "--stages", "tune,prune,retune,export", "--prune.sparsity", 0.5, "--log_every", 1]


@pytest.fixture(scope="module")
def in_memory(tmp_path_factory):
    out = tmp_path_factory.mktemp("memory") / "run"
    # hooks per layer, as ZeRO-3 has for weights on NVMe (hooks per block agree to float rounding, not to the bit)
    run_launcher("ranks", "launch/train.py", ["--ds_config", "ds_configs/zero3.json", *FLAGS, "--zero3_hook_per_block", "false", "--output_dir", out])
    return out, json.loads((out / "summary.json").read_text())


def test_nvme_resident_backbone_trains_prunes_and_resumes_exactly_as_in_memory(in_memory, tmp_path):
    """Killed while saving retune-1 (latest: right after pruning), then resumed: every loss, the
    sparsity and every exported (merged, masked) weight equal the in-memory run's. Pruning read
    and wrote the shards on NVMe: a mask applied only to a swap buffer would leave the export dense."""
    reference_dir, reference = in_memory
    config, out = nvme_config(tmp_path), tmp_path / "run"
    proc = launch("ranks", "launch/train.py", ["--ds_config", config, *FLAGS, "--output_dir", out], env={"DSEE_FAULT_INJECT": "kill_during_save:retune-1"})
    assert proc.returncode != 0 and not (out / "summary.json").exists(), proc.stdout[-2000:] + proc.stderr[-2000:]
    assert (out / "checkpoints" / "latest").read_text().strip() == "prune-0"
    run_launcher("ranks", "launch/train.py", ["--ds_config", config, *FLAGS, "--output_dir", out, "--resume"])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["nvme_params"] >= 2 * 7  # q, k, v, o and the three MLP weights of both layers live on NVMe
    assert summary["losses"] == reference["losses"]
    assert summary["sparsity"] == reference["sparsity"] == pytest.approx(0.5, abs=1e-3)
    exported, expected = load_file(out / "export" / "merged" / "model.safetensors"), load_file(reference_dir / "export" / "merged" / "model.safetensors")
    assert exported.keys() == expected.keys()
    for name, tensor in expected.items():
        assert (exported[name] == tensor).all(), name
    assert not list((tmp_path / "nvme").iterdir())  # the run's own swap folder (dsee-<hash>), kept for the resume, removed at the end
