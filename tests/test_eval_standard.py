"""The standard-benchmark runner through lm-evaluation-harness, offline: two custom lm-eval tasks
(their YAML plus a small local JSONL, the layout lm-eval's `--include_path` takes) on the tiny
Llama. lm-eval's scores are checked against the same quantities computed directly with the HF
model: multiple-choice accuracy by summed log-likelihood, and exact match of greedy generations."""
from __future__ import annotations

import json
import os

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # read when `datasets` is imported
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from eval_helpers import tiny_eval_llama, train_tiny_tokenizer  # noqa: E402

from megatron_ultralong.eval.standard import (PAPER_TASKS, StandardConfig, StandardTask, markdown_table,  # noqa: E402
                                              parse_task, run_standard)

lm_eval = pytest.importorskip("lm_eval")

MC_DOCS = [{"question": f"what is {a} plus {b}", "choices": [str(a + b), str(a + b + 1), "pass key"], "label": i % 3}
           for i, (a, b) in enumerate([(1, 2), (3, 4), (5, 1), (2, 2), (7, 1), (4, 4)])]
GEN_DOCS = [{"question": f"the pass key is {k}", "answer": ans} for k, ans in
            [("1", "1"), ("22", "2"), ("3", "the"), ("4", "x")]]


def _task_dir(tmp_path) -> str:
    d = tmp_path / "tasks"
    d.mkdir()
    for name, docs in (("mc", MC_DOCS), ("gen", GEN_DOCS)):
        with open(d / f"{name}.jsonl", "w") as f:
            f.writelines(json.dumps(doc) + "\n" for doc in docs)
    (d / "mu_tiny_mc.yaml").write_text(
        "task: mu_tiny_mc\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {d / 'mc.jsonl'}\ntest_split: test\nfewshot_split: test\noutput_type: multiple_choice\n"
        "doc_to_text: \"Q: {{question}}\\nA:\"\ndoc_to_choice: \"{{choices}}\"\ndoc_to_target: label\n"
        "metric_list:\n  - metric: acc\n")
    (d / "mu_tiny_gen.yaml").write_text(
        "task: mu_tiny_gen\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {d / 'gen.jsonl'}\ntest_split: test\noutput_type: generate_until\n"
        "doc_to_text: \"{{question}}. The pass key is\"\ndoc_to_target: \"{{answer}}\"\n"
        "generation_kwargs:\n  until: [\"\\n\"]\n  max_gen_toks: 3\n  do_sample: false\n"
        "metric_list:\n  - metric: exact_match\n    ignore_case: true\n    ignore_punctuation: true\n"
        "filter_list:\n  - name: strip\n    filter:\n      - function: remove_whitespace\n"
        "      - function: take_first\n")
    return str(d)


def _loglik(model, tok, context: str, continuation: str) -> float:
    whole = tok.encode(context + continuation)
    n_ctx = len(tok.encode(context))
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([whole])).logits[0].float(), -1)
    return float(sum(logp[i - 1, whole[i]] for i in range(n_ctx, len(whole))))


def _greedy(model, tok, prompt: str, n: int) -> str:
    ids = tok.encode(prompt)
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, pad_token_id=tok.eos_token_id)
    return tok.decode(out[0, len(ids):], skip_special_tokens=True).split("\n")[0]


@pytest.mark.slow
def test_lm_eval_offline_on_local_tasks_matches_the_model(tmp_path):
    from lm_eval.models.huggingface import HFLM

    tok = train_tiny_tokenizer()
    model = tiny_eval_llama(len(tok))
    lm = HFLM(pretrained=model, tokenizer=tok, batch_size=1, device="cpu")
    config = StandardConfig(tasks=(StandardTask("MC", "mu_tiny_mc", 0, "acc,none"),
                                   StandardTask("GEN", "mu_tiny_gen", 0, "exact_match,strip")),
                            include_path=_task_dir(tmp_path), include_defaults=False)
    result = run_standard(lm, config)

    correct = 0
    for doc in MC_DOCS:
        ctx = f"Q: {doc['question']}\nA:"
        ll = [_loglik(model, tok, ctx, " " + c) for c in doc["choices"]]
        correct += int(max(range(3), key=ll.__getitem__) == doc["label"])
    assert result["scores"]["MC"] == pytest.approx(100 * correct / len(MC_DOCS))

    def norm(s: str) -> str:
        return "".join(ch for ch in s.lower() if ch.isalnum() or ch == " ").strip()

    hits = [norm(_greedy(model, tok, f"{d['question']}. The pass key is", 3).strip()) == norm(d["answer"])
            for d in GEN_DOCS]
    assert result["scores"]["GEN"] == pytest.approx(100 * sum(hits) / len(hits))
    assert result["average"] == pytest.approx((result["scores"]["MC"] + result["scores"]["GEN"]) / 2)
    assert result["n_shot"] == {"MC": 0, "GEN": 0}

    # the shot count reaches lm-eval: 2 examples from the few-shot split
    two = run_standard(lm, StandardConfig(tasks=(StandardTask("MC", "mu_tiny_mc", 2, "acc,none"),),
                                          include_path=config.include_path, include_defaults=False))
    assert two["n_shot"] == {"MC": 2}
    assert "| model | MC | GEN | Avg. |" in markdown_table(result, "tiny")


def test_paper_settings_and_flags():
    assert [(t.column, t.num_fewshot) for t in PAPER_TASKS] == [
        ("MMLU", 5), ("MMLU-Pro", 5), ("MATH", 0), ("GSM8K", 8), ("HumanEval", 0)]
    assert parse_task("GSM8K=gsm8k:8:exact_match,strict-match") == StandardTask(
        "GSM8K", "gsm8k", 8, "exact_match,strict-match")
    with pytest.raises(ValueError, match="--task 'GSM8K'"):
        parse_task("GSM8K")
    with pytest.raises(ValueError, match="executes model-written code"):
        run_standard(object(), StandardConfig(tasks=(PAPER_TASKS[-1],)))
