"""Section train_step: a Llama-3.2-1B-shaped model in bf16, one optimizer step with megatron's DDP +
distributed optimizer, per recompute setting at 32K tokens and full recompute at 128K, per layer
spec (local; TE when it imports): seconds, tokens/s, model TFLOP/s, peak memory against
training/memory.py's estimate."""
from __future__ import annotations

import traceback
from typing import Any, Optional

import torch

from gpu_sections import Context, section


def train_config(ctx: Context, seq: int, recompute: str, modules: tuple[str, ...], spec: str,
                 overrides: Optional[dict[str, dict[str, Any]]] = None):
    """The TrainConfig of one measured setting (tiny fp32 model on CPU in the dry run).

    overrides: {config section: {field: value}} on top (e.g. {"model": {"mlp_tiles": 4}}).
    """
    from megatron_ultralong.config_io import from_dict
    from megatron_ultralong.training.config import TrainConfig

    tree: dict[str, dict[str, Any]] = {
        "data": {"paths": ["synthetic"], "seq_length": seq},
        "model": {"config": "tiny" if ctx.dry else "llama3.2-1b", "params_dtype": "float32" if ctx.dry else "bfloat16",
                  "recompute": recompute, "recompute_modules": list(modules) or ["layernorm", "mlp"],
                  "use_transformer_engine": spec == "te"},
        "train": {"device": ctx.device.type, "loss_chunk_tokens": min(seq, 16384)},
    }
    for section_name, fields in (overrides or {}).items():
        tree.setdefault(section_name, {}).update(fields)
    return from_dict(TrainConfig, tree)


def build_step(ctx: Context, cfg, packed_seq_params=None):
    """(step function, model config) for one optimizer step of `cfg` on random tokens."""
    from megatron_ultralong.model import build_model
    from megatron_ultralong.model.config import load_model_config
    from megatron_ultralong.parallel.runtime import init_runtime
    from megatron_ultralong.training.optimizer import build_data_parallel, build_optimizer, finalize_grads
    from megatron_ultralong.training.model_source import recompute_overrides

    rt = init_runtime(cfg.parallel, seed=1, device=cfg.train.device)
    model_cfg = load_model_config(cfg.model.config)
    dtype = torch.bfloat16 if cfg.model.params_dtype == "bfloat16" else torch.float32
    model = build_model(model_cfg, rt, params_dtype=dtype, calculate_per_token_loss=True,
                        micro_batch_size=cfg.train.micro_batch_size,  # 1: TE's fused RoPE when TE imports
                        use_transformer_engine=cfg.model.use_transformer_engine,
                        **recompute_overrides(cfg))
    model.loss_chunk_tokens = cfg.train.loss_chunk_tokens
    ddp = build_data_parallel(model, rt)
    opt = build_optimizer(ddp, cfg, rt)
    seq = cfg.data.seq_length
    ids = torch.randint(0, model_cfg.vocab_size, (1, seq), device=ctx.device)
    pos = torch.arange(seq, device=ctx.device)[None]

    def step():
        ddp.zero_grad_buffer()
        opt.zero_grad()
        ddp(ids, pos, None, labels=ids, packed_seq_params=packed_seq_params).float().mean().backward()
        finalize_grads(ddp, rt)
        return opt.step()

    return step, model_cfg


@section("train_step")
def check_train_step(ctx: Context) -> None:
    from megatron_ultralong.training import memory as M
    from megatron_ultralong.training.metrics import training_flops_per_token

    runs = [(256, "none", ())] if ctx.dry else [
        (32768, "none", ()), (32768, "selective", ("layernorm",)), (32768, "selective", ("layernorm", "mlp")),
        (32768, "full", ()), (131072, "full", ())]
    if ctx.dry:
        ctx.skip("train_step_gpu", "CPU dry run: recompute modes, megatron DDP/distributed optimizer and "
                 "peak memory are GPU-only; the tiny model runs the CPU path (torch AdamW)")
    for spec in ctx.layer_specs():
        for seq, recompute, modules in runs:
            size = f"{seq // 1024}k" if seq >= 1024 else str(seq)
            label = f"{size}_{recompute}{'_' + '_'.join(modules) if modules else ''}"
            label = label if spec == "local" else f"te_{label}"
            try:
                cfg = train_config(ctx, seq, recompute, modules, spec)
                step, model_cfg = build_step(ctx, cfg)
                ctx.cleanup()
                seconds = ctx.timed(step)
                flops = training_flops_per_token(model_cfg, seq) * seq
                ctx.record("train_step", f"{label}_seconds", seconds, "s")
                ctx.record("train_step", f"{label}_tokens_per_s", seq / seconds)
                ctx.record("train_step", f"{label}_tflops", flops / seconds / 1e12, "TFLOP/s")
                est = M.estimate_memory(cfg, world_size=1, model_cfg=model_cfg).total
                ctx.record("train_step", f"{label}_estimated_gib", est / 2**30, "GiB")
                if ctx.device.type == "cuda":
                    peak = torch.cuda.max_memory_allocated(ctx.device)
                    ctx.record("train_step", f"{label}_peak_gib", peak / 2**30, "GiB")
                    ctx.record("train_step", f"{label}_peak_over_estimate", peak / est)
                del step
            except Exception as exc:  # noqa: BLE001 - one failing setting must not hide the others
                ctx.record("train_step", f"{label}_error", f"{type(exc).__name__}: {exc}")
                ctx.failed.append(f"train_step.{label}")
                traceback.print_exc()
            ctx.cleanup()
