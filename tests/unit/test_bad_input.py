"""Bad input fails early and clearly (every case of helpers/bad_inputs.py's BAD_INPUTS); recipes
mean what the same flags mean (a dead rank, a kill or a full disk during a save, a non-finite loss:
tests/multirank/test_reliability_of_runs.py)."""
import time

import pytest
from conftest import ROOT
from dsee_scale.cli import main

from helpers.bad_inputs import BAD_INPUTS, argv, write


def test_every_bad_input_fails_before_heavy_work_with_a_named_message(tmp_path, capsys):
    for what, flags, message in BAD_INPUTS:
        args = argv(flags, tmp_path)
        tic = time.time()
        assert main(args) == 2, what
        err = capsys.readouterr().err
        assert message in err, f"{what}: {err}"
        assert time.time() - tic < 10, what
        assert not (tmp_path / "out").exists(), what  # nothing was created


def test_the_docs_table_shows_what_every_bad_input_prints():
    """docs/reliability.md's table is scripts/bad_input_table.py's: every case here and in
    test_glue.py, run again, its message shortened."""
    import bad_input_table

    doc = bad_input_table.DOC.read_text()
    assert bad_input_table.current(doc) == bad_input_table.table(), "docs/reliability.md's bad-input table is stale: run `python scripts/bad_input_table.py`"


def test_default_folder_holding_files_of_no_run_is_never_replaced(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    keep = tmp_path / "runs" / "default" / "notes.txt"
    keep.parent.mkdir(parents=True)
    keep.write_text("mine")
    assert main(["--ds_config", str(ROOT / "ds_configs" / "zero3.json")]) == 2
    assert "output folder runs/default exists and holds another run" in capsys.readouterr().err
    assert keep.read_text() == "mine"


def test_recipe_values_are_typed_like_the_same_flags(tmp_path):
    """YAML reads `lr: 1e-3` and `stages: tune` as strings; a recipe means what the flags mean."""
    from dsee_scale.config import train_config_from_argv

    recipe = write(tmp_path / "r.yaml", "lr: 1e-3\nstages: tune\nsteps: 5\ndsee:\n  rank: '16'\nprune:\n  sparsity: 0.3\n")
    from_recipe = train_config_from_argv(["--config", recipe])
    from_flags = train_config_from_argv(["--lr", "1e-3", "--stages", "tune", "--steps", "5", "--dsee.rank", "16", "--prune.sparsity", "0.3"])
    assert from_recipe == from_flags and from_recipe.lr == 1e-3 and from_recipe.stages == ["tune"] and from_recipe.dsee.rank == 16


def test_a_section_given_in_part_keeps_the_other_defaults():
    """`--prune.score delta` alone must not reset the default 50% sparsity to PruneConfig's 0."""
    from dsee_scale.config import TrainConfig, train_config_from_argv

    cfg = train_config_from_argv(["--prune.score", "delta", "--dsee.rank", "4"])
    assert cfg.prune.score == "delta" and cfg.prune.sparsity == TrainConfig().prune.sparsity == 0.5
    assert cfg.dsee.rank == 4 and cfg.dsee.nnz == TrainConfig().dsee.nnz


@pytest.mark.parametrize("recipe", sorted((ROOT / "launch" / "recipes").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_recipe_parses_into_a_train_config(recipe):
    from dsee_scale.config import train_config_from_argv
    from dsee_scale.ds_config import resolve_ds_config

    cfg = train_config_from_argv(["--config", str(recipe)])
    assert cfg.model
    if cfg.ds_config is not None:  # None: chosen by device
        resolve_ds_config(cfg.ds_config)  # raises ConfigError naming a missing config


def test_a_rank_other_than_0_leaves_the_message_to_rank_0_then_says_it_itself(tmp_path, capsys, monkeypatch):
    """The launcher stops every rank when the first exits: a rank > 0 that said nothing and left
    at once could end rank 0 before its message is out (seen under load in CI). It waits
    RANK0_GRACE_S first, and is stopped with rank 0; one that outlives it speaks for itself."""
    from dsee_scale import cli

    waits = []
    monkeypatch.setattr(cli.time, "sleep", waits.append)
    args = argv(["--ds_config", "missing.json"], tmp_path)
    assert main(args) == 2 and not waits
    assert capsys.readouterr().err.startswith("dsee_scale: error: DeepSpeed config missing.json does not exist")
    monkeypatch.setattr(cli, "launched_rank", lambda: 1)
    assert main(args) == 2 and waits == [cli.RANK0_GRACE_S]
    assert capsys.readouterr().err.startswith("dsee_scale: error (rank 1): DeepSpeed config missing.json does not exist")
