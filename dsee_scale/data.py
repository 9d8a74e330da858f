"""Tasks and data: local files or hub datasets → tokenized examples → per-rank micro-batches.

Batches are a pure function of (seed, step): every rank slices the same global batch, so a run
resumes exactly from its step counter and gives the same global batches at any world size.
"""
from __future__ import annotations

import csv
import functools
import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from dsee_scale import packing
from dsee_scale.chat import NO_TEMPLATE, adds_bos, check_messages, conversation_tokens, special_ids

if TYPE_CHECKING:
    from datasets import Dataset
    from transformers import PreTrainedTokenizerBase

    from dsee_scale.config import TrainConfig

PAIR_SEPARATOR = "||"


def split_pair(line: str) -> tuple[str, str]:
    """One `source||target` line (E2E's format, and the built-in corpus's) as its two stripped sides."""
    if PAIR_SEPARATOR not in line:
        raise ValueError(f"{line[:80]!r}: no {PAIR_SEPARATOR!r} between source and target; a file of pairs has one on every line")
    source, target = line.split(PAIR_SEPARATOR, 1)
    return source.strip(), target.strip()


TABLE_SUFFIXES = (".tsv", ".csv")
PEEK_ROWS = 20  # examples read by peek_columns: enough to see what a label column holds


def _dialect(suffix: str) -> dict:
    """How a table is split, for csv.reader and pandas alike: TSV with no quote processing, as
    GLUE's own loaders read it (MRPC and STS-B sentences hold unbalanced quotes); CSV quoted."""
    return {"delimiter": "\t", "quoting": csv.QUOTE_NONE} if suffix == ".tsv" else {"delimiter": ",", "quoting": csv.QUOTE_MINIMAL}


def _table_rows(lines, suffix: str, header: bool) -> tuple[list[str], list[list[str]]]:
    """(column names, data rows) of a table's lines: the first row names the columns, or, without
    a header, the columns are named by position, '0', '1', ..."""
    rows = list(csv.reader(lines, **_dialect(suffix)))
    if not rows:
        return [], []
    return (rows[0], rows[1:]) if header else ([str(i) for i in range(len(rows[0]))], rows)


def _head(file: Path, n: int) -> list[str]:
    """The first n non-blank lines; utf-8-sig drops the byte-order mark some files start with
    (GLUE's MRPC), which would otherwise stick to the first column's name."""
    with file.open(encoding="utf-8-sig", newline="") as handle:
        return [line for _, line in zip(range(n), (line for line in handle if line.strip()))]


def _load_local(path: str, header: bool = True):
    """A local file as an HF Dataset: .tsv/.csv (a header row, or header=False: columns named
    '0', '1', ...), .json/.jsonl, .txt (one example per line)."""
    import datasets

    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"data file {path} does not exist (check --train_file / --eval_file)")
    try:
        with file.open("rb") as handle:
            handle.read(1)
    except OSError as err:
        raise ValueError(f"data file {path} cannot be read: {err}") from None
    suffix = file.suffix.lower()
    if suffix in TABLE_SUFFIXES:
        names = None if header else _table_rows(_head(file, 1), suffix, header=False)[0]
        # keep_default_na=False: a sentence that reads "NA" or "null", or an empty field, stays text.
        return datasets.load_dataset("csv", data_files=str(file), encoding="utf-8-sig", keep_default_na=False, header="infer" if header else None,
                                     column_names=names, split="train", **_dialect(suffix))
    if suffix in (".json", ".jsonl"):
        return datasets.load_dataset("json", data_files=str(file), split="train")
    if suffix == ".txt":
        lines = [line.rstrip("\n") for line in file.open(encoding="utf-8") if line.strip()]
        if lines and all(PAIR_SEPARATOR in line for line in lines[:100]):
            pairs = [split_pair(line) for line in lines]
            return datasets.Dataset.from_dict({"source": [s for s, _ in pairs], "target": [t for _, t in pairs]})
        return datasets.Dataset.from_dict({"text": lines})
    raise ValueError(f"data file {path}: unsupported format {suffix!r}; use .tsv, .csv, .json, .jsonl or .txt")


