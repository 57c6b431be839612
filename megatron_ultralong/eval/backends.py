"""Model backends for evaluation: what a task runner needs from a model, and the HF implementation.

A backend answers four questions about token sequences, all greedy and deterministic:
- `next_token_logits(ids)`: logits for the token after `ids`, [V] float32;
- `generate(ids, max_new_tokens, stop_ids)`: greedy continuation (argmax every step, KV-cached);
- `generate_many(context, suffixes, ...)`: one greedy continuation per suffix of a shared context,
  which is prefilled once (several questions about one long haystack);
- `token_losses(ids)`: per-position next-token NLL, [n - 1] float32 (perplexity by position).

`is_writer` says whether this process writes results (False on all but one rank of a distributed
Megatron backend, whose methods are collectives that every rank calls with the same ids).
The Megatron backend lives in `megatron_backend.py`.
"""
from __future__ import annotations

import inspect
from typing import Any, Callable, Optional, Protocol, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from megatron_ultralong.eval.identity import pick_tensors, weights_fingerprint


class Backend(Protocol):
    """What the NIAH / RULER / perplexity runners call."""

    is_writer: bool
    max_position_embeddings: int
    """The model's position limit (config); the grid runner warns or refuses beyond it."""

    trained_length: int
    """The original context length before RoPE scaling (= max_position_embeddings without it)."""

    fingerprint: str
    """Identifies the weights (`identity.weights_fingerprint`): a grid resumes only with the same model."""

    identity: str
    """Identifies the backend and its numerics (kind, dtype, device, parallel layout)."""

    def next_token_logits(self, ids: Sequence[int]) -> Tensor:
        """Logits [V] (float32) of the token following `ids`."""
        ...

    def generate(self, ids: Sequence[int], max_new_tokens: int, stop_ids: Sequence[int] = ()) -> list[int]:
        """Greedy continuation of `ids`: at most max_new_tokens ids, ending at the first stop id
        (which is included)."""
        ...

    def generate_many(self, context: Sequence[int], suffixes: Sequence[Sequence[int]], max_new_tokens: int,
                      stop_ids: Sequence[int] = ()) -> list[list[int]]:
        """[generate(context + suffix, ...) for suffix in suffixes], prefilling the context once."""
        ...

    def token_losses(self, ids: Sequence[int]) -> Tensor:
        """NLL of ids[i + 1] given ids[: i + 1] for i in [0, n - 1): float32 [n - 1]."""
        ...

    def broadcast_from_writer(self, obj: Any) -> Any:
        """`obj` as the writing process has it, on every process (identity with one process)."""
        ...


