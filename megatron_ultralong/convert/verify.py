"""`--verify`: run the Megatron model stage(s) and transformers' LlamaForCausalLM on the same short
prompt and report the max logit difference and the argmax agreement; `VerifyReport.passed` compares
the difference with a tolerance (`--verify-tol`, default by dtype), and `mu-convert` exits 1 beyond it.

transformers is the independent reference: it loads the HF directory its own way (its RoPE, its
attention, its tied/untied head). The Megatron side runs on whatever TP/PP the conversion used: the
stages pass hidden states [s, b, H] with point-to-point sends (no Megatron schedule needed for one
forward), the last stage gathers the vocab-parallel logits over TP and sends them to global rank 0,
which compares.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import torch
import torch.distributed as dist
from torch import Tensor

from megatron_ultralong.model.config import LlamaConfig
from megatron_ultralong.model.gpt import UltraLongGPTModel
from megatron_ultralong.model.stage_forward import stage_hidden, stage_logits
from megatron_ultralong.parallel.runtime import Runtime

DEFAULT_PROMPT = "The capital of France is Paris. The capital of Germany is"


@dataclass(frozen=True)
class VerifyReport:
    """Megatron vs transformers on one prompt."""

    max_abs_logit_diff: float
    """max |logits_megatron - logits_hf| over [b, s, vocab]."""

    argmax_agreement: float
    """Fraction of positions whose top-1 token agrees."""

    num_tokens: int
    dtype: str

    tolerance: Optional[float] = None
    """Largest acceptable max |logit diff| (None: `default_tolerance(dtype)`)."""

    @property
    def tol(self) -> float:
        return self.tolerance if self.tolerance is not None else default_tolerance(self.dtype)

    @property
    def passed(self) -> bool:
        # NaN never passes: `nan <= tol` is False.
        return self.max_abs_logit_diff <= self.tol

    def __str__(self) -> str:
        verdict = "OK" if self.passed else "FAILED"
        return (f"verify ({self.num_tokens} tokens, {self.dtype}): max |logit diff| = "
                f"{self.max_abs_logit_diff:.3e}, argmax agreement = {100 * self.argmax_agreement:.2f}% "
                f"-> {verdict} (tolerance {self.tol:.1e})")


DEFAULT_TOLERANCE = {"float32": 1e-3, "float16": 5e-2, "bfloat16": 5e-1}
"""Per-dtype default of `--verify-tol`. Both sides compute in the model's dtype in a different order
(fused vs unfused ops, TP-split matmuls), so the gap is a few roundings of the largest logits: fp32
conversions agree to ~1e-5; in bf16 one unit in the last place of a logit between 16 and 32 is
0.125, and a few of them add up over the layers. A wrong RoPE or a misplaced weight moves logits by
whole units (0.76 for a misread YaRN config) and flips argmaxes."""


def default_tolerance(dtype: str) -> float:
    """The default max |logit diff| for a comparison run in `dtype` ("float32", "bfloat16", ...)."""
    return DEFAULT_TOLERANCE.get(dtype.removeprefix("torch."), DEFAULT_TOLERANCE["float32"])


def prompt_ids(hf_dir: Union[str, os.PathLike], cfg: LlamaConfig, text: str = DEFAULT_PROMPT,
               max_tokens: int = 64) -> Tensor:
    """[1, s] token ids: the tokenizer's encoding of `text` if the directory has a tokenizer, else
    a fixed pseudo-random sequence (tiny test models have none)."""
    if any((Path(hf_dir) / f).is_file() for f in ("tokenizer.json", "tokenizer.model")):
        from transformers import AutoTokenizer

        ids = AutoTokenizer.from_pretrained(str(hf_dir))(text, return_tensors="pt").input_ids
        return ids[:, :max_tokens]
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, cfg.vocab_size, (1, min(max_tokens, 32)), generator=g)


def megatron_logits(model: UltraLongGPTModel, tokens: Tensor, runtime: Runtime) -> Optional[Tensor]:
    """Full fp32 logits [b, s, vocab] of the whole (pipelined) model on global rank 0; None elsewhere.

    Collective: every rank calls it with the same tokens [b, s]. Other PP groups (DP replicas) run
    their forward too and drop the result."""
    pp = runtime.pg_collection.pp
    cfg = model.model_config
    dtype = next(model.parameters()).dtype
    b, s = tokens.shape
    tokens = tokens.to(runtime.device)
    positions = torch.arange(s, device=runtime.device)[None].expand(b, -1)
    logits = None
    with torch.no_grad():
        hidden = None
        if pp.rank() > 0:
            hidden = torch.empty(s, b, cfg.hidden_size, dtype=dtype, device=runtime.device)
            dist.recv(hidden, src=dist.get_global_rank(pp, pp.rank() - 1))
        out = stage_hidden(model, tokens, positions, input_tensor=hidden)  # [s, b, H]
        if pp.rank() < pp.size() - 1:
            dist.send(out.contiguous(), dst=dist.get_global_rank(pp, pp.rank() + 1))
        else:
            logits = stage_logits(model, out)  # [b, s, vocab] fp32, gathered over TP
    if pp.size() > 1 and dist.get_global_rank(pp, 0) == 0:
        # Only the pipeline holding rank 0 ships its result there (TP rank 0 of its last stage).
        last = dist.get_global_rank(pp, pp.size() - 1)
        if runtime.rank == 0:
            logits = torch.empty(b, s, cfg.vocab_size, dtype=torch.float32, device=runtime.device)
            dist.recv(logits, src=last)
        elif runtime.rank == last:
            dist.send(logits.contiguous(), dst=0)
    return logits if runtime.rank == 0 else None


def hf_logits(hf_dir: Union[str, os.PathLike], tokens: Tensor, dtype: torch.dtype,
              hf_config: Optional[dict] = None) -> Tensor:
    """transformers' logits [b, s, vocab] for `tokens` (AutoModelForCausalLM, eager attention).

    hf_config: a config.json dict to use instead of the directory's own: the config the converter
    used (its RoPE replaced, or read from a transformers 5 `rope_parameters` config, which
    transformers 4.x would silently misread)."""
    from transformers import AutoModelForCausalLM
    from transformers import LlamaConfig as HFLlamaConfig

    kwargs = {"config": HFLlamaConfig(**hf_config)} if hf_config is not None else {}
    model = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=dtype, attn_implementation="eager",
                                                 **kwargs)
    with torch.no_grad():
        return model(tokens).logits.float()


def verify_against_hf(
    model: UltraLongGPTModel,
    runtime: Runtime,
    hf_dir: Union[str, os.PathLike],
    text: str = DEFAULT_PROMPT,
    hf_config: Optional[dict] = None,
    tolerance: Optional[float] = None,
) -> Optional[VerifyReport]:
    """Compare the Megatron model with the HF checkpoint at hf_dir (collective). The report is
    returned on global rank 0, None elsewhere. Both sides run in the Megatron model's dtype;
    hf_config overrides the directory's config.json (see `hf_logits`)."""
    cfg = model.model_config
    tokens = prompt_ids(hf_dir, cfg, text) if runtime.rank == 0 else None
    # Every rank needs the same tokens: broadcast their length, then the ids.
    n = torch.tensor([tokens.shape[1] if tokens is not None else 0])
    if dist.is_initialized():
        dist.broadcast(n, src=0)
        if tokens is None:
            tokens = torch.empty(1, int(n), dtype=torch.long)
        dist.broadcast(tokens, src=0)
    logits = megatron_logits(model, tokens, runtime)
    if runtime.rank != 0:
        return None
    dtype = next(model.parameters()).dtype
    ref = hf_logits(hf_dir, tokens, dtype, hf_config)
    logits = logits.cpu()
    return VerifyReport(
        max_abs_logit_diff=(logits - ref).abs().max().item(),
        argmax_agreement=(logits.argmax(-1) == ref.argmax(-1)).float().mean().item(),
        num_tokens=tokens.shape[1],
        dtype=str(dtype).removeprefix("torch."),
        tolerance=tolerance,
    )
