"""HF Llama <-> Megatron-Core weights: the key map (one home) and model-level load/export."""
