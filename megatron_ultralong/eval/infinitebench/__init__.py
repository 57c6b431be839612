"""InfiniteBench (github.com/OpenBMB/InfiniteBench, arXiv 2402.13718): its 12 tasks, prompts,
truncation and scoring as its own scripts do them."""
from megatron_ultralong.eval.infinitebench.metrics import average, sample_score, score_infinitebench
from megatron_ultralong.eval.infinitebench.prompts import MAX_NEW_TOKENS, TASKS, TEMPLATES, create_prompt
from megatron_ultralong.eval.infinitebench.run import predict, run_infinitebench, run_task

__all__ = ["MAX_NEW_TOKENS", "TASKS", "TEMPLATES", "average", "create_prompt", "predict", "run_infinitebench",
           "run_task", "sample_score", "score_infinitebench"]
