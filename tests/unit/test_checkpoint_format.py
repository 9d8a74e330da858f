"""A checkpoint whose state.json another dsee_scale version wrote is refused with one message
that says to start over, before any heavy work (not a KeyError mid-set-up)."""
import json

import pytest

from dsee_scale import checkpoint
from dsee_scale.config import TrainConfig
from dsee_scale.ds_config import ConfigError
from dsee_scale.validate import check_resumable


def write_checkpoint(folder, state: dict) -> None:
    (folder / "tune-2").mkdir(parents=True)
    (folder / "tune-2" / checkpoint.STATE).write_text(json.dumps(state))
    (folder / checkpoint.LATEST).write_text("tune-2")


def test_a_checkpoint_of_another_format_is_refused_before_launch(tmp_path):
    write_checkpoint(tmp_path / "checkpoints", {"done": {"stage": "tune", "step": 2}, "run": {"model": "builtin:tiny-llama"}})  # format 1
    cfg = TrainConfig(output_dir=str(tmp_path), resume=True)
    with pytest.raises(ConfigError, match=r"written by another dsee_scale version \(checkpoint format 1, this one reads 2\); start again with --overwrite"):
        check_resumable(cfg, {"train_batch_size": 8})
    with pytest.raises(checkpoint.CheckpointError, match="cannot be resumed"):
        checkpoint.load_latest(tmp_path / "checkpoints")


def test_a_checkpoint_of_this_format_is_compared_by_identity(tmp_path):
    from dsee_scale.run_folder import run_identity

    cfg = TrainConfig(output_dir=str(tmp_path), resume=True)
    write_checkpoint(tmp_path / "checkpoints", {"format": checkpoint.FORMAT, "identity": {**run_identity(cfg, {"train_batch_size": 8}), "seed": 1}})
    with pytest.raises(ConfigError, match="is of another run: seed: checkpoint 1, now 42"):
        check_resumable(cfg, {"train_batch_size": 8})
