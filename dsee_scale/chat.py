"""Chat data: templates (the tokenizer's, the built-in ChatML or a Jinja file), checks of `messages`
rows, and each conversation's tokens with the loss on its assistant turns.

Each assistant turn is found by rendering the conversation up to it (with the generation prompt)
and through it, so any template that renders earlier turns the same once later ones follow works,
with no `{% generation %}` markers. The whole rendered conversation is then tokenized once, as
`apply_chat_template(..., tokenize=True)` and a server tokenize it; a turn tokenized alone would
differ where it starts (a SentencePiece tokenizer puts '▁' before the first word of a string,
not after a newline), so the model would learn answers in tokens it is never prompted with.
"""
from __future__ import annotations

import itertools
import logging
import re
from pathlib import Path
from typing import TYPE_CHECKING

import jinja2

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

ROLES = ("system", "user", "assistant", "tool")
# ChatML (Qwen, SmolLM2-Instruct, ...), as transformers documents it.
CHAT_TEMPLATES = {
    "chatml": "{%- for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}{%- endfor %}"
              "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{%- endif %}",
}
TEMPLATE_TOKEN = re.compile(r"<\|[^|<>\s]+\|>")  # <|im_start|>, <|eot_id|>, ...: special tokens by convention
NO_TEMPLATE = ("the tokenizer has no chat template to render 'messages' with: pass --chat_template chatml (the built-in ChatML) "
               "or --chat_template FILE (a Jinja template)")


def template_text(name: str) -> str:
    """The Jinja text of a built-in template's name or of a template file; a ValueError names the
    choices, or the file's syntax error."""
    if name in CHAT_TEMPLATES:
        text = CHAT_TEMPLATES[name]
    elif Path(name).is_file():
        text = Path(name).read_text(encoding="utf-8")
    else:
        raise ValueError(f"--chat_template {name}: neither a built-in template ({', '.join(CHAT_TEMPLATES)}) nor a file")
    from transformers.utils.chat_template_utils import _compile_jinja_template  # the environment apply_chat_template renders with ({% generation %} included)

    try:
        _compile_jinja_template(text)
    except jinja2.TemplateSyntaxError as err:
        raise ValueError(f"--chat_template {name} is not a valid Jinja template: {err.message} (line {err.lineno})") from None
    return text


def adds_bos(tokenizer: PreTrainedTokenizerBase) -> bool:
    """Whether the tokenizer starts plain text with its BOS token (LLaMA-2's does, GPT-2's does not)."""
    bos = tokenizer.bos_token_id
    return bos is not None and tokenizer("a")["input_ids"][:1] == [bos] and tokenizer("a", add_special_tokens=False)["input_ids"][:1] != [bos]


def use_chat_template(tokenizer: PreTrainedTokenizerBase, name: str) -> int:
    """Install a template on the tokenizer; its <|...|> tokens missing from the vocabulary are
    added as special tokens (returns how many), and a tokenizer that starts text with BOS gets it
    from the template too, so a chat renders as training saw it wherever the template is used."""
    text = template_text(name)
    if adds_bos(tokenizer) and "bos_token" not in text:
        text = "{{ bos_token }}" + text
    tokenizer.chat_template = text
    vocab = tokenizer.get_vocab()
    new = [t for t in dict.fromkeys(TEMPLATE_TOKEN.findall(text)) if t not in vocab]
    return tokenizer.add_special_tokens({"extra_special_tokens": new}, replace_extra_special_tokens=False) if new else 0


def check_messages(messages, row: int) -> None:
    """A chat row: a list of {role, content} messages, roles known, at least one assistant turn
    (the loss is on those). `row` counts from 1, as a file's lines do."""
    if not isinstance(messages, list):
        raise ValueError(f"row {row}: column 'messages' holds {type(messages).__name__}, not a list of {{role, content}} messages")
    for i, message in enumerate(messages, 1):
        if not isinstance(message, dict) or not isinstance(message.get("content"), str):
            raise ValueError(f"row {row}, message {i}: a message is {{\"role\": ..., \"content\": \"text\"}}, got {str(message)[:80]!r}")
        if message.get("role") not in ROLES:
            raise ValueError(f"row {row}, message {i}: unknown role {message.get('role')!r}; roles are {', '.join(ROLES)}")
    if not any(m["role"] == "assistant" for m in messages):
        raise ValueError(f"row {row} has no assistant turn: the loss is on assistant messages, so every chat row needs one "
                         "({\"role\": \"assistant\", \"content\": ...}); drop the row or add its answer")


