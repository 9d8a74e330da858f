"""BLEU's generation under ZeRO-3 (issue #16): the model gathered whole on every rank, so each rank
generates alone, gives exactly the texts (and BLEU) of the synced per-layer path."""
import json

from launch_utils import run_launcher

FLAGS = ["--ds_config", "ds_configs/zero3.json", "--steps", 3, "--eval_every", 2, "--stages", "tune,evaluate", "--save_every", 0, "--gen_samples", 5,
         "--gen_max_new_tokens", 6, "--micro_batch_size", 4]


def test_whole_model_generation_equals_the_synced_path(tmp_path):
    """5 sources on 2 ranks: rank 1 has fewer, which the synced path must pad with extra
    generations; the gathered path does not. Generation at step 2 too: training goes on with
    ZeRO-3's hooks back, to the same losses."""
    summaries = {}
    for whole in ("true", "false"):
        out = tmp_path / whole
        run_launcher("ranks", "launch/train.py", [*FLAGS, "--gen_whole_model", whole, "--output_dir", out])
        summaries[whole] = json.loads((out / "summary.json").read_text())
    assert summaries["true"]["generation"] == "whole" and summaries["false"]["generation"] == "synced"
    assert summaries["true"]["after"]["bleu"] == summaries["false"]["after"]["bleu"]
    assert summaries["true"]["losses"] == summaries["false"]["losses"]
    assert all(s["timings"]["generation_tokens_per_s"] > 0 for s in summaries.values())