def load_split(cfg, split: str):
    """The train or eval split named by a TrainConfig: a local file, or a hub dataset (online)."""
    path = cfg.train_file if split == "train" else cfg.eval_file
    if path:
        ds = _load_local(path, cfg.header)
    elif cfg.dataset:
        import datasets

        ds = datasets.load_dataset(cfg.dataset, cfg.dataset_config, split="train" if split == "train" else cfg.eval_split)
    else:
        return None
    limit = cfg.max_train_samples if split == "train" else cfg.max_eval_samples
    if limit is not None:
        ds = ds.select(range(min(limit, len(ds))))
    if len(ds) == 0:
        raise ValueError(f"the {split} data ({path or cfg.dataset}) is empty")
    return ds


# Columns of each LM data format but text (which reads --text_column), in auto's order of preference.
FORMAT_COLUMNS = {"chat": ("messages",), "prompt_completion": ("prompt", "completion"), "e2e": ("source", "target")}


def data_format(columns: list[str], cfg) -> str:
    """An LM dataset's format: --data_format, or (auto) the first of FORMAT_COLUMNS whose columns
    are all there, else text."""
    if cfg.data_format != "auto":
        return cfg.data_format
    return next((fmt for fmt, needs in FORMAT_COLUMNS.items() if all(c in columns for c in needs)), "text")


def check_columns(columns: list[str], cfg, where: str, first_row: dict | None = None) -> None:
    """Name the missing column and the ones present, before any tokenization. `first_row`: a
    TSV/CSV file's first example, to show what each unnamed column (--header false) holds."""
    if cfg.task == "lm":
        needed = list(FORMAT_COLUMNS.get(data_format(columns, cfg), (cfg.text_column,)))
        fix = "set --data_format or --text_column: chat reads 'messages', prompt_completion 'prompt' and 'completion', e2e 'source' and 'target'"
    else:
        needed = [cfg.text_column, cfg.label_column] + ([cfg.text_pair_column] if cfg.text_pair_column else [])
        fix = "set --text_column / --label_column"
    missing = [c for c in needed if c not in columns]
    if not missing:
        return
    shown, hint = f"{columns}", ""
    if first_row is not None and cfg.header:
        shown = f"{[_clip(c) for c in columns]}"
        hint = f"; for a file without a header row add --header false: columns are then named 0 to {len(columns) - 1}"
    elif first_row is not None:
        shown = ", ".join(f"{c} ({_clip(first_row.get(c, ''))!r})" for c in columns)
    raise ValueError(f"{where}: column(s) {missing} not found; columns are {shown} ({fix}{hint})")


def check_row(fmt: str, example: dict, row: int) -> None:
    """A row of a chat or prompt_completion dataset holds what its format reads (`row` from 1)."""
    if fmt == "chat":
        check_messages(example.get("messages"), row)
    elif fmt == "prompt_completion":
        bad = next((c for c in ("prompt", "completion") if not isinstance(example.get(c), str)), None)
        if bad:
            raise ValueError(f"row {row}: column {bad!r} holds {type(example.get(bad)).__name__}, not text: prompt_completion rows are two strings "
                             "(for conversations use a 'messages' column, --data_format chat)")


def _clip(text: str, width: int = 30) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def _number(value) -> float | None:
    """A label as a finite number (int, float, or text such as '3.8'), else None."""
    if isinstance(value, bool):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _real(value) -> bool:
    """A number with a fractional part in its type or text (3.8, 5.0, '5.000'): a regression target, not a class."""
    if isinstance(value, float):
        return _number(value) is not None
    return isinstance(value, str) and _number(value) is not None and not value.strip().lstrip("+-").isdigit()


def check_labels(values, cfg, where: str) -> None:
    """The label column fits the task: classes for 'cls' (names or integers, not real numbers),
    finite numbers for 'reg'. The message names the value and the other task."""
    if cfg.task == "cls":
        real = next((v for v in values if _real(v)), None)
        if real is not None:
            raise ValueError(f"{where}: label column {cfg.label_column!r} holds real numbers (e.g. {real!r}), not classes: "
                             "for a regression target such as STS-B's score use --task reg")
    elif cfg.task == "reg":
        bad = next((v for v in values if _number(v) is None), None)
        if bad is not None:
            raise ValueError(f"{where}: label column {cfg.label_column!r} holds {bad!r}, not a finite number: "
                             "--task reg needs numeric targets; for classes use --task cls")


