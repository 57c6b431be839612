"""RULER (arXiv:2404.06654, github.com/NVIDIA/RULER): its scoring (`metrics`) and the runners."""
from megatron_ultralong.eval.ruler.metrics import RULER_TASK_NAMES, score_ruler
from megatron_ultralong.eval.ruler.styled import RULER_THRESHOLD, effective_length, run_ruler

__all__ = ["RULER_TASK_NAMES", "score_ruler", "RULER_THRESHOLD", "effective_length", "run_ruler"]
