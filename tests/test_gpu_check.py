"""benchmarks/gpu_check.sh --dry-run: the device check runs on CPU, exercises what CPU can (backend
self-check, every ring step of three CP ranks against a dense reference, a training step per layer
spec, one through the plugin's kernels with a document mask, the eval prefill) and skips the rest
with a reason, writing JSON. Its ring-step check must also catch a wrong kernel."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))


@pytest.mark.slow  # ~25 s: builds four tiny models
def test_gpu_check_dry_run(tmp_path):
    out = tmp_path / "gpu_check.json"
    env = dict(os.environ, PYTHON=sys.executable, OMP_NUM_THREADS="2")
    proc = subprocess.run(["bash", os.path.join(ROOT, "benchmarks", "gpu_check.sh"), "--dry-run", "--out", str(out)],
                          capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["mode"] == "dry-run" and res["failed"] == []
    assert res["env"]["megatron_core"] and res["env"]["self_check_sdpa"] == "ok"
    assert res["env"]["auto_backend"] == "sdpa"
    # Every ring step of ranks 0, cp/2, cp-1 (zigzag, CP4) against the dense reference, with limits.
    cpk = res["cp_kernels"]
    assert cpk["checked_ranks"] == [0, 2, 3]
    for name in ("out", "lse", "final_out", "final_lse", "dq", "dk", "dv"):
        assert cpk[f"max_err_{name}"] <= cpk[f"max_err_{name}_limit"] == 1e-4, name
    assert "GPU" in res["cp_kernels_timing"]["skipped"] and "GPU-only" in res["train_step_gpu"]["skipped"]
    assert res["train_step"]["256_none_seconds"] > 0 and res["train_step"]["256_none_estimated_gib"] > 0
    # The plugin's own path in a train step: documents at CP=1, "auto" resolved inside training.
    plugin = res["train_step_plugin"]
    assert plugin["auto_backend_in_training"] == "sdpa"  # CPU fp32: no accelerated kernel applies
    assert plugin["auto_block_calls"] == plugin["ring_block_calls"] > 0  # sdpa has no varlen: the ring
    assert plugin["auto_varlen_calls"] == plugin["ring_varlen_calls"] == 0 and plugin["ring_seconds"] > 0
    assert res["prefill"]["tokens"] == 256 and res["prefill"]["local_auto_backend_in_eval"] == "sdpa"
    assert "cp_kernels.max_err_out:" in proc.stdout  # one line per figure
    # The memory stack: offloaded bytes equal the memory model's host term; each setting's loss and
    # gradients within their limits of the plain run.
    stack = res["memory_stack"]
    assert stack["full_tiles_offload_offloaded_over_model"] == 1.0 and stack["full_tiles_seconds"] > 0
    exact = res["memory_stack_exact"]
    assert exact["full_tiles_offload_grad_rel_err"] <= exact["full_tiles_offload_grad_rel_err_limit"]


def test_default_out_is_outside_the_repository(monkeypatch):
    import gpu_check

    monkeypatch.setenv("OUT", "/some/where")
    assert gpu_check.default_out() == "/some/where/gpu_check.json"
    monkeypatch.delenv("OUT")
    assert not os.path.abspath(gpu_check.default_out()).startswith(ROOT + os.sep)


@pytest.mark.parametrize("broken", ["dk", "lse"])
def test_ring_step_check_catches_a_wrong_kernel(monkeypatch, broken):
    from gpu_sections import Context
    from gpu_sections.cp_kernels import check_rank
    from megatron_ultralong.attention import kernels

    real_fwd, real_bwd = kernels._FORWARD["sdpa"], kernels._BACKWARD["sdpa"]
    if broken == "dk":  # a backward that loses part of dK on every full block
        def bwd(*args):
            dq, dk, dv = real_bwd(*args)
            return dq, dk * (0.5 if not args[-1] else 1.0), dv
        monkeypatch.setitem(kernels._BACKWARD, "sdpa", bwd)
    else:  # a forward whose lse is off by a little on full blocks (merge weights then wrong)
        def fwd(q, k, v, scale, causal):
            out, lse = real_fwd(q, k, v, scale, causal)
            return out, lse + (0.0 if causal else 0.01)
        monkeypatch.setitem(kernels._FORWARD, "sdpa", fwd)
    ctx = Context(device=torch.device("cpu"), dry=True)
    worst = check_rank(ctx, 1, 4, 64, 2, 1, 32, torch.float32, "sdpa")
    failing = {name for name, err in worst.items() if err > 1e-4}
    assert ({"dk"} <= failing) if broken == "dk" else ({"lse", "final_lse", "final_out"} <= failing), worst
