"""The `gpu` tier (`pytest -m gpu tests/gpu`; step 2 of scripts/gpu_check.sh): the CPU tier's
ZeRO-3 rank scripts on CUDA devices, batches on the engine's device. Tiny LLaMA, GPT-2 and BERT
trained under ZeRO-3 equal one plain process (fp32 with TF32 off: losses and adapters within
1e-5; bf16: losses within 2e-2), frozen weights stay partitioned and unchanged, the merged export reloads with
plain transformers to the engine's logits; the pruning masks of GPU shards equal
torch.nn.utils.prune's on the same weights.

The ranks start from GPU_HOST_ENV (the environment before tests/conftest.py pinned the suite to
the CPU): 2 NCCL ranks where 2 GPUs or more are visible, else 1 rank, still ZeRO-3, but DeepSpeed
skips its gathers at one partition, so the shards are whole there. Without a usable CUDA GPU every
test is skipped, saying why. DSEE_GPU_TIER_ON_CPU=1 runs the tier on 2 CPU ranks instead: the
tier's own code checked where no GPU is (gpu_check.sh --cpu runs a part of it).
"""
import functools
import json
import math
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from conftest import GPU_HOST_ENV, tiny_model
from launch_utils import RANKS, run_launcher
from ranks.common import eval_batch, reference_run
from safetensors.torch import load_file

from gpu_check import ON_CPU, TOLERANCE, relative_diff  # the device check's switch and bounds: relative losses, adapters (L2 per tensor), logits
from helpers.prune_reference import check_prune_tiny_results

pytestmark = pytest.mark.gpu

KINDS = {"llama": "lm", "gpt2": "lm", "bert": "cls"}
STEPS = 20
OFFLINE = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
# What DeepSpeed and torch see with the host's environment: asked of a child process, as this
# one is pinned to the CPU and must not initialise CUDA.
PROBE = ("import json, torch; from deepspeed.accelerator import get_accelerator; "
         "print(json.dumps({'gpus': torch.cuda.device_count() if torch.cuda.is_available() else 0, 'accelerator': get_accelerator().device_name()}))")


@dataclass(frozen=True)
class Devices:
    """Where the tier's ranks run: 'cuda' or 'cpu', ranks per launch, their environment."""

    kind: str
    world: int
    env: dict[str, str]


@functools.cache
def cuda_devices() -> tuple[int, str]:
    """(CUDA GPUs the ranks would use, why none): once per session. Without an NVIDIA driver
    (no nvidia-smi, no /dev/nvidiactl) the probe's seconds of imports are skipped."""
    if GPU_HOST_ENV.get("CUDA_VISIBLE_DEVICES") in ("", "-1"):
        return 0, f"CUDA_VISIBLE_DEVICES={GPU_HOST_ENV['CUDA_VISIBLE_DEVICES']!r} in the host environment"
    if shutil.which("nvidia-smi", path=GPU_HOST_ENV.get("PATH")) is None and not Path("/dev/nvidiactl").exists():
        return 0, "no NVIDIA driver on this machine (no nvidia-smi, no /dev/nvidiactl)"
    proc = subprocess.run([sys.executable, "-c", PROBE], env=GPU_HOST_ENV, capture_output=True, text=True, timeout=300)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        return 0, f"probing torch and DeepSpeed failed ({proc.returncode}): {(proc.stdout + proc.stderr)[-500:]}"
    found = json.loads(lines[-1])
    if not found["gpus"]:
        return 0, "torch.cuda.is_available() is False in the host environment"
    if found["accelerator"] != "cuda":
        return 0, f"DeepSpeed's accelerator in the host environment is {found['accelerator']!r}, not 'cuda' (DS_ACCELERATOR={GPU_HOST_ENV.get('DS_ACCELERATOR')!r})"
    return found["gpus"], ""


@pytest.fixture(scope="session")
def devices() -> Devices:
    if os.environ.get(ON_CPU) == "1":
        return Devices("cpu", 2, dict(os.environ))  # this process's pins: DeepSpeed's CPU accelerator
    gpus, why = cuda_devices()
    if not gpus:
        pytest.skip(f"no CUDA GPU usable: {why}")
    return Devices("cuda", min(gpus, 2), {**GPU_HOST_ENV, **OFFLINE})


