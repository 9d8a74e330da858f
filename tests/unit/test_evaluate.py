"""LM evaluation without labels in the model call (evaluate.lm_sums): the same loss as the labelled
path, chunked so that no batch × sequence × vocabulary tensor exists; perplexity of a text in the
SparseGPT/Wanda windows (data.text_windows); lm-evaluation-harness on an export (the `eval`
extra). Across ranks under ZeRO-3: tests/multirank/test_perplexity_runs.py."""
import json
import sys

import pytest
import torch
from bench_eval_memory import labelled_sums
from conftest import SHARED_DATA, tiny_model
from torch.utils._python_dispatch import TorchDispatchMode

from dsee_scale import arch, evaluate
from dsee_scale.evaluate import evaluate_rows, lm_sums

WIKITEXT = SHARED_DATA / "wikitext2" / "test.txt"


def lm_batch(vocab: int, rows: int = 4, length: int = 24) -> dict[str, torch.Tensor]:
    """Right-padded rows of different lengths, a prompt without loss in each, as data.collate makes them."""
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab, (rows, length), generator=generator)
    lengths = torch.tensor([length, length - 5, length - 11, 7])[:rows]
    mask = (torch.arange(length) < lengths[:, None]).long()
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :3] = -100
    return {"input_ids": ids * mask, "attention_mask": mask, "labels": labels}


@pytest.mark.parametrize("kind", ["llama", "gpt2", "gemma2"])
def test_loss_without_labels_equals_the_labelled_path(kind, monkeypatch):
    """fp32: the head run per chunk (any chunk size) and the logits chunked (a family arch.py does
    not know) give the labelled path's sums within 1e-6, a filler row (real False) left out.
    Gemma 2 soft-caps its logits after the head (a cap of 0.5, felt by a tiny model's logits):
    its chunks are of logits."""
    model = tiny_model(kind, vocab_size=1000, **({"final_logit_softcapping": 0.5} if kind == "gemma2" else {}))
    batch, real = lm_batch(1000), torch.tensor([True, True, True, False])
    with torch.no_grad():
        labelled = model(**batch)
        expected = labelled_sums(labelled.logits, batch["labels"], real)
        for chunk in (1, 7, 1024):
            got = lm_sums(model, model, batch, real, chunk=chunk)
            assert got[1] == expected[1] and got[0].item() == pytest.approx(expected[0].item(), rel=1e-6), chunk
        all_real = lm_sums(model, model, batch, torch.ones(4, dtype=torch.bool))
        assert (all_real[0] / all_real[1]).item() == pytest.approx(labelled.loss.item(), rel=1e-6)  # HF's own mean token loss
        assert "forward" not in vars(model.get_output_embeddings())  # the head is itself again
        assert arch.logits_are_head_output(model) == (kind != "gemma2")
        monkeypatch.setattr(arch, "logits_are_head_output", lambda model: False)
        got = lm_sums(model, model, batch, real, chunk=7)
        assert got[0].item() == pytest.approx(expected[0].item(), rel=1e-6)


class LargestTensor(TorchDispatchMode):
    """The most elements of any tensor an op returned while open."""

    def __init__(self) -> None:
        super().__init__()
        self.numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.numel = max([self.numel, *(t.numel() for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, torch.Tensor))])
        return out


def test_no_tensor_grows_with_sequence_times_vocabulary():
    """A 32k vocabulary: the labelled call makes B×T×V logits, lm_sums at most chunk × V (the
    chunk's fp32 logits), at any sequence length. Peak memory measured: benchmarks/bench_eval_memory.py."""
    vocab, chunk = 32000, 64
    model = tiny_model("llama", vocab_size=vocab, max_position_embeddings=512)
    for length in (128, 512):
        batch = {"input_ids": torch.randint(0, vocab, (2, length)), "attention_mask": torch.ones(2, length, dtype=torch.long)}
        batch["labels"] = batch["input_ids"]
        with torch.no_grad(), LargestTensor() as new:
            lm_sums(model, model, batch, torch.ones(2, dtype=torch.bool), chunk=chunk)
        with torch.no_grad(), LargestTensor() as old:
            labelled_sums(model(**batch).logits, batch["labels"], torch.ones(2, dtype=torch.bool))
        assert old.numel >= 2 * length * vocab
        assert new.numel == chunk * vocab, length


@pytest.fixture(scope="module")
def gpt2_tokenizer():
    from transformers import AutoTokenizer

    from dsee_scale.data import with_pad_token

    return with_pad_token(AutoTokenizer.from_pretrained(str(SHARED_DATA / "gpt2_tokenizer")))


def test_text_windows_follow_the_sparsegpt_wanda_protocol(tmp_path, gpt2_tokenizer):
    """The text tokenized once, whole windows of exactly max_length tokens, the rest dropped."""
    from dsee_scale.data import text_windows

    text = "".join(WIKITEXT.read_text(encoding="utf-8").splitlines(keepends=True)[:30])
    (tmp_path / "t.txt").write_text(text, encoding="utf-8")
    ids = gpt2_tokenizer(text)["input_ids"]
    windows = text_windows(str(tmp_path / "t.txt"), gpt2_tokenizer, 64)
    assert len(windows) == len(ids) // 64 >= 3
    assert windows["input_ids"] == windows["labels"] == [ids[i * 64 : (i + 1) * 64] for i in range(len(windows))]
    (tmp_path / "short.txt").write_text("A few words .")
    with pytest.raises(ValueError, match=r"--eval_perplexity .*short.txt: 4 tokens, fewer than one window of --max_length 64"):
        text_windows(str(tmp_path / "short.txt"), gpt2_tokenizer, 64)