def peek_columns(path: str, header: bool = True) -> tuple[list[str], list[dict] | None]:
    """(column names, the first examples) of a local file, reading only its first lines; a JSON
    document (not JSON lines) gives ([], None): it is checked once loaded."""
    file = Path(path)
    suffix = file.suffix.lower()
    if not header and suffix not in TABLE_SUFFIXES:
        raise ValueError(f"data file {path}: --header false applies to .tsv/.csv files, not {suffix}")
    lines = _head(file, PEEK_ROWS + 1)
    if suffix in TABLE_SUFFIXES:
        names, rows = _table_rows(lines, suffix, header)
        return names, [dict(zip(names, row)) for row in rows[:PEEK_ROWS]]
    if suffix in (".json", ".jsonl"):
        if not lines:
            return [], []
        if suffix == ".json" and not lines[0].lstrip().startswith("{"):
            return [], None
        import json

        try:
            examples = [json.loads(line) for line in lines]
        except json.JSONDecodeError:
            return [], None  # a JSON document, not lines: checked after loading
        return list(examples[0]), examples
    if suffix == ".txt":
        if lines and PAIR_SEPARATOR in lines[0]:
            return ["source", "target"], [dict(zip(("source", "target"), split_pair(line))) for line in lines if PAIR_SEPARATOR in line]
        return ["text"], [{"text": line} for line in lines]
    raise ValueError(f"data file {path}: unsupported format {suffix!r}; use .tsv, .csv, .json, .jsonl or .txt")


def label_map(train_ds, cfg) -> dict[str, int]:
    """str(label value) → class id: integer labels keep their value, strings are numbered in
    sorted order. Keys are strings so the map survives JSON (it is stored in exported configs)."""
    values = sorted(set(train_ds[cfg.label_column]), key=str)
    if all(isinstance(v, int) for v in values):
        if min(values) < 0:
            raise ValueError(f"integer labels must be >= 0, found {min(values)}")
        return {str(v): v for v in range(max(values) + 1)}
    return {str(v): i for i, v in enumerate(values)}


def tokenize(ds: Dataset, tokenizer: PreTrainedTokenizerBase, cfg: TrainConfig, labels: dict[str, int] | None = None) -> Dataset:
    """One batched pass → columns input_ids and labels: a class id (cls), a float (reg), or
    per-token targets, -100 where there is no loss (lm, by data_format: lm_example). cls/reg
    pairs (text_pair_column) are encoded as the tokenizer's pair; e2e rows keep source and target
    for BLEU. LM rows also get `truncated` and `targets` (tokens with a loss), for data_counts;
    rows whose answer cannot fit in max_length are left out.
    datasets caches the result beside a file-backed split, so a rank mapping after rank 0 (see
    dist.main_process_first) reads it instead of tokenizing again."""
    # Plain locals, not cfg: the cache key hashes what `encode` closes over.
    text, pair, label, max_length, task = cfg.text_column, cfg.text_pair_column, cfg.label_column, cfg.max_length, cfg.task
    fmt = data_format(ds.column_names, cfg) if task == "lm" else None
    if fmt == "chat" and tokenizer.chat_template is None:
        raise ValueError(NO_TEMPLATE)
    if fmt not in (None, "chat") and tokenizer.eos_token_id is None:
        raise ValueError(f"data_format {fmt} ends each row with EOS, and the tokenizer has none: set its eos_token")
    # What every row needs of the tokenizer, asked once (each answer costs tokenizer calls).
    bos = [tokenizer.bos_token_id] if fmt is not None and adds_bos(tokenizer) else []
    specials = special_ids(tokenizer) if fmt == "chat" else set()

    def encode(batch: dict[str, list], indices: list[int]) -> dict[str, list]:
        if task != "lm":
            ids = tokenizer(batch[text], batch[pair] if pair else None, truncation=True, max_length=max_length)["input_ids"]
            if task == "reg":
                return {"input_ids": ids, "labels": [float(v) for v in batch[label]]}
            values = [str(v) for v in batch[label]]
            unknown = [v for v in values if v not in labels]
            if unknown:
                raise ValueError(f"label {unknown[0]!r} does not occur in the training data (labels: {', '.join(labels)})")
            return {"input_ids": ids, "labels": [labels[v] for v in values]}
        out = {"input_ids": [], "labels": [], "truncated": [], "targets": []}
        for i, index in enumerate(indices):
            example = {column: values[i] for column, values in batch.items()}
            check_row(fmt, example, index + 1)
            fitted = fit(*lm_example(fmt, example, tokenizer, text, index + 1, bos, specials), max_length, tokenizer.bos_token_id)
            if fitted is not None:
                out["input_ids"].append(fitted[0])
                out["labels"].append(fitted[1])
                out["truncated"].append(fitted[2])
                out["targets"].append(sum(t != -100 for t in fitted[1][1:]))  # the model shifts labels by one
        return out

    from datasets.fingerprint import Hasher

    keep = {"source", "target"} if fmt == "e2e" else set()  # e2e never drops a row, so its columns can stay beside the new ones
    # datasets keys its cache by a hash of `encode`, which leaves out the module functions it calls:
    # their source goes in the key too, so a cached result never outlives a change to them.
    code = [Path(__file__).read_text(encoding="utf-8"), Path(__file__).with_name("chat.py").read_text(encoding="utf-8")]
    return ds.map(encode, batched=True, with_indices=True, remove_columns=[c for c in ds.column_names if c not in keep], desc="tokenizing",
                  new_fingerprint=Hasher.hash([ds._fingerprint, encode, code]))


