"""Data formats of both tasks, label maps, loss masking, and deterministic global batches."""
import copy
import json

import pytest
from conftest import SHARED_DATA

from dsee_scale.config import TrainConfig
from dsee_scale.data import GlobalBatches, collate, label_map, load_split, tokenize


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(SHARED_DATA / "gpt2_tokenizer"))
    tokenizer.pad_token = tokenizer.eos_token  # as Recipe._tokenizer does
    return tokenizer


ROWS = [("a fine film", "pos"), ("dull", "neg"), ("so-so", "mixed"), ("great", "pos")]


def write_cls(path, fmt):
    if fmt in ("tsv", "csv"):
        sep = "\t" if fmt == "tsv" else ","
        path.write_text(f"text{sep}label\n" + "".join(f"{t}{sep}{l}\n" for t, l in ROWS))
    elif fmt == "jsonl":
        path.write_text("".join(json.dumps({"text": t, "label": l}) + "\n" for t, l in ROWS))
    else:
        path.write_text(json.dumps([{"text": t, "label": l} for t, l in ROWS]))


@pytest.mark.parametrize("fmt", ["tsv", "csv", "json", "jsonl"])
def test_classification_files_with_string_labels_and_three_classes(fmt, tmp_path, tokenizer):
    path = tmp_path / f"d.{fmt}"
    write_cls(path, fmt)
    cfg = TrainConfig(task="cls", train_file=str(path), eval_file=str(path))
    ds = load_split(cfg, "train")
    labels = label_map(ds, cfg)
    assert labels == {"mixed": 0, "neg": 1, "pos": 2}
    rows = tokenize(ds, tokenizer, cfg, labels)
    assert rows["labels"] == [2, 1, 0, 2]


def test_a_label_unseen_in_training_is_named(tmp_path, tokenizer):
    train, evaluation = tmp_path / "train.tsv", tmp_path / "eval.tsv"
    train.write_text("text\tlabel\na\tpos\nb\tneg\n")
    evaluation.write_text("text\tlabel\nc\tpos\nd\tmixed\n")
    cfg = TrainConfig(task="cls", train_file=str(train), eval_file=str(evaluation))
    with pytest.raises(ValueError, match="label 'mixed' does not occur in the training data"):
        tokenize(load_split(cfg, "eval"), tokenizer, cfg, label_map(load_split(cfg, "train"), cfg))


def test_integer_labels_keep_their_values(tmp_path):
    path = tmp_path / "d.tsv"
    path.write_text("sentence\tlabel\nx\t3\ny\t0\n")
    cfg = TrainConfig(task="cls", train_file=str(path), eval_file=str(path), text_column="sentence")
    assert label_map(load_split(cfg, "train"), cfg) == {"0": 0, "1": 1, "2": 2, "3": 3}


def test_lm_plain_text_and_jsonl(tmp_path, tokenizer):
    """Documents, each ending with EOS (more formats: test_llm_data.py)."""
    txt, jsonl = tmp_path / "d.txt", tmp_path / "d.jsonl"
    txt.write_text("hello world\nsecond line\n")
    jsonl.write_text(json.dumps({"text": "hello world"}) + "\n")
    for path in (txt, jsonl):
        cfg = TrainConfig(task="lm", train_file=str(path), eval_file=str(path))
        row = tokenize(load_split(cfg, "train"), tokenizer, cfg)[0]
        assert row["labels"] == row["input_ids"] == tokenizer("hello world")["input_ids"] + [tokenizer.eos_token_id]


def test_a_pair_file_with_a_line_missing_its_separator_names_the_line(tmp_path):
    path = tmp_path / "pairs.txt"
    path.write_text("name : A || A is a pub .\n" * 100 + "name : B , no separator\n")
    cfg = TrainConfig(task="lm", train_file=str(path), eval_file=str(path))
    with pytest.raises(ValueError, match="'name : B , no separator': no '\\|\\|' between source and target"):
        load_split(cfg, "train")


def test_e2e_pairs_put_the_loss_on_the_target_only(tokenizer):
    cfg = TrainConfig(task="lm", train_file=str(SHARED_DATA / "e2e" / "valid.txt"), eval_file=str(SHARED_DATA / "e2e" / "valid.txt"), max_train_samples=3)
    rows = tokenize(load_split(cfg, "train"), tokenizer, cfg)
    for row in rows:
        masked = row["labels"].count(-100)
        assert masked > 0 and row["labels"][masked:] == row["input_ids"][masked:]
        assert tokenizer.decode(row["input_ids"][masked:], skip_special_tokens=True).strip() == row["target"]
    left = copy.deepcopy(tokenizer)
    left.padding_side = "left"  # LLaMA tokenizers' side: batches stay right-padded anyway
    batch = collate(rows[:], left)
    assert batch["labels"].shape == batch["input_ids"].shape and (batch["labels"][batch["attention_mask"] == 0] == -100).all()
    lengths = [len(ids) for ids in rows["input_ids"]]
    assert batch["attention_mask"].tolist() == [[1] * n + [0] * (max(lengths) - n) for n in lengths]


def test_global_batches_are_the_same_at_any_world_size():
    one = GlobalBatches(100, micro_batch=4, grad_accum=2, world=1, seed=3)
    two = GlobalBatches(100, micro_batch=2, grad_accum=2, world=2, seed=3)
    for step in range(30):  # crosses epochs
        assert one.global_indices(step) == two.global_indices(step)
        parts = [two.micro_indices(step, a, r) for a in range(2) for r in range(2)]
        assert sorted(i for p in parts for i in p) == sorted(one.global_indices(step))
