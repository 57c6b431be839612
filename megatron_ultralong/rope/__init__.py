"""Rotary position embeddings: the typed config, the frequency math (one home), the module."""
from megatron_ultralong.rope.config import ROPE_TYPES, RopeConfig, yarn_for_context_length
from megatron_ultralong.rope.frequencies import compute_rope_parameters

__all__ = ["ROPE_TYPES", "RopeConfig", "yarn_for_context_length", "compute_rope_parameters"]
