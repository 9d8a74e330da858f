"""The LR each optimizer step used: transformers' schedule by name, per stage; a DeepSpeed
`scheduler` block is honoured instead when the config has one (one process, ZeRO-3)."""
import json

import pytest
import torch
from conftest import ROOT
from launch_utils import one_process

STEPS, RETUNE, LR = 6, 4, 0.01
ARGS = ["--model", "builtin:tiny-gpt2", "--steps", STEPS, "--retune_steps", RETUNE, "--lr", LR, "--micro_batch_size", 4, "--log_every", 1,
        "--save_every", 0, "--stages", "tune,prune,retune", "--prune.sparsity", 0.5]


def logged_lrs(tmp_path, ds_config: dict, *flags) -> dict[str, list[float]]:
    config = tmp_path / "ds.json"
    config.write_text(json.dumps(ds_config))
    out = tmp_path / "run"
    proc = one_process(["--ds_config", config, "--output_dir", out, *ARGS, *flags])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lrs: dict[str, list[float]] = {}
    for record in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()):
        if "lr" in record:
            lrs.setdefault(record["stage"], []).append(record["lr"])
    return lrs


def replay(make_schedule, steps: int) -> list[float]:
    """The LR at each step of a schedule driven on its own, as the engine drives it."""
    optimizer = torch.optim.AdamW([torch.zeros(1, requires_grad=True)], lr=LR)
    schedule = make_schedule(optimizer)
    lrs = []
    for _ in range(steps):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    return lrs


@pytest.fixture
def zero3() -> dict:
    return json.loads((ROOT / "ds_configs" / "zero3.json").read_text())


def test_each_stage_follows_the_named_transformers_schedule(tmp_path, zero3):
    from transformers import get_scheduler

    lrs = logged_lrs(tmp_path, zero3, "--lr_scheduler", "cosine", "--warmup_steps", 2)
    for stage, steps in (("tune", STEPS), ("retune", RETUNE)):
        expected = replay(lambda opt: get_scheduler("cosine", opt, num_warmup_steps=2, num_training_steps=steps), steps)
        assert lrs[stage] == pytest.approx(expected, abs=1e-12), stage
    assert lrs["tune"][0] == 0.0 and max(lrs["tune"]) == pytest.approx(LR)  # warm-up as given, not capped


def test_a_deepspeed_scheduler_block_is_honoured(tmp_path, zero3):
    from deepspeed.runtime.lr_schedules import WarmupLR

    params = {"warmup_min_lr": 0.0, "warmup_max_lr": 0.003, "warmup_num_steps": 3, "warmup_type": "linear"}
    lrs = logged_lrs(tmp_path, {**zero3, "scheduler": {"type": "WarmupLR", "params": params}})
    # The engine owns this schedule for the whole run: re-tuning continues where tuning stopped.
    expected = replay(lambda opt: WarmupLR(opt, **params), STEPS + RETUNE)
    assert lrs["tune"] + lrs["retune"] == pytest.approx(expected, abs=1e-12)
    assert max(expected) == pytest.approx(0.003)
