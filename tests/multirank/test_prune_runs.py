"""Exact pruning on 2 ZeRO-3 ranks (the masks of one process, zeros kept through re-tuning and
reload) and the shipped recipe's 2:4 run, one process."""
import json

import pytest
import torch
from conftest import tiny_model
from launch_utils import RANKS, one_process, run_launcher

from helpers.prune_reference import check_prune_tiny_results


@pytest.mark.parametrize("kind, task", [("gpt2", "lm"), ("bert", "cls")])
def test_two_rank_zero3_masks_equal_single_process(kind, task, tmp_path):
    base = tmp_path / "base"
    tiny_model(kind, task).save_pretrained(base)
    run_launcher("ranks", RANKS / "prune_tiny.py", ["--base", base, "--task", task, "--out", tmp_path])
    check_prune_tiny_results(torch.load(tmp_path / "masks.pt", weights_only=True), base, task)


def test_pruned_entries_stay_zero_through_retuning_and_reload(tmp_path):
    base = tmp_path / "base"
    tiny_model("gpt2").save_pretrained(base)
    run_launcher("ranks", RANKS / "prune_tiny.py", ["--base", base, "--out", tmp_path / "a", "--retune", 20])
    run_launcher("ranks", RANKS / "prune_tiny.py", ["--base", base, "--out", tmp_path / "b", "--resume", tmp_path / "a" / "ckpt"])
    for run in ("a", "b"):
        for rank in range(2):
            report = json.loads((tmp_path / run / f"retune_rank{rank}.json").read_text())
            assert report["still_zero"] and report["pruned_local"] > 0
            assert report["sparsity"] == 0.5


def test_recipe_with_a_2_4_pattern_exports_a_2_4_sparse_model_with_the_runs_metric(tmp_path):
    """The shipped recipe, one process: 2:4 pruning, sparsity-preserving re-tune, exact merge."""
    from safetensors.torch import load_file

    from dsee_scale.evaluate import evaluate_folder
    from dsee_scale.semistructured import is_nm_sparse

    run = tmp_path / "run"
    proc = one_process(["--model", "builtin:tiny-gpt2", "--steps", 4, "--retune_steps", 3, "--micro_batch_size", 4, "--save_every", 0,
                        "--gen_samples", 2, "--gen_max_new_tokens", 2, "--prune.pattern", "2:4", "--output_dir", run])
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["sparsity"] == summary["final_sparsity"] == 0.5  # merging kept every zero
    weights = load_file(str(run / "export" / "merged" / "model.safetensors"))
    pruned = [n for n in weights if ".h." in n and n.endswith("weight") and weights[n].dim() == 2]
    assert any("c_attn" in n for n in pruned)  # the adapted matrices too
    for name in pruned:
        assert is_nm_sparse(weights[name], 2, 4, dim=0), name  # Conv1D: (in, out)
    plain = evaluate_folder(str(run / "export" / "merged"), str(run / "data" / "eval.txt"), "lm")
    assert plain["eval_loss"] == pytest.approx(summary["after"]["eval_loss"], rel=1e-5)
