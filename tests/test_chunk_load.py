"""`ChunkLoadStrategy`: megatron-core's `dist_checkpointing.load` with a local, collective-free read of
just the requested chunks, in a world of one process (where megatron's own strategy cannot load
part of a stacked tensor).

The checkpoint is written by megatron-core's `dist_checkpointing.save`; the reference values come
from megatron-core's own loader reading the whole tensors.
"""
import pytest
import torch

from dist_utils import run_distributed

LAYERS, ROWS, COLS = 4, 6, 5


def _saved_state():
    """A stacked [LAYERS, ROWS, COLS] tensor saved as one chunk per layer (as megatron saves
    `decoder.layers.*`), and a [ROWS, COLS] vocab-like matrix saved in two row halves (as at TP=2)."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    g = torch.Generator().manual_seed(0)
    layers = [torch.randn(ROWS, COLS, generator=g) for _ in range(LAYERS)]
    vocab = torch.randn(ROWS, COLS, generator=g)
    sharded = {f"stack.{i}": ShardedTensor.from_rank_offsets("stack", t, (0, i, LAYERS), prepend_axis_num=1)
               for i, t in enumerate(layers)}
    for half in range(2):
        sharded[f"vocab.{half}"] = ShardedTensor.from_rank_offsets(
            "vocab", vocab[half * ROWS // 2:(half + 1) * ROWS // 2].clone(), (0, half, 2))
    return sharded, torch.stack(layers), vocab


def _body(rank, world_size, root):
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor
    from megatron.core.dist_checkpointing.validation import StrictHandling

    from megatron_ultralong.checkpoint.torch_dist import SyncTorchDistSaveStrategy
    from megatron_ultralong.checkpoint.chunk_load import ChunkLoadStrategy

    sharded, stack, vocab = _saved_state()
    dist_checkpointing.save(sharded, root, sharded_strategy=SyncTorchDistSaveStrategy())
    # Reference: megatron's own loader, whole tensors.
    ref = dist_checkpointing.load(
        {"stack": ShardedTensor.from_rank_offsets("stack", torch.empty(LAYERS, ROWS, COLS)),
         "vocab": ShardedTensor.from_rank_offsets("vocab", torch.empty(ROWS, COLS))}, root)
    assert torch.equal(ref["stack"], stack) and torch.equal(ref["vocab"], vocab)

    strategy = ChunkLoadStrategy()

    def load(request):
        return dist_checkpointing.load(request, root, sharded_strategy=strategy, validate_access_integrity=False,
                                       strict=StrictHandling.ASSUME_OK_UNEXPECTED)

    # One layer of the stack, and rows 2..3 of the vocab matrix (across both stored halves).
    layer2 = torch.full((ROWS, COLS), float("nan"))
    rows = torch.empty(2, COLS)
    got = load({"layer": ShardedTensor.from_rank_offsets("stack", layer2, (0, 2, LAYERS), prepend_axis_num=1),
                "rows": ShardedTensor("vocab", rows, torch.float32, (2, COLS), (ROWS, COLS), (2, 0),
                                      axis_fragmentations=(3, 1))})
    assert torch.equal(got["layer"], ref["stack"][2]) and got["layer"] is layer2  # read in place
    assert torch.equal(got["rows"], ref["vocab"][2:4])

    # A larger padded vocabulary than was saved (export at another TP): stored rows, then zeros.
    padded = torch.full((ROWS + 2, COLS), float("nan"))
    got = load({"v": ShardedTensor.from_rank_offsets("vocab", padded, allow_shape_mismatch=True)})
    assert torch.equal(got["v"][:ROWS], ref["vocab"]) and torch.all(got["v"][ROWS:] == 0)
    with pytest.raises(ValueError, match=r"'vocab' chunk at \(0, 0\) of size \(8, 5\) lies outside the stored "
                                         r"tensor of shape \(6, 5\)"):
        load({"v": ShardedTensor.from_rank_offsets("vocab", torch.empty(ROWS + 2, COLS))})
    with pytest.raises(ValueError, match=r"holds no tensor 'nope'"):
        load({"x": ShardedTensor.from_rank_offsets("nope", torch.empty(1))})
    with pytest.raises(ValueError, match=r"is not a plain ShardedTensor"):
        load({"o": ShardedObject("obj", None, (1,), (0,))})


def test_chunk_load_reads_requested_chunks_in_one_process(tmp_path):
    run_distributed(_body, world_size=1, args=(str(tmp_path),))
