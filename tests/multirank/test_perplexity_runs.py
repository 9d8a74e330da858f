"""--eval_perplexity through whole runs: the perplexity of a WikiText-2 excerpt before the first
stage and after each stage that changes the model, on 1 process and on 2 ZeRO-3 ranks (windows
split over the ranks, a filler window on one): the same figures; the export re-evaluated with
plain transformers (python -m dsee_scale.evaluate's path) gives the run's last one. The adapters are
DSEE's LoRA (--dsee.nnz 0: an empty S, which ZeRO-3 keeps no optimizer state for)."""
import json

import pytest
from conftest import SHARED_DATA
from launch_utils import one_process, run_launcher, tail_per_rank

from dsee_scale.evaluate import evaluate_folder

FLAGS = ["--model", "builtin:tiny-llama", "--max_length", 64, "--micro_batch_size", 2, "--stages", "tune,prune,retune,export,evaluate",
         "--steps", 2, "--retune_steps", 1, "--dsee.nnz", 0, "--warmup_steps", 0, "--save_every", 0, "--gen_samples", 2, "--gen_max_new_tokens", 2]


def test_perplexity_after_every_stage_does_not_depend_on_the_world_size(tmp_path):
    text = tmp_path / "wiki.txt"
    text.write_text("".join((SHARED_DATA / "wikitext2" / "test.txt").read_text(encoding="utf-8").splitlines(keepends=True)[:8]), encoding="utf-8")
    flags = FLAGS + ["--eval_perplexity", text]
    one = one_process(flags + ["--grad_accum", 2, "--output_dir", tmp_path / "one"])  # the global batch of 2 ranks: the same training
    assert one.returncode == 0, tail_per_rank(one.stdout + one.stderr, 6000)
    output = run_launcher("ranks", "launch/train.py", flags + ["--output_dir", tmp_path / "two"])
    alone, split = (json.loads((tmp_path / run / "summary.json").read_text())["perplexity"] for run in ("one", "two"))
    assert set(alone) == set(split) == {"file", "window", "windows", "before", "tune", "prune", "retune", "after"}
    assert alone["window"] == 64 and alone["windows"] == split["windows"] == 10  # 5 a rank: batches of 2, 2 and 1 with a filler
    assert split["before"] == pytest.approx(alone["before"], rel=1e-6)
    for stage in ("tune", "prune", "retune", "after"):  # trained on 1 or 2 ranks: the same to float rounding
        assert split[stage] == pytest.approx(alone[stage], rel=1e-5), stage
    assert alone["prune"] != alone["tune"]
    rank0, rank1 = output.split("--- rank 1 ---")
    assert rank0.count("perplexity of ") == 5 + 5 and "perplexity of " not in rank1  # logged, and in the summary table, by rank 0 alone
    metrics = [json.loads(line) for line in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    assert [m["tag"] for m in metrics if m["stage"] == "perplexity"] == ["before", "tune", "prune", "retune", "after"]
    plain = evaluate_folder(str(tmp_path / "two" / "export" / "merged"), None, perplexity_file=str(text), max_length=64)
    assert plain["text_perplexity"]["windows"] == split["windows"]
    assert plain["text_perplexity"]["perplexity"] == pytest.approx(split["after"], rel=1e-5)
