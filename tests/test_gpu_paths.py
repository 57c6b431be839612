"""GPU-only code paths, reproduced on CPU (issue 12): each test fails on the defect it names.

No GPU is available to this project's CI, so each GPU branch is driven here through the same
library function it calls on a GPU, with megatron-core's own checks running on CPU (optimizer
process groups) or a stand-in for the CUDA op that records what it was given.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

from dist_utils import run_distributed


def _optimizer_groups_body(rank: int, world_size: int) -> None:
    import megatron.core.optimizer as mcore_optimizer
    from megatron.core.distributed import DistributedDataParallelConfig
    from megatron.core.process_groups_config import ProcessGroupCollection

    from megatron_ultralong.parallel.runtime import ParallelConfig, init_runtime, shutdown_runtime
    from megatron_ultralong.training.config import OptimSection
    from megatron_ultralong.training.optimizer import MegatronOptimizer

    rt = init_runtime(ParallelConfig(), device="cpu")
    seen = {}

    def fake_get_megatron_optimizer(config, model_chunks, use_gloo_process_groups=True, pg_collection=None, **kw):
        # megatron-core's own group set-up, exactly as get_megatron_optimizer runs it first
        # (it needs no GPU); the CUDA-only optimizer construction after it is not reached.
        seen["groups"] = ProcessGroupCollection.setup_process_groups_for_optimizer(
            pg_collection, model_chunks, use_gloo_process_groups
        )
        return object()

    model = nn.Linear(4, 4)
    model.ddp_config = DistributedDataParallelConfig(use_distributed_optimizer=True)
    original = mcore_optimizer.get_megatron_optimizer
    mcore_optimizer.get_megatron_optimizer = fake_get_megatron_optimizer
    try:
        MegatronOptimizer(model, OptimSection(), bf16=True, pg_collection=rt.pg_collection)
    finally:
        mcore_optimizer.get_megatron_optimizer = original
        shutdown_runtime()
    assert seen["groups"]["dp_cp_group"] is not None
    assert seen["groups"]["intra_dp_cp_group_gloo"] is None


def test_megatron_optimizer_process_groups_accepted_by_megatron():
    # Defect 1: with pg_collection, megatron-core 0.16.1 raises unless use_gloo_process_groups=False.
    run_distributed(_optimizer_groups_body, world_size=1)
