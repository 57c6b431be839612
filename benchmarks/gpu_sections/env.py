"""Section env: versions, which accelerated packages import, the backends' self-checks and what
"auto" picks at top level."""
from __future__ import annotations

import importlib.util

import torch

from gpu_sections import Context, section


@section("env")
def check_env(ctx: Context) -> None:
    from megatron_ultralong.attention import kernels
    from megatron_ultralong.attention.flash_backends import load_binding

    device = ctx.device
    ctx.record("env", "torch", torch.__version__)
    ctx.record("env", "cuda", torch.version.cuda or "none")
    ctx.record("env", "device", torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu")
    try:
        from importlib import metadata

        ctx.record("env", "megatron_core", metadata.version("megatron-core"))
    except Exception as exc:  # noqa: BLE001
        ctx.record("env", "megatron_core", f"missing ({exc})")
    ctx.record("env", "transformer_engine", ctx.te_available)
    ctx.record("env", "transformer_engine_found", importlib.util.find_spec("transformer_engine") is not None)
    ctx.record("env", "cudnn", bool(torch.backends.cudnn.is_available()))
    for name in ("flash_attn", "fa3"):
        binding = load_binding(name)
        ctx.record("env", name, ".".join(map(str, binding.version)) if binding else False)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    probe = torch.empty(0, device=device, dtype=dtype)
    for name in kernels.BACKENDS[1:]:
        if not kernels._available(name, probe):
            ctx.record("env", f"self_check_{name}", "unavailable")
            continue
        ok, reason = kernels.self_check(kernels._FORWARD[name], kernels._BACKWARD[name], device, dtype)
        ctx.record("env", f"self_check_{name}", "ok" if ok else f"FAILED: {reason}")
    ctx.record("env", "auto_backend", kernels.select_backend("auto", probe))
    from megatron_ultralong.parallel.runtime import rope_fusion_choice

    ctx.record("env", "rope_fusion_at_micro_batch_1", rope_fusion_choice(device, 1))
