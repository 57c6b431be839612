"""Attention for the `core_attention` slot of Megatron-Core's SelfAttention."""
