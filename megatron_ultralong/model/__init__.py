"""Llama-family models on Megatron-Core: typed config, presets, layer spec, builder.

The config names load at once; the builders (megatron-core, torch) on first use, so a config-only
import (a CLI checking its arguments, the training config's `model.yarn`) stays fast.
"""
import importlib

from megatron_ultralong.model.config import PRESETS, LlamaConfig, load_model_config

_LAZY = {
    "UltraLongGPTModel": "gpt",
    "build_model": "gpt",
    "gather_tp_logits": "gpt",
    "padded_vocab_size": "gpt",
    "to_transformer_config": "gpt",
    "get_ultralong_layer_spec": "layer_spec",
    "transformer_engine_available": "layer_spec",
    "stage_hidden": "stage_forward",
    "stage_logits": "stage_forward",
}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(f"megatron_ultralong.model.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'megatron_ultralong.model' has no attribute {name!r}")


__all__ = ["LlamaConfig", "PRESETS", "load_model_config", *_LAZY]
