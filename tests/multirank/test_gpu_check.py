"""scripts/gpu_check.sh in its CPU mode: the GPU check's own steps on tiny models and 2 CPU ranks
(the environment, the gpu tier's fp32 LLaMA tests, tiny LLaMA through every stage killed at a
re-tune checkpoint and resumed, both exports reloaded, tokens/s of four methods), and its GPU mode's
stop where DeepSpeed is not on CUDA."""
import json
import os
import subprocess
import sys

from conftest import ROOT


def gpu_check_cpu_mode(out) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "scripts/gpu_check.sh", "--cpu", "--out", str(out)], cwd=ROOT, env={**os.environ, "PY": sys.executable},
                          capture_output=True, text=True, timeout=900)


def test_gpu_check_cpu_mode_runs_every_step_and_each_passes(tmp_path):
    proc = gpu_check_cpu_mode(tmp_path)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    printed = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    steps = {line["step"]: line for line in map(json.loads, (tmp_path / "gpu_check.jsonl").read_text().splitlines())}
    assert list(steps) == ["environment", "equivalence", "pipeline", "speed"] and printed == list(steps.values())
    assert all(line["ok"] and line["mode"] == "cpu" and line["ranks"] == 2 for line in printed)
    assert steps["environment"]["accelerator"] == "cpu"
    assert steps["equivalence"]["passed"] == 3 and steps["equivalence"]["skipped"] == 0  # the fp32 LLaMA run's tests
    pipeline = steps["pipeline"]
    assert (pipeline["killed_writing"], pipeline["resumed_from"]) == ("retune-4", "retune-2")
    assert pipeline["losses_identical"] and len(pipeline["losses"]["retune"]) == 4  # resumed on CPU ranks: to the bit
    assert pipeline["sparsity"] == pipeline["final_sparsity"] == 0.5 and pipeline["generation"] == "whole" and pipeline["compressed_format"] == "sparse-bitmask"
    assert all(r["ok"] and r["max_abs_logit_diff"] <= 1e-5 for r in pipeline["reload"].values()) and set(pipeline["reload"]) == {"merged", "compressed"}
    speed = steps["speed"]
    assert set(speed["tokens_per_s"]) == {"dsee", "peft_lora", "optimized_linear", "full"} and all(v > 0 for v in speed["tokens_per_s"].values())
    trainable = speed["trainable_params"]
    assert trainable["dsee"] - trainable["peft_lora"] == 4 * 2 * 64  # the same LoRA budget; DSEE adds S's 64 entries per matrix (4 layers, q and v)
    assert speed["dsee_vs_peft_lora"] > 0 and speed["peak_device_mb"]["dsee"] is None


def test_gpu_mode_stops_after_the_environment_step_where_deepspeed_is_not_on_cuda(tmp_path):
    # this suite pins DeepSpeed's CPU accelerator (tests/conftest.py), on GPU hosts too
    proc = subprocess.run(["bash", "scripts/gpu_check.sh", "--out", str(tmp_path)], cwd=ROOT, env={**os.environ, "PY": sys.executable},
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, (proc.stdout + proc.stderr)[-3000:]
    (line,) = map(json.loads, (tmp_path / "gpu_check.jsonl").read_text().splitlines())
    assert (line["step"], line["ok"], line["mode"]) == ("environment", False, "gpu")
    assert "DeepSpeed's accelerator is 'cpu', not 'cuda'" in line["error"] and "DS_ACCELERATOR=cuda" in line["error"]
