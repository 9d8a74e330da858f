"""launch/train.py on a machine with an NVIDIA GPU (a fake nvidia-smi first on PATH) whose torch
cannot use it (this CPU-only torch; on a GPU host, the suite's empty CUDA_VISIBLE_DEVICES): it
exits 2 before any heavy work, naming CUDA and the fix, and the same command trains on the CPU
once DS_ACCELERATOR=cpu asks for it. (tests/unit/test_gpu_host.py: each reason and fix.)"""
import json
import time

import torch
from launch_utils import one_process

from helpers.gpu_host import GPU_LINE, gpu_host_env

FLAGS = ["--model", "builtin:tiny-llama", "--steps", 2, "--stages", "tune", "--save_every", 0, "--log_every", 1]


def test_a_gpu_host_refuses_the_silent_cpu_fallback_and_trains_on_the_cpu_on_purpose(tmp_path):
    env, run = gpu_host_env(tmp_path / "bin"), tmp_path / "run"
    tic = time.monotonic()
    refused = one_process([*FLAGS, "--output_dir", run], env=env)
    took = time.monotonic() - tic
    assert refused.returncode == 2, refused.stdout[-2000:] + refused.stderr[-4000:]
    err = refused.stderr
    assert f"dsee_scale: error: this machine has an NVIDIA GPU (nvidia-smi lists {GPU_LINE!r})" in err and "CUDA is unusable because" in err
    assert "check with `python -m dsee_scale.doctor`; or set DS_ACCELERATOR=cpu to train on the CPU on purpose" in err
    if torch.version.cuda is None:
        assert "a CPU-only build (torch.version.cuda is None)" in err and "TORCH_INDEX_URL=https://download.pytorch.org/whl/cu124 make setup" in err
    assert not run.exists() and took < 60, took  # the imports alone: nothing was built or tokenized

    trained = one_process([*FLAGS, "--output_dir", run], env={**env, "DS_ACCELERATOR": "cpu"})
    assert trained.returncode == 0, trained.stdout[-2000:] + trained.stderr[-4000:]
    assert "dsee_scale: DeepSpeed config zero3, chosen by device: DeepSpeed's accelerator is the CPU: fp32" in trained.stdout
    summary = json.loads((run / "summary.json").read_text())
    assert len(summary["losses"]["tune"]) == 2
    assert json.loads((run / "config.json").read_text())["ds_config"] == "zero3"
