"""benchmarks/gpu_check.sh --dry-run: the device check runs on CPU, exercises what CPU can (backend
self-check, one CP rank's ring steps vs SDPA, a training step, the eval prefill) and skips the
rest with a reason, writing JSON."""
from __future__ import annotations

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_gpu_check_dry_run(tmp_path):
    out = tmp_path / "gpu_check.json"
    env = dict(os.environ, PYTHON=sys.executable, OMP_NUM_THREADS="2")
    proc = subprocess.run(["bash", os.path.join(ROOT, "benchmarks", "gpu_check.sh"), "--dry-run", "--out", str(out)],
                          capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["mode"] == "dry-run"
    assert res["env"]["megatron_core"] and res["env"]["self_check_sdpa"] == "ok"
    assert res["env"]["auto_backend"] == "sdpa"
    # One CP rank's zigzag ring steps, merged, equal full causal attention on CPU.
    assert res["cp_kernels"]["max_err_out"] < 1e-5 and res["cp_kernels"]["max_err_dq"] < 1e-5
    assert "GPU" in res["cp_kernels_timing"]["skipped"] and "GPU-only" in res["train_step_gpu"]["skipped"]
    assert res["train_step"]["256_none_seconds"] > 0 and res["train_step"]["256_none_estimated_gib"] > 0
    assert res["prefill"]["tokens"] == 256
    assert "cp_kernels.max_err_out:" in proc.stdout  # one line per figure
