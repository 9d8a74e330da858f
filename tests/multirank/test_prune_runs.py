"""Exact pruning on 2 ZeRO-3 ranks (the masks of one process, zeros kept through re-tuning and
reload) and the shipped recipe's 2:4 run, one process."""
import json

import pytest
import torch
from conftest import tiny_model
from launch_utils import RANKS, one_process, run_launcher

from dsee_scale import apply_dsee
from dsee_scale.prune import prune_targets
from helpers.prune_reference import DEFAULTS, DSEE, recorded_input_norms, reference_masks, reference_nm_masks


@pytest.mark.parametrize("kind, task", [("gpt2", "lm"), ("bert", "cls")])
def test_two_rank_zero3_masks_equal_single_process(kind, task, tmp_path):
    base = tmp_path / "base"
    tiny_model(kind, task).save_pretrained(base)
    run_launcher("ranks", RANKS / "prune_tiny.py", ["--base", base, "--task", task, "--out", tmp_path])
    results = torch.load(tmp_path / "masks.pt", weights_only=True)
    from dsee_scale.models import build_model
    from dsee_scale.prune import prune_nm

    reconstructed = results.pop("reconstruct")  # 2:4 + reconstruction: the same weights as one process on all the batches
    model = apply_dsee(build_model(base, task), DSEE).eval()
    batches = [{k: v for k, v in b.items() if k != "labels"} for b in reconstructed["calibration"]]
    prune_nm(model, "2:4", score="activation", calibration=(batches, lambda batch: model(**batch)), reconstruct=True)
    for t in prune_targets(model, DEFAULTS.include, DEFAULTS.exclude):
        torch.testing.assert_close(reconstructed["weights"][t.name], t.param.detach(), rtol=1e-4, atol=1e-5, msg=t.name)

    for key, got in results.items():
        scope, score, sparsity = key.split("-")
        model = apply_dsee(build_model(base, task), DSEE)
        norms = got.get("norms")
        if norms:  # the ranks' all-reduced norms: those of the whole calibration batch in one process
            single = recorded_input_norms(model.eval(), [{k: v for k, v in b.items() if k != "labels"} for b in got["calibration"]])
            for name, norm in norms.items():
                torch.testing.assert_close(norm, single[name], rtol=1e-5, atol=1e-6)
        expected = reference_nm_masks(model, 2, 4, score, norms) if scope == "pattern" else reference_masks(model, float(sparsity), scope, score, norms)
        assert set(got["masks"]) == set(expected)
        for name, mask in got["masks"].items():
            assert torch.equal(mask, expected[name]), (key, name)
        if scope == "global":
            assert got["zeros"] == round(float(sparsity) * got["numel"])
        if scope == "pattern":
            assert got["zeros"] * 2 == got["numel"]


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
