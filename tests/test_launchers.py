"""launch/train.py under every launcher: 2 real CPU ranks train, prune, re-tune and export;
the export is re-evaluated in this (plain) process and must give the metric the run reported."""
import json
import shutil

import pytest
from conftest import ROOT
from launch_utils import free_port, run_launcher

from dsee_scale.evaluate import evaluate_folder

pytestmark = pytest.mark.multiproc
QUICK = ["--ds_config", "ds_configs/zero3.json", "--model", "builtin:tiny-gpt2", "--steps", 6, "--retune_steps", 2, "--micro_batch_size", 4,
         "--gen_samples", 2, "--gen_max_new_tokens", 4, "--save_every", 0, "--log_every", 2, "--prune.sparsity", 0.5]


def check_run(out, reference_summary=None):
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2
    assert summary["sparsity"] == 0.5
    assert summary["train_loss"]["tune"][1] < summary["train_loss"]["tune"][0]
    plain = evaluate_folder(str(out / "export" / "merged"), str(out / "data" / "eval.txt"), "lm")
    assert plain["eval_loss"] == pytest.approx(summary["after"]["eval_loss"], rel=1e-5)
    assert (out / "metrics.jsonl").read_text().count('"stage": "tune"') == 3
    assert any((out / "tensorboard").iterdir())
    if reference_summary is not None:
        assert summary["train_loss"] == reference_summary["train_loss"]
    return summary


@pytest.fixture(scope="module")
def deepspeed_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("ds") / "run"
    run_launcher("deepspeed", "launch/train.py", QUICK + ["--output_dir", out])
    return out


def test_deepspeed_launcher(deepspeed_run):
    summary = check_run(deepspeed_run)
    assert (deepspeed_run / "export" / "adapter" / "dsee_adapter.safetensors").exists()
    assert "bleu" in summary["after"]


@pytest.mark.parametrize("launcher", ["torchrun", "mpirun"])
def test_torchrun_and_mpirun_give_the_deepspeed_run(launcher, tmp_path, deepspeed_run):
    if launcher == "mpirun" and not shutil.which("mpirun"):
        pytest.fail("mpirun not installed: run `make setup` (installs openmpi-bin)")
    out = tmp_path / "run"
    run_launcher(launcher, "launch/train.py", QUICK + ["--output_dir", out])
    check_run(out, json.loads((deepspeed_run / "summary.json").read_text()))


def test_accelerate_launch(tmp_path, deepspeed_run):
    import subprocess
    import sys
    from pathlib import Path

    out = tmp_path / "run"
    accelerate = Path(sys.executable).parent / "accelerate"
    cmd = [str(accelerate), "launch", "--config_file", "launch/accelerate/zero3.yaml", "--main_process_port", str(free_port()), "launch/train.py"] + [str(a) for a in QUICK + ["--output_dir", out]]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-5000:]
    check_run(out, json.loads((deepspeed_run / "summary.json").read_text()))


def test_two_nodes_simulated_over_loopback(tmp_path, deepspeed_run):
    """Two `torchrun --nnodes 2 --node_rank i` invocations of 1 rank each, rendezvous on 127.0.0.1."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    out, port = tmp_path / "run", str(free_port())
    torchrun = str(Path(sys.executable).parent / "torchrun")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs = [
        subprocess.Popen([torchrun, "--nnodes", "2", "--node_rank", str(rank), "--nproc_per_node", "1", "--master_addr", "127.0.0.1", "--master_port", port, "launch/train.py"]
                         + [str(a) for a in QUICK + ["--output_dir", out]], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for rank in (0, 1)
    ]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outputs[0][-3000:] + outputs[1][-3000:]
    check_run(out, json.loads((deepspeed_run / "summary.json").read_text()))
