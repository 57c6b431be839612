"""megatron-ultralong: ultra-long-context (1M-4M tokens) training for Llama on Megatron-Core."""

__version__ = "0.1.0"
