"""training/memory.py: the one memory/FLOPs model, checked against measurement and its derivation."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from megatron_ultralong.model.config import PRESETS
from megatron_ultralong.training import memory as M
from megatron_ultralong.training import memory_fit as F
from megatron_ultralong.training import step_time as S

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _probe(seq: int, *flags: str) -> dict:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.path.join(ROOT, "examples")]), OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "memory_probe.py"), str(seq), *flags],
                         capture_output=True, text=True, timeout=300, env=env, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("seq", [2048, 8192])
def test_activation_estimate_matches_measured_memory_on_cpu(seq):
    import memory_probe

    lay = M.Layout(seq_length=seq, act_bytes=4, loss_chunk_tokens=memory_probe.LOSS_CHUNK,
                   distributed_optimizer=False, fused_kernels=False)
    est = M.estimate_layout(memory_probe.CONFIG, lay)
    measured = _probe(seq)
    # Allocator peak of forward+backward above a warm baseline vs the parts of the estimate that grow
    # with the step's tokens: saved activations + the backward working set.
    assert measured["peak"] == pytest.approx(est.activations + est.backward_working_set, rel=0.15), measured
    # The saved set alone: the distinct storages autograd holds after the forward.
    assert measured["saved"] == pytest.approx(est.activations, rel=0.15), measured


@pytest.mark.slow
@pytest.mark.parametrize("seq", [2048, 4096])
def test_tiled_mlp_peak_matches_the_model_on_cpu(seq):
    """The tiled MLP (model.mlp_tiles=4) keeps only its input and re-runs tile by tile: the
    allocator's peak of forward+backward against the memory model's tiled terms, and below the
    untiled model's prediction by the MLP's saved set and working set."""
    import memory_probe

    lay = M.Layout(seq_length=seq, act_bytes=4, loss_chunk_tokens=memory_probe.LOSS_CHUNK,
                   distributed_optimizer=False, fused_kernels=False, mlp_tiles=4)
    est = M.estimate_layout(memory_probe.CONFIG, lay)
    measured = _probe(seq, "--mlp-tiles", "4")
    assert measured["peak"] == pytest.approx(est.activations + est.backward_working_set, rel=0.1), measured
    assert measured["saved"] == pytest.approx(est.activations, rel=0.05), measured
    plain = M.estimate_layout(memory_probe.CONFIG, M.Layout(**{**lay.__dict__, "mlp_tiles": 1}))
    assert measured["peak"] < 0.6 * (plain.activations + plain.backward_working_set)


def test_full_recompute_saved_set_matches_the_model_on_cpu():
    """Full recompute keeps each layer's input, the final norm's input (its output and x * rstd are
    re-made per loss chunk: without that the saved set is 2 KB per token, 60%, larger) and the
    rotary angles; the peak within 5%."""
    import memory_probe

    seq = 2048
    lay = M.Layout(seq_length=seq, act_bytes=4, loss_chunk_tokens=memory_probe.LOSS_CHUNK,
                   distributed_optimizer=False, fused_kernels=False, recompute="full", mlp_tiles=4)
    est = M.estimate_layout(memory_probe.CONFIG, lay)
    measured = _probe(seq, "--recompute", "full", "--mlp-tiles", "4")
    assert measured["saved"] == pytest.approx(est.activations, rel=0.02), measured
    assert measured["peak"] == pytest.approx(est.activations + est.backward_working_set, rel=0.05), measured


def test_llama8b_derivation_figures():
    cfg = PRESETS["llama3.1-8b"]
    tp1 = M.Layout(seq_length=1 << 20, tp=1)
    parts = M.layer_saved_bytes(cfg, tp1)
    # Korthikanti et al.'s minimal set for Llama-3.1-8B (module docstring): 139,392 B + 8 B rstd.
    minimal = sum(v for k, v in parts.items() if k not in ("attention out", "rope cos/sin")) + 8192
    assert minimal == 139_400
    sp8 = M.Layout(seq_length=1 << 20, tp=8, cp=16, dp=2, sequence_parallel=True)
    none = M.activation_bytes_per_token_per_layer(cfg, sp8)
    core_attn = M.activation_bytes_per_token_per_layer(cfg, M.Layout(**{**sp8.__dict__, "recompute": "selective",
                                                                         "recompute_modules": ("core_attn",)}))
    # megatron's "core_attn" drops only the lse (4 B x 32 heads / 8), and its checkpoint's v (a view)
    # pins the fused QKV output: q and k widths, (4096 + 1024) x 2 B / 8 = 1,280 B.
    assert core_attn - none == 1280 - 16
    ln_mlp = M.Layout(**{**sp8.__dict__, "recompute": "selective", "recompute_modules": ("layernorm", "mlp")})
    assert none - M.activation_bytes_per_token_per_layer(cfg, ln_mlp) == (2 * 4096 * 2 + 3 * 14336 * 2) / 8
    full = M.Layout(**{**sp8.__dict__, "recompute": "full"})
    assert M.activation_bytes_per_token_per_layer(cfg, full) == 4096 * 2 / 8


def test_cp_buffers_by_algorithm():
    cfg = PRESETS["llama3.1-8b"]
    lay = M.Layout(seq_length=1 << 20, tp=8, cp=16, dp=2, sequence_parallel=True)
    ring = M.cp_buffer_bytes(cfg, lay)
    gather = M.cp_buffer_bytes(cfg, M.Layout(**{**lay.__dict__, "cp_comm_type": "all_gather"}))
    # all_gather holds whole-sequence K/V and fp32 dK/dV: at 1M / TP8 one KV head of 128 ->
    # 2 x 1M x 128 x 4 B = 1 GiB of fp32 dK/dV, twice at the reduce-scatter, + fp32 dQ.
    assert gather == 2 * (2 * (1 << 20) * 128 * 4) + 4 * 512 * 65536
    assert ring < gather / 3
    assert M.cp_buffer_bytes(cfg, M.Layout(**{**lay.__dict__, "cp": 1})) == 0


def test_estimate_from_train_config_and_step_time():
    from megatron_ultralong.training.config import load_train_config

    cfg = load_train_config(os.path.join(ROOT, "examples", "recipes", "llama31_8b_1m.yaml"))
    est = M.estimate_memory(cfg, world_size=256)
    assert set(est.as_dict()) == {"weights", "grads", "optimizer", "activations", "backward_working_set",
                                  "cp_buffers", "logits", "total", "host_activations", "host_optimizer",
                                  "host_total"}
    assert est.weights == pytest.approx(M.parameter_count(PRESETS["llama3.1-8b"]) / 8 * 2)
    assert est.optimizer == pytest.approx(est.weights * 6 / 32)  # 12 B/param over DP8 x CP4
    t = S.estimate_step_time(cfg, world_size=256, mfu=0.5, peak_tflops=1000)
    flops = cfg.train.global_batch_size * (1 << 20) * (t.model_flops_per_token + t.recompute_flops_per_token)
    assert t.seconds == pytest.approx(flops / 256 / 500e12)
    with pytest.raises(ValueError, match="peak_tflops"):
        S.estimate_step_time(cfg.__class__(**{**cfg.__dict__, "train": cfg.train.__class__(
            **{**cfg.train.__dict__, "peak_tflops": None})}), world_size=256)


def test_choose_recompute_takes_the_cheapest_that_fits():
    cfg = PRESETS["llama3.1-8b"]
    lay = M.Layout(seq_length=1 << 21, tp=8, cp=8, dp=4, sequence_parallel=True)
    totals = [M.estimate_layout(cfg, M.Layout(**{**lay.__dict__, "recompute": r, "recompute_modules": m})).total
              for r, m in F.RECOMPUTE_LADDER]
    assert totals == sorted(totals, reverse=True)  # each recompute rung saves memory
    budget = (totals[1] + totals[2]) / 2
    assert F.choose_recompute(cfg, lay, budget).recompute_modules == ("layernorm", "mlp")
    assert F.choose_recompute(cfg, lay, totals[-1] - 1, ladder=F.RECOMPUTE_LADDER) is None
    # The full ladder goes on to tiles and offload, and runs out below its last rung.
    last = M.estimate_layout(cfg, F.apply_rung(lay, F.MEMORY_LADDER[-1])).total
    assert F.choose_recompute(cfg, lay, totals[-1] - 1).mlp_tiles > 1
    assert F.choose_recompute(cfg, lay, last - 1) is None
