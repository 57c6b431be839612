"""Tiled MLP: megatron-core's SwiGLU MLP run over the sequence in tiles, each tile recomputed in backward.

The technique is DeepSpeed ALST's TiledMLP (Bekman et al. 2025, "Arctic Long Sequence Training",
arXiv 2506.13996, §3.2): an MLP is position-wise, so the sequence can be cut into tiles that go
through it one after another. Each tile runs under megatron-core's activation checkpoint
(`tensor_parallel.checkpoint`), which keeps only the tile's input; its fc1 output (2F/TP per
token), SwiGLU output (F/TP) and their gradients exist for one tile at a time, in forward and in
backward. Per token and layer the MLP then keeps nothing beyond its input, and the backward working
set of the MLP (re-run activations, gradients, and under sequence parallelism the all-gathered
input and the full-size input gradient of fc1) shrinks by the tile count
(training/memory.py models it).

It is a `ModuleSpec` swap of the layer's `mlp` submodule (model/layer_spec.py): the submodules
(fc1, fc2, and under Transformer Engine the pre-MLP RMSNorm folded into fc1) are megatron's own, so
weights, sharded state dicts and checkpoints are those of `MLP`.

Tiles split dim 0 (the sequence; under sequence parallelism this rank's shard, which fc1 gathers
tile by tile: the gathered tile holds tile j of every TP rank, and fc2's reduce-scatter hands each
rank its own rows back, so the result is the untiled MLP's exactly).
"""
from __future__ import annotations

import functools
import logging

import torch
from megatron.core import tensor_parallel
from megatron.core.transformer.mlp import MLP


class _TiledMLPBuildNote(logging.Filter):
    """megatron-core's TransformerLayer passes its TP group only to an `mlp` spec whose module is
    exactly `MLP` and warns "Unknown MLP type" for any other, once per layer. `TiledMLP` takes the
    default TP group (`get_tensor_model_parallel_group_if_none`, the same group under megatron's
    parallel state), so that warning says nothing here; this filter drops it."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Unknown MLP type")


def quiet_unknown_mlp_warning() -> None:
    """Install `_TiledMLPBuildNote` on megatron's transformer-layer logger (idempotent); the layer
    spec calls it when it puts TiledMLP in."""
    logging.getLogger("megatron.core.transformer.transformer_layer").addFilter(_NOTE)


_NOTE = _TiledMLPBuildNote()


class TiledMLP(MLP):
    """megatron-core `MLP` whose forward runs `num_tiles` sequence tiles, each under recompute.

    forward(hidden_states [s, b, h], ...) -> (output [s, b, h], None), as `MLP.forward`.
    """

    def __init__(self, *args, num_tiles: int = 1, **kwargs):
        if not isinstance(num_tiles, int) or num_tiles < 1:
            raise ValueError(f"model.mlp_tiles={num_tiles!r}: expected an integer >= 1")
        super().__init__(*args, **kwargs)
        self.num_tiles = num_tiles
        """Sequence tiles per forward (1 = megatron's MLP unchanged)."""

    def forward(self, hidden_states, per_token_scale=None, **kwargs):
        tiles = min(self.num_tiles, hidden_states.shape[0])
        if tiles <= 1 or per_token_scale is not None:  # per-token scales are MoE's; not tiled
            return super().forward(hidden_states, per_token_scale, **kwargs)
        run = functools.partial(MLP.forward, self, **kwargs)
        outputs, biases = [], []
        for tile in torch.tensor_split(hidden_states, tiles, dim=0):
            if torch.is_grad_enabled():
                # megatron's checkpoint (runtime.py accommodation 5 makes it run on CPU): saves the
                # tile, re-runs it in its own backward, so only one tile's internals are ever live.
                out, bias = tensor_parallel.checkpoint(run, False, tile)
            else:
                out, bias = run(tile)
            outputs.append(out)
            biases.append(bias)
        # fc2's bias (add_bias_linear; Llama has none) is per feature, the same for every tile.
        return torch.cat(outputs, dim=0), biases[0]
