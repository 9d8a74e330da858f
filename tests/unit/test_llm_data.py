"""LM data formats on a tiny LLaMA's SentencePiece tokenizer (and GPT-2's BPE) with the built-in
ChatML template: where the loss is, BOS/EOS, fitting rows to max_length, auto detection, bad chat
rows, and an export that generates with its chat template and stops at <|im_end|> (alone and in
left-padded batches)."""
import json

import pytest
import torch
from conftest import SHARED_DATA

from dsee_scale.chat import CHAT_TEMPLATES, check_messages, end_of_turn, use_chat_template
from dsee_scale.config import TrainConfig
from dsee_scale.data import check_columns, corpus_texts, data_counts, data_format, load_split, tokenize, train_sentencepiece, write_corpus

ANSWERS = ["The Eagle is a cheap French restaurant in the riverside .", "Zizzi ."]
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "name : The Eagle | food : French"}, {"role": "assistant", "content": ANSWERS[0]},
        {"role": "user", "content": "And Zizzi ?"}, {"role": "assistant", "content": ANSWERS[1]}]


@pytest.fixture(scope="module")
def llama_folder(tmp_path_factory):
    """The built-in SentencePiece tokenizer (LLaMA's kind), as `builtin:tiny-llama` runs train it."""
    folder = tmp_path_factory.mktemp("tok")
    train_sentencepiece(write_corpus(folder / "corpus.txt", 300, seed=0), folder, vocab_size=512)
    return str(folder)


def load(source: str, template: str | None = "chatml", **options):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source, **options)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token  # as data.load_tokenizer does
    if template:
        use_chat_template(tokenizer, template)
    return tokenizer


@pytest.fixture(params=["llama", "gpt2"])
def tokenizer(request, llama_folder):
    return load(llama_folder if request.param == "llama" else str(SHARED_DATA / "gpt2_tokenizer"))


def tokenized(tmp_path, rows: list[dict], tokenizer, **options):
    """(source dataset, tokenized rows) of JSONL rows."""
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = TrainConfig(train_file=str(path), eval_file=str(path), **options)
    ds = load_split(cfg, "train")
    return ds, tokenize(ds, tokenizer, cfg)


def encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def labelled_runs(labels: list[int]) -> list[list[int]]:
    """Positions with a loss, as runs of consecutive positions."""
    runs = []
    for i, label in enumerate(labels):
        if label != -100:
            if runs and runs[-1][-1] == i - 1:
                runs[-1].append(i)
            else:
                runs.append([i])
    return runs


def test_chat_loss_is_on_each_assistant_turn_through_its_end_of_turn_token(tmp_path, tokenizer):
    """Each assistant answer and the <|im_end|> closing it (as TRL's assistant masks): nothing of
    the system or user turns, the role headers, or the newline ChatML puts after <|im_end|>."""
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    _, rows = tokenized(tmp_path, [{"messages": CHAT}], tokenizer)
    ids, labels = rows[0]["input_ids"], rows[0]["labels"]
    runs = labelled_runs(labels)
    rendered = tokenizer.apply_chat_template(CHAT, tokenize=False)
    assert ids == encode(tokenizer, rendered)  # the conversation as a server tokenizes it, not turn by turn
    assert [[ids[i] for i in run] for run in runs] == [[labels[i] for i in run] for run in runs]
    assert [run[-1] for run in runs] == [i for i, t in enumerate(ids) if t == end][2::2]  # each answer through its <|im_end|> (system, user, answer, user, answer)
    assert [tokenizer.decode([ids[i] for i in run[:-1]]).strip() for run in runs] == ANSWERS
    prompts = [encode(tokenizer, tokenizer.apply_chat_template(CHAT[:n], tokenize=False, add_generation_prompt=True)) for n in (2, 4)]
    assert [run[0] for run in runs] == [len(p) for p in prompts]  # an answer starts where its generation prompt's tokens end
    if tokenizer.convert_ids_to_tokens(198) == "Ċ":  # GPT-2's byte-level BPE is lossless: the tokens are the rendered text, newlines included
        assert tokenizer.decode(ids) == rendered and ids[runs[0][-1] + 1] == 198 and labels[runs[0][-1] + 1] == -100
    assert rows[0]["targets"] == sum(map(len, runs))
    assert end_of_turn(tokenizer) == end


def test_chat_generation_prompt_is_tokenized_as_training_saw_it(tmp_path, tokenizer):
    """The tokens before an answer are those of apply_chat_template(..., add_generation_prompt=True),
    which is what generation starts from."""
    _, rows = tokenized(tmp_path, [{"messages": CHAT[:3]}], tokenizer)
    prompt = encode(tokenizer, tokenizer.apply_chat_template(CHAT[:2], tokenize=False, add_generation_prompt=True))
    assert rows[0]["input_ids"][: len(prompt)] == prompt and set(rows[0]["labels"][: len(prompt)]) == {-100}


