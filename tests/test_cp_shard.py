"""The zigzag CP layout: chunk ids, shard/unshard round trip, positions, batch sharding, errors."""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from dist_utils import run_distributed

from megatron_ultralong.parallel.cp_layout import (
    gather_tensor,
    local_positions,
    local_ranges,
    natural_to_zigzag,
    shard_batch,
    shard_tensor,
    stack_shards,
    unshard_tensors,
    zigzag_chunk_ids,
    zigzag_to_natural,
)


@pytest.mark.parametrize("cp", [1, 2, 3, 4])
def test_chunk_ids_are_r_and_mirror(cp):
    for r in range(cp):
        assert zigzag_chunk_ids(cp, r) == (r, 2 * cp - 1 - r)
    # Every chunk is held exactly once.
    held = sorted(c for r in range(cp) for c in zigzag_chunk_ids(cp, r))
    assert held == list(range(2 * cp))


def test_megatron_example_positions():
    # megatron/core/utils.py get_batch_on_this_cp_rank: CP=2 -> GPU0 gets chunks 0 and 3, GPU1 chunks 1 and 2.
    assert local_positions(8, 2, 0).tolist() == [0, 1, 6, 7]
    assert local_positions(8, 2, 1).tolist() == [2, 3, 4, 5]
    assert local_ranges(16, 4, 1) == ((2, 4), (12, 14))


@pytest.mark.parametrize("cp, seq_dim", [(2, 1), (4, 1), (3, 0), (2, 2)])
def test_shard_unshard_round_trip(cp, seq_dim):
    shape = [3, 5, 7]
    shape[seq_dim] = 2 * cp * 3
    x = torch.randn(*shape)
    shards = [shard_tensor(x, cp, r, seq_dim) for r in range(cp)]
    positions = torch.arange(x.size(seq_dim))
    for r, s in enumerate(shards):
        # The shard holds exactly the rows at the rank's global positions.
        assert torch.equal(s, x.index_select(seq_dim, local_positions(x.size(seq_dim), cp, r)))
        assert torch.equal(shard_tensor(positions, cp, r, 0), local_positions(x.size(seq_dim), cp, r))
    assert torch.equal(unshard_tensors(shards, seq_dim), x)
    stacked = stack_shards(x, cp, seq_dim)
    for r in range(cp):
        assert torch.equal(stacked[r], shards[r])
    rank_major = torch.cat(shards, dim=seq_dim)
    assert torch.equal(natural_to_zigzag(x, cp, seq_dim), rank_major)
    assert torch.equal(zigzag_to_natural(rank_major, cp, seq_dim), x)


def test_shard_batch_shards_per_token_entries_only():
    cp, s = 2, 8
    tokens = torch.arange(2 * s).view(2, s)
    cu = torch.tensor([0, 3, 8, 16])
    batch = dict(tokens=tokens, labels=tokens + 1, loss_mask=torch.ones(2, s), position_ids=tokens % s,
                 cu_seqlens=cu, name="x")
    out = shard_batch(batch, cp, 1)
    assert out["tokens"].tolist() == [[2, 3, 4, 5], [10, 11, 12, 13]]
    assert out["labels"].tolist() == [[3, 4, 5, 6], [11, 12, 13, 14]]
    assert out["position_ids"].tolist() == [[2, 3, 4, 5], [2, 3, 4, 5]]
    assert out["cu_seqlens"] is cu and out["name"] == "x"
    with pytest.raises(ValueError, match="sequence length 6"):
        shard_batch(dict(tokens=tokens, labels=tokens[:, :6]), cp, 0)


def test_indivisible_seq_len_names_the_values():
    with pytest.raises(ValueError, match=r"seq_len=10 is not divisible by 2\*cp_size=4"):
        shard_tensor(torch.zeros(1, 10), 2, 0)
    with pytest.raises(ValueError, match="seq_len=12 .* 2\\*cp_size=8"):
        local_positions(12, 4, 0)
    with pytest.raises(ValueError, match="cp_rank=2"):
        zigzag_chunk_ids(2, 2)


def _gather_body(rank: int, world: int) -> None:
    x = torch.arange(2 * 3 * 16, dtype=torch.float32).view(2, 16, 3)  # same on every rank
    local = shard_tensor(x, world, rank, seq_dim=1)
    assert torch.equal(gather_tensor(local, dist.group.WORLD, seq_dim=1), x)


def test_gather_tensor_inverts_shard():
    run_distributed(_gather_body, world_size=2)