def lm_example(fmt: str, example: dict, tokenizer: PreTrainedTokenizerBase, text_column: str, row: int, bos: list[int],
               specials: set[int]) -> tuple[list[int], list[int], int | None]:
    """(input ids, labels, where the answer starts) of one LM row, before fitting to max_length.
    `bos`: [BOS] where the tokenizer adds it to text, else [] (chat: as the template renders it);
    EOS ends a document, an e2e target and a completion; `specials`: the tokenizer's special ids
    (chat: where an assistant turn ends). The answer's start is None where truncation cuts the
    end (text and e2e, as before this format existed)."""
    eos = [tokenizer.eos_token_id]
    encode = lambda s: tokenizer(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    if fmt == "text":
        ids = bos + encode(example[text_column]) + eos
        return ids, ids, None
    if fmt == "e2e":
        source, target = encode(example["source"] + " " + PAIR_SEPARATOR), encode(" " + example["target"]) + eos
        return source + target, [-100] * len(source) + target, None
    if fmt == "prompt_completion":
        prompt, completion = bos + encode(example["prompt"]), encode(example["completion"]) + eos
        return prompt + completion, [-100] * len(prompt) + completion, len(prompt)
    return conversation_tokens(tokenizer, example["messages"], row, specials)


def fit(ids: list[int], labels: list[int], answer: int | None, max_length: int, bos: int | None) -> tuple[list[int], list[int], bool] | None:
    """A row within max_length, and whether it was cut: without an answer start, its end is cut;
    with one, the prompt loses its start (a leading BOS stays), keeping the end of the question
    next to the whole answer; None (the row is dropped) where the answer alone does not fit."""
    if len(ids) <= max_length:
        return ids, labels, False
    if answer is None:
        return ids[:max_length], labels[:max_length], True
    head = int(bos is not None and ids[0] == bos)
    room = max_length - head
    if len(ids) - answer > room:
        return None
    cut = len(ids) - room
    return ids[:head] + ids[cut:], labels[:head] + labels[cut:], True


def data_counts(source: Dataset, rows: Dataset, fmt: str) -> dict:
    """What tokenizing an LM split did, for the log and summary.json's `data`."""
    return {"format": fmt, "rows": len(rows), "truncated_rows": sum(rows["truncated"]), "dropped_rows": len(source) - len(rows), "target_tokens": sum(rows["targets"])}


def text_windows(path: str, tokenizer: PreTrainedTokenizerBase, length: int) -> Dataset:
    """A plain text file as the SparseGPT/Wanda perplexity protocol reads it: the whole text
    tokenized once (as the tokenizer encodes one document: a BOS first where it adds one) and cut
    into windows of exactly `length` tokens, the last partial window dropped; every token of a
    window but its first is predicted. Rows of input_ids = labels, for evaluate.evaluate_rows."""
    import datasets

    text = Path(path).read_text(encoding="utf-8")
    ids = tokenizer(text, verbose=False)["input_ids"]  # verbose: no warning that the text is longer than the model's context
    windows = [ids[start : start + length] for start in range(0, len(ids) - length + 1, length)]
    if not windows:
        raise ValueError(f"--eval_perplexity {path}: {len(ids)} tokens, fewer than one window of --max_length {length}: give a longer text or a lower --max_length")
    return datasets.Dataset.from_dict({"input_ids": windows, "labels": windows})


def collate(rows: dict[str, list], tokenizer: PreTrainedTokenizerBase) -> dict[str, torch.Tensor]:
    """Tokenized rows (columns, as `Dataset[indices]` gives them) as host tensors; the caller moves
    them to its device in one copy. Right-padded whatever the tokenizer's own side (LLaMA
    tokenizers say left), so every tokenizer gives the same layout. `tokenizer.pad` pads only the
    model inputs, so per-token labels are padded here, with -100 (no loss on padding)."""
    labels = rows["labels"]
    if isinstance(labels[0], list):
        width = max(map(len, labels))
        labels = [row + [-100] * (width - len(row)) for row in labels]
    batch = dict(tokenizer.pad({"input_ids": rows["input_ids"], "labels": labels}, padding_side="right", return_attention_mask=True, return_tensors="pt"))
    if "lengths" in rows:  # packed windows (packing.pack): position ids restart at each row
        batch["position_ids"] = packing.position_ids(rows["lengths"], batch["input_ids"].shape[1])
    return batch


def batch_counts(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """(examples, real tokens) of a collated micro-batch, on its device: a packed window holds an
    example wherever a real token's position id is 0."""
    real = batch["attention_mask"].bool()
    examples = (batch["position_ids"] == 0).logical_and(real).sum() if "position_ids" in batch else torch.tensor(real.shape[0], device=real.device)
    return torch.stack([examples, real.sum()])


@functools.lru_cache(maxsize=2)
def _epoch_order(n_examples: int, seed: int, epoch: int) -> list[int]:
    """One epoch's shuffle, made once (a 60k-row shuffle costs ~30 ms: once per epoch, not per micro-batch)."""
    order = list(range(n_examples))
    random.Random(seed * 100_003 + epoch).shuffle(order)
    return order


@dataclass
class GlobalBatches:
    """Step s → the s-th global batch of a seeded per-epoch shuffle; rank r takes its slice."""

    n_examples: int
    micro_batch: int
    grad_accum: int
    world: int
    seed: int

    @property
    def global_batch(self) -> int:
        return self.micro_batch * self.grad_accum * self.world

    def _order(self, epoch: int) -> list[int]:
        return _epoch_order(self.n_examples, self.seed, epoch)

    def global_indices(self, step: int) -> list[int]:
        start = step * self.global_batch
        out = []
        while len(out) < self.global_batch:
            epoch, offset = divmod(start + len(out), self.n_examples)
            order = self._order(epoch)
            out.extend(order[offset : offset + self.global_batch - len(out)])
        return out

    def micro_positions(self, accum: int, rank: int) -> range:
        """Places in the global batch of micro-step `accum` on `rank`: contiguous, accumulation-major."""
        start = (accum * self.world + rank) * self.micro_batch
        return range(start, start + self.micro_batch)

    def micro_indices(self, step: int, accum: int, rank: int) -> list[int]:
        """Rows of micro-step `accum` of `step` on `rank`."""
        places = self.micro_positions(accum, rank)
        return self.global_indices(step)[places.start : places.stop]

    def loss_share(self, labels: list[list[int]]) -> dict:
        """LM: every micro-step's loss is its share of one mean over the global batch's target
        tokens (transformers' `num_items_in_batch`; `labels`: the global batch's), so the
        gradient does not depend on how the batch is split over ranks and micro-steps (DeepSpeed
        then averages over both). Classification and regression rows weigh the same in every
        split already."""
        targets = sum(sum(1 for t in row[1:] if t != -100) for row in labels)  # the model shifts labels by one
        return {"num_items_in_batch": max(1, targets) / (self.grad_accum * self.world)}


# ---- the built-in offline corpus: E2E-style restaurant records → sentences --------------------

_NAMES = ["The Eagle", "Blue Spice", "The Mill", "Zizzi", "Aromi", "The Punter", "Cotto", "Giraffe", "Wildwood", "Alimentum", "Strada", "Loch Fyne", "The Vaults", "Bibimbap House", "Clowns", "The Phoenix"]
_FOOD = ["Italian", "French", "Chinese", "Indian", "English", "Japanese", "fast food"]
_AREA = ["city centre", "riverside"]
_PRICE = ["cheap", "moderate", "high"]
_TEMPLATES = [
    "{name} is a {price} {food} restaurant in the {area} .",
    "In the {area} there is a {price} {food} place called {name} .",
    "{name} serves {food} food at {price} prices in the {area} .",
    "For {price} {food} food , try {name} in the {area} .",
]


def generate_corpus(n: int, seed: int = 0) -> list[tuple[str, str]]:
    """(meaning representation, sentence) pairs, deterministic: the default run's data."""
    rng = random.Random(seed)
    pairs = []
    for _ in range(n):
        slots = {"name": rng.choice(_NAMES), "food": rng.choice(_FOOD), "area": rng.choice(_AREA), "price": rng.choice(_PRICE)}
        source = f"name : {slots['name']} | food : {slots['food']} | price : {slots['price']} | area : {slots['area']}"
        pairs.append((source, rng.choice(_TEMPLATES).format(**slots)))
    return pairs


def write_corpus(path: Path, n: int, seed: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{s}{PAIR_SEPARATOR}{t}\n" for s, t in generate_corpus(n, seed)), encoding="utf-8")
    return path


def load_tokenizer(cfg, writer: bool) -> PreTrainedTokenizerBase:
    """The model's own tokenizer (or --tokenizer); builtin models get a SentencePiece tokenizer
    trained once on the run's corpus, by the run folder's writers (run_folder.is_writer)."""
    from transformers import AutoTokenizer

    from dsee_scale import dist
    from dsee_scale.models import resolve_model_path

    if cfg.tokenizer or not cfg.model.startswith("builtin:"):
        tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(cfg.tokenizer or cfg.model))
    else:
        folder = Path(cfg.output_dir) / "tokenizer"
        if writer and not (folder / "tokenizer_config.json").exists():
            train_sentencepiece(Path(cfg.train_file), folder, vocab_size=512)
        dist.barrier()
        tokenizer = AutoTokenizer.from_pretrained(str(folder))
    return with_pad_token(tokenizer)


def with_pad_token(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """The tokenizer, with its EOS (or UNK) as the pad token where it has none: collate pads."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    return tokenizer


def corpus_texts(corpus: Path) -> list[str]:
    """The texts a built-in tokenizer learns from: a JSON(L) file's strings (texts, prompts,
    message contents; not its keys or syntax), any other file's lines, split at ||."""
    text = corpus.read_text(encoding="utf-8")
    if corpus.suffix.lower() not in (".json", ".jsonl"):
        return [part for line in text.splitlines() for part in line.split(PAIR_SEPARATOR)]
    import json

    try:
        records = [json.loads(text)]
    except json.JSONDecodeError:  # JSON lines
        records = [json.loads(line) for line in text.splitlines() if line.strip()]

    def strings(value) -> list[str]:
        if isinstance(value, str):
            return value.splitlines()
        items = value.values() if isinstance(value, dict) else value if isinstance(value, list) else []
        return [s for item in items for s in strings(item)]

    return [s for s in strings(records) if s.strip()]


def train_sentencepiece(corpus: Path, folder: Path, vocab_size: int):
    """A SentencePiece tokenizer trained on the corpus, saved as an HF tokenizer folder."""
    import sentencepiece as spm
    from transformers import LlamaTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus_texts(corpus)), model_prefix=str(folder / "tokenizer"), vocab_size=vocab_size, model_type="unigram",
        pad_id=0, unk_id=1, bos_id=2, eos_id=3, character_coverage=1.0, user_defined_symbols=[PAIR_SEPARATOR], hard_vocab_limit=False, minloglevel=2,
    )
    tokenizer = LlamaTokenizer.from_pretrained(str(folder))
    tokenizer.pad_token = "<pad>"
    tokenizer.save_pretrained(str(folder))
    return tokenizer