def segments(tokenizer: PreTrainedTokenizerBase, messages: list[dict], row: int) -> list[tuple[str, bool]]:
    """The rendered conversation as (text, is an assistant turn) pieces, in order: before each
    assistant turn, everything up to its generation prompt; the turn itself, from its content
    through what the template closes it with (e.g. 'answer<|im_end|>\\n'). The tokenizer has a
    template (tokenize checks)."""
    def render(upto: int, prompt: bool) -> str:
        try:
            return tokenizer.apply_chat_template(messages[:upto], tokenize=False, add_generation_prompt=prompt)
        except jinja2.TemplateError as err:  # e.g. a template's raise_exception('roles must alternate user/assistant')
            raise ValueError(f"row {row}: the chat template refuses the conversation{' up to message ' + str(upto) if upto < len(messages) else ''}: {err}") from None

    full, pieces, done = render(len(messages), False), [], 0
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before, through = render(i, True), render(i + 1, False)
        if not (full.startswith(through) and through.startswith(before) and len(before) >= done):
            raise ValueError(f"row {row}: the chat template renders a conversation's start differently once later turns follow, so its assistant "
                             "turns cannot be told apart: use a template that renders each turn the same (--chat_template chatml, or a FILE)")
        pieces += [(before[done:], False), (through[len(before):], True)]
        done = len(through)
    pieces.append((full[done:], False))
    return [(text, assistant) for text, assistant in pieces if text]


def conversation_tokens(tokenizer: PreTrainedTokenizerBase, messages: list[dict], row: int, specials: set[int]) -> tuple[list[int], list[int], int]:
    """(input ids, labels, where the last assistant turn starts) of a chat row: the rendered
    conversation tokenized whole, labels on the assistant turns' tokens (`answer_labels`). A turn
    starts after the tokens its rendered prefix has alone (what generation is prompted with),
    or where those first differ from the whole's, should a token straddle the two."""
    encode = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    pieces = segments(tokenizer, messages, row)
    whole = "".join(text for text, _ in pieces)
    ids = encode(whole)
    ends = list(itertools.accumulate(len(text) for text, _ in pieces))
    bounds = [0, *itertools.accumulate((_common_prefix(encode(whole[:end]), ids) for end in ends[:-1]), max), len(ids)]
    labels, answer = [], 0
    for (_, assistant), start, stop in zip(pieces, bounds, bounds[1:]):
        if assistant:
            answer = start
        labels += answer_labels(ids[start:stop], specials) if assistant else [-100] * (stop - start)
    return ids, labels, answer


def _common_prefix(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def special_ids(tokenizer: PreTrainedTokenizerBase) -> set[int]:
    return set(tokenizer.all_special_ids) | {i for i, token in tokenizer.added_tokens_decoder.items() if token.special}


def answer_labels(ids: list[int], specials: set[int]) -> list[int]:
    """An assistant turn's labels: its tokens through the last special one (the end-of-turn
    token, which teaches the model to stop, as TRL's assistant masks do); what the template adds
    after it (ChatML's newline) is not trained. A turn with no special token is trained whole."""
    last = max((i for i, t in enumerate(ids) if t in specials), default=len(ids) - 1)
    return ids[: last + 1] + [-100] * (len(ids) - last - 1)


def end_of_turn(tokenizer: PreTrainedTokenizerBase) -> int | None:
    """The token that closes an assistant turn (<|im_end|> in ChatML), for generate() to stop
    at; None without a chat template or where turns end in plain text."""
    if tokenizer.chat_template is None:
        return None
    probe = [{"role": "user", "content": "?"}, {"role": "assistant", "content": "!"}]
    try:  # after training, at export: a template that refuses this probe must not lose the run
        turn = next(text for text, assistant in segments(tokenizer, probe, row=0) if assistant)
    except (ValueError, StopIteration) as err:
        logging.getLogger("dsee_scale").warning("generation_config.json: no end-of-turn token found (the chat template refused a probe "
                                                "conversation: %s); generate() stops at EOS only", err)
        return None
    specials = special_ids(tokenizer)
    return next((t for t in reversed(tokenizer(turn, add_special_tokens=False)["input_ids"]) if t in specials), None)
