"""Llama-3 / 3.1 chat rendering and tokenization with an assistant-only loss mask.

The rendering reproduces, character for character, what transformers' `apply_chat_template` makes of
the chat templates shipped in Meta's `tokenizer_config.json` (tests/fixtures/sft/*.jinja hold both
templates; tests/test_sft_chat.py renders through transformers' own Jinja engine and compares):

    llama3    <|begin_of_text|> then per message
              <|start_header_id|>{role}<|end_header_id|>\\n\\n{content|trim}<|eot_id|>
    llama3.1  <|begin_of_text|><|start_header_id|>system<|end_header_id|>\\n\\n
              Cutting Knowledge Date: December 2023\\nToday Date: {date}\\n\\n{system|trim}<|eot_id|>
              (always present, even without a system message), then the other messages as above.

UltraLong fine-tunes Llama-3.1-8B-Instruct and keeps its chat format (arXiv 2504.06214; model card
https://huggingface.co/nvidia/Llama-3.1-Nemotron-8B-UltraLong-4M-Instruct), so
"llama3.1" is the default.

Loss mask: only an assistant message's content tokens and its closing <|eot_id|> are targets; the
header tokens (<|start_header_id|>assistant<|end_header_id|>\\n\\n), system and user turns never are.
Tokenization is per segment (text between a trainable and an untrainable span is encoded apart).
That equals tokenizing the whole rendered string whenever the tokenizer cannot merge across the
"\\n\\n" | content boundary, which holds for Llama-3's pre-tokenizer: content is trimmed, so it never
starts with whitespace, and "\\s*[\\r\\n]+" ends the "\\n\\n" pre-token. `ChatTokenizer.verify`
checks this on real data instead of trusting it.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Any, Literal, Mapping, Optional, Sequence

import numpy as np
from tokenizers import Tokenizer

ROLES = ("system", "user", "assistant")
BOS = "<|begin_of_text|>"
START_HEADER = "<|start_header_id|>"
END_HEADER = "<|end_header_id|>"
EOT = "<|eot_id|>"

Message = Mapping[str, str]
ChatSpan = tuple[str, bool]
"""(text, trainable): consecutive spans concatenate to the rendered conversation."""


@dataclass(frozen=True)
class ChatFormat:
    """Which Llama chat template to reproduce."""

    name: Literal["llama3.1", "llama3"] = "llama3.1"
    """"llama3.1" (Llama-3.1-8B-Instruct, UltraLong's base: fixed system block with a knowledge
    cutoff and date) or "llama3" (Meta-Llama-3-8B-Instruct: messages only)."""

    date_string: str = "26 Jul 2024"
    """"Today Date" of the llama3.1 system block; the template's own default when the caller passes
    no `date_string` (the 3.1-8B template has no strftime fallback)."""

    def __post_init__(self) -> None:
        if self.name not in ("llama3.1", "llama3"):
            raise ValueError(f"chat_format={self.name!r}: expected 'llama3.1' or 'llama3'")
        if "\n" in self.date_string:
            raise ValueError(f"date_string={self.date_string!r}: must be a single line")


def validate_messages(record: Any, where: str) -> list[dict[str, str]]:
    """Check one JSONL record {"messages": [{"role", "content"}, ...]}; ValueError names `where`.

    Rejected: not an object, no/empty "messages", a message that is not an object, an unknown role,
    missing or non-string content, and a conversation without an assistant turn (it would carry no
    loss at all, which almost always means a conversion bug upstream).
    """
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}")
    messages = record.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"{where}: 'messages' must be a non-empty list")
    out = []
    for k, msg in enumerate(messages):
        if not isinstance(msg, dict):
            raise ValueError(f"{where}: messages[{k}] is not an object")
        role = msg.get("role")
        if role not in ROLES:
            raise ValueError(f"{where}: messages[{k}] has unknown role {role!r}; expected one of {ROLES}")
        if "content" not in msg or msg["content"] is None:
            raise ValueError(f"{where}: messages[{k}] ({role}) has no 'content'")
        if not isinstance(msg["content"], str):
            raise ValueError(f"{where}: messages[{k}] ({role}) content is not a string")
        out.append({"role": role, "content": msg["content"]})
    if not any(m["role"] == "assistant" for m in out):
        raise ValueError(f"{where}: no assistant turn (nothing to train on)")
    return out


def chat_spans(messages: Sequence[Message], fmt: ChatFormat = ChatFormat()) -> list[ChatSpan]:
    """Split the rendered conversation into (text, trainable) spans.

    Untrainable runs are merged so they are tokenized as one string, exactly as in the whole text.
    """
    segments: list[ChatSpan] = []

    def add(text: str, trainable: bool) -> None:
        if segments and segments[-1][1] == trainable:
            segments[-1] = (segments[-1][0] + text, trainable)
        else:
            segments.append((text, trainable))

    add(BOS, False)
    rest = list(messages)
    if fmt.name == "llama3.1":
        # The 3.1 template pops a leading system message into its fixed system block; a system
        # message anywhere else renders as an ordinary turn below.
        system = rest.pop(0)["content"].strip() if rest and rest[0]["role"] == "system" else ""
        add(
            f"{START_HEADER}system{END_HEADER}\n\nCutting Knowledge Date: December 2023\n"
            f"Today Date: {fmt.date_string}\n\n{system}{EOT}",
            False,
        )
    for msg in rest:
        add(f"{START_HEADER}{msg['role']}{END_HEADER}\n\n", False)
        content = msg["content"].strip()  # Jinja's `trim` is str.strip()
        if msg["role"] == "assistant":
            add(content + EOT, True)
        else:
            add(content + EOT, False)
    return segments


def render_chat(messages: Sequence[Message], fmt: ChatFormat = ChatFormat()) -> str:
    """The text `apply_chat_template(messages, tokenize=False)` gives for `fmt`'s template."""
    return "".join(text for text, _ in chat_spans(messages, fmt))


