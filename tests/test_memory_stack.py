"""The memory stack on CPU: recompute, tiled MLP, activation offload, optimizer offload.

Each setting must leave the loss and every gradient equal to the plain run (tiny model, fp32, TP 2
over gloo, a few SGD steps), the offload must move exactly the bytes the memory model's host term
says, and the memory model's TE flag must match the module list of megatron-core's TE layer spec.
"""
from __future__ import annotations

import dataclasses
import inspect
import json
import os
import subprocess

import pytest
import torch

from dist_utils import run_distributed
from megatron_ultralong.model.config import PRESETS
from megatron_ultralong.training import memory as M
from megatron_ultralong.training import memory_fit as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SEQ = 64
FULL = dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
SETTINGS = {
    "full": dict(mcore=FULL),
    "selective[layernorm]": dict(mcore=dict(recompute_granularity="selective", recompute_modules=["layernorm"])),
    "selective[layernorm,mlp]": dict(mcore=dict(recompute_granularity="selective", recompute_modules=["layernorm", "mlp"])),
    "selective[core_attn]": dict(mcore=dict(recompute_granularity="selective", recompute_modules=["core_attn"])),
    "mlp_tiles=3": dict(tiles=3),
    "offload=1.0": dict(offload=1.0),
    "full+offload=0.5": dict(mcore=FULL, offload=0.5),
    "full+tiles=4+offload=1.0": dict(mcore=FULL, tiles=4, offload=1.0),
    "selective[layernorm]+offload=1.0": dict(mcore=dict(recompute_granularity="selective",
                                                        recompute_modules=["layernorm"]), offload=1.0),
}


def _layout(setting: dict, tp: int) -> M.Layout:
    """The memory model's view of a setting on the tiny CPU model (fp32, unfused, local spec)."""
    mcore = setting.get("mcore", {})
    return M.Layout(seq_length=SEQ, tp=tp, act_bytes=4, distributed_optimizer=False, fused_kernels=False,
                    recompute=mcore.get("recompute_granularity") or "none",
                    recompute_modules=tuple(mcore.get("recompute_modules", ())),
                    mlp_tiles=setting.get("tiles", 1), activation_offload=setting.get("offload", 0.0))


def _run_setting(rt, setting: dict, steps: int = 3):
    """Losses, per-step gradients and offloaded bytes of a few SGD steps of the tiny model."""
    from megatron_ultralong.model import build_model
    from megatron_ultralong.model.activation_offload import ActivationOffload, ByteStorePool

    torch.manual_seed(0)
    model = build_model(PRESETS["tiny"], rt, loss_chunk_tokens=16, mlp_tiles=setting.get("tiles", 1),
                        **setting.get("mcore", {}))
    offload = ActivationOffload(model.decoder, setting["offload"], ByteStorePool()) if setting.get("offload") else None
    gen = torch.Generator().manual_seed(1)
    losses, grads, moved = [], [], []
    for _ in range(steps):
        ids = torch.randint(0, 1000, (1, SEQ), generator=gen)
        loss = model(ids, torch.arange(SEQ)[None], None, labels=ids).mean()
        loss.backward()
        losses.append(loss.item())
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
        moved.append(offload.pool.stored_bytes if offload else 0)
        with torch.no_grad():
            for p in model.parameters():
                p -= 0.05 * p.grad
                p.grad = None
    return losses, grads, moved


def _equality_body(rank, world_size, out_file):
    from megatron_ultralong.parallel.runtime import ParallelConfig, init_runtime, shutdown_runtime

    rt = init_runtime(ParallelConfig(tensor_parallel=world_size), device="cpu")
    try:
        base_losses, base_grads, _ = _run_setting(rt, {})
        report = {}
        for name, setting in SETTINGS.items():
            losses, grads, moved = _run_setting(rt, setting)
            torch.testing.assert_close(losses, base_losses, rtol=1e-6, atol=0, msg=name)
            for step, (g, g0) in enumerate(zip(grads, base_grads)):
                assert g.keys() == g0.keys()
                for key in g0:
                    torch.testing.assert_close(g[key], g0[key], rtol=1e-5, atol=1e-7,
                                               msg=lambda m, k=key, s=step: f"{name}, step {s}, {k}: {m}")
            report[name] = moved
        if rank == 0:
            with open(out_file, "w") as f:
                json.dump(report, f)
    finally:
        shutdown_runtime()


