"""Llama-family models on Megatron-Core: typed config, presets, layer spec, builder."""
from megatron_ultralong.model.config import LlamaConfig, PRESETS, load_model_config
from megatron_ultralong.model.gpt import (
    UltraLongGPTModel,
    build_model,
    gather_tp_logits,
    padded_vocab_size,
    to_transformer_config,
)
from megatron_ultralong.model.layer_spec import get_ultralong_layer_spec, transformer_engine_available
from megatron_ultralong.model.stage_forward import stage_hidden, stage_logits

__all__ = [
    "LlamaConfig",
    "PRESETS",
    "load_model_config",
    "UltraLongGPTModel",
    "build_model",
    "gather_tp_logits",
    "padded_vocab_size",
    "to_transformer_config",
    "get_ultralong_layer_spec",
    "transformer_engine_available",
    "stage_hidden",
    "stage_logits",
]
