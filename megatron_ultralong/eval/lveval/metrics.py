"""LV-Eval's scoring, as its `metrics.py` and `evaluation.py` compute it
(github.com/infinigence/LVEval; arXiv 2402.05136, section 3.3).

Per dataset (`config.DATASET_METRIC`):
* English QA with answer keywords (`qa_f1_score_with_gold_ans`): if the sample has keywords
  (`gold_ans`), the recall of keyword tokens in the prediction, counting only shared tokens that
  are not on the English blacklist, must reach 0.2 or the sample scores 0; then plain token F1.
* Chinese QA with keywords (`qa_f1_zh_score_with_gold_ans`): jieba words, gate 0.4 with the
  Chinese blacklist; with no keywords the reference itself is the keyword list.
* factrecall: plain F1 (English words / jieba words), no gate.
* dureader: ROUGE-L F of jieba words with blacklisted words removed (the `rouge` package, 1.0.1,
  as upstream pins it).

`evaluation.py` then takes, per sample, the metric against the *first* reference only (its loop
over `answers` breaks after one), averages over samples and rounds `100 * mean` to 2 decimals.
Upstream quirks reproduced on purpose, because published numbers carry them: the first-reference
rule; the blacklist filters only the gate's overlap, not the F1; dureader's text is segmented by
jieba twice (the second pass sees the spaces the first inserted); any ROUGE failure (empty text)
scores 0.
"""
from __future__ import annotations

from collections import Counter
from typing import Callable, Literal, Optional, Sequence

from megatron_ultralong.eval.lveval.prompts import DATASETS, LENGTHS, split_name
from megatron_ultralong.eval.qa_metrics import f1_score, normalize_answer, normalize_zh_answer

ABANDON_WORDS_EN = frozenset((
    "and", "to", "of", "in", "her", "was", "with", "for", "it", "from", "is", "that", "his", "he", "by", "she",
    "they", "or", "at", "because", "be", "on", "are", "their", "what", "as", "had", "were", "about", "being",
    "this", "who", "but", "have", "has", "when", "which", "does"))
"""LV-Eval's English word blacklist (`ABANDON_WORDS_EN`)."""

ABANDON_WORDS_ZH = frozenset((
    "的", "和", "是", "等", "在", "年", "可以", "为", "与", "‰", "了", "或", "一种", "月", "c", "至", "日", "有", "进行", "于",
    "不", "中", "×", "根据", "小", "由", "亩", "也", "要", "指", "法", "会", "元", "主要", "以及", "通过", "首先", "对", "然后",
    "号", "以", "所", "后", "丁", "包括", "无", "将", "用", "能", "形", "方面", "因素", "位于", "而", "从", "到", "一定", "用于",
    "但", "使用", "让", "具有", "并", "亿元", "万元", "上", "类", "基于", "才", "来", "地", "片", "其他", "个", "或者", "变得",
    "时", "给", "你", "使", "条", "受", "已经", "带", "度"))
"""LV-Eval's Chinese word blacklist (`ABANDON_WORDS_ZH`)."""

EN_GATE = 0.2
ZH_GATE = 0.4

MetricName = Literal["qa_f1_score_with_gold_ans", "qa_f1_zh_score_with_gold_ans", "qa_f1_score", "qa_f1_zh_score",
                     "rouge_zh_score_blacklist"]


def _jieba_words(text: str) -> list[str]:
    import jieba  # imported on first use: loading its dictionary takes a second

    return list(jieba.cut(text, cut_all=False))


def _zh_tokens(text: str) -> list[str]:
    """jieba words, normalised, empty ones dropped (punctuation and whitespace vanish)."""
    return [t for t in (normalize_zh_answer(w) for w in _jieba_words(text)) if t]


def _gate(pred_tokens: list[str], gold_tokens: list[str], blacklist: frozenset, threshold: float,
          what: str) -> bool:
    """True if the keyword recall (shared tokens not on the blacklist / keyword tokens) reaches
    `threshold`."""
    if not gold_tokens:
        # Upstream divides by zero here; a clear error beats a traceback.
        raise ValueError(f"answer keywords {what!r} have no tokens after normalisation")
    common = Counter(pred_tokens) & Counter(gold_tokens)
    num_same = sum(v for k, v in common.items() if k not in blacklist)
    return num_same / len(gold_tokens) >= threshold


def qa_f1_score(prediction: str, ground_truth: str, gold_ans: Optional[str] = None) -> float:
    """English token F1 after SQuAD normalisation (factrecall_en)."""
    return f1_score(normalize_answer(prediction).split(), normalize_answer(ground_truth).split())


def qa_f1_score_with_gold_ans(prediction: str, ground_truth: str, gold_ans: Optional[str] = None) -> float:
    """English F1 behind the keyword-recall gate (0.2); no gate when `gold_ans` is empty/None."""
    pred = normalize_answer(prediction).split()
    if gold_ans and not _gate(pred, normalize_answer(gold_ans).split(), ABANDON_WORDS_EN, EN_GATE, gold_ans):
        return 0.0
    return f1_score(pred, normalize_answer(ground_truth).split())


def qa_f1_zh_score(prediction: str, ground_truth: str, gold_ans: Optional[str] = None) -> float:
    """Chinese F1 over normalised jieba words (factrecall_zh)."""
    return f1_score(_zh_tokens(prediction), _zh_tokens(ground_truth))


