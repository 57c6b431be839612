"""LV-Eval: scoring cases built from its `metrics.py` / `evaluation.py` behaviour, the loader on the
HF dataset's file layouts, middle truncation as `prediction.py` does it, and a run end to end.

Expected values are worked out by hand from upstream's definitions (github.com/infinigence/LVEval);
jieba 0.42.1 segmentations are the ones shown in the comments.
"""
from __future__ import annotations

import json
import os
import zipfile

import pytest
from eval_helpers import train_tiny_tokenizer

from megatron_ultralong.eval.lveval import metrics as M
from megatron_ultralong.eval.lveval.loader import load_samples, locate
from megatron_ultralong.eval.lveval.prompts import (DATASETS, MAX_NEW_TOKENS, PROMPTS, build_chat, split_name,
                                                    truncate_prompt)
from megatron_ultralong.eval.lveval.run import run_file, run_lveval

GATED_EN = M.qa_f1_score_with_gold_ans
GATED_ZH = M.qa_f1_zh_score_with_gold_ans


def test_english_f1_ignores_case_punctuation_and_articles():
    assert GATED_EN("The Eiffel Tower!", "eiffel tower", "Eiffel") == 1.0
    assert M.qa_f1_score("An apple, the pear.", "apple pear") == 1.0
    # "theatre" is not the article "the": only whole words are dropped.
    assert M.qa_f1_score("theatre", "the atre") == 0.0
    # precision 1/2, recall 1 -> F1 2/3
    assert M.qa_f1_score("Paris France", "Paris") == pytest.approx(2 / 3)


def test_english_keyword_gate_at_and_around_its_threshold():
    keywords5 = "alpha beta gamma delta epsilon"
    # 1 of 5 keyword tokens = 0.2: the gate is `recall < 0.2 -> 0`, so exactly 0.2 passes;
    # then F1 against the reference: precision 1, recall 1/2.
    assert GATED_EN("alpha", "alpha beta", keywords5) == pytest.approx(2 / 3)
    # 1 of 6 < 0.2: zero whatever the F1 would be.
    assert GATED_EN("alpha", "alpha beta", keywords5 + " zeta") == 0.0
    # No keywords (None or ""): no gate.
    assert GATED_EN("alpha", "alpha beta", None) == pytest.approx(2 / 3)
    assert GATED_EN("alpha", "alpha beta", "") == pytest.approx(2 / 3)


def test_blacklist_filters_the_gate_not_the_f1():
    # Keywords "the river of paris" -> [river, of, paris]; "of" is blacklisted, so a prediction
    # sharing only "of" has keyword recall 0 and scores 0 although its F1 would be 2/3.
    assert GATED_EN("of", "of paris", "the river of paris") == 0.0
    assert M.qa_f1_score("of", "of paris") == pytest.approx(2 / 3)
    # "paris": recall 1/3 >= 0.2, F1 2/3.
    assert GATED_EN("paris", "of paris", "the river of paris") == pytest.approx(2 / 3)
    # The F1 itself keeps blacklisted words: "of" counts in precision and recall.
    assert GATED_EN("of paris", "of paris", "paris") == 1.0


def test_empty_prediction_scores_zero():
    assert GATED_EN("", "paris", "paris") == 0.0
    assert GATED_EN("", "paris", None) == 0.0
    assert GATED_ZH("", "北京", None) == 0.0
    assert M.rouge_zh_score_blacklist("", "北京首都") == 0.0  # rouge raises on empty text; upstream scores 0


def test_chinese_f1_over_jieba_words_with_its_gate():
    # 北京是中国的首都。 -> 北京/是/中国/的/首都/。 ; punctuation normalised away -> 5 words.
    # No keywords: the reference is the keyword list; recall 1 >= 0.4; F1 = 2 * (1/5 * 1) / (6/5).
    assert GATED_ZH("北京是中国的首都。", "北京", None) == pytest.approx(1 / 3)
    five = "北京上海广州深圳天津"  # five jieba words
    assert GATED_ZH("北京", five, five) == 0.0  # recall 1/5 < 0.4
    # recall 2/5 = 0.4 passes; F1 = 2 * (1 * 2/5) / (7/5)
    assert GATED_ZH("北京上海", five, five) == pytest.approx(4 / 7)
    # Chinese blacklist in the gate: 的 is blacklisted, so sharing only 的 fails.
    assert GATED_ZH("的", "的首都", "的首都") == 0.0