def test_over_long_chat_loses_its_prompt_start_and_keeps_the_answer(tmp_path, llama_folder):
    tokenizer = load(llama_folder)
    long = [{"role": "user", "content": "The Eagle is near the river . " * 20}, {"role": "assistant", "content": ANSWERS[0]}]
    _, whole = tokenized(tmp_path, [{"messages": long}], tokenizer, max_length=1024)
    source, cut = tokenized(tmp_path, [{"messages": long}], tokenizer, max_length=40)
    assert len(whole[0]["input_ids"]) > 40 and not whole[0]["truncated"]
    assert cut[0]["input_ids"] == whole[0]["input_ids"][-40:] and cut[0]["labels"] == whole[0]["labels"][-40:] and cut[0]["truncated"]
    assert data_counts(source, cut, "chat")["truncated_rows"] == 1


def test_rows_whose_answer_cannot_fit_are_dropped_and_counted(tmp_path, llama_folder):
    tokenizer = load(llama_folder)
    short = [{"role": "user", "content": "Zizzi ?"}, {"role": "assistant", "content": "Zizzi ."}]
    long_prompt = [{"role": "user", "content": "The Eagle is near the river . " * 20}, {"role": "assistant", "content": "Zizzi ."}]
    long_answer = [{"role": "user", "content": "Zizzi ?"}, {"role": "assistant", "content": "The Eagle is near the river . " * 20}]
    source, rows = tokenized(tmp_path, [{"messages": m} for m in (short, long_prompt, long_answer)], tokenizer, max_length=40)
    targets = sum(sum(t != -100 for t in labels[1:]) for labels in rows["labels"])
    assert data_counts(source, rows, "chat") == {"format": "chat", "rows": 2, "truncated_rows": 1, "dropped_rows": 1, "target_tokens": targets}
    answers = [[t for t in labels if t != -100] for labels in rows["labels"]]  # both kept rows end in the same answer
    assert all(len(ids) <= 40 for ids in rows["input_ids"]) and answers[0] == answers[1] and tokenizer.decode(answers[0], skip_special_tokens=True).strip() == "Zizzi ."


def test_text_documents_end_with_eos_and_long_ones_lose_their_end(tmp_path, tokenizer):
    text = "The Eagle is cheap ."
    source, rows = tokenized(tmp_path, [{"text": text}, {"text": text * 20}], tokenizer, max_length=30)
    assert rows[0]["input_ids"] == rows[0]["labels"] == encode(tokenizer, text) + [tokenizer.eos_token_id]
    assert rows[1]["input_ids"] == encode(tokenizer, text * 20)[:30] and rows[1]["truncated"]  # a cut document does not end: no EOS
    assert data_counts(source, rows, "text")["truncated_rows"] == 1


def test_prompt_completion_puts_the_loss_on_the_completion_and_its_eos(tmp_path, tokenizer):
    prompt, completion = "name : The Eagle | food : French ->", " The Eagle serves French food ."
    _, rows = tokenized(tmp_path, [{"prompt": prompt, "completion": completion}], tokenizer)
    p, c = encode(tokenizer, prompt), encode(tokenizer, completion) + [tokenizer.eos_token_id]
    assert rows[0]["input_ids"] == p + c and rows[0]["labels"] == [-100] * len(p) + c
    _, cut = tokenized(tmp_path, [{"prompt": "The Eagle is near the river . " * 20, "completion": completion}], tokenizer, max_length=24)
    assert cut[0]["labels"][-len(c):] == c and len(cut[0]["input_ids"]) == 24 and cut[0]["truncated"]


def test_bos_follows_the_tokenizer_once(tmp_path, llama_folder):
    """A tokenizer that starts text with BOS: text and prompts start with it; an installed template
    that does not render it is given it, one that does keeps its own; a cut prompt keeps it."""
    plain = load(llama_folder, template=None, add_bos_token=True)
    bos = plain.bos_token_id
    for row in ({"text": "Zizzi ."}, {"prompt": "Zizzi ?", "completion": " Zizzi ."}):
        _, rows = tokenized(tmp_path, [row], plain)
        assert rows[0]["input_ids"][0] == bos and rows[0]["input_ids"].count(bos) == 1
    template = tmp_path / "own.jinja"
    template.write_text("{{ bos_token }}" + CHAT_TEMPLATES["chatml"])
    for name in ("chatml", str(template)):
        tokenizer = load(llama_folder, template=name, add_bos_token=True)
        assert tokenizer.chat_template.count("bos_token") == 1
        _, rows = tokenized(tmp_path, [{"messages": CHAT}], tokenizer)
        assert rows[0]["input_ids"][0] == bos and rows[0]["input_ids"].count(bos) == 1
    long = [{"role": "user", "content": "The Eagle is near the river . " * 20}, {"role": "assistant", "content": "Zizzi ."}]
    _, cut = tokenized(tmp_path, [{"messages": long}], tokenizer, max_length=30)
    assert cut[0]["input_ids"][0] == bos and len(cut[0]["input_ids"]) == 30