@pytest.mark.slow  # ~25 s: nine settings x three steps on two gloo ranks
def test_every_setting_leaves_loss_and_gradients_unchanged_and_offload_moves_the_modelled_bytes(tmp_path):
    out = tmp_path / "moved.json"
    run_distributed(_equality_body, 2, args=(str(out),))
    moved = json.loads(out.read_text())
    cfg = PRESETS["tiny"]
    for name, setting in SETTINGS.items():
        host = M.estimate_layout(cfg, _layout(setting, tp=2)).host_activations
        if not setting.get("offload"):
            assert moved[name] == [0, 0, 0] and host == 0
        elif "full" in name:
            # Full recompute: exactly each offloaded layer's input, T x h x 4 B (the model's term).
            layers = round(setting["offload"] * cfg.num_layers)
            assert moved[name] == [layers * SEQ * cfg.hidden_size * 4] * 3
            assert host == moved[name][0]
        else:
            # The whole saved set of every layer: the model's per-layer inventory (unfused CPU kernels).
            assert moved[name][0] == pytest.approx(host, rel=0.1), (moved[name], host)


def test_recompute_on_cpu_rests_on_the_pinned_megatron_internals():
    """runtime.py accommodation 5: if these fail, megatron-core changed how recompute saves RNG
    states or how CheckpointWithoutOutput reads fp8 (the stand-ins may then be unnecessary)."""
    from megatron.core.tensor_parallel import random as mrandom

    assert "_get_cuda_rng_state(" in inspect.getsource(mrandom._get_all_rng_states)
    assert "_set_cuda_rng_state(" in inspect.getsource(mrandom._set_all_rng_states)
    assert "fp8 is not None" in inspect.getsource(mrandom.CheckpointWithoutOutput.__init__)
    assert "FP8GlobalStateManager" in inspect.getsource(mrandom.CheckpointWithoutOutputFunction.forward)


def _te_spec_with_stand_in_provider(monkeypatch):
    """megatron-core's real `get_gpt_layer_with_transformer_engine_spec`, with TE's spec provider
    replaced by one returning stand-in classes named like TE's (TE itself needs a GPU build)."""
    from megatron.core.models.backends import BackendSpecProvider
    from megatron.core.models.gpt import gpt_layer_specs

    def stand_in(name):
        return type(name, (torch.nn.Module,), {})

    class TEStandIn(BackendSpecProvider):
        def linear(self): return stand_in("TELinear")
        def column_parallel_linear(self): return stand_in("TEColumnParallelLinear")
        def row_parallel_linear(self): return stand_in("TERowParallelLinear")
        def fuse_layernorm_and_linear(self): return True
        def column_parallel_layer_norm_linear(self): return stand_in("TELayerNormColumnParallelLinear")
        def layer_norm(self, rms_norm=False, for_qk=False): return stand_in("TENorm")
        def core_attention(self): return stand_in("TEDotProductAttention")
        def grouped_mlp_modules(self, *a, **k): raise NotImplementedError
        def activation_func(self): return None

    monkeypatch.setattr(gpt_layer_specs, "TESpecProvider", TEStandIn, raising=False)
    return gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec()


def test_memory_model_te_flag_matches_the_te_spec_module_list(monkeypatch):
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    from megatron_ultralong.model.layer_spec import norms_folded_into_linears

    te = _te_spec_with_stand_in_provider(monkeypatch)
    sub = te.submodules
    assert sub.self_attention.submodules.linear_qkv.__name__ == "TELayerNormColumnParallelLinear"
    assert sub.mlp.submodules.linear_fc1.__name__ == "TELayerNormColumnParallelLinear"
    assert norms_folded_into_linears(te) == M.FOLDED_NORMS_TE == ("attention", "mlp")
    assert norms_folded_into_linears(get_gpt_layer_local_spec(normalization="RMSNorm")) == ()

    cfg = PRESETS["llama3.1-8b"]
    base = M.Layout(seq_length=1 << 20, tp=8, sequence_parallel=True)
    h_e_tp = cfg.hidden_size * 2 / 8

    def saved(te_spec, *modules):
        lay = M.Layout(**{**base.__dict__, "transformer_engine": te_spec,
                          "recompute": "selective" if modules else "none", "recompute_modules": modules})
        return M.layer_saved_bytes(cfg, lay)["norm outputs"]

    # "layernorm" recompute re-runs only norm modules: with TE both outputs stay (fused norm+linear).
    assert saved(False, "layernorm") == 0 and saved(True, "layernorm") == saved(True) == 2 * h_e_tp
    # "mlp" re-runs the MLP, and with TE the pre-MLP norm inside fc1: only the attention norm's stays.
    assert saved(True, "layernorm", "mlp") == h_e_tp == 1024
    assert saved(False, "layernorm", "mlp") == 0


