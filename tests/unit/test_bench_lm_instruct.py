"""bench_lm_instruct.py's GSM8K scoring (the final number of a reply) and report.py's table and
verdicts from lm_instruct.jsonl."""
import json
import sys

import bench_lm_instruct
import pytest
import report


@pytest.mark.parametrize("text, number", [
    ("She sold 48/2 = <<48/2=24>>24 clips.\n#### 72", "72"),
    ("#### 1,000", "1000"),
    ("The answer is 18.0.", "18"),
    ("So she earns $10 an hour, 3 hours: 30 dollars", "30"),
    ("#### -5 (after 3 steps)", "-5"),
    ("no number here", None),
])
def test_final_number_reads_gsm8k_answers_and_free_replies(text, number):
    assert bench_lm_instruct.final_number(text) == number


def test_chat_rows_put_the_question_in_the_user_turn_and_the_answer_in_the_assistant_turn(tmp_path):
    source = tmp_path / "train.jsonl"
    source.write_text("".join(json.dumps({"question": f"q{i}", "answer": f"a\n#### {i}"}) + "\n" for i in range(5)))
    rows = [json.loads(line) for line in bench_lm_instruct.chat_rows(source, 3, tmp_path / "chat.jsonl").read_text().splitlines()]
    assert rows == [{"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a\n#### {i}"}]} for i in range(3)]


def test_instruct_table_keeps_the_dsee_cells_setting_and_judges_the_targets(tmp_path, monkeypatch):
    monkeypatch.setattr(report, "RESULTS", tmp_path)
    base = {"task": "gsm8k", "seed": 0, "train_rows": 256, "steps": 12, "sparsity": 0.0}
    rows = [{**base, "method": "dsee", "answer_ppl": 9.0, "exact_match": 0.3, "steps": 4},  # another setting: replaced below
            {**base, "method": "dense", "answer_ppl": 20.0, "exact_match": 0.1},
            {**base, "method": "peft_lora", "answer_ppl": 2.0, "exact_match": 0.2, "trainable_pct": 3.1},
            {**base, "method": "dsee", "answer_ppl": 2.2, "exact_match": 0.25, "trainable_pct": 3.12},
            {**base, "method": "dsee_50%", "answer_ppl": 2.31, "exact_match": 0.2, "sparsity": 0.5}]
    (tmp_path / "lm_instruct.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    section = report.lm_instruct_section()
    assert "| dsee | 2.20 (1 seed) | 25.00 (1 seed) | 0.0% | 3.12% |" in section
    assert "| dsee_50% | 2.31 (1 seed) | 20.00 (1 seed) | 50.0% |" in section
    assert "+0.095 nats from PEFT LoRA's at the same rank (target ≤ +0.05: missed by 0.045 nats; 1 seed)" in section  # log(2.2/2.0)
    assert "dsee_50%: answer-token perplexity +5.0% of unpruned DSEE's (target ≤ +10%: met; 1 seed)" in section
    assert "9.00" not in section


def test_instruct_verdicts_compare_only_the_seeds_both_cells_have(tmp_path, monkeypatch):
    """A seed run for one cell only (seed 2 of dsee here) moves its table row, not the verdicts."""
    monkeypatch.setattr(report, "RESULTS", tmp_path)
    ppl = {("peft_lora", 0): 2.0, ("peft_lora", 1): 4.0, ("dsee", 0): 2.0, ("dsee", 1): 4.4, ("dsee", 2): 100.0, ("dsee_50%", 1): 4.62}
    rows = [{"task": "gsm8k", "seed": seed, "train_rows": 256, "steps": 12, "method": m, "answer_ppl": v, "exact_match": 0.1} for (m, seed), v in ppl.items()]
    (tmp_path / "lm_instruct.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    section = report.lm_instruct_section()
    assert "| dsee | 35.47 ± 55.90 |" in section  # the table: every seed of the cell
    assert "+0.065 nats from PEFT LoRA's at the same rank (target ≤ +0.05: missed by 0.015 nats; 2 seeds)" in section  # log(3.2/3.0)
    assert "dsee_50%: answer-token perplexity +5.0% of unpruned DSEE's (target ≤ +10%: met; 1 seed)" in section  # 4.62 against seed 1's 4.4


def test_e2e_subset_keeps_the_first_representations_with_all_their_references(tmp_path):
    source = tmp_path / "test.txt"
    source.write_text("a : 1||One .\na : 1||The one .\nb : 2 ||Two .\n\nc : 3||Three .\nb : 2|| Second two .\n")
    subset = bench_lm_instruct.e2e_subset(source, 2, tmp_path / "subset.txt")
    assert bench_lm_instruct.e2e_references(subset) == {"a : 1": ["One .", "The one ."], "b : 2": ["Two .", "Second two ."]}


def test_e2e_table_and_the_headlines_bleu_column(tmp_path, monkeypatch):
    monkeypatch.setattr(report, "RESULTS", tmp_path)
    base = {"seed": 0, "train_rows": 547, "steps": 12, "sparsity": 0.0}
    rows = [{**base, "task": "gsm8k", "method": "dsee", "answer_ppl": 3.0, "exact_match": 0.02},
            {**base, "task": "e2e", "method": "peft_lora", "bleu": 60.0, "answer_ppl": 4.0, "trainable_pct": 1.78},
            {**base, "task": "e2e", "method": "dsee", "bleu": 61.5, "answer_ppl": 3.9, "trainable_pct": 1.79},
            {**base, "task": "e2e", "method": "dsee_2:4", "bleu": 55.25, "answer_ppl": 6.0, "sparsity": 0.5}]
    (tmp_path / "lm_instruct.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    section = report.lm_e2e_section()
    assert "| dsee | 61.50 (1 seed) | 3.90 (1 seed) | 0.0% | 1.79% |" in section
    assert "- dsee: BLEU +1.50 against peft_lora (1 seed)." in section and "- dsee_2:4: BLEU -6.25 against dsee (1 seed)." in section
    assert "exact" not in section  # GSM8K's rows stay in their own table
    headline = report.lm_instruct_headline()
    assert "| dsee | 3.00 (1 seed) | 2.00 (1 seed) | 61.50 (1 seed) |" in headline
    assert "| peft_lora |  |  | 60.00 (1 seed) |" in headline


def test_help_prints(monkeypatch, capsys):
    """argparse formats help strings with %: the cell name dsee_50% in --cells' help once crashed --help."""
    monkeypatch.setattr(sys, "argv", ["bench_lm_instruct.py", "--help"])
    with pytest.raises(SystemExit) as stop:
        bench_lm_instruct.main()
    assert stop.value.code == 0 and "dsee_50%, dsee_2:4" in capsys.readouterr().out