def test_perplexity_of_a_text_is_exp_of_the_mean_loss_over_its_windows(tmp_path, gpt2_tokenizer):
    """As SparseGPT/Wanda compute it: each window through the model with its labels, mean NLL over
    every predicted token, exp; in batches with a filler window (5 windows, batches of 2)."""
    from dsee_scale.data import text_windows

    (tmp_path / "t.txt").write_text("".join(WIKITEXT.read_text(encoding="utf-8").splitlines(keepends=True)[:12]), encoding="utf-8")
    model = tiny_model("gpt2", vocab_size=len(gpt2_tokenizer))
    windows = text_windows(str(tmp_path / "t.txt"), gpt2_tokenizer, 32).select(range(5))
    with torch.no_grad():
        losses = [model(input_ids=torch.tensor([w]), labels=torch.tensor([w])).loss for w in windows["input_ids"]]
    result = evaluate_rows(model, windows, gpt2_tokenizer, "lm", micro=2)
    assert result["perplexity"] == pytest.approx(torch.stack(losses).mean().exp().item(), rel=1e-5)


def test_harness_without_lm_eval_names_the_eval_extra(monkeypatch, capsys, tmp_path):
    monkeypatch.setitem(sys.modules, "lm_eval", None)
    monkeypatch.setattr(sys, "argv", ["evaluate", "--model", str(tmp_path), "--harness", "hellaswag"])
    with pytest.raises(SystemExit) as code:
        evaluate.main()
    assert code.value.code == 2
    assert "--harness (lm-evaluation-harness) needs lm_eval, which is not installed: install dsee_scale's 'eval' extra (pip install -e '.[eval]'" in capsys.readouterr().err


TASK = """task: tiny_yes_no
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{label}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""


def test_harness_runs_a_local_multiple_choice_task_on_an_export(tmp_path, monkeypatch, capsys, gpt2_tokenizer):
    """`python -m dsee_scale.evaluate --harness` through lm-eval's Python API, offline: a task
    YAML and its JSONL written here, a tiny model exported as a run exports it."""
    from dsee_scale.export import export_hf, save_for_generation

    model, export = tiny_model("gpt2", vocab_size=len(gpt2_tokenizer)), tmp_path / "export"
    export_hf(model, export)
    save_for_generation(model, gpt2_tokenizer, export)
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    rows = [{"question": f"Is {n} an even number?", "choices": [" yes", " no"], "label": n % 2} for n in range(10)]
    (tasks / "tiny.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    (tasks / "tiny.yaml").write_text(TASK.format(data=tasks / "tiny.jsonl"))
    monkeypatch.setattr(sys, "argv", ["evaluate", "--model", str(export), "--harness", "tiny_yes_no", "--include_path", str(tasks), "--batch_size", "4"])
    evaluate.main()
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["harness"]
    assert result["n-samples"]["tiny_yes_no"]["effective"] == 10 and result["n-shot"]["tiny_yes_no"] == 0
    accuracy = result["results"]["tiny_yes_no"]["acc,none"]
    assert isinstance(accuracy, float) and 0.0 <= accuracy <= 1.0


def test_e2e_continuations_in_left_padded_batches_equal_one_at_a_time_and_bleu_groups_references(gpt2_tokenizer):
    """evaluate.pair_continuations (bench_lm_instruct's E2E generations): batched with left padding,
    each source's greedy target is generate()'s one at a time; grouped_bleu scores a generation
    against every reference of its own source, not another's."""
    from dsee_scale.evaluate import generate, grouped_bleu, pair_continuations, pair_prompt

    tokenizer = gpt2_tokenizer
    pairs = [("name : Zizzi | eatType : pub", "Zizzi is a pub ."), ("name : The Mill | area : riverside | food : Indian", "The Mill serves Indian food by the river .")]
    model = tiny_model("gpt2", vocab_size=len(tokenizer), eos_token_id=tokenizer.eos_token_id)
    rows = []
    for source, target in pairs:
        prompt, answer = tokenizer(pair_prompt(source))["input_ids"], tokenizer(" " + target)["input_ids"] + [tokenizer.eos_token_id]
        rows.append((torch.tensor([prompt + answer]), torch.tensor([[-100] * len(prompt) + answer])))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(40):
        for ids, labels in rows:
            model(input_ids=ids, labels=labels).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
    model.eval()
    sources = [source for source, _ in pairs]
    batched = pair_continuations(model, tokenizer, sources, max_new_tokens=16, batch_size=2)
    assert batched == [target for _, target in pairs]  # learned, and stopped at EOS
    assert batched == [generate(model, tokenizer, s, 16, synced_gpus=False)[0] for s in sources]
    assert tokenizer.padding_side == "right"  # restored

    refs = {sources[0]: ["A pub named Zizzi .", pairs[0][1]], sources[1]: ["Indian food at The Mill ."]}
    assert grouped_bleu(list(zip(sources, batched)), refs) < 100  # the second generation matches none of its references
    refs[sources[1]].append(pairs[1][1])
    assert grouped_bleu(list(zip(sources, batched)), refs) == pytest.approx(100.0)
    assert grouped_bleu([(sources[1], batched[0])], refs) < 50  # another source's reference does not count
