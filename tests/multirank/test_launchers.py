"""launch/train.py under every launcher: 2 real CPU ranks train, prune, re-tune and export;
the export is re-evaluated in this (plain) process and must give the metric the run reported."""
import glob
import json
import os
import shutil
import subprocess
import sys

import pytest
from conftest import ROOT
from launch_utils import RANKS, free_port, launch, progress_bar_in, run_launcher

from dsee_scale.evaluate import evaluate_folder

QUICK = ["--ds_config", "ds_configs/zero3.json", "--model", "builtin:tiny-gpt2", "--steps", 6, "--retune_steps", 2, "--micro_batch_size", 4,
         "--gen_samples", 2, "--gen_max_new_tokens", 4, "--save_every", 0, "--log_every", 2, "--prune.sparsity", 0.5]


def check_run(out, reference_summary=None):
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2
    assert summary["sparsity"] == 0.5 and summary["prune_scope"] == "row"  # unset: a decoder's default
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
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-5000:]
    check_run(out, json.loads((deepspeed_run / "summary.json").read_text()))


def test_two_nodes_simulated_over_loopback_with_node_local_disks(tmp_path, deepspeed_run):
    """Two `torchrun --nnodes 2 --node_rank i` invocations of 1 rank each, rendezvous on
    127.0.0.1, each "node" with its own output root: every node holds a complete checkpoint,
    and node 1's alone resumes (here on 1 rank) to the model node 0 exported."""
    import subprocess
    import sys
    from pathlib import Path


    port = str(free_port())
    torchrun = str(Path(sys.executable).parent / "torchrun")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}  # as launch_utils.launch: one thread per rank
    procs = [
        subprocess.Popen([torchrun, "--nnodes", "2", "--node_rank", str(rank), "--nproc_per_node", "1", "--master_addr", "127.0.0.1", "--master_port", port, "launch/train.py"]
                         + [str(a) for a in QUICK + ["--output_dir", tmp_path / f"node{rank}" / "run"]], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for rank in (0, 1)
    ]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outputs[0][-3000:] + outputs[1][-3000:]
    node0, node1 = (tmp_path / f"node{rank}" / "run" for rank in (0, 1))
    check_run(node0, json.loads((deepspeed_run / "summary.json").read_text()))
    tag = (node0 / "checkpoints" / "latest").read_text()
    assert (node1 / "checkpoints" / "latest").read_text() == tag == "retune-2"
    for name in ("trainable.safetensors", "masks.safetensors", "state.json"):
        assert (node1 / "checkpoints" / tag / name).read_bytes() == (node0 / "checkpoints" / tag / name).read_bytes(), name
    # Node 1's copy alone: resume on one rank (same global batch) and export.
    shutil.rmtree(node0.parent)
    run_launcher("deepspeed", "launch/train.py", QUICK + ["--micro_batch_size", 8, "--output_dir", node1, "--resume"], nproc=1)
    plain = evaluate_folder(str(node1 / "export" / "merged"), str(node1 / "data" / "eval.txt"), "lm")
    reference = json.loads((deepspeed_run / "summary.json").read_text())["after"]["eval_loss"]
    assert plain["eval_loss"] == pytest.approx(reference, rel=1e-4)


def test_hf_trainer_with_apply_dsee_under_zero3(tmp_path):
    """The documented Trainer example: real MiniLM, SST-2 rows, 2 ranks; the merged export
    reloads in a plain process and classifies the dev rows exactly as the Trainer did."""
    import torch
    from conftest import SHARED_DATA, minilm_dir
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    train, dev = tmp_path / "train.tsv", tmp_path / "dev.tsv"
    train.write_text("".join((SHARED_DATA / "sst2" / "train.tsv").read_text().splitlines(keepends=True)[:129]))
    dev.write_text("".join((SHARED_DATA / "sst2" / "test.tsv").read_text().splitlines(keepends=True)[:49]))
    out, port = tmp_path / "out", str(free_port())
    run_launcher("ranks", "launch/hf_trainer_example.py", ["--model", minilm_dir(), "--train_file", train, "--eval_file", dev, "--output_dir", out, "--max_steps", 4],
                 env={"MASTER_PORT": port})
    assert not glob.glob(f"/dev/shm/deepspeed_*_{port}_*")  # DeepSpeed's CPU collectives' buffers (69 MB each, RAM) are gone
    result = json.loads((out / "result.json").read_text())
    assert result["world_size"] == 2
    assert result["trainable"] == 6 * 2 * (8 * (384 + 384) + 64) + 384 * 2 + 2
    model = AutoModelForSequenceClassification.from_pretrained(out / "merged").eval()
    tokenizer = AutoTokenizer.from_pretrained(out / "merged")
    rows = [line.split("\t") for line in dev.read_text().splitlines()[1:]]
    with torch.no_grad():
        enc = tokenizer([r[0] for r in rows], truncation=True, max_length=64, padding=True, return_tensors="pt")
        predictions = model(**enc).logits.argmax(-1)
    accuracy = (predictions == torch.tensor([int(r[1]) for r in rows])).float().mean().item()
    assert accuracy == pytest.approx(result["accuracy"], abs=1e-6)


def test_every_ds_config_drives_an_engine(tmp_path):
    run_launcher("ranks", RANKS / "ds_configs.py", [tmp_path])
    results = json.loads((tmp_path / "results.json").read_text())
    assert set(results) == {p.name for p in (ROOT / "ds_configs").glob("*.json")}
    for name, result in results.items():
        assert all(l == l and l < 10 for l in result["losses"]), name  # finite
        assert not result["bf16"], name  # forced to fp32 on CPU
        assert not result["imported_muon"], name  # engine.create_engine keeps DeepSpeed's Muon (and its compile) out


# Registered before init_distributed, so atexit runs it after init_distributed's own handler.
EXIT_PROBE = """import atexit, sys, torch.distributed
atexit.register(lambda: print("process group alive at exit:", torch.distributed.is_initialized(), flush=True))
from dsee_scale.engine import init_distributed
init_distributed()
if sys.argv[1] == "raise":
    raise RuntimeError("this rank failed")
"""


@pytest.mark.parametrize("ending, alive", [("return", False), ("raise", True)])
def test_a_clean_exit_ends_the_process_group_a_failed_one_leaves_it(ending, alive):
    """engine.end_process_group_at_exit; the failed rank may still abort at exit (-6), so only
    its failure is asserted."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_SIZE": "1",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    proc = subprocess.run([sys.executable, "-c", EXIT_PROBE, ending], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert (proc.returncode != 0) == alive, proc.stdout + proc.stderr
    assert f"process group alive at exit: {alive}" in proc.stdout


# `make demo`'s run (the built-in default: tiny LLaMA, SentencePiece, every stage), fewer steps.
DEMO = ["--steps", 4, "--retune_steps", 2, "--gen_samples", 2, "--gen_max_new_tokens", 4, "--save_every", 0, "--log_every", 2]


def check_demo_output(output: str, folder) -> dict:
    """A finished default run: adapters in fp32 whatever the host; no progress bar in a log."""
    import torch
    from safetensors.torch import load_file

    summary = json.loads((folder / "summary.json").read_text())
    assert summary["sparsity"] == 0.5 and "bleu" in summary["after"]
    adapter = load_file(str(folder / "export" / "adapter" / "dsee_adapter.safetensors"))
    assert {t.dtype for t in adapter.values() if t.is_floating_point()} == {torch.float32}
    assert not progress_bar_in(output)  # not a terminal: no progress bar, one log line per --log_every steps
    assert output.count("dsee_scale: retune step") == 1
    return summary


def test_default_recipe_on_both_kinds_of_host_twice_continues_then_replaces(tmp_path):
    """`make demo`'s run, fewer steps: where DeepSpeed reports fp16 support (Intel) and where it
    does not (AMD EPYC). Run again after a crash, it continues; after a finished run, it starts
    over. Only the default folder (runs/default) is managed so; named folders need --resume or
    --overwrite. The three runs give the same losses bit for bit."""
    args = DEMO + ["--ds_config", ROOT / "ds_configs" / "zero3.json"]
    script = str(ROOT / "launch" / "train.py")
    folder = tmp_path / "runs" / "default"
    crashed = launch("ranks", script, args, cwd=tmp_path, host="fp16", env={"DSEE_FAULT_INJECT": "kill_during_save:retune-2"})
    assert crashed.returncode != 0 and (folder / "checkpoints" / "latest").read_text() == "prune-0"
    again = run_launcher("ranks", script, args, cwd=tmp_path, host="fp16")
    assert "holds an unfinished run of this configuration: continuing it" in again
    continued = check_demo_output(again, folder)
    assert len(continued["losses"]["tune"]) == 4 and len(continued["losses"]["retune"]) == 2
    third = run_launcher("ranks", script, args, cwd=tmp_path, host="no-fp16")
    assert "replacing the previous run in runs/default" in third
    assert check_demo_output(third, folder)["losses"] == continued["losses"]
    assert third.count("dsee_scale: tune step") == 2