def test_dureader_rouge_drops_blacklisted_words():
    # 北京的首都 -> 北京/的/首都; 的 is blacklisted, leaving the reference's 北京/首都: ROUGE-L F = 1
    # (the rouge package's 1e-8 epsilon). 和 is blacklisted too.
    assert M.rouge_zh_score_blacklist("北京的首都", "北京首都") == pytest.approx(1.0, abs=1e-6)
    assert M.rouge_zh_score_blacklist("北京和首都", "北京首都") == pytest.approx(1.0, abs=1e-6)
    # A non-blacklisted extra word: LCS 2 of 3 hypothesis words -> P 2/3, R 1, F 0.8.
    assert M.rouge_zh_score_blacklist("北京中国首都", "北京首都") == pytest.approx(0.8, abs=1e-6)


def test_evaluator_uses_the_first_answer_only_and_rounds_to_two_decimals():
    # evaluation.scorer breaks after the first reference: "paris" against ["london", "paris"] is 0.
    assert M.sample_scores("loogle_SD_mixup_16k", ["paris"], [["london", "paris"]], [None]) == [0.0]
    # three samples 1, 0, 0 -> 33.33 (round(100 * 1/3, 2))
    score = M.score_lveval("factrecall_en_32k", ["paris", "x", ""], [["paris"], ["paris"], ["paris"]])
    assert score == 33.33
    with pytest.raises(ValueError, match="answers"):
        M.score_lveval("factrecall_en", ["a"], [[]])
    with pytest.raises(ValueError, match="no tokens"):
        GATED_EN("x", "y", "the ...")  # keywords empty after normalisation: upstream divides by zero


def test_task_names_with_and_without_length_suffix():
    assert split_name("hotpotwikiqa_mixup") == ("hotpotwikiqa_mixup", None)
    assert split_name("hotpotwikiqa_mixup_16k") == ("hotpotwikiqa_mixup", "16k")
    assert split_name("factrecall_en_256k") == ("factrecall_en", "256k")
    with pytest.raises(ValueError, match="unknown LV-Eval task 'hotpot'"):
        split_name("hotpot")
    with pytest.raises(ValueError, match="length level '512k'"):
        split_name("factrecall_zh_512k")
    assert set(M.DATASET_METRIC) == set(DATASETS) == set(PROMPTS) == set(MAX_NEW_TOKENS)


def test_aggregates_need_every_dataset_and_level():
    full = {d: {"16k": 10.0, "32k": 20.0, "64k": 30.0, "128k": 40.0, "256k": 50.0} for d in DATASETS}
    agg = M.aggregate(full)
    assert agg["16k"] == 10.0 and agg["<128K"] == 25.0 and agg["<256K"] == 30.0
    del full["lic_mixup"]["256k"]
    agg = M.aggregate(full)
    assert agg["<128K"] == 25.0 and agg["256k"] is None and agg["<256K"] is None


def _tokenizer_with_bos():
    from tokenizers.processors import TemplateProcessing

    tok = train_tiny_tokenizer()
    tok._tokenizer.post_processor = TemplateProcessing(single="<s> $A", special_tokens=[("<s>", tok.bos_token_id)])
    return tok


def test_middle_truncation_counts_special_tokens_and_decodes_halves_apart():
    tok = _tokenizer_with_bos()
    prompt = " ".join(f"w{i}" for i in range(200))
    ids = tok(prompt)["input_ids"]
    assert ids[0] == tok.bos_token_id
    assert truncate_prompt(tok, prompt, None) == prompt
    assert truncate_prompt(tok, prompt, len(ids)) == prompt  # BOS counted: exactly fits
    out = truncate_prompt(tok, prompt, 41)  # odd: 20 ids from each end
    # prediction.py: decode(ids[:20]) + decode(ids[-20:]), special tokens skipped (BOS gone).
    assert out == tok.decode(ids[:20], skip_special_tokens=True) + tok.decode(ids[-20:], skip_special_tokens=True)
    assert out.startswith("w0 w1") and out.endswith("w198 w199")


