"""The chat rendering equals transformers' apply_chat_template on Meta's own templates, and the
assistant-only mask equals the one transformers derives from a {% generation %}-tagged copy."""
from __future__ import annotations

import pytest
from sft_helpers import conversation, hf_tokenizer, tokenizer_json
from tokenizers import Tokenizer

from megatron_ultralong.data.samples.chat import (
    ChatFormat, ChatTokenizer, chat_spans, hf_chat_template_ids, render_chat, validate_messages,
)

TEMPLATES = {"llama3.1": "llama3.1_chat_template.jinja", "llama3": "llama3_chat_template.jinja"}
CASES = {
    "single_turn": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}],
    "multi_turn": conversation(4, turns=3),
    "system": conversation(2, turns=2, system=True),
    "whitespace_is_trimmed": [
        {"role": "system", "content": "  \n Be brief.\n\n"},
        {"role": "user", "content": "\tWhat is 2 + 2?  "},
        {"role": "assistant", "content": "\n4\n "},
    ],
    "second_system_is_a_turn": [
        {"role": "system", "content": "First."},
        {"role": "user", "content": "a"},
        {"role": "system", "content": "Second."},
        {"role": "assistant", "content": "b"},
    ],
    "empty_reply_and_trailing_user": [
        {"role": "user", "content": "say nothing"},
        {"role": "assistant", "content": ""},
        {"role": "user", "content": "thanks"},
    ],
    "unicode": [{"role": "user", "content": "naïve café 東京?"}, {"role": "assistant", "content": "東京 — 42 😀"}],
}


def _tagged(template: str) -> str:
    """Meta's template with each assistant reply (content + <|eot_id|>) inside {% generation %}.

    Both templates build a message as HEADER + content|trim + EOT in one expression; the llama3.1
    file spells the newlines as the escape "\\n", the llama3 one as real newline characters.
    """
    nl = "\\n\\n" if "\\n\\n" in template else "\n\n"
    head = "'<|start_header_id|>' + message['role'] + '<|end_header_id|>" + nl + "'"
    tail = "message['content'] | trim + '<|eot_id|>'"
    tagged_body = (
        "{{- " + head + " }}{%- if message['role'] == 'assistant' %}{% generation %}{{- " + tail
        + " }}{% endgeneration %}{%- else %}{{- " + tail + " }}{%- endif %}"
    )
    llama31 = "{{- " + head + "+ " + tail + " }}"
    llama3 = (
        "{% set content = " + head + "+ " + tail + " %}{% if loop.index0 == 0 %}"
        "{% set content = bos_token + content %}{% endif %}{{ content }}"
    )
    if llama31 in template:
        return template.replace(llama31, tagged_body)
    assert llama3 in template, "unexpected template text"
    return template.replace(llama3, "{% if loop.index0 == 0 %}{{ bos_token }}{% endif %}" + tagged_body)


@pytest.fixture(scope="module")
def hf():
    return {name: hf_tokenizer(file) for name, file in TEMPLATES.items()}


@pytest.mark.parametrize("fmt", ["llama3.1", "llama3"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_render_and_ids_equal_apply_chat_template(hf, fmt, case):
    messages = CASES[case]
    tok = hf[fmt]
    expected_text = tok.apply_chat_template(messages, tokenize=False)
    assert render_chat(messages, ChatFormat(fmt)) == expected_text
    ids, _ = ChatTokenizer(Tokenizer.from_str(tokenizer_json()), ChatFormat(fmt)).encode(messages)
    assert ids.tolist() == hf_chat_template_ids(tok, messages)  # a list on 4.x, a BatchEncoding on 5.x


def test_llama31_default_system_block_and_date(hf):
    messages = CASES["single_turn"]
    text = render_chat(messages, ChatFormat("llama3.1", date_string="01 Jan 2025"))
    assert text == hf["llama3.1"].apply_chat_template(messages, tokenize=False, date_string="01 Jan 2025")
    assert text.startswith(
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"
        "Cutting Knowledge Date: December 2023\nToday Date: 01 Jan 2025\n\n<|eot_id|>"
    )
    assert render_chat(messages, ChatFormat("llama3")) == (
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nHello!<|eot_id|>"
    )


@pytest.mark.parametrize("fmt", ["llama3.1", "llama3"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_mask_equals_transformers_assistant_mask(hf, fmt, case):
    messages = CASES[case]
    tok = hf[fmt]
    tagged = _tagged(tok.chat_template)
    assert tok.apply_chat_template(messages, tokenize=False, chat_template=tagged) == render_chat(messages, ChatFormat(fmt))
    out = tok.apply_chat_template(
        messages, chat_template=tagged, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    ids, flags = ChatTokenizer(Tokenizer.from_str(tokenizer_json()), ChatFormat(fmt)).encode(messages)
    assert ids.tolist() == out["input_ids"]
    assert flags.astype(int).tolist() == out["assistant_masks"]


def test_mask_is_assistant_content_and_eot_only():
    tok = Tokenizer.from_str(tokenizer_json())
    messages = CASES["system"]
    ids, flags = ChatTokenizer(tok).encode(messages)
    trained = tok.decode(ids[flags].tolist(), skip_special_tokens=False)
    replies = [m["content"].strip() + "<|eot_id|>" for m in messages if m["role"] == "assistant"]
    assert trained == "".join(replies)
    # Each reply's header sits right before its first trained token and is untrained.
    segments = chat_spans(messages)
    assert [t for t, trainable in segments if trainable] == replies
    assert all(t.endswith("<|start_header_id|>assistant<|end_header_id|>\n\n") for t, trainable in segments[:-1] if not trainable)


@pytest.mark.parametrize(
    "record, needle",
    [
        ([1, 2], "expected a JSON object"),
        ({"messages": []}, "non-empty list"),
        ({"messages": [{"role": "bot", "content": "x"}]}, "unknown role 'bot'"),
        ({"messages": [{"role": "user"}]}, "has no 'content'"),
        ({"messages": [{"role": "user", "content": 3}]}, "not a string"),
        ({"messages": [{"role": "user", "content": "only a question"}]}, "no assistant turn"),
    ],
)
def test_validate_messages_names_the_place(record, needle):
    with pytest.raises(ValueError, match="f.jsonl:7: .*" + needle):
        validate_messages(record, "f.jsonl:7")


def test_control_tokens_in_content_are_rejected():
    chat = ChatTokenizer(Tokenizer.from_str(tokenizer_json()))
    messages = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a<|eot_id|>b"}]
    with pytest.raises(ValueError, match=r"x:1: messages\[1\] content contains the special token '<\|eot_id\|>'"):
        chat.check_content(messages, "x:1")


def test_tokenizer_without_chat_tokens_is_refused():
    from tokenizers import models

    with pytest.raises(ValueError, match="lacks the Llama-3 chat tokens"):
        ChatTokenizer(Tokenizer(models.BPE()))