def test_tiled_mlp_swaps_into_both_specs(monkeypatch):
    from megatron_ultralong.model.layer_spec import get_ultralong_layer_spec
    from megatron_ultralong.model.tiled_mlp import TiledMLP

    spec = get_ultralong_layer_spec(False, "sdpa", mlp_tiles=4)
    assert spec.submodules.mlp.module is TiledMLP and spec.submodules.mlp.params["num_tiles"] == 4
    assert get_ultralong_layer_spec(False, "sdpa").submodules.mlp.module is not TiledMLP


def test_offload_tiles_and_optimizer_offload_in_the_memory_model():
    cfg = PRESETS["llama3.1-8b"]
    lay = M.Layout(seq_length=1 << 20, tp=8, sequence_parallel=True, recompute="full", transformer_engine=True)
    plain = M.estimate_layout(cfg, lay)
    assert plain.host_total == 0
    # Offloading every layer: the layer inputs (1M x 1,024 B x 32 = 32 GiB) move to the host,
    # two layers' worth stay in flight on the device.
    off = M.estimate_layout(cfg, M.Layout(**{**lay.__dict__, "activation_offload": 1.0}))
    assert off.host_activations == (1 << 20) * 1024 * 32
    assert plain.activations - off.activations == (1 << 20) * 1024 * 30
    # Tiles divide the MLP's backward working set; the QKV projection's phase then bounds it.
    tiled = M.estimate_layout(cfg, M.Layout(**{**lay.__dict__, "mlp_tiles": 16}))
    assert tiled.backward_working_set < plain.backward_working_set
    # The optimizer offload: 12 B/param leave the device, 18 B/param (with the staging copies) on host.
    opt = M.estimate_layout(cfg, M.Layout(**{**lay.__dict__, "optimizer_offload": 1.0}))
    params = M.parameter_count(cfg) / 8
    assert opt.optimizer == 0 and opt.host_optimizer == pytest.approx(params * 18)
    assert plain.optimizer == pytest.approx(params * 12)


def test_optimizer_offload_reaches_megatron_optimizer_config():
    from megatron.core.optimizer import OptimizerConfig

    from megatron_ultralong.training.config import OptimSection
    from megatron_ultralong.training.optimizer import optimizer_offload_fields

    assert optimizer_offload_fields(OptimSection()) == {}
    fields = optimizer_offload_fields(OptimSection(cpu_offload_fraction=0.75))
    # Every key is an OptimizerConfig field (building one needs TE's version for the precision-aware
    # path, a GPU image's): megatron-core then builds its HybridDeviceOptimizer.
    assert set(fields) <= {f.name for f in dataclasses.fields(OptimizerConfig)}
    assert fields["optimizer_cpu_offload"] and fields["optimizer_offload_fraction"] == 0.75
    assert fields["use_precision_aware_optimizer"]
    with pytest.raises(ValueError, match=r"optim.cpu_offload_fraction=1.5"):
        OptimSection(cpu_offload_fraction=1.5)


def test_memory_ladder_walks_tiles_and_offload():
    cfg = PRESETS["llama3.1-8b"]
    lay = M.Layout(seq_length=1 << 20, tp=8, sequence_parallel=True, transformer_engine=True)
    totals = [M.estimate_layout(cfg, F.apply_rung(lay, r)).total for r in F.MEMORY_LADDER]
    assert totals[-1] == min(totals) and totals[0] == max(totals)
    chosen = F.choose_recompute(cfg, lay, 40 * 2**30)
    assert chosen.recompute == "full" and chosen.mlp_tiles == 16 and chosen.activation_offload == 1.0
    # A host budget rules out rungs that offload more than it holds.
    assert F.choose_recompute(cfg, lay, 40 * 2**30, host_budget_bytes=2**30) is None


@pytest.mark.parametrize("tp,local,tiles", [(2, 8, 3), (4, 6, 4), (8, 5, 2)])
def test_sequence_tiles_put_sequence_parallel_rows_back_in_order(tp, local, tiles):
    """The row order of sequence_tiles.py with TP ranks simulated in one process: the column-parallel
    tiles (each an all-gather of every rank's tile) come back in sequence order, and the row-parallel
    tiles reduce-scatter each rank's own rows (megatron's gathers allocate on CUDA, so the index math
    is checked here with the collectives written out; gpu_check runs the real ones)."""
    from megatron_ultralong.model.sequence_tiles import gathered_rows, sequence_order, tile_bounds

    torch.manual_seed(0)
    x = torch.randn(tp * local, 3)
    w = torch.randn(3, 5)
    shards = x.split(local)  # rank r holds rows [r*local, (r+1)*local)
    bounds = tile_bounds(local, tiles)
    # Column: gather tile j of every rank, apply, concatenate, reorder.
    outs = [torch.cat([s[a:b] for s in shards]) @ w for a, b in bounds]
    torch.testing.assert_close(torch.cat(outs).index_select(0, sequence_order(local, tp, bounds)), x @ w)
    # Row: each tile picks the gathered rows of the full input; the reduce-scatter gives rank r
    # the r-th block of each tile's output, which must be rank r's own rows of that tile.
    for r in range(tp):
        mine = []
        for a, b in bounds:
            y = x.index_select(0, gathered_rows(local, tp, a, b)) @ w
            mine.append(y[r * (b - a):(r + 1) * (b - a)])
        torch.testing.assert_close(torch.cat(mine), (x @ w)[r * local:(r + 1) * local])


