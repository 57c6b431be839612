import pytest
import torch
import torch.distributed as dist

from dist_utils import run_distributed


def _allreduce(rank, world_size):
    t = torch.tensor([float(rank + 1)])
    dist.all_reduce(t)
    assert t.item() == sum(range(1, world_size + 1))


def _fail_on_one(rank, world_size):
    if rank == 1:
        raise ValueError("boom on rank 1")


def test_run_distributed_allreduce():
    run_distributed(_allreduce, world_size=2)


def test_run_distributed_reports_rank_failure():
    with pytest.raises(AssertionError, match="rank 1 of 2 failed(.|\n)*boom on rank 1"):
        run_distributed(_fail_on_one, world_size=2)
