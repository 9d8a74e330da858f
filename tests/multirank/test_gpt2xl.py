"""GPT-2-XL on this box and a GPT-2-small 2-node run over loopback (slow: `pytest -m slow`)."""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT
from launch_utils import free_port, run_launcher

pytestmark = pytest.mark.slow


def test_gpt2xl_builds_tunes_prunes_and_saves_within_20gib_and_30min(tmp_path):
    tic = time.time()
    out = tmp_path / "results.jsonl"
    proc = subprocess.run([sys.executable, "benchmarks/bench_gpt2xl.py", "--out", str(out), "--output_dir", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    line = json.loads(out.read_text().splitlines()[-1])
    assert line["params"] > 1.5e9 and line["world_size"] == 2
    assert line["total_rss_gib"] < 20
    assert line["sparsity"] == 0.5 and line["adapter_ckpt_bytes"] < 0.01 * 4 * line["params"]
    assert time.time() - tic < 1800


MULTINODE = ["--config", "launch/recipes/gpt2-e2e.yaml", "--steps", 3, "--retune_steps", 1, "--max_train_samples", 64, "--max_eval_samples", 8,
             "--stages", "tune,prune,retune", "--micro_batch_size", 2, "--save_every", 0]


def test_two_simulated_nodes_equal_one_node_with_two_ranks(tmp_path):
    single = tmp_path / "single"
    run_launcher("deepspeed", "launch/train.py", MULTINODE + ["--output_dir", single], timeout=1200)
    port, nodes = str(free_port()), tmp_path / "nodes"
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("localhost slots=1\n127.0.0.1 slots=1\n")
    deepspeed = str(Path(sys.executable).parent / "deepspeed")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}  # as launch_utils.launch: one thread per rank
    procs = [
        subprocess.Popen([deepspeed, "--hostfile", str(hostfile), "--no_ssh", "--node_rank", str(rank), "--master_addr", "127.0.0.1", "--master_port", port, "launch/train.py"]
                         + [str(a) for a in MULTINODE + ["--output_dir", nodes]], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for rank in (0, 1)
    ]
    outputs = [p.communicate(timeout=1200)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outputs[0][-3000:] + outputs[1][-3000:]
    assert json.loads((nodes / "summary.json").read_text())["losses"] == json.loads((single / "summary.json").read_text())["losses"]
