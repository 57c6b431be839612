"""Sections memory_stack and memory_stack_exact: the memory-saving settings on the device.

memory_stack: a Llama-3.2-1B-shaped model in bf16, one optimizer step at 64K tokens per setting
(full recompute, + tiled MLP and projections, + activation offload to pinned host memory, +
optimizer offload), per layer spec: seconds, the step-time cost against full recompute, peak
memory against training/memory.py's estimate, and the bytes the offload moved against the
model's host term.

memory_stack_exact: the tiny model in fp32 on the device, two steps per setting against the plain
run: the loss and every gradient must agree (the CPU test, tests/test_memory_stack.py, with the
real CUDA streams, pinned buffers and megatron's CUDA RNG states this time).
"""
from __future__ import annotations

import traceback

import torch

from gpu_sections import Context, section
from gpu_sections.train_step import train_config

SETTINGS: tuple[tuple[str, dict], ...] = (
    ("full", {"model": {"recompute": "full"}}),
    ("full_tiles", {"model": {"recompute": "full", "mlp_tiles": 4}}),
    ("full_tiles_offload", {"model": {"recompute": "full", "mlp_tiles": 4, "activation_offload": 1.0}}),
    ("full_tiles_offload_optim", {"model": {"recompute": "full", "mlp_tiles": 4, "activation_offload": 1.0},
                                  "optim": {"cpu_offload_fraction": 1.0}}),
)
"""(label, config overrides) measured by memory_stack, the first being the baseline for the cost."""


def build_stack_step(ctx: Context, cfg):
    """(step, model config, offloader or None) for one optimizer step of `cfg` with its tiles and offload."""
    from megatron_ultralong.model import build_model
    from megatron_ultralong.model.activation_offload import ActivationOffload, host_pool_for
    from megatron_ultralong.model.config import load_model_config
    from megatron_ultralong.parallel.runtime import init_runtime
    from megatron_ultralong.training.model_source import recompute_overrides
    from megatron_ultralong.training.optimizer import build_data_parallel, build_optimizer, finalize_grads

    rt = init_runtime(cfg.parallel, seed=1, device=cfg.train.device)
    model_cfg = load_model_config(cfg.model.config)
    dtype = torch.bfloat16 if cfg.model.params_dtype == "bfloat16" else torch.float32
    model = build_model(model_cfg, rt, params_dtype=dtype, calculate_per_token_loss=True,
                        micro_batch_size=cfg.train.micro_batch_size, mlp_tiles=cfg.model.mlp_tiles,
                        use_transformer_engine=cfg.model.use_transformer_engine,
                        loss_chunk_tokens=cfg.train.loss_chunk_tokens, **recompute_overrides(cfg))
    offload = (ActivationOffload(model.decoder, cfg.model.activation_offload, host_pool_for(rt.device))
               if cfg.model.activation_offload else None)
    ddp = build_data_parallel(model, rt)
    opt = build_optimizer(ddp, cfg, rt)
    seq = cfg.data.seq_length
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model_cfg.vocab_size, (1, seq), generator=gen).to(ctx.device)
    pos = torch.arange(seq, device=ctx.device)[None]

    def step():
        ddp.zero_grad_buffer()
        opt.zero_grad()
        loss = ddp(ids, pos, None, labels=ids).float().mean()
        loss.backward()
        finalize_grads(ddp, rt)
        opt.step()
        return loss

    return step, model_cfg, offload, model


@section("memory_stack")
def check_memory_stack(ctx: Context) -> None:
    from megatron_ultralong.training import memory as M

    seq = 256 if ctx.dry else 65536
    settings = SETTINGS[:3] if ctx.dry else SETTINGS  # the optimizer offload is megatron's, GPU only
    for spec in ctx.layer_specs():
        base_seconds = None
        for label, overrides in settings:
            name = label if spec == "local" else f"te_{label}"
            try:
                cfg = train_config(ctx, seq, "full", (), spec, overrides)
                step, model_cfg, offload, _ = build_stack_step(ctx, cfg)
                ctx.cleanup()
                seconds = ctx.timed(step)
                base_seconds = base_seconds or seconds
                ctx.record("memory_stack", f"{name}_seconds", seconds, "s")
                ctx.record("memory_stack", f"{name}_cost_vs_full", seconds / base_seconds)
                est = M.estimate_memory(cfg, world_size=1, model_cfg=model_cfg)
                ctx.record("memory_stack", f"{name}_estimated_gib", est.total / 2**30, "GiB")
                ctx.record("memory_stack", f"{name}_estimated_host_gib", est.host_total / 2**30, "GiB")
                if offload is not None:
                    ctx.record("memory_stack", f"{name}_offloaded_gib", offload.pool.stored_bytes / 2**30, "GiB")
                    ctx.record("memory_stack", f"{name}_offloaded_over_model",
                               offload.pool.stored_bytes / est.host_activations)
                if ctx.device.type == "cuda":
                    peak = torch.cuda.max_memory_allocated(ctx.device)
                    ctx.record("memory_stack", f"{name}_peak_gib", peak / 2**30, "GiB")
                    ctx.record("memory_stack", f"{name}_peak_over_estimate", peak / est.total)
                del step, offload
            except Exception as exc:  # noqa: BLE001 - one failing setting must not hide the others
                ctx.record("memory_stack", f"{name}_error", f"{type(exc).__name__}: {exc}")
                ctx.failed.append(f"memory_stack.{name}")
                traceback.print_exc()
            ctx.cleanup()


@section("memory_stack_exact")
def check_memory_stack_exact(ctx: Context) -> None:
    """Loss and gradients of each setting against the plain run, tiny fp32 model, two steps."""
    seq = 256
    exact = (("plain", {}), ("full", {"model": {"recompute": "full"}}),
             ("selective_layernorm_mlp", {"model": {"recompute": "selective", "recompute_modules": ["layernorm", "mlp"]}}),
             ("full_tiles_offload", {"model": {"recompute": "full", "mlp_tiles": 4, "activation_offload": 1.0}}),
             ("tiles_offload_half", {"model": {"mlp_tiles": 3, "activation_offload": 0.5}}))
    for spec in ctx.layer_specs():
        reference = None
        for label, overrides in exact:
            name = label if spec == "local" else f"te_{label}"
            try:
                overrides = {**overrides, "model": {**overrides.get("model", {}), "config": "tiny",
                                                    "params_dtype": "float32"}}
                cfg = train_config(ctx, seq, overrides["model"].get("recompute", "none"), (), spec, overrides)
                step, _, _, model = build_stack_step(ctx, cfg)
                losses, grads = [], []
                for _ in range(2):
                    losses.append(step().item())
                    grads.append(torch.cat([(p.main_grad if hasattr(p, "main_grad") else p.grad).float().flatten()
                                            for p in model.parameters()]))
                if reference is None:
                    reference = (losses, grads)
                    continue
                loss_err = max(abs(a - b) for a, b in zip(losses, reference[0]))
                grad_err = max(float((g - r).abs().max() / r.abs().max().clamp_min(1e-30))
                               for g, r in zip(grads, reference[1]))
                ctx.check("memory_stack_exact", f"{name}_loss_abs_err", loss_err, 1e-5)
                ctx.check("memory_stack_exact", f"{name}_grad_rel_err", grad_err, 1e-4)
            except Exception as exc:  # noqa: BLE001
                ctx.record("memory_stack_exact", f"{name}_error", f"{type(exc).__name__}: {exc}")
                ctx.failed.append(f"memory_stack_exact.{name}")
                traceback.print_exc()
            ctx.cleanup()
