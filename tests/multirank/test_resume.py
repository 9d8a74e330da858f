"""Resume after SIGKILL, in every stage, on the same or another number of ranks: the run goes on
as if never stopped. Checkpoints hold only world-size-independent state (checkpoint.py).

The model is the built-in tiny LLaMA, which has no dropout: dropout masks are drawn per rank,
so with dropout another world size trains on other (equally random) masks. The unstructured runs
re-tune self-distilled (prune.distill, top-8 of 512 tokens): the teacher outputs the 2-rank run
kept before pruning are what a resume on 1, 2 or 3 ranks reads (distill.py)."""
import json
import shutil

import pytest
import torch
from launch_utils import launch, run_launcher

GLOBAL_BATCH = 6  # 6, 3 and 2 rows per rank on 1, 2 and 3 ranks
COMMON = ["--ds_config", "ds_configs/zero3.json", "--model", "builtin:tiny-llama", "--steps", 6, "--retune_steps", 4, "--save_every", 2,
          "--log_every", 1, "--stages", "tune,prune,retune,export", "--gen_samples", 2, "--gen_max_new_tokens", 2]
UNSTRUCTURED = ["--prune.sparsity", 0.5, "--prune.reconstruct", "true", "--prune.distill", "true", "--prune.distill_topk", 8]  # the re-fitted backbone must come back too
STRUCTURED = ["--prune.sparsity", 0.3, "--prune.heads", 0.25, "--prune.ffn", 0.25]


