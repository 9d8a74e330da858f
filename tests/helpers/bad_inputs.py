"""Bad input to launch/train.py and the message it must give, as data: (what is wrong, flags, the
message). The tests run every case (tests/unit/test_bad_input.py, tests/unit/test_glue.py) and
scripts/bad_input_table.py writes docs/reliability.md's table from the same lists.

A flag is a string (or a number, or a path), a TmpPath (a file the case writes into its
temporary folder first, or a path there that must not exist), or a function giving the value when
the case runs (a model folder found at run time)."""
import json
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

from conftest import RECIPES, SHARED_DATA, minilm_dir

from helpers.glue import TINY


def write(path: Path, text: str | bytes) -> str:
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return str(path)


class TmpPath(NamedTuple):
    """`name` in the case's temporary folder: written with `content` first unless that is None;
    the flag's value is its path, or with `passed` the path of that (a folder holding it)."""
    name: str
    content: str | bytes | None = None
    passed: str | None = None

    def make(self, tmp: Path) -> str:
        if self.content is not None:
            (tmp / self.name).parent.mkdir(parents=True, exist_ok=True)
            write(tmp / self.name, self.content)
        return str(tmp / (self.passed or self.name))


Flag = str | int | float | Path | TmpPath | Callable[[], str]
Case = tuple[str, list[Flag], str]

TSV = TmpPath("ok.tsv", "sentence\tlabel\ngood film\t1\nbad film\t0\n")
CLS = ["--task", "cls", "--model", "builtin:tiny-bert", "--train_file", TSV, "--eval_file", TSV, "--text_column", "sentence"]

USER, ANSWER = {"role": "user", "content": "Zizzi ?"}, {"role": "assistant", "content": "Zizzi ."}


def chat(*rows) -> TmpPath:
    """A JSONL file of 'messages' rows, as --train_file and --eval_file."""
    return TmpPath("chat.jsonl", "".join(json.dumps({"messages": messages}) + "\n" for messages in rows))


def chat_flags(*rows, template: str | None = "chatml") -> list[Flag]:
    data = chat(*rows)
    return ["--train_file", data, "--eval_file", data] + (["--chat_template", template] if template else [])


# Checked before any heavy work, from every rank (tests/unit/test_bad_input.py).
BAD_INPUTS: list[Case] = [
    ("DeepSpeed config missing", ["--ds_config", "nope.json"], "DeepSpeed config nope.json does not exist"),
    ("DeepSpeed config malformed", ["--ds_config", TmpPath("bad.json", "{stage: 3")], "is not valid JSON"),
    ("batch sizes disagree", ["--ds_config", TmpPath("b.json", '{"train_batch_size": 10, "train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 1}')], "batch sizes disagree"),
    ("hpZ in the DeepSpeed config", ["--ds_config", TmpPath("hpz.json", '{"zero_optimization": {"stage": 3, "zero_hpz_partition_size": 2}}')], "zero_hpz_partition_size is not supported"),
    ("quantized frozen weights in the DeepSpeed config", ["--ds_config", TmpPath("q.json", '{"zero_optimization": {"stage": 3, "zero_quantized_nontrainable_weights": true}}')],
     "zero_quantized_nontrainable_weights is not supported"),
    ("data file missing", CLS[:4] + ["--train_file", TmpPath("none.tsv")], "does not exist"),
    ("data file unreadable", CLS[:4] + ["--train_file", TmpPath("bin.tsv", b"\xff\xfe\x00\x81" * 64)], "cannot be read as UTF-8 text"),
    ("empty dataset", CLS[:4] + ["--train_file", TmpPath("empty.tsv", "sentence\tlabel\n"), "--eval_file", TSV], "holds no examples"),
    ("label column missing", CLS + ["--label_column", "stars"], "column(s) ['stars'] not found"),
    ("text column missing", CLS[:-2], "column(s) ['text'] not found"),
    ("targets match nothing", ["--dsee.targets", "query,value"], "no module matched the DSEE targets"),
    ("rank too large", ["--dsee.rank", "4096"], "rank 4096 is larger than a dimension"),
    ("nnz too large", ["--dsee.nnz", "99999999"], "nnz 99999999 is larger than the"),
    ("unknown init", ["--dsee.init", "xavier"], "--dsee.init: Input should be 'lora' or 'normal' (got 'xavier')"),
    ("unknown support method", ["--dsee.support", "svd"], "unknown support method 'svd'"),
    ("sparsity outside [0, 1)", ["--prune.sparsity", "1.5"], "--prune.sparsity: Input should be less than 1 (got '1.5')"),
    ("OWL's block sparsities could leave [0, 1)", ["--prune.scope", "owl", "--prune.sparsity", "0.1"], "lower prune.owl_lambda to at most 0.05"),
    ("OWL on weights outside the transformer blocks", CLS + ["--prune.scope", "owl", "--prune.include", ".*pooler.*"],
     "prune.scope owl sets a sparsity per transformer block, and ['bert.pooler.dense.weight'] lie in none"),
    ("a prune scope with an N:M pattern", ["--prune.scope", "row", "--prune.pattern", "2:4"], "leave prune.scope unset"),
    ("re-fit without pruning", ["--prune.reconstruct", "true", "--prune.sparsity", "0"], "prune.reconstruct re-fits the weights that unstructured or N:M pruning keeps"),
    ("distillation weight outside [0, 1]", ["--prune.distill", "--prune.distill_alpha", "2"], "--prune.distill_alpha: Input should be less than or equal to 1 (got '2')"),
    ("distillation for a baseline", ["--method", "peft_lora", "--prune.sparsity", "0", "--prune.distill"], "prune.distill teaches the pruned model its own outputs from before pruning, and method peft_lora does not prune"),
    ("unknown model", ["--model", "./no/such/model"], "unknown model './no/such/model'"),
    ("unknown builtin model", ["--model", "builtin:gpt5"], "unknown builtin model 'builtin:gpt5'"),
    ("GGUF file missing", ["--model", "gguf:/no/such/model.gguf"], "no file /no/such/model.gguf"),
    ("tokenizer/model vocabulary mismatch", ["--task", "cls", "--model", minilm_dir, "--tokenizer", SHARED_DATA / "gpt2_tokenizer", "--train_file", TSV, "--eval_file", TSV,
                                             "--text_column", "sentence"], "tokenizer"),
    ("output folder of another run", ["--output_dir", TmpPath("used_run/dsee_run.json", "{}", passed="used_run")], "exists and holds another run"),
    ("unknown option in a recipe", ["--config", TmpPath("r.yaml", "model: builtin:tiny-gpt2\nlearning_rate: 0.1\n")], "r.yaml: learning_rate: unknown TrainConfig field"),
    ("bad value for a flag", ["--steps", "many"], "--steps: Input should be a valid integer"),
    ("bad value in a recipe", ["--config", TmpPath("lr.yaml", "lr: fast\n")], "lr.yaml: lr: Input should be a valid number"),
    ("chat data without a chat template", chat_flags([USER, ANSWER], template=None), "chat data with --model builtin:tiny-llama: the tokenizer has no chat template"),
    ("chat template's new tokens frozen in a pretrained model", ["--model", minilm_dir, *chat_flags([USER, ANSWER])], "--dsee.trainable_modules word_embeddings"),
    ("chat template neither built in nor a file", chat_flags([USER, ANSWER], template="vicuna"), "--chat_template vicuna: neither a built-in template (chatml) nor a file"),
    ("chat row without an assistant turn", chat_flags([USER, ANSWER], [USER]), "row 2 has no assistant turn"),
    ("unknown role in a chat row", chat_flags([USER, {"role": "bot", "content": "Zizzi ."}]), "row 1, message 2: unknown role 'bot'; roles are system, user, assistant, tool"),
    ("chat messages not a list", chat_flags("Zizzi ?"), "row 1: column 'messages' holds str, not a list of {role, content} messages"),
    ("data format without its columns", ["--data_format", "prompt_completion"] + chat_flags([USER, ANSWER])[:4], "column(s) ['prompt', 'completion'] not found"),
    ("--packing with a classification task", CLS + ["--packing"], "packing concatenates causal-LM rows (--task lm)"),
    ("--packing on a model whose rows it cannot keep apart", ["--model", "builtin:tiny-bert", "--packing"], "--packing: model type 'bert' is not one whose rows dsee_scale keeps apart"),
    ("perplexity text missing", ["--eval_perplexity", TmpPath("wiki.txt")], "wiki.txt is not a file (a plain text file, e.g. ../shared/data/wikitext2/test.txt)"),
    ("perplexity of a classifier", CLS + ["--eval_perplexity", TmpPath("wiki.txt", "Some text .\n")], "eval_perplexity measures a language model's perplexity: it is for --task lm, not cls"),
    ("stages out of order", ["--stages", "export,retune"], "stages export,retune are out of order"),
    ("--resume and --overwrite together", ["--resume", "--overwrite"], "choose --resume or --overwrite, not both"),
]

