"""scripts/gpu_check.sh in its CPU mode: the GPU check's own steps (ZeRO-3 prune + export + plain
reload, structured BERT, a 2:4 export, tokens/s of three methods) on small models and 2 CPU ranks."""
import json
import os
import subprocess
import sys

from conftest import ROOT
from launch_utils import free_port


def gpu_check_cpu_mode(out) -> subprocess.CompletedProcess:
    env = {**os.environ, "PY": sys.executable, "MASTER_PORT": str(free_port())}
    return subprocess.run(["bash", "scripts/gpu_check.sh", "--cpu", "--out", str(out)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)


def test_gpu_check_cpu_mode_runs_every_check_and_reloads_exports_exactly(tmp_path):
    proc = gpu_check_cpu_mode(tmp_path)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    checks = {line["check"]: line for line in map(json.loads, (tmp_path / "gpu_check.jsonl").read_text().splitlines())}
    assert set(checks) == {"gpt2_prune50_export_reload", "bert_structured_export_reload", "gpt2_2of4_export_reload", "speed"}
    gpt2, bert, speed = checks["gpt2_prune50_export_reload"], checks["bert_structured_export_reload"], checks["speed"]
    assert gpt2["reload_ok"] and gpt2["max_abs_logit_diff"] <= 1e-5 and gpt2["sparsity"] == gpt2["final_sparsity"] == 0.5
    nm = checks["gpt2_2of4_export_reload"]
    assert nm["reload_ok"] and nm["max_abs_logit_diff"] <= 1e-5 and nm["all_2of4"] and nm["matrices"] == 16  # 4 blocks × (c_attn, attn c_proj, c_fc, mlp c_proj)
    assert bert["reload_ok"] and bert["max_abs_logit_diff"] <= 1e-5 and bert["flops_saved"] > 0.1
    assert min(bert["structured"]["heads"]) < 4  # heads were removed
    assert all(speed[f"{m}_tokens_per_s"] > 0 for m in ("full", "peft_lora", "dsee"))