def ranks(n: int) -> list:
    """Flags that keep the global batch at GLOBAL_BATCH on n ranks."""
    return ["--micro_batch_size", GLOBAL_BATCH // n, "--grad_accum", 1]


def killed(out, flags: list, nproc: int, tag: str):
    """A run SIGKILLed while it writes checkpoint `tag`: `latest` names the one before."""
    proc = launch("ranks", "launch/train.py", flags + ranks(nproc) + ["--output_dir", out], nproc=nproc, env={"DSEE_FAULT_INJECT": f"kill_during_save:{tag}"})
    assert proc.returncode != 0 and not (out / "summary.json").exists(), proc.stdout[-2000:] + proc.stderr[-2000:]
    return out


def resumed(killed_run, copy, flags: list, nproc: int) -> dict:
    shutil.copytree(killed_run, copy)
    run_launcher("ranks", "launch/train.py", flags + ranks(nproc) + ["--output_dir", copy, "--resume"], nproc=nproc)
    return json.loads((copy / "summary.json").read_text())


def close(losses: dict, reference: dict) -> bool:
    """Same stages and steps, every loss within rounding of the reference (rtol 1e-5)."""
    return losses.keys() == reference.keys() and all(losses[k] == pytest.approx(reference[k], rel=1e-5) for k in reference)


def export_logits(run, task: str) -> torch.Tensor:
    from dsee_scale.models import TASK_MODELS

    model = TASK_MODELS[task].from_pretrained(run / "export" / "merged").eval()
    ids = torch.arange(1, 25).reshape(2, 12)
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits


def assert_like_reference(root, name: str, summary: dict, reference: dict, nproc: int, atol: float) -> None:
    """Resumed on `nproc` ranks into root/name: the reference's losses to rounding, its final
    sparsity, and its exported logits within `atol`."""
    assert summary["world_size"] == nproc
    assert close(summary["losses"], reference["losses"])
    assert summary["final_sparsity"] == reference["final_sparsity"]
    torch.testing.assert_close(export_logits(root / name, "lm"), export_logits(root / "reference", "lm"), atol=atol, rtol=0)


def reference_run(tmp_path_factory, name: str, pruning: list):
    """(folder, flags, summary) of the uninterrupted 2-rank run the others are compared with."""
    root = tmp_path_factory.mktemp(name)
    flags = COMMON + pruning
    run_launcher("ranks", "launch/train.py", flags + ranks(2) + ["--output_dir", root / "reference"])
    return root, flags, json.loads((root / "reference" / "summary.json").read_text())


@pytest.fixture(scope="module")
def unstructured(tmp_path_factory):
    return reference_run(tmp_path_factory, "unstructured", UNSTRUCTURED)


@pytest.fixture(scope="module")
def structured(tmp_path_factory):
    return reference_run(tmp_path_factory, "structured", STRUCTURED)


@pytest.fixture(scope="module")
def killed_mid_retune(unstructured):
    root, flags, _ = unstructured
    return killed(root / "killed", flags, 2, "retune-2")  # latest: right after pruning


def test_killed_mid_retune_resumes_bit_for_bit_on_2_ranks_and_within_rounding_on_1(unstructured, killed_mid_retune):
    root, flags, reference = unstructured
    same = resumed(killed_mid_retune, root / "same", flags, 2)
    assert same["losses"] == reference["losses"]
    # Masks, re-fitted weights and the distillation come from the run folder: another prune setting now would change them.
    fewer = resumed(killed_mid_retune, root / "one_rank", flags + ["--prune.score", "delta", "--prune.sparsity", 0.2, "--prune.reconstruct", "false",
                                                                   "--prune.distill_alpha", 0], 1)
    assert fewer["world_size"] == 1
    assert close(fewer["losses"], reference["losses"])
    assert fewer["sparsity"] == same["sparsity"] == reference["sparsity"] == 0.5
    assert fewer["final_sparsity"] == reference["final_sparsity"]
    torch.testing.assert_close(export_logits(root / "one_rank", "lm"), export_logits(root / "reference", "lm"), atol=1e-5, rtol=0)


def test_two_rank_run_continues_on_three_oversubscribed(unstructured, killed_mid_retune):
    root, flags, reference = unstructured
    more = resumed(killed_mid_retune, root / "three_ranks", flags, 3)  # 3 ranks on 2 cores
    assert_like_reference(root, "three_ranks", more, reference, 3, atol=1e-5)


def test_one_rank_run_continues_on_two(unstructured):
    root, flags, reference = unstructured
    run = killed(root / "killed_1", flags, 1, "tune-4")
    more = resumed(run, root / "two_ranks", flags, 2)
    # Pruning (and its re-fit, a least-squares solve that magnifies rounding) runs after the
    # resume here, on weights tuned partly on 1 rank: logits agree to rounding, not to 1e-5.
    assert_like_reference(root, "two_ranks", more, reference, 2, atol=1e-4)


def test_structured_run_resumes_after_removal_on_2_and_on_1_rank(structured):
    root, flags, reference = structured
    run = killed(root / "killed", flags, 2, "retune-2")  # latest: heads and neurons already removed
    same = resumed(run, root / "same", flags, 2)
    assert same["losses"] == reference["losses"]
    assert same["structured"]["heads"] == reference["structured"]["heads"] and same["structured"]["ffn"] == reference["structured"]["ffn"]
    one = resumed(run, root / "one_rank", flags, 1)
    assert close(one["losses"], reference["losses"])
    assert one["final_sparsity"] == reference["final_sparsity"]
    torch.testing.assert_close(export_logits(root / "one_rank", "lm"), export_logits(root / "reference", "lm"), atol=1e-5, rtol=0)


def test_distillation_at_alpha_0_is_the_plain_re_tune_bit_for_bit(structured):
    """The teacher pass (before heads and neurons are removed) leaves the run as it was, and its
    term at α = 0 adds nothing: the structured reference's losses, to the bit."""
    root, flags, reference = structured
    run_launcher("ranks", "launch/train.py", flags + ranks(2) + ["--prune.distill", "true", "--prune.distill_alpha", 0, "--output_dir", root / "alpha_0"])
    summary = json.loads((root / "alpha_0" / "summary.json").read_text())
    assert summary["losses"] == reference["losses"]
    assert summary["timings"]["teacher_s"] > 0 and not (root / "reference" / "teacher").exists()
    assert sorted(p.name for p in (root / "alpha_0" / "teacher").iterdir()) == ["meta.json", *(f"step-00000{s}.safetensors" for s in range(4))]


def test_a_checkpoint_of_another_run_is_refused_before_launch(unstructured, tmp_path, capsys):
    from dsee_scale.cli import main

    root, flags, _ = unstructured
    shutil.copytree(root / "reference", tmp_path / "run")
    argv = [str(a) for a in flags + ranks(2) + ["--output_dir", tmp_path / "run", "--resume", "--dsee.rank", 4, "--dsee.nnz", 8, "--micro_batch_size", 2]]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "is of another run" in err and "dsee.rank: checkpoint 8, now 4" in err and "dsee.nnz: checkpoint 64, now 8" in err
    assert "global_batch: checkpoint 6, now 2" in err and "--grad_accum" in err
