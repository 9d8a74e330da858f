"""Chat data through whole runs: a builtin tiny LLaMA tuned on ChatML conversations through every
stage, its export generating with plain transformers and stopping at <|im_end|>; a pretrained
model whose tokenizer lacks the template's tokens grows its embeddings under 2-rank ZeRO-3."""
import json

import torch
from conftest import tiny_model
from launch_utils import one_process, run_launcher, tail_per_rank
from safetensors.torch import load_file

from dsee_scale.data import generate_corpus, train_sentencepiece, write_corpus


def write_chat(path, n: int) -> str:
    """Conversations a tiny random model learns to close in a few dozen steps: every answer is 'yes'."""
    rows = [{"messages": [{"role": "user", "content": source}, {"role": "assistant", "content": "yes"}]} for source, _ in generate_corpus(n, seed=0)]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def test_chat_run_through_every_stage_exports_a_model_that_stops_at_its_end_of_turn(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    data, out = write_chat(tmp_path / "chat.jsonl", 64), tmp_path / "run"
    proc = one_process(["--model", "builtin:tiny-llama", "--task", "lm", "--data_format", "chat", "--chat_template", "chatml", "--train_file", data, "--eval_file", data,
                        "--output_dir", out, "--steps", 60, "--retune_steps", 5, "--lr", 0.05, "--warmup_steps", 2, "--max_length", 96, "--micro_batch_size", 8,
                        "--save_every", 0, "--log_every", 20])
    assert proc.returncode == 0, tail_per_rank(proc.stdout + proc.stderr, 6000)
    assert "train data: format chat; 64 rows, 0 truncated, 0 dropped" in proc.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["data"]["train"] == {"format": "chat", "rows": 64, "truncated_rows": 0, "dropped_rows": 0, "target_tokens": summary["data"]["train"]["target_tokens"]}
    assert summary["data"]["train"]["target_tokens"] >= 2 * 64  # 'yes' and <|im_end|> at least
    assert summary["after"]["eval_loss"] < summary["before"]["eval_loss"] and summary["sparsity"] == 0.5

    merged = out / "export" / "merged"
    tokenizer, model = AutoTokenizer.from_pretrained(merged), AutoModelForCausalLM.from_pretrained(merged).eval()
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert end in model.generation_config.eos_token_id and model.generation_config.pad_token_id == tokenizer.pad_token_id
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "name : Zizzi | food : Indian | price : high | area : city centre"}],
                                           add_generation_prompt=True, return_tensors="pt", return_dict=True)
    new = model.generate(**prompt, max_new_tokens=16, do_sample=False)[0, prompt["input_ids"].shape[1]:].tolist()
    assert len(new) < 16 and new[-1] == end, tokenizer.convert_ids_to_tokens(new)  # stopped by generation_config.json's eos_token_id
    assert tokenizer.decode(new, skip_special_tokens=True).strip() == "yes"


def test_pretrained_model_grows_its_embeddings_for_the_template_tokens_under_two_rank_zero3(tmp_path):
    """The tokenizer's vocabulary (V) gains <|im_start|> and <|im_end|>: the model is resized to
    V + 2 before DSEE, partitioned again, trained with its embeddings and LM head (what the run asks
    for, the new rows starting alike) and exported; the two new rows have become different."""
    base = tmp_path / "base"
    tokenizer = train_sentencepiece(write_corpus(tmp_path / "corpus.txt", 300, seed=0), base, vocab_size=512)
    vocab = len(tokenizer)
    tiny_model("llama", vocab_size=vocab, bos_token_id=2, eos_token_id=3, pad_token_id=0).save_pretrained(base)  # untied: the LM head grows too
    before = load_file(str(base / "model.safetensors"))
    data, out = write_chat(tmp_path / "chat.jsonl", 16), tmp_path / "run"
    run_launcher("ranks", "launch/train.py", ["--model", base, "--chat_template", "chatml", "--train_file", data, "--eval_file", data, "--output_dir", out,
                                              "--stages", "tune,export", "--steps", 2, "--micro_batch_size", 2, "--max_length", 64, "--save_every", 0,
                                              "--dsee.trainable_modules", "embed_tokens,lm_head"])
    after = load_file(str(out / "export" / "merged" / "model.safetensors"))
    config = json.loads((out / "export" / "merged" / "config.json").read_text())
    assert config["vocab_size"] == vocab + 2
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        assert before[name].shape[0] == vocab and after[name].shape[0] == vocab + 2, name
        assert torch.isfinite(after[name]).all() and not torch.equal(after[name][vocab], after[name][vocab + 1]), name
    generation = json.loads((out / "export" / "merged" / "generation_config.json").read_text())
    assert vocab + 1 in generation["eos_token_id"]  # <|im_end|>, the second token added


def test_the_llama_instruct_recipe_runs_on_the_cpu_with_a_tiny_model(tmp_path):
    """launch/recipes/llama-instruct.yaml as shipped (chat data, gradient checkpointing, lr 2e-4, cosine
    schedule, accumulation, the DeepSpeed config chosen by device: zero3 here, zero3_bf16 on GPUs),
    with what needs a GPU and the hub overridden: builtin:tiny-llama with ChatML, a few steps, short rows;
    packed rows, and the perplexity of a text file measured before and after each stage."""
    from conftest import RECIPES, SHARED_DATA
    from transformers import AutoTokenizer

    data, out, text = write_chat(tmp_path / "chat.jsonl", 16), tmp_path / "run", tmp_path / "wiki.txt"
    text.write_text("".join((SHARED_DATA / "wikitext2" / "test.txt").read_text().splitlines(keepends=True)[:60]))
    proc = one_process(["--config", RECIPES / "llama-instruct.yaml", "--model", "builtin:tiny-llama", "--chat_template", "chatml", "--train_file", data, "--eval_file", data,
                        "--output_dir", out, "--max_length", 160, "--steps", 2, "--retune_steps", 1, "--warmup_steps", 1, "--grad_accum", 2, "--eval_perplexity", text])
    assert proc.returncode == 0, tail_per_rank(proc.stdout + proc.stderr, 6000)
    assert "DeepSpeed config zero3, chosen by device" in proc.stdout
    config = json.loads((out / "config.json").read_text())
    assert config["data_format"] == "chat" and config["gradient_checkpointing"] and config["lr"] == 2e-4 and config["lr_scheduler"] == "cosine"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["data"]["train"]["format"] == "chat" and summary["data"]["train"]["rows"] == 16 and summary["sparsity"] == 0.5
    assert len(summary["losses"]["tune"]) == 2 and len(summary["losses"]["retune"]) == 1
    assert config["packing"] and summary["data"]["train"]["packing"]["windows"] < 16  # rows of ~70 tokens: two to a window
    perplexity = summary["perplexity"]
    assert perplexity["windows"] > 0 and all(1 < perplexity[stage] < float("inf") for stage in ("before", "tune", "prune", "retune", "after"))
    merged = out / "export" / "merged"
    end = AutoTokenizer.from_pretrained(merged).convert_tokens_to_ids("<|im_end|>")
    assert end in json.loads((merged / "generation_config.json").read_text())["eos_token_id"]  # generation stops at the end of turn