def check_budget(max_new_tokens: int) -> None:
    """ValueError unless max_new_tokens >= 1 (checked before a prefill, which may take minutes)."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens}: expected >= 1")


def greedy(step: Callable[[int], Tensor], logits: Tensor, vocab_size: int, max_new_tokens: int,
           stop_ids: Sequence[int] = ()) -> list[int]:
    """Greedy decoding loop shared by the backends: logits [>= vocab_size] of the first new token,
    step(token) -> logits of the next one. Returns at most max_new_tokens ids, ending at the first
    stop id (included)."""
    check_budget(max_new_tokens)
    out: list[int] = []
    stops = set(stop_ids)
    while True:
        token = int(logits[:vocab_size].argmax())
        out.append(token)
        if token in stops or len(out) == max_new_tokens:
            return out
        logits = step(token)


def check_prompt(ids: Sequence[int], vocab_size: int) -> Tensor:
    """ids as a LongTensor [1, n]; ValueError for an empty prompt or ids outside the vocabulary."""
    t = torch.as_tensor(list(ids), dtype=torch.long)
    if t.numel() == 0:
        raise ValueError("empty prompt")
    if int(t.min()) < 0 or int(t.max()) >= vocab_size:
        raise ValueError(
            f"prompt token id range [{int(t.min())}, {int(t.max())}] is outside the model's vocabulary "
            f"[0, {vocab_size}); tokenizer and model do not match"
        )
    return t[None]


class HFBackend:
    """A transformers causal LM (`LlamaForCausalLM` or any `*ForCausalLM`) on CPU or GPU.

    Long prompts are prefilled in chunks of `prefill_chunk` tokens through the KV cache, and only
    the last position's logits are materialized (`logits_to_keep=1`): a 128K prompt would otherwise
    need a [128K, V] logits tensor (64 GiB at V=128K fp32). The attention itself is whatever the
    model was loaded with (SDPA by default; eager attention OOMs long before 128K, RULER #105).
    """

    is_writer = True

    def __init__(self, model: torch.nn.Module, prefill_chunk: int = 4096, loss_chunk: int = 1024):
        if prefill_chunk < 1 or loss_chunk < 1:
            raise ValueError(f"prefill_chunk={prefill_chunk}, loss_chunk={loss_chunk}: expected >= 1")
        self.model = model.eval()
        self.prefill_chunk = prefill_chunk
        self.loss_chunk = loss_chunk
        self.vocab_size = int(model.config.vocab_size)
        self.device = next(model.parameters()).device
        self.max_position_embeddings = int(model.config.max_position_embeddings)
        rope_scaling = getattr(model.config, "rope_scaling", None) or {}
        self.trained_length = int(rope_scaling.get("original_max_position_embeddings") or self.max_position_embeddings)
        """Context length before RoPE scaling (the heatmap's vertical line)."""
        self.prefilled_tokens = 0
        """Prompt tokens prefilled by generate / generate_many so far (forks add none)."""
        self.fingerprint = weights_fingerprint(model.config, pick_tensors(list(model.named_parameters())))
        self.identity = f"hf/{next(model.parameters()).dtype}/{self.device.type}"
        # transformers 5 renamed forward's `past_key_values` to `cache` (the old name is deprecated
        # and goes in 5.40); 4.x only knows the old one.
        self._cache_kwarg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"

    @classmethod
    def from_pretrained(cls, path: str, dtype: Optional[torch.dtype] = None, device: Optional[str] = None,
                        **kwargs) -> "HFBackend":
        """Load an HF model directory (config.json + weights); `--model` in error messages."""
        from transformers import AutoModelForCausalLM

        try:
            model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=True)
        except (OSError, ValueError) as e:
            raise ValueError(f"--model={path!r}: cannot load an HF causal LM from it ({e})") from e
        dev = device or ("cuda" if torch.cuda.is_available() else "cpu")
        return cls(model.to(dev), **kwargs)

    def _new_cache(self):
        from transformers import DynamicCache

        return DynamicCache()

    def _forward(self, ids: Tensor, cache, **kwargs):
        """The model on ids [1, n], reading and extending `cache`."""
        return self.model(input_ids=ids, use_cache=True, **{self._cache_kwarg: cache}, **kwargs)

    @torch.no_grad()
    def _prefill(self, ids: Tensor, cache) -> Tensor:
        """Run ids [1, n] through the cache in chunks; returns the last position's logits [V]."""
        logits = None
        for start in range(0, ids.shape[1], self.prefill_chunk):
            chunk = ids[:, start : start + self.prefill_chunk].to(self.device)
            out = self._forward(chunk, cache, logits_to_keep=1)
            logits = out.logits[0, -1]
        return logits.float()

    def next_token_logits(self, ids: Sequence[int]) -> Tensor:
        return self._prefill(check_prompt(ids, self.vocab_size), self._new_cache()).cpu()

    @torch.no_grad()
    def _step(self, cache, token: int) -> Tensor:
        step = torch.tensor([[token]], device=self.device)
        return self._forward(step, cache).logits[0, -1].float()

    def generate(self, ids: Sequence[int], max_new_tokens: int, stop_ids: Sequence[int] = ()) -> list[int]:
        check_budget(max_new_tokens)
        cache = self._new_cache()
        logits = self._prefill(check_prompt(ids, self.vocab_size), cache)
        self.prefilled_tokens += len(ids)
        return greedy(lambda token: self._step(cache, token), logits, self.vocab_size, max_new_tokens, stop_ids)

    def generate_many(self, context: Sequence[int], suffixes: Sequence[Sequence[int]], max_new_tokens: int,
                      stop_ids: Sequence[int] = ()) -> list[list[int]]:
        """The context is prefilled once; after each continuation the cache is cropped back to it
        (transformers' `DynamicCache.crop`), which is the fork for continuations run one after another."""
        if not suffixes:
            raise ValueError("generate_many needs at least one suffix")
        check_budget(max_new_tokens)
        cache = self._new_cache()
        context_logits = self._prefill(check_prompt(context, self.vocab_size), cache)
        self.prefilled_tokens += len(context)
        outs = []
        for suffix in suffixes:
            logits = context_logits
            if len(suffix):
                logits = self._prefill(check_prompt(suffix, self.vocab_size), cache)
            outs.append(greedy(lambda token: self._step(cache, token), logits, self.vocab_size,
                               max_new_tokens, stop_ids))
            extra = cache.get_seq_length() - len(context)
            if extra > 0:  # a negative count removes tokens in transformers 4.x and 5.x (5.x refuses positive)
                cache.crop(-extra)
        return outs

    def broadcast_from_writer(self, obj: Any) -> Any:
        return obj

    @torch.no_grad()
    def token_losses(self, ids: Sequence[int]) -> Tensor:
        t = check_prompt(ids, self.vocab_size)
        if t.shape[1] < 2:
            raise ValueError("token_losses needs at least 2 tokens")
        cache = self._new_cache()
        losses = []
        for start in range(0, t.shape[1] - 1, self.loss_chunk):
            chunk = t[:, start : start + self.loss_chunk].to(self.device)
            targets = t[0, start + 1 : start + 1 + chunk.shape[1]].to(self.device)
            logits = self._forward(chunk, cache).logits[0].float()
            # The last chunk's final position has no target when it ends at the sequence end.
            logits = logits[: targets.shape[0]]
            losses.append(F.cross_entropy(logits, targets, reduction="none").cpu())
        return torch.cat(losses)