def test_tiles_reach_the_attention_projections():
    from megatron_ultralong.model.layer_spec import get_ultralong_layer_spec

    attn = get_ultralong_layer_spec(False, "sdpa", mlp_tiles=4).submodules.self_attention.submodules
    for slot, kind in (("linear_qkv", "column"), ("linear_proj", "row")):
        spec = getattr(attn, slot)
        assert spec.module.tiled_kind == kind and spec.params == {"num_tiles": 4}


@pytest.mark.parametrize("name,device_gb", [("llama31_8b_1m_8gpu", 80.0), ("llama31_8b_4m_8gpu_h100", 80.0),
                                           ("llama31_8b_4m_8gpu", 141.0)])
def test_one_node_recipes_are_the_cheapest_rung_that_fits(name, device_gb, tmp_path):
    """The one-node recipes: the cheapest rung of MEMORY_LADDER within 90% of the device (with the
    plan's framework allowance), and the figures their headers quote are the model's."""
    import re
    import sys

    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import memory_plan

    cfg, lay = memory_plan.one_node_recipe(name)
    assert lay.world_size == 8 and cfg.check_world(8) == 1
    model = PRESETS["llama3.1-8b"]
    chosen = F.choose_recompute(model, lay, memory_plan.one_node_budget(device_gb))
    assert chosen is not None
    assert (chosen.recompute, chosen.mlp_tiles, chosen.activation_offload, chosen.optimizer_offload) == \
        (lay.recompute, lay.mlp_tiles, lay.activation_offload, lay.optimizer_offload)
    est = M.estimate_layout(model, lay)
    assert est.total + memory_plan.FRAMEWORK_GB * 1e9 <= 0.9 * device_gb * 1e9
    header = open(os.path.join(ROOT, "examples", "recipes", name + ".yaml")).read()
    per_gpu = re.search(r"([\d.]+) GiB per GPU of (\d+)", header)
    assert float(per_gpu.group(1)) == round(est.total / 2**30, 1) and float(per_gpu.group(2)) == device_gb
    host = re.search(r"(\d+) GiB of pinned memory per GPU", header)
    assert int(host.group(1)) == round(est.host_total / 2**30)
    # The node launcher runs a one-node recipe whole: 8 processes, the recipe as written (no smoke-test
    # overrides of its length, layout or save directory).
    stub = tmp_path / "bin"
    stub.mkdir()
    (stub / "torchrun").write_text('#!/usr/bin/env bash\nprintf "%s\\n" "$@"\n')
    (stub / "torchrun").chmod(0o755)
    argv = subprocess.run(["bash", os.path.join(ROOT, "examples", "recipes", "run_node.sh")], cwd=tmp_path,
                          env=dict(os.environ, RECIPE=name, PATH=f"{stub}:{os.environ['PATH']}"),
                          capture_output=True, text=True, check=True).stdout.split()
    assert argv[argv.index("--nproc-per-node") + 1] == "8"
    assert argv[argv.index("--config") + 1] == os.path.join(ROOT, "examples", "recipes", name + ".yaml")
    assert argv[argv.index("--config") + 2:] == []


@pytest.mark.slow  # ~60 s: two 2-rank trainer runs
def test_trainer_with_the_memory_stack_matches_the_plain_run_under_cp(tmp_path):
    """End to end through the trainer and its config: CP 2 over gloo, selective recompute + tiles +
    every layer's saved set offloaded (the CP attention's q/k/v/out/lse among it): the same losses
    and gradient norms as the plain run, step by step."""
    from test_train_loop import _make_dataset, _overrides, _run

    prefix = str(tmp_path / "arith")
    _make_dataset(prefix)
    cp = {"parallel.context_parallel": 2, "train.steps": 2, "optim.warmup_steps": 0}
    plain = _run(2, _overrides(prefix, **cp), tmp_path / "plain.json")
    stack = _run(2, _overrides(prefix, **cp, **{"model.recompute": "selective", "model.recompute_modules": "[layernorm]",
                                               "model.mlp_tiles": 2, "model.activation_offload": 1.0}),
                 tmp_path / "stack.json")
    for a, b in zip(plain, stack):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6) and a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-5)
