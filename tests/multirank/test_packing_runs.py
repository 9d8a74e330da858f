"""--packing through whole training runs: 2 ranks train as 1 process with accumulation does, loss
for loss, on a GPT-2 with dropout on (row-keyed per packed window, its attention through the
row-dropout attention and the windows' block-diagonal masks); the summary counts the windows and
the real tokens per second."""
import json
import random

import pytest
from launch_utils import one_process, run_launcher, tail_per_rank

from dsee_scale.data import generate_corpus

FLAGS = ["--model", "builtin:tiny-gpt2", "--packing", "--max_length", 256, "--stages", "tune", "--steps", 3, "--save_every", 0, "--log_every", 1, "--lr", 0.01]


def write_rows(path, n: int) -> str:
    """prompt_completion rows of varied length (55 to 155 tokens of the built-in tokenizer): a
    restaurant's name and one to three sentences."""
    rng = random.Random(0)
    pairs = generate_corpus(4 * n, seed=0)
    rows = [{"prompt": pairs[i][0].split(" | ")[0] + " ->", "completion": " " + " ".join(t for _, t in pairs[i : i + rng.randrange(1, 4)])} for i in range(0, 4 * n, 4)]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def test_a_packed_run_on_two_ranks_equals_one_process(tmp_path):
    data = write_rows(tmp_path / "rows.jsonl", 48)
    flags = FLAGS + ["--train_file", data, "--eval_file", data]
    run_launcher("ranks", "launch/train.py", flags + ["--micro_batch_size", 2, "--grad_accum", 1, "--output_dir", tmp_path / "two"])
    proc = one_process(flags + ["--micro_batch_size", 2, "--grad_accum", 2, "--output_dir", tmp_path / "one"])
    assert proc.returncode == 0, tail_per_rank(proc.stdout + proc.stderr, 6000)
    assert "packing: 48 training rows in" in proc.stderr and "tokens/s" in proc.stderr
    two, one = (json.loads((tmp_path / name / "summary.json").read_text()) for name in ("two", "one"))
    assert two["world_size"] == 2 and one["world_size"] == 1
    assert two["losses"]["tune"] == pytest.approx(one["losses"]["tune"], rel=1e-5)
    packed = one["data"]["train"]["packing"]
    assert packed == two["data"]["train"]["packing"] and 1 < packed["windows"] < 48 / 2 and packed["fill"] > 0.85
    assert one["timings"]["tune_tokens_per_s"] > 0 and two["timings"]["tune_tokens_per_s"] > 0
