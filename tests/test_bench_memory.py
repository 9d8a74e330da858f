"""benchmarks/bench_memory.py's peer row: DeepSpeed's OptimizedLinear LoRA beside DSEE, same model,
same targets, bf16 (memory_worker.py on 2 real ranks), and the refusal to time bf16 emulation; the
floor's engine settings."""
import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import ROOT
from launch_utils import run_launcher

sys.path.insert(0, str(ROOT / "benchmarks"))
import bench_memory  # noqa: E402


@pytest.mark.parametrize("avx512_bf16, amx, native", [(True, False, True), (False, True, True), (False, False, False)])
def test_bf16_counts_as_native_only_with_avx512_bf16_or_amx(monkeypatch, avx512_bf16, amx, native):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    assert bench_memory.native_bf16_cpu() == native
    if not native:
        monkeypatch.setattr(sys, "argv", ["bench_memory.py", "--model", "medium-llama"])
        with pytest.raises(SystemExit, match="no AVX-512 bf16 or AMX"):
            bench_memory.main()


def test_the_peer_row_is_refused_on_a_gpu_machine(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(sys, "argv", ["bench_memory.py", "--model", "medium-llama"])
    with pytest.raises(SystemExit, match="compares host memory and CPU time"):
        bench_memory.main()


@pytest.mark.multiproc
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


def test_a_method_row_reports_its_median_launch_and_highest_peaks():
    launches = [{"method": "dsee", "s_per_step": s, "sys_s_per_step_per_rank": [s / 4, s / 4], "peak_rss_mb_per_rank": rss, "peak_pss_mb_per_rank": pss}
                for s, rss, pss in [(4.8, [10, 12], [5, 6]), (4.2, [11, 9], [7, 4]), (4.5, [9, 9], [5, 5]), (4.6, [9, 9], [5, 5])]]
    row = bench_memory.combine(launches[:3])
    assert row["s_per_step"] == 4.5 and row["s_per_step_launches"] == [4.8, 4.2, 4.5]
    assert row["sys_s_per_step_per_rank"] == [4.5 / 4, 4.5 / 4]  # every figure of one launch, the median one
    assert row["peak_rss_mb_per_rank"] == [11, 12] and row["peak_pss_mb_per_rank"] == [7, 6]
    assert bench_memory.combine(launches)["s_per_step"] == 4.5  # an even count: the lower middle launch, not an average


def test_repeats_interleave_the_launches_and_every_row_shares_the_run(monkeypatch, tmp_path):
    order = []

    def line(method: str, s: float) -> dict:
        order.append(method)
        return {"method": method, "world_size": 2, "micro_batch": 2, "seq": 32, "s_per_step": s,
                "peak_rss_mb_per_rank": [100.0, 100.0], "peak_pss_mb_per_rank": [50.0, 50.0]}

    monkeypatch.setattr(bench_memory, "launch", lambda method, size, env, port, profile: line(method, 2.0 + len(order) / 100))
    monkeypatch.setattr(bench_memory, "floor", lambda size, env, profile: line("floor", 1.0 + len(order) / 100))
    out = tmp_path / "memory.jsonl"
    monkeypatch.setattr(sys, "argv", ["bench_memory.py", "--quick", "--repeats", "3", "--out", str(out)])
    bench_memory.main()
    rows = [*bench_memory.METHODS, "floor"]
    assert order == rows * 3
    lines = {line["method"]: line for line in map(json.loads, out.read_text().splitlines())}
    assert list(lines) == rows and len({line["run_id"] for line in lines.values()}) == 1
    assert all(len(line["s_per_step_launches"]) == 3 for line in lines.values())
    assert lines["dsee"]["s_per_step"] == lines["dsee"]["s_per_step_launches"][1]  # launches 3, 9, 15: times rise through the run
    assert lines["dsee"]["s_per_step_vs_floor"] == round(lines["dsee"]["s_per_step"] / lines["floor"]["s_per_step"], 3)


@pytest.mark.parametrize("flags", [["--repeats", "0"], ["--repeats", "2", "--profile", "p"]])
def test_repeats_must_be_positive_and_single_when_profiling(monkeypatch, flags):
    monkeypatch.setattr(sys, "argv", ["bench_memory.py", "--quick", *flags])
    with pytest.raises(SystemExit):
        bench_memory.main()


def test_methods_choose_the_rows_and_dsee_and_the_floor_always_run(monkeypatch, tmp_path):
    order = []
    monkeypatch.setattr(bench_memory, "launch", lambda method, size, env, port, profile: order.append(method) or
                        {"method": method, "world_size": 2, "micro_batch": 2, "seq": 32, "s_per_step": 2.0, "peak_rss_mb_per_rank": [1.0, 1.0], "peak_pss_mb_per_rank": [1.0, 1.0]})
    monkeypatch.setattr(bench_memory, "floor", lambda size, env, profile: order.append("floor") or
                        {"method": "floor", "s_per_step": 1.6, "peak_rss_mb_per_rank": [1.0, 1.0], "peak_pss_mb_per_rank": [1.0, 1.0]})
    monkeypatch.setattr(sys, "argv", ["bench_memory.py", "--quick", "--methods", "dsee_gathered", "--repeats", "2", "--out", str(tmp_path / "m.jsonl")])
    bench_memory.main()
    assert order == ["dsee", "dsee_gathered", "floor"] * 2
    lines = [json.loads(line) for line in (tmp_path / "m.jsonl").read_text().splitlines()]
    assert [line["s_per_step_vs_floor"] for line in lines] == [1.25, 1.25, 1.0] and not any("peak_vs_peft_lora" in line for line in lines)
    monkeypatch.setattr(sys, "argv", ["bench_memory.py", "--quick", "--methods", "optimized_linear"])
    with pytest.raises(SystemExit):
        bench_memory.main()
