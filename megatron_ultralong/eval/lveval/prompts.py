"""LV-Eval's datasets, prompts, generation lengths, chat wrapping and middle truncation
(github.com/infinigence/LVEval: `config.py`, `prediction.py`, `utils.py`; arXiv 2402.05136).

Prompts and generation budgets are LV-Eval's own strings and numbers (`DATASET_PROMPT`,
`DATASET_MAXGEN`); a prompt that differs by one character scores a different model, so they are
reproduced exactly.
"""
from __future__ import annotations

import re
from typing import Any, Optional

from megatron_ultralong.eval.qa_metrics import hf_tokenizer, middle_ids

DATASETS: tuple[str, ...] = (
    "hotpotwikiqa_mixup", "loogle_SD_mixup", "loogle_CR_mixup", "loogle_MIR_mixup", "multifieldqa_en_mixup",
    "multifieldqa_zh_mixup", "factrecall_en", "factrecall_zh", "cmrc_mixup", "lic_mixup", "dureader_mixup",
)
"""LV-Eval's 11 datasets (`DATASET_SELECTED`), in upstream order."""

LENGTHS: tuple[str, ...] = ("16k", "32k", "64k", "128k", "256k")
"""The five length levels (`DATASET_LENGTH_LEVEL`), in words (Chinese: characters), not tokens."""

LENGTH_WORDS = {level: int(level[:-1]) * 1000 for level in LENGTHS}

MAX_NEW_TOKENS: dict[str, int] = {name: 16 if name.startswith("factrecall") else 64 for name in DATASETS}
"""`DATASET_MAXGEN`: 16 for the two factrecall sets, 64 for the rest."""

_EN_QA = ("Please answer the following question based on the given passages. Questions and answers are only "
          "relevant to one passage. Only give me the answer and do not output any other explanation and evidence.")
_EN_QA_AFTER = ("Please answer the following question based on the above passages. Questions and answers are "
                "only relevant to one passage. Only give me the answer and do not output any other explanation "
                "and evidence.")
_EN_PROMPT = f"{_EN_QA}\n\nArticle: {{context}}\n\n{_EN_QA_AFTER}\n\nQuestion: {{input}}\nAnswer:"
_ZH_MIX = "请根据下面给定的文章回答问题，问题和答案只与其中一篇文章有关。\n\n文章：{context}\n\n"
_ZH_TAIL = "问题：{input}\n回答："

PROMPTS: dict[str, str] = {
    "hotpotwikiqa_mixup": (
        "Answer the question based on the given passages. Questions and answers are only relevant to some "
        "passages. Only give me the answer and do not output any other explanation and evidence.\n\nArticle: "
        "{context}\n\nPlease answer the following question based on the above passages. Questions and answers "
        "are only relevant to some passages. Only give me the answer and do not output any other explanation "
        "and evidence.\n\nQuestion: {input}\nAnswer:"),
    "loogle_SD_mixup": _EN_PROMPT,
    "loogle_CR_mixup": _EN_PROMPT,
    "loogle_MIR_mixup": _EN_PROMPT,
    "multifieldqa_en_mixup": _EN_PROMPT,
    "multifieldqa_zh_mixup": (
        "请阅读以下文章并用中文回答问题，问题和答案只与其中一篇文章有关。只需要直接给出问题的答案，不要输出其他任何解释和证据。\n\n"
        "文章：{context}\n\n请基于上面的文章回答下面的问题，问题和答案只与其中一篇文章有关。只需要直接给出问题的答案，"
        "不要输出其他任何解释和证据。\n\n" + _ZH_TAIL),
    "factrecall_en": ("Please answer the following questions based on the given article.\n\nArticle: {context}\n\n"
                      "Please answer the following questions based on the above article.\n\n"
                      "Question: {input}\nAnswer:"),
    "factrecall_zh": "请基于给定的文章回答下述问题。\n\n文章：{context}\n\n现在请基于上述文章回答下面的问题。\n\n" + _ZH_TAIL,
    "cmrc_mixup": _ZH_MIX + "现在请基于上述文章回答下面的问题，问题和答案只与其中一篇文章有关。\n\n" + _ZH_TAIL,
    # lic_mixup's second sentence starts "请现在", not "现在请" as the others: upstream's wording.
    "lic_mixup": _ZH_MIX + "请现在基于上述文章回答下面的问题，问题和答案只与其中一篇文章有关。\n\n" + _ZH_TAIL,
    "dureader_mixup": _ZH_MIX + "现在请基于上述文章回答下面的问题，问题和答案只与其中一篇文章有关。\n\n" + _ZH_TAIL,
}
"""`DATASET_PROMPT`: filled with a sample's `context` and `input`."""

