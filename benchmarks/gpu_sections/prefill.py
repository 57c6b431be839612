"""Section prefill: the evaluation prefill (next-token logits) at 32K tokens, per layer spec."""
from __future__ import annotations

import torch

from gpu_sections import Context, section


@section("prefill")
def check_prefill(ctx: Context) -> None:
    from megatron_ultralong.eval.megatron_backend import MegatronBackend
    from megatron_ultralong.model import build_model
    from megatron_ultralong.model.config import load_model_config
    from megatron_ultralong.parallel.runtime import ParallelConfig, init_runtime

    seq = 256 if ctx.dry else 32768
    model_cfg = load_model_config("tiny" if ctx.dry else "llama3.2-1b")
    ctx.record("prefill", "tokens", seq)
    from megatron_ultralong.attention import kernels

    dtype = torch.float32 if ctx.dry else torch.bfloat16
    for spec in ctx.layer_specs():
        kernels._auto_choice.cache_clear()  # "auto" is then first resolved under no_grad, in evaluation
        kernels.AUTO_CHOSEN.clear()
        rt = init_runtime(ParallelConfig(), seed=1, device=ctx.device.type)
        model = build_model(model_cfg, rt, params_dtype=dtype,
                            use_transformer_engine=spec == "te", loss_chunk_tokens=4096).eval()
        backend = MegatronBackend(model, rt)
        ids = torch.randint(0, model_cfg.vocab_size, (seq,)).tolist()
        with torch.no_grad():
            seconds = ctx.timed(lambda: backend.next_token_logits(ids))
        ctx.record("prefill", f"{spec}_seconds", seconds, "s")
        ctx.record("prefill", f"{spec}_auto_backend_in_eval", kernels.AUTO_CHOSEN.get((str(ctx.device), str(dtype)),
                                                                                    "sdpa"))
        ctx.record("prefill", f"{spec}_tokens_per_s", seq / seconds)
        del model, backend
        ctx.cleanup()
