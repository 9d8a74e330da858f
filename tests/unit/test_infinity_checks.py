"""ZeRO-Infinity's checks before launch (issue #20): an NVMe swap buffer too small, a swap folder
not writable, structured pruning with the backbone on NVMe; DeepSpeed's CPU ops built in by
`make setup` (the 2-rank runs on NVMe: tests/multirank/test_infinity.py)."""
import json
import shutil

import pytest
from dsee_scale.cli import main

from helpers.nvme import nvme_config


def test_nvme_offload_errors_are_named_before_launch(tmp_path, capsys):
    config = json.loads(open(nvme_config(tmp_path)).read())
    config["zero_optimization"]["offload_param"]["buffer_size"] = 1000
    small = tmp_path / "small.json"
    small.write_text(json.dumps(config))
    assert main(["--ds_config", str(small), "--model", "builtin:small-llama", "--output_dir", str(tmp_path / "a")]) == 2
    assert "offload_param.buffer_size 1,000 is smaller than this model's largest weight shard at 1 rank(s), 1,572,864 elements" in capsys.readouterr().err
    config["zero_optimization"]["offload_param"]["nvme_path"] = "/proc/no_such_place"
    small.write_text(json.dumps(config))
    assert main(["--ds_config", str(small), "--output_dir", str(tmp_path / "b")]) == 2
    assert "offload_param.nvme_path /proc/no_such_place is not a writable folder" in capsys.readouterr().err
    config["zero_optimization"]["offload_param"]["nvme_path"] = str(tmp_path / "nvme")
    small.write_text(json.dumps(config))
    assert main(["--ds_config", str(small), "--prune.heads", "0.25", "--output_dir", str(tmp_path / "c")]) == 2
    assert "structured pruning (prune.heads / prune.ffn) with the backbone on NVMe" in capsys.readouterr().err


@pytest.mark.skipif(shutil.which("nvidia-smi") is not None, reason="on a GPU machine make setup leaves DeepSpeed's CUDA ops to its JIT")
def test_deepspeeds_cpu_ops_are_built_in_not_compiled_during_a_run():
    """`make setup` compiles DeepSpeed's CPU ops into the package: JIT-compiling async_io on first
    use takes minutes inside a run, in a cache every other checkout rebuilds."""
    from deepspeed.git_version_info import installed_ops

    assert all(installed_ops.get(op) for op in ("cpu_adam", "deepspeed_shm_comm", "async_io", "pin_memory")), installed_ops