def hf_chat_template_ids(hf_tokenizer: Any, messages: Sequence[Message], **kwargs: Any) -> list[int]:
    """Token ids transformers' `apply_chat_template` gives for one conversation, on transformers 4.x
    and 5.x alike: with `tokenize=True`, 4.x returns a list of ids and 5.x a `BatchEncoding`;
    `return_dict=True` makes both return the mapping. kwargs go to `apply_chat_template`
    (chat_template, date_string, add_generation_prompt, ...)."""
    out = hf_tokenizer.apply_chat_template(list(messages), tokenize=True, return_dict=True, **kwargs)
    return list(out["input_ids"])


def load_tokenizer(path: str) -> Tokenizer:
    """An HF `tokenizer.json`, or a directory holding one (as Llama-3.1-8B-Instruct's repo does)."""
    file = os.path.join(path, "tokenizer.json") if os.path.isdir(path) else path
    if not os.path.isfile(file):
        raise ValueError(f"tokenizer {path!r}: no tokenizer.json found")
    return Tokenizer.from_file(file)


class ChatTokenizer:
    """Token ids and per-token trainable flags of conversations, for one tokenizer and format."""

    def __init__(self, tokenizer: Tokenizer, fmt: ChatFormat = ChatFormat()):
        self.tokenizer = tokenizer
        self.fmt = fmt
        missing = [t for t in (BOS, START_HEADER, END_HEADER, EOT) if tokenizer.token_to_id(t) is None]
        if missing:
            raise ValueError(f"tokenizer lacks the Llama-3 chat tokens {missing}")
        specials = [t.content for t in tokenizer.get_added_tokens_decoder().values() if t.special]
        # Content must not smuggle control tokens in: "<|eot_id|>" inside a reply would end the
        # turn early and shift the loss mask. The tokenizer would map the string to the special id.
        self._control = re.compile("|".join(re.escape(s) for s in sorted(specials, key=len, reverse=True)))

    def check_content(self, messages: Sequence[Message], where: str) -> None:
        for k, msg in enumerate(messages):
            hit = self._control.search(msg["content"])
            if hit:
                raise ValueError(f"{where}: messages[{k}] content contains the special token {hit.group()!r}")

    def encode_many(self, conversations: Sequence[Sequence[Message]]) -> list[tuple[np.ndarray, np.ndarray]]:
        """Per conversation: (ids int32 [n], trainable bool [n]). One batched tokenizer call."""
        all_segments = [chat_spans(m, self.fmt) for m in conversations]
        flat = [text for segs in all_segments for text, _ in segs]
        encodings = self.tokenizer.encode_batch(flat, add_special_tokens=False) if flat else []
        out, k = [], 0
        for segs in all_segments:
            ids_parts, flag_parts = [], []
            for _, trainable in segs:
                ids = encodings[k].ids
                k += 1
                ids_parts.append(np.asarray(ids, dtype=np.int32))
                flag_parts.append(np.full(len(ids), trainable, dtype=bool))
            out.append((np.concatenate(ids_parts), np.concatenate(flag_parts)))
        return out

    def encode(self, messages: Sequence[Message]) -> tuple[np.ndarray, np.ndarray]:
        return self.encode_many([messages])[0]

    def verify(self, messages: Sequence[Message], where: Optional[str] = None) -> None:
        """ValueError unless per-segment ids equal the ids of the whole rendered text."""
        ids, _ = self.encode(messages)
        whole = self.tokenizer.encode(render_chat(messages, self.fmt), add_special_tokens=False).ids
        if ids.tolist() != whole:
            raise ValueError(
                f"{where or 'conversation'}: tokenizing per segment differs from tokenizing the rendered "
                "text; this tokenizer merges across the header/content boundary, so the assistant mask "
                "cannot be placed exactly (a Llama-3 tokenizer never does)"
            )
