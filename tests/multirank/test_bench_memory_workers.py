"""benchmarks/memory_worker.py, bench_memory.py's worker: the peer row, DeepSpeed's OptimizedLinear
LoRA beside DSEE, same model, same targets, bf16, on 2 real ranks; the options it needs; the
floor's engine settings, one plain process."""
import json
import os
import subprocess
import sys

import pytest
from conftest import ROOT
from launch_utils import run_launcher


def test_optimized_linear_row_shards_the_targets_and_trains_the_same_lora_as_dsee(tmp_path):
    # small-llama: 2 layers of LLaMA's shape; bf16 is emulated where the CPU lacks it (slow, correct)
    out = tmp_path / "rows.jsonl"
    size = ["--model", "small-llama", "--seq", "16", "--batch", "2", "--steps", "1", "--warmup", "1", "--bf16", "--out", out]
    for method in ("optimized_linear", "dsee"):  # the workers of PEER_METHODS (dsee_layer_hooks is dsee with a flag)
        run_launcher("ranks", "benchmarks/memory_worker.py", ["--method", method, *size])
    rows = {row["method"]: row for row in map(json.loads, out.read_text().splitlines())}
    peer, dsee = rows["optimized_linear"], rows["dsee"]
    layers, width, rank = 2, 768, 16
    assert peer["trainable_params"] == layers * 2 * rank * (width + width)  # A and B of q and v, nothing else
    assert dsee["trainable_params"] - peer["trainable_params"] == layers * 2 * 64  # DSEE adds S's 64 entries per matrix
    assert dsee["params"] - peer["params"] == layers * 2 * 64  # the whole model counted, sharded weights too
    assert peer["reductions_mb_per_step"] > 0 and peer["reduce_scatter_mb_per_step"] == 0  # ZeRO-2 all-reduces its gradients
    # each forward gathers the q and v weights from their halves: bf16, sent by each rank
    assert peer["all_gather_mb_per_step"] >= layers * 2 * width * width * 2 / 2 / 2**20
    assert all(row["bf16"] and row["s_per_step"] > 0 for row in (peer, dsee))
    # PSS splits shared pages (DSEE's frozen weights in /dev/shm, libraries) between the ranks
    assert all(0 < pss < rss for row in (peer, dsee) for pss, rss in zip(row["peak_pss_mb_per_rank"], row["peak_rss_mb_per_rank"]))
    assert peer["shared_frozen_weights"] == 0 and dsee["shared_frozen_weights"] == layers * 7 + 2  # ZeRO-2 partitions nothing; every frozen matrix and both embeddings
    # the shipped engine configs, and ZeRO-3 hooking each block whole (leaf modules)
    assert (peer["ds_config"], dsee["ds_config"]) == ("ds_configs/zero2.json", "ds_configs/zero3.json")
    assert (peer["z3_leaf_modules"], dsee["z3_leaf_modules"]) == (0, layers)
    assert peer["gradient_clipping"] == dsee["gradient_clipping"] == 1.0


@pytest.mark.parametrize("flags", [["--model", "small-llama"], ["--model", "gpt2-medium", "--bf16"]])
def test_optimized_linear_needs_bf16_and_a_llama_model(tmp_path, flags):
    proc = subprocess.run([sys.executable, "benchmarks/memory_worker.py", "--method", "optimized_linear", *flags, "--out", tmp_path / "x"],
                          cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 1 and "needs --bf16 and a LLaMA model" in proc.stderr


def test_the_floor_clips_as_the_shipped_config_says_wherever_it_is_started(tmp_path):
    # one plain process, started outside the repository: the default config is found from its root
    out = tmp_path / "floor.jsonl"
    proc = subprocess.run([sys.executable, ROOT / "benchmarks" / "memory_worker.py", "--method", "floor", "--model", "tiny", "--seq", "16", "--batch", "2",
                           "--steps", "1", "--warmup", "1", "--rank", "4", "--out", out],
                          cwd=tmp_path, env={**os.environ, "RANK": "0", "WORLD_SIZE": "1", "PYTHONPATH": str(ROOT)}, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    row = json.loads(out.read_text())
    assert (row["method"], row["ds_config"], row["gradient_clipping"]) == ("floor", "ds_configs/zero3.json", 1.0)
    assert row["s_per_step"] > 0 and 0 < row["trainable_params"] < row["params"]
