"""Megatron checkpoints for every caller (conversion, training, evaluation): `torch_dist` save and
load, the chunk-load strategy, the train-state checkpoint with its `latest` pointer, and
checkpoint-path resolution."""