_NAME = re.compile(r"^(?P<name>.+?)(?:_(?P<length>\d{1,3}k))?$")


def split_name(task: str) -> tuple[str, Optional[str]]:
    """"hotpotwikiqa_mixup_16k" -> ("hotpotwikiqa_mixup", "16k"); "factrecall_en" -> ("factrecall_en",
    None). ValueError naming the task when the dataset or the length level is not LV-Eval's."""
    m = _NAME.match(task)
    name, length = (m.group("name"), m.group("length")) if m else (task, None)
    if name not in DATASETS:
        raise ValueError(f"unknown LV-Eval task {task!r}; expected one of {', '.join(DATASETS)}, "
                         f"optionally with a length suffix _{'/_'.join(LENGTHS)}")
    if length is not None and length not in LENGTHS:
        raise ValueError(f"LV-Eval task {task!r}: length level {length!r} is not one of {', '.join(LENGTHS)}")
    return name, length


def build_prompt(dataset: str, sample: dict) -> str:
    """The dataset's prompt filled with the sample's `context` and `input`."""
    return PROMPTS[dataset].format(context=sample["context"], input=sample["input"])


def truncate_prompt(tokenizer: Any, prompt: str, max_length: Optional[int]) -> str:
    """LV-Eval's middle truncation (`utils.truncate_prompt`, after LongBench): if the prompt is
    longer than `max_length` tokens, keep `max_length // 2` tokens from each end. As upstream:
    the count is of `tokenizer(prompt)` ids, i.e. *with* the tokenizer's special tokens (BOS), and
    the two halves are decoded separately (special tokens skipped) and joined as text. None: no
    truncation (the model takes the whole prompt)."""
    if max_length is None:
        return prompt
    tok = hf_tokenizer(tokenizer)
    head, tail = middle_ids(tok(prompt, truncation=False)["input_ids"], max_length)
    if not tail:
        return prompt
    return tok.decode(head, skip_special_tokens=True) + tok.decode(tail, skip_special_tokens=True)


def build_chat(prompt: str, model_name: str) -> str:
    """LV-Eval's `build_chat`: a conversation wrapper chosen by substrings of the model name; any
    other name (Llama-3.x, UltraLong) gets the bare prompt. chatglm2's `tokenizer.build_prompt` is
    the one case not reproduced (it needs that model's tokenizer)."""
    if "chatglm2" in model_name:
        raise ValueError("model name contains 'chatglm2': LV-Eval wraps it with that tokenizer's build_prompt, "
                         "which is not reproduced here")
    if "BlueLM" in model_name:
        return f"[|Human|]:{prompt}[|AI|]:"
    if "vicuna" in model_name or "sft" in model_name:
        system = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives "
                  "helpful, detailed, and polite answers to the user's questions.")
        return f"{system} USER: {prompt} ASSISTANT:"
    if "llama2" in model_name or "Llama-2" in model_name or "LLaMA" in model_name:
        return f"[INST]{prompt}[/INST]\n\n"
    if "Mistral" in model_name:
        return f"<s>[INST] {prompt} [/INST]"
    if "internlm" in model_name:
        return f"<|User|>:{prompt}<eoh>\n<|Bot|>:"
    return prompt


def post_process(response: str, model_name: str) -> str:
    """LV-Eval's `post_process` of a generation, by model name (xgen, internlm; others unchanged)."""
    if "xgen" in model_name:
        return response.strip().replace("Assistant:", "")
    if "internlm" in model_name:
        return response.split("<eoa>")[0]
    return response
