"""GLUE's raw files end to end (issue #18): a 2-rank run of each format through launch/train.py
and its recipe, the gathered metrics equal to a plain evaluation of the export."""
import json
import math

import pytest
from conftest import RECIPES
from launch_utils import progress_bar_in, run_launcher

from dsee_scale.evaluate import evaluate_folder
from helpers.glue import FORMATS, TINY, recipe_config

# Structured pruning scored by gradients on STS-B: the calibration loss is the regression's MSE.
STRUCTURED = ["--prune.heads", 0.25, "--prune.structured_score", "gradient", "--prune.calibration_batches", 2]
METRIC_KEYS = {"cola": {"mcc", "accuracy"}, "mrpc": {"accuracy", "f1"}, "rte": {"accuracy"}, "stsb": {"eval_loss", "pearson", "spearman"}}
RANGES = {"accuracy": (0, 1), "f1": (0, 1), "mcc": (-1, 1), "pearson": (-1, 1), "spearman": (-1, 1), "eval_loss": (0, math.inf)}


@pytest.mark.parametrize("task", FORMATS)
def test_two_ranks_run_each_glue_format_end_to_end(task, tmp_path):
    """The recipe's data settings, a tiny BERT and a slice of the data through every stage on 2
    ZeRO-3 ranks. 15 evaluation rows over 2 ranks of micro-batch 4: rank 1 pads its share with a
    filler row; the gathered metrics equal a plain single-process evaluation of the export, so
    every row was counted once. Its output, not a terminal's, has no progress bar."""
    out = tmp_path / "run"
    flags = ["--config", RECIPES / f"glue-{task}.yaml", *TINY, "--steps", 2, "--retune_steps", 1, "--warmup_steps", 0, "--max_train_samples", 16,
             "--max_eval_samples", 15, "--max_length", 32, "--micro_batch_size", 4, "--stages", "tune,prune,retune,export,evaluate",
             "--output_dir", out, *(STRUCTURED if task == "stsb" else [])]
    output = run_launcher("ranks", "launch/train.py", flags, env={"HF_DATASETS_CACHE": str(tmp_path / "datasets")})  # read and tokenized afresh
    assert not progress_bar_in(output)  # a log, not a terminal: no progress bar, the libraries' (reading, tokenizing, loading) included
    summary = json.loads((out / "summary.json").read_text())
    cfg = recipe_config(task, *flags[2:])
    for when in ("before", "after"):
        assert set(summary[when]) == METRIC_KEYS[task], when
        for key, value in summary[when].items():
            low, high = RANGES[key]
            assert math.isfinite(value) and low <= value <= high, (when, key, value)
    plain = evaluate_folder(str(out / "export" / "merged"), cfg.eval_file, cfg.task, text_column=cfg.text_column, text_pair_column=cfg.text_pair_column,
                            label_column=cfg.label_column, header=cfg.header, metric=cfg.metric, max_length=32, max_eval_samples=15)
    assert plain == pytest.approx(summary["after"], abs=1e-5)