def qa_f1_zh_score_with_gold_ans(prediction: str, ground_truth: str, gold_ans: Optional[str] = None) -> float:
    """Chinese F1 behind the keyword-recall gate (0.4); the reference is the keyword list when
    `gold_ans` is empty/None."""
    pred, truth = _zh_tokens(prediction), _zh_tokens(ground_truth)
    keywords = gold_ans or ground_truth
    if keywords and not _gate(pred, _zh_tokens(keywords), ABANDON_WORDS_ZH, ZH_GATE, keywords):
        return 0.0
    return f1_score(pred, truth)


def _rouge_l_f(prediction: str, ground_truth: str) -> float:
    from rouge import Rouge

    try:
        return Rouge().get_scores([prediction], [ground_truth], avg=True)["rouge-l"]["f"]
    except Exception:  # upstream's bare except: empty text (and deep recursion on long text) score 0
        return 0.0


def rouge_zh_score_blacklist(prediction: str, ground_truth: str, gold_ans: Optional[str] = None) -> float:
    """dureader: ROUGE-L F of normalised jieba words minus the Chinese blacklist. As upstream, the
    text is joined with spaces after one jieba pass and segmented again; the spaces become empty
    tokens, which are kept (they are not on the blacklist) and only widen the gaps."""
    def words(text: str) -> str:
        spaced = " ".join(_jieba_words(text))
        kept = [normalize_zh_answer(t) for t in _jieba_words(spaced)]
        return " ".join(t for t in kept if t not in ABANDON_WORDS_ZH)

    return _rouge_l_f(words(prediction), words(ground_truth))


METRICS: dict[MetricName, Callable[[str, str, Optional[str]], float]] = {
    "qa_f1_score_with_gold_ans": qa_f1_score_with_gold_ans,
    "qa_f1_zh_score_with_gold_ans": qa_f1_zh_score_with_gold_ans,
    "qa_f1_score": qa_f1_score,
    "qa_f1_zh_score": qa_f1_zh_score,
    "rouge_zh_score_blacklist": rouge_zh_score_blacklist,
}

DATASET_METRIC: dict[str, MetricName] = {
    "hotpotwikiqa_mixup": "qa_f1_score_with_gold_ans",
    "loogle_SD_mixup": "qa_f1_score_with_gold_ans",
    "loogle_CR_mixup": "qa_f1_score_with_gold_ans",
    "loogle_MIR_mixup": "qa_f1_score_with_gold_ans",
    "multifieldqa_en_mixup": "qa_f1_score_with_gold_ans",
    "multifieldqa_zh_mixup": "qa_f1_zh_score_with_gold_ans",
    "factrecall_en": "qa_f1_score",
    "factrecall_zh": "qa_f1_zh_score",
    "cmrc_mixup": "qa_f1_zh_score_with_gold_ans",
    "lic_mixup": "qa_f1_zh_score_with_gold_ans",
    "dureader_mixup": "rouge_zh_score_blacklist",
}
"""`config.DATASET_METRIC`: each dataset's metric by name."""


def sample_scores(task: str, preds: Sequence[str], answers: Sequence[Sequence[str]],
                  gold_ans: Sequence[Optional[str]]) -> list[float]:
    """Per-sample values in [0, 1] as `evaluation.scorer` computes them: the dataset's metric
    against the first reference (upstream's loop breaks after one)."""
    name, _ = split_name(task)
    if not (len(preds) == len(answers) == len(gold_ans)):
        raise ValueError(f"{len(preds)} predictions, {len(answers)} answer lists, {len(gold_ans)} gold_ans")
    metric = METRICS[DATASET_METRIC[name]]
    out = []
    for i, (p, refs, gold) in enumerate(zip(preds, answers, gold_ans)):
        if isinstance(refs, str) or not refs:
            raise ValueError(f"sample {i}: answers must be a non-empty list of strings, got {refs!r}")
        out.append(max(0.0, float(metric(p, refs[0], gold))))
    return out


def score_lveval(task: str, preds: Sequence[str], answers: Sequence[Sequence[str]],
                 gold_ans: Optional[Sequence[Optional[str]]] = None) -> float:
    """LV-Eval's score of one dataset file: round(100 * mean per-sample score, 2)."""
    if not preds:
        raise ValueError(f"LV-Eval {task}: no predictions to score")
    values = sample_scores(task, preds, answers, gold_ans if gold_ans is not None else [None] * len(preds))
    return round(100 * sum(values) / len(values), 2)


def aggregate(scores: dict[str, dict[str, float]]) -> dict[str, Optional[float]]:
    """The paper's LV-Eval columns from {dataset: {length level: score}}: the mean over datasets
    per length level ("16k" ... "256k", LV-Eval's leaderboard rows), "<128K" (the mean of the
    16k-128k levels) and "<256K" (all five levels). A column is None unless every dataset has
    every level it needs, so a partial run never looks like a full one."""
    out: dict[str, Optional[float]] = {}
    for level in LENGTHS:
        have = [scores[d][level] for d in DATASETS if level in scores.get(d, {})]
        out[level] = sum(have) / len(have) if len(have) == len(DATASETS) else None
    for label, levels in (("<128K", LENGTHS[:4]), ("<256K", LENGTHS)):
        vals = [out[level] for level in levels]
        out[label] = sum(vals) / len(vals) if all(v is not None for v in vals) else None  # type: ignore[misc]
    return out