@pytest.fixture(scope="module", params=[(precision, kind) for precision in TOLERANCE for kind in KINDS], ids="-".join)
def run(request, devices, tmp_path_factory):
    """One STEPS-step ZeRO-3 run of zero3_tiny.py (exported) per precision and architecture."""
    precision, kind = request.param
    root = tmp_path_factory.mktemp(f"{precision}-{kind}")
    tiny_model(kind, KINDS[kind]).save_pretrained(root / "base")
    args = ["--base", root / "base", "--task", KINDS[kind], "--out", root / "run", "--steps", STEPS, "--export", "--persistence", 100]
    run_launcher("ranks", RANKS / "zero3_tiny.py", args + (["--bf16"] if precision == "bf16" else []), nproc=devices.world, base_env=devices.env, timeout=600)
    reports = [json.loads((root / "run" / f"report_rank{r}.json").read_text()) for r in range(devices.world)]
    return {"precision": precision, "kind": kind, "task": KINDS[kind], "base": root / "base", "out": root / "run", "reports": reports, "world": devices.world}


def test_zero3_on_the_devices_equals_one_plain_process(run):
    tolerance = TOLERANCE[run["precision"]]
    ref_losses, ref_state, _ = reference_run(run["base"], run["task"], STEPS)
    losses = torch.tensor(run["reports"][0]["losses"], dtype=torch.float64)
    expected = torch.tensor(ref_losses, dtype=torch.float64)
    assert ((losses - expected).abs() / expected.abs()).max().item() <= tolerance, (losses.tolist(), ref_losses)
    assert run["reports"][0]["dtypes"] == [f"torch.{'bfloat16' if run['precision'] == 'bf16' else 'float32'}"]
    saved = load_file(str(run["out"] / "adapter" / "dsee_adapter.safetensors"))
    assert set(saved) == set(ref_state)
    if run["precision"] == "bf16":  # Adam's lr-sized steps on bf16-rounded gradients part the adapters' paths (5-30% after 20 steps on CPU ranks), not the losses (1e-3)
        return
    for name, tensor in ref_state.items():
        assert relative_diff(saved[name], tensor) <= tolerance, name


def test_frozen_weights_stay_partitioned_unchanged_and_without_gradients(run):
    world = run["world"]
    for report in run["reports"]:
        assert report["world"] == world
        for name, numel in report["full_numel"].items():  # one rank: its one partition is the whole tensor
            assert report["shard_numel_during"][name] in (math.ceil(numel / world), numel - math.ceil(numel / world) * (world - 1)), name
            assert report["shard_numel_after"][name] == report["shard_numel_during"][name]
        assert report["frozen_checksum_before"] == report["frozen_checksum_after"] != 0.0
        assert report["adapters_whole"] and report["frozen_grads"] == 0


def test_merged_export_reloads_with_plain_transformers_to_the_engines_logits(run):
    from dsee_scale.models import TASK_MODELS

    model = TASK_MODELS[run["task"]].from_pretrained(run["out"] / "hf").eval()
    expected = torch.load(run["out"] / "logits.pt", weights_only=True)
    with torch.no_grad():
        logits = model(input_ids=eval_batch()).logits.float()
    if run["precision"] == "fp32":
        torch.testing.assert_close(logits, expected, atol=TOLERANCE["fp32"], rtol=0)
    else:  # bf16 on another device (this process's CPU): the same function to bf16's rounding
        assert model.dtype == torch.bfloat16 and relative_diff(logits, expected) <= TOLERANCE["bf16"]


def test_pruning_masks_of_device_shards_equal_torch_prune(devices, tmp_path):
    """prune_tiny.py on tiny LLaMA: |W| (global, per layer, 2:4), |W + ΔW|, |ΔW| and activation
    scores, and the 2:4 re-fit, from the shards on the devices."""
    base = tmp_path / "base"
    tiny_model("llama").save_pretrained(base)
    run_launcher("ranks", RANKS / "prune_tiny.py", ["--base", base, "--out", tmp_path], nproc=devices.world, base_env=devices.env, timeout=600)
    check_prune_tiny_results(torch.load(tmp_path / "masks.pt", weights_only=True), base, "lm", on_gpu=devices.kind == "cuda")