GLUE = SHARED_DATA / "glue"
# A wrong data choice for GLUE's raw files, with a tiny BERT; run from the repository root, as the
# recipes name their files from there (tests/unit/test_glue.py).
DATA_MISTAKES: list[Case] = [
    ("real-valued labels with task cls", ["--config", RECIPES / "glue-stsb.yaml", "--task", "cls", "--metric", "accuracy", *TINY],
     "label column 'score' holds real numbers (e.g. '5.000'), not classes: for a regression target such as STS-B's score use --task reg"),
    ("class names with task reg", ["--config", RECIPES / "glue-rte.yaml", "--task", "reg", "--metric", "pearson_spearman", *TINY],
     "label column 'label' holds 'not_entailment', not a finite number: --task reg needs numeric targets; for classes use --task cls"),
    ("headerless file read with a header", ["--config", RECIPES / "glue-cola.yaml", "--header", "true", *TINY],
     "columns are ['gj04', '1', '', \"Our friends won't buy this an…\"] (set --text_column / --label_column; for a file without a header row add --header false: columns are then named 0 to 3)"),
    ("column missing from a headerless file", ["--config", RECIPES / "glue-cola.yaml", "--text_column", "sentence", *TINY],
     "column(s) ['sentence'] not found; columns are 0 ('gj04'), 1 ('1'), 2 (''), 3 (\"Our friends won't buy this an…\")"),
    ("metric of the other task", ["--config", RECIPES / "glue-stsb.yaml", "--metric", "mcc", *TINY], "metric mcc is for --task cls, not reg: choose one of pearson_spearman"),
    ("--header false on a file that is not a table", ["--train_file", GLUE.parent / "e2e" / "valid.txt", "--header", "false", *TINY], "--header false applies to .tsv/.csv files"),
]


def argv(flags: list[Flag], tmp: Path) -> list[str]:
    """launch/train.py's arguments for a case: its files written into `tmp`, and --output_dir
    tmp/out unless the case gives one (a case must leave tmp/out uncreated)."""
    args = [flag.make(tmp) if isinstance(flag, TmpPath) else str(flag() if callable(flag) else flag) for flag in flags]
    return args if "--output_dir" in args else [*args, "--output_dir", str(tmp / "out")]
