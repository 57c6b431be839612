"""LV-Eval (github.com/infinigence/LVEval, arXiv 2402.05136): its 11 datasets at 5 length levels,
prompts, truncation and scoring as its own scripts do them."""
from megatron_ultralong.eval.lveval.metrics import aggregate, sample_scores, score_lveval
from megatron_ultralong.eval.lveval.prompts import DATASETS, LENGTHS, MAX_NEW_TOKENS, PROMPTS, split_name
from megatron_ultralong.eval.lveval.run import predict, run_file, run_lveval

__all__ = ["DATASETS", "LENGTHS", "MAX_NEW_TOKENS", "PROMPTS", "aggregate", "predict", "run_file", "run_lveval",
           "sample_scores", "score_lveval", "split_name"]
