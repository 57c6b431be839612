"""Long-context evaluation: NIAH grids, RULER (exact, and the RULER-style families), the suite, loss by
position; HF and Megatron backends."""
from megatron_ultralong.eval.backends import Backend, HFBackend
from megatron_ultralong.eval.niah import NiahConfig, NiahResults, run_niah
from megatron_ultralong.eval.perplexity import loss_by_position
from megatron_ultralong.eval.ruler import run_ruler
from megatron_ultralong.eval.tokenizer import EvalTokenizer

__all__ = ["Backend", "HFBackend", "NiahConfig", "NiahResults", "run_niah", "loss_by_position", "run_ruler",
           "EvalTokenizer"]