@pytest.mark.parametrize("columns, expected", [(["messages", "text"], "chat"), (["prompt", "completion", "text"], "prompt_completion"), (["source", "target"], "e2e"),
                                               (["text", "meta"], "text"), (["prompt", "text"], "text")])
def test_auto_detects_the_format_by_its_columns(columns, expected):
    assert data_format(columns, TrainConfig()) == expected
    assert data_format(columns, TrainConfig(data_format="text")) == "text"


def test_a_format_without_its_columns_is_named():
    with pytest.raises(ValueError, match=r"column\(s\) \['messages'\] not found; columns are \['text'\] \(set --data_format"):
        check_columns(["text"], TrainConfig(data_format="chat"), "d.jsonl")
    with pytest.raises(ValueError, match=r"column\(s\) \['text'\] not found.*prompt_completion 'prompt' and 'completion'"):
        check_columns(["prompt", "answer"], TrainConfig(), "d.jsonl")
    with pytest.raises(ValueError, match="data_format and chat_template are for --task lm"):
        TrainConfig(task="cls", data_format="chat")


@pytest.mark.parametrize("messages, message", [
    ("hello", "row 3: column 'messages' holds str, not a list"),
    ([{"role": "user", "content": "hi"}], "row 3 has no assistant turn"),
    ([{"role": "bot", "content": "hi"}], "row 3, message 1: unknown role 'bot'; roles are system, user, assistant, tool"),
    ([{"role": "assistant"}], "row 3, message 1: a message is"),
])
def test_bad_chat_rows_are_named(messages, message):
    with pytest.raises(ValueError, match=message):
        check_messages(messages, 3)


def test_chat_data_without_a_template_is_refused(tmp_path, llama_folder):
    with pytest.raises(ValueError, match="no chat template.*--chat_template chatml"):
        tokenized(tmp_path, [{"messages": CHAT}], load(llama_folder, template=None))


def test_builtin_tokenizer_learns_the_texts_of_json_rows_not_their_syntax(tmp_path):
    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps({"messages": CHAT[1:3]}) + "\n")
    assert corpus_texts(path) == ["user", CHAT[1]["content"], "assistant", ANSWERS[0]]


def test_export_generates_with_its_chat_template_and_stops_at_the_end_of_turn(tmp_path, llama_folder):
    """A tiny LLaMA taught one answer, exported (export_hf + save_for_generation) and reloaded
    with plain transformers: generation_config.json's eos_token_id holds <|im_end|>, so greedy
    generation from the chat template's prompt ends there, before max_new_tokens."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dsee_scale.data import collate
    from dsee_scale.export import export_hf, save_for_generation
    from dsee_scale.models import tiny_config

    tokenizer = load(llama_folder)
    model = AutoModelForCausalLM.from_config(tiny_config("llama", vocab_size=len(tokenizer), bos_token_id=2, eos_token_id=3, pad_token_id=0))
    chat = [{"role": "user", "content": "Zizzi ?"}, {"role": "assistant", "content": "Zizzi ."}]
    _, rows = tokenized(tmp_path, [{"messages": chat}], tokenizer)
    batch = collate(rows[:], tokenizer)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(60):
        model(**{k: batch[k] for k in ("input_ids", "attention_mask", "labels")}).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    export_hf(model.eval(), tmp_path / "export")
    save_for_generation(model, tokenizer, tmp_path / "export")

    reloaded, plain = AutoModelForCausalLM.from_pretrained(tmp_path / "export"), AutoTokenizer.from_pretrained(tmp_path / "export")
    end = plain.convert_tokens_to_ids("<|im_end|>")
    assert reloaded.generation_config.eos_token_id == [3, end] and reloaded.generation_config.pad_token_id == 0
    prompt = plain.apply_chat_template(chat[:1], add_generation_prompt=True, return_tensors="pt", return_dict=True)
    new = reloaded.generate(**prompt, max_new_tokens=20, do_sample=False)[0, prompt["input_ids"].shape[1]:].tolist()
    assert new == [t for t in rows[0]["labels"] if t != -100] and new[-1] == end and plain.decode(new[:-1]).strip() == "Zizzi ."

    # evaluate.chat_replies (bench_lm_instruct's greedy replies): batched with left padding beside a
    # longer conversation, the reply is the same and stops at <|im_end|> as well
    from dsee_scale.evaluate import chat_replies

    conversations, side = [chat[:1], CHAT[1:2]], plain.padding_side
    replies = chat_replies(reloaded, plain, conversations, max_new_tokens=12, batch_size=2)
    assert replies[0] == "Zizzi ." and replies == chat_replies(reloaded, plain, conversations, max_new_tokens=12, batch_size=1)
    assert plain.padding_side == side  # restored
