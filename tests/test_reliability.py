"""Bad input fails early and clearly; a dead rank ends the job; a kill during a save loses
nothing and the resumed run repeats the uninterrupted one bit for bit."""
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from conftest import ROOT, SHARED_DATA, minilm_dir
from launch_utils import launch, launcher_command, one_process, run_launcher

sys.path.insert(0, str(ROOT / "launch"))
from train import main  # noqa: E402


def write(path: Path, text: str | bytes) -> str:
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return str(path)


def bad_inputs(tmp: Path) -> list[tuple[str, list[str], str]]:
    """(what is wrong, flags, the message it must give): also the README's table."""
    tsv = write(tmp / "ok.tsv", "sentence\tlabel\ngood film\t1\nbad film\t0\n")
    used = tmp / "used_run"
    used.mkdir(exist_ok=True)
    (used / "dsee_run.json").write_text("{}")
    cls = ["--task", "cls", "--model", "builtin:tiny-bert", "--train_file", tsv, "--eval_file", tsv, "--text_column", "sentence"]
    return [
        ("DeepSpeed config missing", ["--ds_config", "nope.json"], "DeepSpeed config nope.json does not exist"),
        ("DeepSpeed config malformed", ["--ds_config", write(tmp / "bad.json", "{stage: 3")], "is not valid JSON"),
        ("batch sizes disagree", ["--ds_config", write(tmp / "b.json", '{"train_batch_size": 10, "train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 1}')], "batch sizes disagree"),
        ("hpZ in the DeepSpeed config", ["--ds_config", write(tmp / "hpz.json", '{"zero_optimization": {"stage": 3, "zero_hpz_partition_size": 2}}')], "zero_hpz_partition_size is not supported"),
        ("quantized frozen weights in the DeepSpeed config", ["--ds_config", write(tmp / "q.json", '{"zero_optimization": {"stage": 3, "zero_quantized_nontrainable_weights": true}}')], "zero_quantized_nontrainable_weights is not supported"),
        ("data file missing", cls[:4] + ["--train_file", str(tmp / "none.tsv")], "does not exist"),
        ("data file unreadable", cls[:4] + ["--train_file", write(tmp / "bin.tsv", b"\xff\xfe\x00\x81" * 64)], "cannot be read as UTF-8 text"),
        ("empty dataset", cls[:4] + ["--train_file", write(tmp / "empty.tsv", "sentence\tlabel\n"), "--eval_file", tsv], "holds no examples"),
        ("label column missing", cls + ["--label_column", "stars"], "column(s) ['stars'] not found"),
        ("text column missing", cls[:-2], "column(s) ['text'] not found"),
        ("targets match nothing", ["--dsee.targets", "query,value"], "no module matched the DSEE targets"),
        ("rank too large", ["--dsee.rank", "4096"], "rank 4096 is larger than a dimension"),
        ("nnz too large", ["--dsee.nnz", "99999999"], "nnz 99999999 is larger than the"),
        ("unknown init", ["--dsee.init", "xavier"], "--dsee.init: Input should be 'lora' or 'normal' (got 'xavier')"),
        ("unknown support method", ["--dsee.support", "svd"], "unknown support method 'svd'"),
        ("sparsity outside [0, 1)", ["--prune.sparsity", "1.5"], "--prune.sparsity: Input should be less than 1 (got 1.5)"),
        ("re-fit without pruning", ["--prune.reconstruct", "true", "--prune.sparsity", "0"], "prune.reconstruct re-fits the weights that unstructured or N:M pruning keeps"),
        ("unknown model", ["--model", "./no/such/model"], "unknown model './no/such/model'"),
        ("unknown builtin model", ["--model", "builtin:gpt5"], "unknown builtin model 'builtin:gpt5'"),
        ("tokenizer/model vocabulary mismatch", ["--task", "cls", "--model", minilm_dir(), "--tokenizer", str(SHARED_DATA / "gpt2_tokenizer"), "--train_file", tsv, "--eval_file", tsv, "--text_column", "sentence"], "tokenizer"),
        ("output folder of another run", ["--output_dir", str(used)], "exists and holds another run"),
        ("unknown option in a recipe", ["--config", write(tmp / "r.yaml", "model: builtin:tiny-gpt2\nlearning_rate: 0.1\n")], "r.yaml: learning_rate: unknown TrainConfig field"),
        ("bad value for a flag", ["--steps", "many"], "--steps: Input should be a valid integer"),
        ("bad value in a recipe", ["--config", write(tmp / "lr.yaml", "lr: fast\n")], "lr.yaml: lr: Input should be a valid number"),
        ("stages out of order", ["--stages", "export,retune"], "stages export,retune are out of order"),
        ("--resume and --overwrite together", ["--resume", "--overwrite"], "choose --resume or --overwrite, not both"),
    ]




