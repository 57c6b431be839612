"""GPU-only code paths, reproduced on CPU: each test fails on the defect it names.

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
        _check_recompute_settings_reach_megatron(rt)
    finally:
        mcore_optimizer.get_megatron_optimizer = original
        shutdown_runtime()
    assert seen["groups"]["dp_cp_group"] is not None
    assert seen["groups"]["intra_dp_cp_group_gloo"] is None


def _check_recompute_settings_reach_megatron(rt) -> None:
    """Defect 6: every setting of the ladder is accepted by megatron-core's TransformerConfig and
    turns on the matching recompute in its TransformerLayer (built on CPU; it runs on GPU)."""
    from megatron_ultralong.model import build_model
    from megatron_ultralong.model.config import PRESETS
    from megatron_ultralong.training.config import load_train_config
    from megatron_ultralong.training.memory_fit import RECOMPUTE_LADDER
    from megatron_ultralong.training.model_source import recompute_overrides

    for mode, modules in RECOMPUTE_LADDER:
        overrides = [f"model.recompute={mode}"] + ([f"model.recompute_modules=[{','.join(modules)}]"] if modules else [])
        cfg = load_train_config(None, ("data.paths=[x]", *overrides))
        model = build_model(PRESETS["tiny"], rt, **recompute_overrides(cfg))
        layer = model.decoder.layers[0]
        assert model.config.recompute_granularity == (None if mode == "none" else mode)
        assert layer.recompute_input_layernorm == ("layernorm" in modules)
        assert layer.recompute_mlp == ("mlp" in modules)


def test_megatron_optimizer_groups_and_recompute_settings_accepted_by_megatron():
    # Defect 1: with pg_collection, megatron-core 0.16.1 raises unless use_gloo_process_groups=False.
    # Defect 6: the recompute settings the recipes use reach megatron's layers.
    run_distributed(_optimizer_groups_body, world_size=1)


class _WithExtraState(nn.Module):
    """Mixin for a module class that, like Transformer Engine's RMSNorm, has an `_extra_state`."""

    def get_extra_state(self):
        return torch.tensor([7.0])

    def set_extra_state(self, state):
        self.loaded_extra_state = state


def _give_extra_state(module: nn.Module) -> None:
    module.__class__ = type("TE" + type(module).__name__, (_WithExtraState, type(module)), {})


def _extra_state_body(rank: int, world_size: int, root: str) -> None:
    from pathlib import Path

    from megatron_ultralong.checkpoint.torch_dist import load_megatron_checkpoint, save_megatron_checkpoint
    from megatron_ultralong.model import build_model
    from megatron_ultralong.model.config import PRESETS
    from megatron_ultralong.parallel.runtime import ParallelConfig, init_runtime, shutdown_runtime

    rt = init_runtime(ParallelConfig(), device="cpu")
    cfg = PRESETS["tiny"]
    try:
        plain = build_model(cfg, rt)
        save_megatron_checkpoint(plain, Path(root) / "plain")
        te_like = build_model(cfg, rt)
        _give_extra_state(te_like.decoder.final_layernorm)
        _give_extra_state(te_like.decoder.layers[0].mlp.linear_fc1)
        assert "decoder.final_layernorm._extra_state" in te_like.state_dict()
        # torch-spec checkpoint -> model asking for extra state: loads, weights equal.
        load_megatron_checkpoint(te_like, Path(root) / "plain")
        loaded = te_like.state_dict()
        for name, a in plain.state_dict().items():
            if isinstance(a, torch.Tensor) and "_extra_state" not in name:
                torch.testing.assert_close(loaded[name], a, msg=name)
        # ...and the reverse: a checkpoint with extra state into the plain model.
        save_megatron_checkpoint(te_like, Path(root) / "te")
        load_megatron_checkpoint(build_model(cfg, rt), Path(root) / "te")
        # A missing real weight is still an error.
        broken = build_model(cfg, rt)
        broken.decoder.final_layernorm.register_parameter("extra_bias", nn.Parameter(torch.zeros(cfg.hidden_size)))
        with pytest.raises(Exception, match=r"extra_bias"):
            load_megatron_checkpoint(broken, Path(root) / "plain")
    finally:
        shutdown_runtime()


def test_checkpoint_portable_between_te_and_torch_specs(tmp_path):
    # Defect 5: a TE model's state dict asks for `_extra_state` keys a torch-spec checkpoint lacks.
    run_distributed(_extra_state_body, world_size=1, args=(str(tmp_path),))


def test_gradient_accumulation_fusion_on_gpu_when_megatron_has_the_kernel(monkeypatch):
    # runtime.py used to turn the fusion off on every device.
    from megatron.core.tensor_parallel import layers

    from megatron_ultralong.parallel.runtime import megatron_config_overrides

    monkeypatch.setattr(layers, "_grad_accum_fusion_available", True)
    assert megatron_config_overrides(torch.device("cuda", 0))["gradient_accumulation_fusion"] is True
    assert megatron_config_overrides(torch.device("cpu"))["gradient_accumulation_fusion"] is False
    monkeypatch.setattr(layers, "_grad_accum_fusion_available", False)
    assert megatron_config_overrides(torch.device("cuda", 0))["gradient_accumulation_fusion"] is False
