"""Resume with dropout on, on other world sizes and with gradient accumulation (the multirank
tests test_resume_dropout_gpt2.py and test_resume_dropout_minilm.py, one file per model so that
the two share out over the suite's workers): dropout is drawn per global row (dsee_scale.dropout),
so a run killed on 2 ranks goes on on 1 rank with accumulation 2, or on 3 ranks, with the
uninterrupted run's tune and re-tune losses (rtol 1e-5), its masks and its export. Adapter dropout 0.1 too."""
import json
import shutil

import pytest
import torch
from conftest import SHARED_DATA, minilm_dir
from launch_utils import launch, run_launcher, tail_per_rank
from safetensors.torch import load_file

GLOBAL_BATCH = 6
COMMON = ["--ds_config", "ds_configs/zero3.json", "--steps", 5, "--retune_steps", 3, "--save_every", 2, "--log_every", 1, "--dsee.dropout", 0.1,
          "--stages", "tune,prune,retune,export", "--prune.sparsity", 0.5, "--lr", 1e-3]
SPLITS = {"2 ranks": (2, 3, 1), "1 rank, accumulation 2": (1, 3, 2), "3 ranks": (3, 2, 1)}  # ranks, micro-batch, accumulation


def split(name: str) -> tuple[int, list]:
    ranks, micro, accum = SPLITS[name]
    assert ranks * micro * accum == GLOBAL_BATCH
    return ranks, ["--micro_batch_size", micro, "--grad_accum", accum]


def model_flags(kind: str, tmp) -> list:
    if kind == "gpt2":
        return ["--model", "builtin:tiny-gpt2", "--gen_samples", 2, "--gen_max_new_tokens", 2]
    rows = (SHARED_DATA / "sst2" / "train.tsv").read_text().splitlines(keepends=True)
    (tmp / "train.tsv").write_text("".join(rows[:97]))
    return ["--model", minilm_dir(), "--task", "cls", "--train_file", tmp / "train.tsv", "--text_column", "sentence", "--max_length", 32]


def train(flags: list, out, name: str, *extra, env=None):
    nproc, batch = split(name)
    return launch("ranks", "launch/train.py", flags + batch + ["--output_dir", out, *extra], nproc=nproc, env=env)


def finished(out) -> dict:
    return json.loads((out / "summary.json").read_text())


def masks(out) -> dict:
    latest = (out / "checkpoints" / "latest").read_text().strip()
    return load_file(str(out / "checkpoints" / latest / "masks.safetensors"))


def export_output(out, kind: str) -> torch.Tensor:
    from dsee_scale.models import TASK_MODELS

    model = TASK_MODELS["lm" if kind == "gpt2" else "cls"].from_pretrained(out / "export" / "merged").eval()
    ids = torch.arange(1, 25).reshape(2, 12)
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits


def killed_runs(kind: str, root, killed_on: set[str]) -> list:
    """The uninterrupted 2-rank run, and runs killed while writing checkpoint tune-4 (latest:
    tune-2) on each split of `killed_on`; returns the flags."""
    flags = COMMON + model_flags(kind, root)
    run_launcher("ranks", "launch/train.py", flags + split("2 ranks")[1] + ["--output_dir", root / "reference"], nproc=2)
    for name in sorted(killed_on):
        proc = train(flags, root / f"killed on {name}", name, env={"DSEE_FAULT_INJECT": "kill_during_save:tune-4"})
        assert proc.returncode != 0 and not (root / f"killed on {name}" / "summary.json").exists(), proc.stderr[-3000:]
    return flags


# killed on 2 ranks, resumed on 1 with accumulation and on 3 (tests/multirank/test_resume.py resumes 1 rank on 2)
FROM_2_RANKS = [("2 ranks", "1 rank, accumulation 2"), ("2 ranks", "3 ranks")]


def resume_tests(kind: str, resumes: list[tuple[str, str]]):
    """The module fixture and the test of one model's file, for each (killed on, resumed on) of
    `resumes`: `runs, test_... = resume_tests(kind, resumes)`."""
    @pytest.fixture(scope="module")
    def runs(tmp_path_factory):
        root = tmp_path_factory.mktemp(kind)
        return root, killed_runs(kind, root, {killed for killed, _ in resumes})

    @pytest.mark.parametrize("killed_on, resumed_on", resumes)
    def test_resume_on_another_split_gives_the_uninterrupted_run(runs, killed_on, resumed_on):
        check_resume(kind, *runs, killed_on, resumed_on)

    return runs, test_resume_on_another_split_gives_the_uninterrupted_run


def check_resume(kind: str, root, flags: list, killed_on: str, resumed_on: str) -> None:
    """The run killed on `killed_on`, resumed on `resumed_on`, ends as the uninterrupted one."""
    out = root / f"{killed_on} -> {resumed_on}"
    shutil.copytree(root / f"killed on {killed_on}", out)
    proc = train(flags, out, resumed_on, "--resume")
    assert proc.returncode == 0, tail_per_rank(proc.stderr, 6000)
    reference, resumed = finished(root / "reference"), finished(out)
    assert resumed["world_size"] == split(resumed_on)[0]
    assert resumed["losses"].keys() == reference["losses"].keys() == {"tune", "retune"}
    for stage, losses in reference["losses"].items():
        assert resumed["losses"][stage] == pytest.approx(losses, rel=1e-5), stage
    assert masks(out).keys() == masks(root / "reference").keys()
    assert all(torch.equal(masks(out)[k], v) for k, v in masks(root / "reference").items())
    torch.testing.assert_close(export_output(out, kind), export_output(root / "reference", kind), rtol=0, atol=1e-5)
