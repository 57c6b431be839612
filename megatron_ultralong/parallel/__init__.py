"""The process layout, below everything that uses it: TP/PP/CP/DP groups, the zigzag CP layout,
the runtime (torch.distributed + megatron-core parallel state) and its CUDA accommodations."""
