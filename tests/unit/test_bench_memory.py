"""benchmarks/bench_memory.py in this process, its launches stubbed: the refusal to time bf16
emulation or on a GPU machine, how launches are repeated, interleaved and combined into rows
(its workers on real ranks: tests/multirank/test_bench_memory_workers.py)."""
import json
import sys

import bench_memory
import pytest
import torch


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
