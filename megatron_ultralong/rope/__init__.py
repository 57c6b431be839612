"""Rotary position embeddings: the typed config, the frequency math (one home), the module.

`compute_rope_parameters` (torch) loads on first use, so the config alone imports without torch.
"""
import importlib

from megatron_ultralong.rope.config import ROPE_TYPES, RopeConfig, yarn_for_context_length


def __getattr__(name: str):
    if name == "compute_rope_parameters":
        return importlib.import_module("megatron_ultralong.rope.frequencies").compute_rope_parameters
    raise AttributeError(f"module 'megatron_ultralong.rope' has no attribute {name!r}")


__all__ = ["ROPE_TYPES", "RopeConfig", "yarn_for_context_length", "compute_rope_parameters"]
