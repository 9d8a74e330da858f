"""A bad input exits every launched rank with one message; a dead rank ends the job; a kill or a
full disk during a save loses nothing and the resumed run repeats the uninterrupted one bit for
bit; a non-finite loss stops the run or, asked to, skips its step."""
import json
import math
import os
import signal
import subprocess
import time

import torch
from conftest import ROOT
from launch_utils import launch, launcher_command, one_process, run_launcher
from safetensors.torch import load_file


def test_bad_input_exits_every_rank_with_one_message(tmp_path):
    cmd = launcher_command("deepspeed", "launch/train.py") + ["--ds_config", "missing.json", "--output_dir", str(tmp_path / "o")]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert out.count("dsee_scale: error: DeepSpeed config missing.json does not exist") == 1


QUICK = ["--ds_config", "ds_configs/zero3.json", "--model", "builtin:tiny-gpt2", "--micro_batch_size", 4, "--log_every", 1,
         "--stages", "tune,prune,retune", "--prune.sparsity", 0.5]


def test_killing_one_rank_ends_the_job_within_60_seconds(tmp_path):
    out = tmp_path / "run"
    cmd = launcher_command("deepspeed", "launch/train.py") + [str(a) for a in QUICK + ["--steps", 100000, "--output_dir", out]]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, "PYTHONPATH": str(ROOT)}, start_new_session=True)
    try:
        deadline = time.time() + 240
        while not ((out / "metrics.jsonl").exists() and '"tune"' in (out / "metrics.jsonl").read_text()):
            assert time.time() < deadline and proc.poll() is None, "training never started"
            time.sleep(0.5)
        # This job's rank 1 only (its session): another run's on this machine is not ours to kill.
        rank1 = subprocess.run(["pgrep", "-s", str(proc.pid), "-f", "launch/train.py --local_rank=1"], capture_output=True, text=True).stdout.split()
        assert rank1, "rank 1 not found"
        os.kill(int(rank1[0]), signal.SIGKILL)
        tic = time.time()
        code = proc.wait(timeout=60)
        assert code != 0 and time.time() - tic < 60
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)


def test_kill_during_save_then_resume_repeats_the_uninterrupted_run(tmp_path):
    steps = ["--steps", 6, "--retune_steps", 4, "--save_every", 2]
    reference = tmp_path / "reference"
    run_launcher("ranks", "launch/train.py", QUICK + steps + ["--output_dir", reference])
    crashed = tmp_path / "crashed"
    proc = launch("ranks", "launch/train.py", QUICK + steps + ["--output_dir", crashed], env={"DSEE_FAULT_INJECT": "kill_during_save:tune-4"})
    assert proc.returncode != 0
    assert (crashed / "checkpoints" / "latest").read_text() == "tune-2"
    assert not (crashed / "checkpoints" / "tune-4").exists()
    run_launcher("ranks", "launch/train.py", QUICK + steps + ["--output_dir", crashed, "--resume"])
    expected = json.loads((reference / "summary.json").read_text())
    resumed = json.loads((crashed / "summary.json").read_text())
    assert resumed["losses"] == expected["losses"]
    assert resumed["sparsity"] == expected["sparsity"] == 0.5


def test_a_full_disk_during_a_save_keeps_the_previous_checkpoint_and_says_so(tmp_path):
    run = tmp_path / "run"
    flags = QUICK + ["--steps", 6, "--retune_steps", 2, "--save_every", 2, "--output_dir", run]
    proc = one_process(flags, env={"DSEE_FAULT_INJECT": "enospc_during_save:tune-4"})
    assert proc.returncode != 0
    assert "dsee_scale: error: checkpoint tune-4 could not be written to" in proc.stderr
    assert "No space left on device; the previous checkpoint (tune-2) is intact and resumable" in proc.stderr
    checkpoints = run / "checkpoints"
    assert (checkpoints / "latest").read_text() == "tune-2"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["latest", "tune-2"]  # no half-written folder left behind
    resumed = one_process(flags + ["--resume"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert len(json.loads((run / "summary.json").read_text())["losses"]["tune"]) == 6


def test_a_non_finite_loss_stops_the_run_naming_stage_and_step(tmp_path):
    run = tmp_path / "run"
    proc = one_process(QUICK + ["--steps", 40, "--save_every", 1, "--lr", 1e30, "--output_dir", run])
    assert proc.returncode != 0
    message = next(line for line in proc.stderr.splitlines() if line.startswith("dsee_scale: error: tune step"))
    step = int(message.split("tune step ")[1].split(":")[0])
    assert "the loss is nan" in message or "the loss is inf" in message
    assert (run / "checkpoints" / "latest").read_text() == f"tune-{step - 1}"  # the last good step


def test_skip_nonfinite_discards_that_steps_update_and_goes_on(tmp_path):
    run = tmp_path / "run"
    flags = QUICK + ["--steps", 5, "--retune_steps", 2, "--save_every", 1, "--keep_checkpoints", 10, "--skip_nonfinite", 1, "--output_dir", run]
    proc = one_process(flags, env={"DSEE_FAULT_INJECT": "nan_loss:tune-3"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "tune step 3: the loss is nan: step skipped, its update discarded (1 of --skip_nonfinite 1)" in proc.stderr
    summary = json.loads((run / "summary.json").read_text())
    assert summary["skipped_steps"] == {"tune": [3]}
    assert len(summary["losses"]["tune"]) == 4 and all(math.isfinite(x) for x in summary["losses"]["tune"])
    # The skipped step left adapters and optimizer moments as they were after step 2.
    before, after = (load_file(run / "checkpoints" / tag / "trainable.safetensors") for tag in ("tune-2", "tune-3"))
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    changed = load_file(run / "checkpoints" / "tune-4" / "trainable.safetensors")
    assert not all(torch.equal(after[k], changed[k]) for k in after)  # and training went on