def test_chat_wrapping_by_model_name():
    assert build_chat("Q", "UltraLong-8B-1M") == "Q"
    assert build_chat("Q", "Llama-2-7b-chat") == "[INST]Q[/INST]\n\n"
    assert build_chat("Q", "Mistral-7B") == "<s>[INST] Q [/INST]"


def _sample(i: int, answer: str = "paris") -> dict:
    return {"input": f"Where is thing {i}?", "context": f"Thing {i} is in {answer}. " * 3, "answers": [answer],
            "length": 12, "dataset": "loogle_SD_mixup_16k", "language": "en", "answer_keywords": answer,
            "confusing_facts": []}


def _write(path: str, rows: list) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def test_loader_finds_the_unzipped_flat_and_zipped_layouts(tmp_path):
    rows = [_sample(0), _sample(1)]
    _write(str(tmp_path / "a" / "loogle_SD_mixup" / "loogle_SD_mixup_16k.jsonl"), rows)
    _write(str(tmp_path / "b" / "loogle_SD_mixup_16k.jsonl"), rows)
    os.makedirs(tmp_path / "c")
    with zipfile.ZipFile(tmp_path / "c" / "loogle_SD_mixup.zip", "w") as z:
        z.writestr("loogle_SD_mixup/loogle_SD_mixup_16k.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    for root in ("a", "b", "c"):
        assert load_samples(str(tmp_path / root), "loogle_SD_mixup", "16k") == rows
    assert locate(str(tmp_path / "c"), "loogle_SD_mixup", "16k").endswith("::loogle_SD_mixup/loogle_SD_mixup_16k.jsonl")
    with pytest.raises(FileNotFoundError, match="loogle_SD_mixup_32k"):
        load_samples(str(tmp_path / "a"), "loogle_SD_mixup", "32k")


def test_loader_names_the_bad_line_and_field(tmp_path):
    path = tmp_path / "factrecall_en_16k.jsonl"
    _write(str(path), [_sample(0)])
    with open(path, "a") as f:
        f.write(json.dumps({"input": "q", "context": "c", "answers": "paris"}) + "\n")
    with pytest.raises(ValueError, match=r"factrecall_en_16k.jsonl:2: field 'answers'"):
        load_samples(str(tmp_path), "factrecall_en", "16k")
    path.write_text("{not json\n")
    with pytest.raises(ValueError, match=r"factrecall_en_16k.jsonl:1: not valid JSON"):
        load_samples(str(tmp_path), "factrecall_en", "16k")


def test_run_writes_prediction_py_rows_and_scores_them(tmp_path):
    data, out = tmp_path / "data", tmp_path / "out"
    for level in ("16k", "32k"):
        _write(str(data / "loogle_SD_mixup" / f"loogle_SD_mixup_{level}.jsonl"),
               [_sample(0, "paris"), _sample(1, "london")])
    seen = []

    def generate(prompt: str, max_new_tokens: int) -> str:
        seen.append((prompt, max_new_tokens))
        return " Paris." if "thing 0" in prompt else "rome"

    res = run_file(generate, None, str(data), "loogle_SD_mixup", "16k", str(out))
    assert res["score"] == 50.0 and res["n"] == 2
    assert seen[0][1] == 64 and seen[0][0] == PROMPTS["loogle_SD_mixup"].format(**_sample(0, "paris"))
    rows = [json.loads(line) for line in open(res["path"], encoding="utf-8")]
    assert rows[0] == {"pred": " Paris.", "answers": ["paris"], "gold_ans": "paris", "input": "Where is thing 0?",
                       "all_classes": None, "length": 12}
    result = run_lveval(generate, None, str(data), str(out), datasets=["loogle_SD_mixup"], lengths=["16k", "32k"])
    assert result["scores"] == {"loogle_SD_mixup": {"16k": 50.0, "32k": 50.0}}
    assert json.load(open(out / "lveval_results.json"))["scores"] == result["scores"]