@pytest.fixture
def cases(tmp_path):
    return bad_inputs(tmp_path)


def test_every_bad_input_fails_before_heavy_work_with_a_named_message(cases, tmp_path, capsys):
    for what, flags, message in cases:
        argv = ["--output_dir", str(tmp_path / "out"), *flags] if "--output_dir" not in flags else flags
        tic = time.time()
        assert main(argv) == 2, what
        err = capsys.readouterr().err
        assert message in err, f"{what}: {err}"
        assert time.time() - tic < 10, what
        assert not (tmp_path / "out").exists(), what  # nothing was created


def test_readme_table_lists_every_bad_input(cases):
    readme = (ROOT / "README.md").read_text()
    for what, _, message in cases:
        assert f"| {what} |" in readme, what
        assert message.split("'")[0].strip() in readme, what


def test_default_folder_holding_files_of_no_run_is_never_replaced(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    keep = tmp_path / "runs" / "default" / "notes.txt"
    keep.parent.mkdir(parents=True)
    keep.write_text("mine")
    assert main(["--ds_config", str(ROOT / "ds_configs" / "zero3.json")]) == 2
    assert "output folder runs/default exists and holds another run" in capsys.readouterr().err
    assert keep.read_text() == "mine"


def test_recipe_values_are_typed_like_the_same_flags(tmp_path):
    """YAML reads `lr: 1e-3` and `stages: tune` as strings; a recipe means what the flags mean."""
    from dsee_scale.config import train_config_from_argv

    recipe = write(tmp_path / "r.yaml", "lr: 1e-3\nstages: tune\nsteps: 5\ndsee:\n  rank: '16'\nprune:\n  sparsity: 0.3\n")
    from_recipe = train_config_from_argv(["--config", recipe])
    from_flags = train_config_from_argv(["--lr", "1e-3", "--stages", "tune", "--steps", "5", "--dsee.rank", "16", "--prune.sparsity", "0.3"])
    assert from_recipe == from_flags and from_recipe.lr == 1e-3 and from_recipe.stages == ["tune"] and from_recipe.dsee.rank == 16


def test_a_section_given_in_part_keeps_the_other_defaults():
    """`--prune.score delta` alone must not reset the default 50% sparsity to PruneConfig's 0."""
    from dsee_scale.config import TrainConfig, train_config_from_argv

    cfg = train_config_from_argv(["--prune.score", "delta", "--dsee.rank", "4"])
    assert cfg.prune.score == "delta" and cfg.prune.sparsity == TrainConfig().prune.sparsity == 0.5
    assert cfg.dsee.rank == 4 and cfg.dsee.nnz == TrainConfig().dsee.nnz


@pytest.mark.parametrize("recipe", sorted((ROOT / "launch" / "recipes").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_recipe_parses_into_a_train_config(recipe):
    from dsee_scale.config import train_config_from_argv

    cfg = train_config_from_argv(["--config", str(recipe)])
    assert cfg.model and (ROOT / cfg.ds_config).exists(), f"{recipe.name} names a missing DeepSpeed config {cfg.ds_config}"


@pytest.mark.multiproc
def test_bad_input_exits_every_rank_with_one_message(tmp_path):
    cmd = launcher_command("deepspeed", "launch/train.py") + ["--ds_config", "missing.json", "--output_dir", str(tmp_path / "o")]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert out.count("dsee_scale: error: DeepSpeed config missing.json does not exist") == 1


QUICK = ["--ds_config", "ds_configs/zero3.json", "--model", "builtin:tiny-gpt2", "--micro_batch_size", 4, "--log_every", 1,
         "--stages", "tune,prune,retune", "--prune.sparsity", 0.5]


@pytest.mark.multiproc
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


@pytest.mark.multiproc
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
