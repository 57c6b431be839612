"""The device check behind benchmarks/gpu_check.sh: one line per figure, all figures as JSON.

    benchmarks/gpu_check.sh [--dry-run] [--out gpu_check.json]

Sections:
  env        torch / CUDA / megatron-core versions; TE, flash-attn, FA3, cuDNN availability; the
             attention backends' self-checks (kernels.self_check) and what "auto" picks.
  cp_kernels one CP rank of the 1M recipe on one GPU (TP8: 4 q heads / 1 KV head, d=128, 65,536
             local tokens in zigzag chunks of 32,768, CP16): forward+backward of every ring step of
             rank 0 against ONE causal call of equal FLOPs (S/sqrt(cp) tokens); the ratio is the CP
             rank efficiency (ring-flash-attention's zigzag reaches 0.90; goal >= 0.95). Also the
             errors of the ring result vs the SDPA reference on the rows it checks.
  train_step a Llama-3.2-1B-shaped model in bf16, one optimizer step with megatron's DDP +
             distributed optimizer, per recompute setting at 32K tokens and full recompute at
             128K: seconds, tokens/s, model TFLOP/s, peak memory vs training/memory.py's estimate.
  prefill    the evaluation prefill (next-token logits) at 32K tokens.
--dry-run (CPU): the same code at toy sizes (errors are real, times are not figures) and every
GPU-only part skipped with its reason. Times here are never quoted as performance: the figures go to
docs/benchmarks.md from a run on the GPU, with the command and machine.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import sys
import time
import traceback
from typing import Any, Callable

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

RESULTS: dict[str, Any] = {}


def record(section: str, name: str, value: Any, unit: str = "") -> None:
    RESULTS.setdefault(section, {})[name] = value
    shown = f"{value:.4g}" if isinstance(value, float) else value
    print(f"{section}.{name}: {shown}{' ' + unit if unit else ''}", flush=True)


def skip(section: str, reason: str) -> None:
    RESULTS.setdefault(section, {})["skipped"] = reason
    print(f"{section}: skipped ({reason})", flush=True)


def timed(fn: Callable[[], Any], device: torch.device, repeat: int = 1) -> float:
    """Seconds per call after one warm-up call (CUDA synchronised around the timed calls)."""
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(repeat):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / repeat


def check_env(device: torch.device) -> None:
    from megatron_ultralong.attention import kernels
    from megatron_ultralong.attention.flash_backends import load_binding

    record("env", "torch", torch.__version__)
    record("env", "cuda", torch.version.cuda or "none")
    record("env", "device", torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu")
    try:
        from importlib import metadata

        record("env", "megatron_core", metadata.version("megatron-core"))
    except Exception as exc:  # noqa: BLE001
        record("env", "megatron_core", f"missing ({exc})")
    record("env", "transformer_engine", importlib.util.find_spec("transformer_engine") is not None)
    record("env", "cudnn", bool(torch.backends.cudnn.is_available()))
    for name in ("flash_attn", "fa3"):
        binding = load_binding(name)
        record("env", name, ".".join(map(str, binding.version)) if binding else False)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    probe = torch.empty(0, device=device, dtype=dtype)
    for name in ("sdpa", "cudnn", "flash_attn", "fa3"):
        if not kernels._available(name, probe):
            record("env", f"self_check_{name}", "unavailable")
            continue
        ok, reason = kernels.self_check(kernels._FORWARD[name], kernels._BACKWARD[name], device, dtype)
        record("env", f"self_check_{name}", "ok" if ok else f"FAILED: {reason}")
    record("env", "auto_backend", kernels.select_backend("auto", probe))


def check_cp_kernels(device: torch.device, dry: bool) -> None:
    """Rank 0 of a CP group, simulated on one device: all ring steps vs one causal call."""
    from megatron_ultralong.attention.kernels import attention_backward_into, attention_forward_into, select_backend
    from megatron_ultralong.attention.segments import build_segments
    from megatron_ultralong.attention.softmax_merge import empty_accumulator
    from megatron_ultralong.parallel.cp_layout import local_ranges

    cp, n, heads, kv_heads, d = (4, 256, 4, 1, 64) if dry else (16, 65536, 4, 1, 128)
    dtype = torch.float32 if dry else torch.bfloat16
    seq, rank = n * cp, 0
    backend = select_backend("auto", torch.empty(0, device=device, dtype=dtype))
    record("cp_kernels", "shape", f"cp={cp} local={n} chunk={n // 2} h={heads} g={kv_heads} d={d} {dtype} backend={backend}")
    gen = torch.Generator(device="cpu").manual_seed(0)
    q = torch.randn(1, heads, n, d, generator=gen).to(device, dtype)
    dout = torch.randn(1, heads, n, d, generator=gen).to(device, dtype)
    # Every rank's K/V block, as the ring would deliver them (only g KV heads).
    kv_blocks = [torch.randn(2, 1, kv_heads, n, d, generator=gen).to(device, dtype) for _ in range(cp)]
    q_ranges, scale = local_ranges(seq, cp, rank), d ** -0.5
    steps = [(kv_blocks[(rank - s) % cp], build_segments(q_ranges, local_ranges(seq, cp, (rank - s) % cp), True))
             for s in range(cp)]

    def ring_fwd_bwd():
        out, lse = empty_accumulator(q)
        for kv, segs in steps:
            attention_forward_into(out, lse, q, kv[0], kv[1], segs, scale, backend)
        out_q = out.to(dtype)
        dq = torch.zeros(q.shape, dtype=torch.float32, device=device)
        for kv, segs in steps:
            dkv = torch.zeros(kv.shape, dtype=torch.float32, device=device)
            attention_backward_into(dq, dkv[0], dkv[1], dout, q, kv[0], kv[1], out_q, lse, segs, scale, backend)
        return out_q, dq

    out, dq = ring_fwd_bwd()
    # Reference: SDPA over the rows of rank 0 against the whole sequence in natural order.
    check_rows = min(n, 2048)
    pos = torch.cat([torch.arange(a, b) for a, b in q_ranges]).to(device)[:check_rows]
    k_full = torch.empty(1, kv_heads, seq, d, device=device, dtype=dtype)
    v_full = torch.empty_like(k_full)
    for src in range(cp):
        idx = torch.cat([torch.arange(a, b) for a, b in local_ranges(seq, cp, src)]).to(device)
        k_full[:, :, idx], v_full[:, :, idx] = kv_blocks[src][0], kv_blocks[src][1]
    rq = q[:, :, :check_rows].float().requires_grad_()
    keys = int(pos.max()) + 1  # the checked rows see no key beyond their last position
    mask = torch.arange(keys, device=device)[None, :] <= pos[:, None]
    ref = F.scaled_dot_product_attention(rq, k_full[:, :, :keys].float(), v_full[:, :, :keys].float(),
                                         attn_mask=mask, scale=scale, enable_gqa=True)
    ref.backward(dout[:, :, :check_rows].float())
    record("cp_kernels", "max_err_out", (out[:, :, :check_rows].float() - ref).abs().max().item())
    record("cp_kernels", "max_err_dq", (dq[:, :, :check_rows] - rq.grad).abs().max().item())
    if dry:
        skip("cp_kernels_timing", "CPU dry run: kernel times are only meaningful on the GPU")
        return
    t_ring = timed(ring_fwd_bwd, device)
    # Equal FLOPs: the rank's causal work is S^2 / (2 cp) per head = one causal call of S / sqrt(cp).
    length = int(seq / math.sqrt(cp))
    qr = torch.randn(1, heads, length, d, device=device, dtype=dtype, requires_grad=True)
    kr = torch.randn(1, kv_heads, length, d, device=device, dtype=dtype, requires_grad=True)
    vr = torch.randn_like(kr, requires_grad=True)
    dr = torch.randn(1, heads, length, d, device=device, dtype=dtype)

    def one_causal():
        F.scaled_dot_product_attention(qr, kr, vr, is_causal=True, scale=scale, enable_gqa=True).backward(dr)

    t_ref = timed(one_causal, device)
    flops = 4 * heads * d * seq * seq / (2 * cp) * 3.5  # fwd 2 matmuls + bwd 5, causal half
    record("cp_kernels", "ring_seconds", t_ring, "s")
    record("cp_kernels", "one_causal_seconds", t_ref, "s")
    record("cp_kernels", "rank_efficiency", t_ref / t_ring)
    record("cp_kernels", "ring_tflops", flops / t_ring / 1e12, "TFLOP/s")


def _train_config(seq: int, recompute: str, modules: tuple[str, ...], dry: bool):
    from megatron_ultralong.config_io import from_dict
    from megatron_ultralong.training.config import TrainConfig

    return from_dict(TrainConfig, {
        "data": {"paths": ["synthetic"], "seq_length": seq},
        "model": {"config": "tiny" if dry else "llama3.2-1b", "params_dtype": "float32" if dry else "bfloat16",
                  "recompute": recompute, "recompute_modules": list(modules) or ["layernorm", "mlp"]},
        "train": {"device": "cpu" if dry else "cuda", "loss_chunk_tokens": min(seq, 16384)},
    })


def check_train_step(device: torch.device, dry: bool) -> None:
    from megatron_ultralong.model import build_model
    from megatron_ultralong.model.config import load_model_config
    from megatron_ultralong.parallel.runtime import init_runtime
    from megatron_ultralong.training import memory as M
    from megatron_ultralong.training.metrics import training_flops_per_token
    from megatron_ultralong.training.optimizer import build_data_parallel, build_optimizer, finalize_grads
    from megatron_ultralong.training.trainer import _recompute_overrides

    runs = [(256, "none", ())] if dry else [
        (32768, "none", ()), (32768, "selective", ("layernorm",)), (32768, "selective", ("layernorm", "mlp")),
        (32768, "full", ()), (131072, "full", ())]
    if dry:
        skip("train_step_gpu", "CPU dry run: recompute modes, megatron DDP/distributed optimizer and "
             "peak memory are GPU-only; the tiny model runs the CPU path (torch AdamW)")
    for seq, recompute, modules in runs:
        size = f"{seq // 1024}k" if seq >= 1024 else str(seq)
        label = f"{size}_{recompute}{'_' + '_'.join(modules) if modules else ''}"
        try:
            cfg = _train_config(seq, recompute, modules, dry)
            rt = init_runtime(cfg.parallel, seed=1, device=cfg.train.device)
            model_cfg = load_model_config(cfg.model.config)
            dtype = torch.bfloat16 if cfg.model.params_dtype == "bfloat16" else torch.float32
            model = build_model(model_cfg, rt, params_dtype=dtype, calculate_per_token_loss=True,
                                **_recompute_overrides(cfg, rt.is_cuda))
            model.loss_chunk_tokens = cfg.train.loss_chunk_tokens
            ddp = build_data_parallel(model, rt)
            opt = build_optimizer(ddp, cfg, rt)
            ids = torch.randint(0, model_cfg.vocab_size, (1, seq), device=device)
            pos = torch.arange(seq, device=device)[None]

            def step():
                ddp.zero_grad_buffer()
                opt.zero_grad()
                ddp(ids, pos, None, labels=ids).float().mean().backward()
                finalize_grads(ddp, rt)
                return opt.step()

            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            seconds = timed(step, device)
            flops = training_flops_per_token(model_cfg, seq) * seq
            record("train_step", f"{label}_seconds", seconds, "s")
            record("train_step", f"{label}_tokens_per_s", seq / seconds)
            record("train_step", f"{label}_tflops", flops / seconds / 1e12, "TFLOP/s")
            est = M.estimate_memory(cfg, world_size=1, model_cfg=model_cfg).total
            record("train_step", f"{label}_estimated_gib", est / 2**30, "GiB")
            if device.type == "cuda":
                peak = torch.cuda.max_memory_allocated(device)
                record("train_step", f"{label}_peak_gib", peak / 2**30, "GiB")
                record("train_step", f"{label}_peak_over_estimate", peak / est)
            del model, ddp, opt
        except Exception as exc:  # noqa: BLE001 - one failing setting must not hide the others
            record("train_step", f"{label}_error", f"{type(exc).__name__}: {exc}")
            traceback.print_exc()


def check_prefill(device: torch.device, dry: bool) -> None:
    from megatron_ultralong.eval.megatron_backend import MegatronBackend
    from megatron_ultralong.model import build_model
    from megatron_ultralong.model.config import load_model_config
    from megatron_ultralong.parallel.runtime import ParallelConfig, init_runtime

    seq = 256 if dry else 32768
    rt = init_runtime(ParallelConfig(), seed=1, device=device.type)
    model_cfg = load_model_config("tiny" if dry else "llama3.2-1b")
    model = build_model(model_cfg, rt, params_dtype=torch.float32 if dry else torch.bfloat16,
                        loss_chunk_tokens=4096).eval()
    backend = MegatronBackend(model, rt)
    ids = torch.randint(0, model_cfg.vocab_size, (seq,)).tolist()
    with torch.no_grad():
        seconds = timed(lambda: backend.next_token_logits(ids), device)
    record("prefill", "tokens", seq)
    record("prefill", "seconds", seconds, "s")
    record("prefill", "tokens_per_s", seq / seconds)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="CPU: toy sizes, GPU-only parts skipped")
    parser.add_argument("--out", default="gpu_check.json", help="JSON file for all figures")
    args = parser.parse_args()
    dry = args.dry_run or not torch.cuda.is_available()
    if not args.dry_run and dry:
        print("no CUDA device: running the dry run", flush=True)
    device = torch.device("cpu") if dry else torch.device("cuda", 0)
    RESULTS["mode"] = "dry-run" if dry else "gpu"
    failed = False
    for name, fn in (("env", lambda: check_env(device)), ("cp_kernels", lambda: check_cp_kernels(device, dry)),
                     ("train_step", lambda: check_train_step(device, dry)), ("prefill", lambda: check_prefill(device, dry))):
        try:
            fn()
        except Exception as exc:  # noqa: BLE001 - record and go on to the next section
            failed = True
            record(name, "error", f"{type(exc).__name__}: {exc}")
            traceback.print_exc()
    tmp = args.out + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(RESULTS, f, indent=2, default=str)
    os.replace(tmp, args.out)
    print(f"wrote {args.out}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
