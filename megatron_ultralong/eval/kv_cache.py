"""A KV cache sharded over context-parallel ranks, for decoding after a CP prefill.

After the zigzag prefill each CP rank already holds K and V of its own n/CP tokens (post-RoPE,
only the g KV heads of its TP shard) in every layer: the cache simply keeps them, in the model's
dtype, and nothing is ever gathered. A new token is then decoded by every CP rank at once:

1. its q/k/v are computed on every CP rank (the rest of the model is replicated over CP, so every
   rank runs the new token through its layers; broadcasting it from one rank instead would add a
   collective per layer and leave the other ranks idle for the same time);
2. the rank that owns the token (`DecodeState.next_owner`: the one with the fewest cached tokens,
   so the shards stay within one token of each other) appends its k/v;
3. every rank attends the new query to its shard, giving a partial (out [b, h, 1, d], lse [b, h, 1]);
4. one all-gather per layer of [b, h, 1, d + 1] (out and lse packed) and `softmax_merge.merge_attention`
   give every rank the exact attention over all cached keys, in the same order on every rank, so all
   ranks compute identical logits and take the same argmax.
The LSE merge is not a sum, so the partials are all-gathered rather than all-reduced; at d + 1
floats per head and rank the two cost the same, and the merge stays the one in softmax_merge.py.

Why not Megatron-Core's inference seam (`Attention(inference_context=StaticInferenceContext)`):
its static cache holds the *whole* sequence on every rank ([max_seq, b, g*d] per layer, positions
contiguous from 0) and hands core attention the full K/V; a 1M-token cache is 128 GiB for
Llama-3.1-8B, which is exactly what CP must split. Its non-flash-decode path also re-applies RoPE
to the whole cached K every step. So the cache lives *beside* it, in the `core_attention` slot:
`install_cache` wraps each layer's core attention (which receives q/k/v after RoPE, via the same
spec seam the plugin's CP attention uses) for the duration of one forward; `Attention` is called
with inference_context=None and sees an ordinary core attention.

Continuations (`DecodeState.fork`): the prefilled context is immutable (`PrefixCache`); each
continuation keeps its own short tail of appended tokens per layer, so several questions about one
1M-token context cost one prefill and no copy of its cache.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Iterator, Literal, Optional

import torch
import torch.distributed as dist
from torch import Tensor

from megatron_ultralong.attention.kernels import block_forward
from megatron_ultralong.attention.softmax_merge import empty_accumulator, merge_attention, merge_attention_


@dataclass(frozen=True)
class PrefixCache:
    """The K/V a CP prefill left on this rank: per layer, the shard of the context's real tokens."""

    keys: tuple[Tensor, ...]
    """Per layer, K [b, g, L_r, d] (post-RoPE, model dtype, this rank's real tokens in local order)."""

    values: tuple[Tensor, ...]
    """Per layer, V [b, g, L_r, d]."""

    counts: tuple[int, ...]
    """Cached context tokens on every CP rank (the same on all ranks), index = CP rank."""

    length: int
    """Tokens in the context: the position of the next token."""


@dataclass
class DecodeState:
    """One continuation of a prefilled context: the shared prefix plus its own appended tokens."""

    prefix: PrefixCache
    tail_keys: list[Optional[Tensor]] = field(default_factory=list)
    """Per layer, K [b, g, t_r, d] of the tokens this continuation appended on this rank (or None)."""

    tail_values: list[Optional[Tensor]] = field(default_factory=list)
    counts: list[int] = field(default_factory=list)
    """Cached tokens (prefix + tail) per CP rank, replicated on all ranks."""

    length: int = 0
    """Tokens so far (context + appended): the position of the next token."""

    def __post_init__(self) -> None:
        if not self.counts:
            layers = len(self.prefix.keys)
            self.tail_keys, self.tail_values = [None] * layers, [None] * layers
            self.counts, self.length = list(self.prefix.counts), self.prefix.length

    def fork(self) -> "DecodeState":
        """An independent continuation from this point (tails are immutable tensors: shared, not copied)."""
        return DecodeState(self.prefix, list(self.tail_keys), list(self.tail_values), list(self.counts),
                           self.length)

    def next_owner(self) -> int:
        """The CP rank that caches the next token: fewest cached tokens, lowest rank on ties."""
        return min(range(len(self.counts)), key=lambda r: (self.counts[r], r))


class _Session:
    """What the wrapped core attentions do during one forward: store (prefill) or decode."""

    def __init__(self, mode: Literal["prefill", "decode"], keep: Optional[Tensor] = None,
                 state: Optional[DecodeState] = None, owner: int = 0):
        self.mode = mode
        self.keep = keep
        """Prefill: bool [s_local], True for real (non-padding) tokens, whose K/V are cached."""
        self.state = state
        self.owner = owner
        self.keys: dict[int, Tensor] = {}
        self.values: dict[int, Tensor] = {}


class CachedCoreAttention(torch.nn.Module):
    """Wraps one layer's `UltraLongCoreAttention` (same forward signature) around a cache session."""

    def __init__(self, inner: torch.nn.Module, layer_index: int, session: _Session):
        super().__init__()
        self.inner = inner
        self.layer_index = layer_index
        self.session = session

    def forward(self, query: Tensor, key: Tensor, value: Tensor, attention_mask: Optional[Tensor],
                attn_mask_type=None, attention_bias=None, packed_seq_params=None) -> Tensor:
        """query [s, b, h, d], key/value [s, b, g, d] (post-RoPE) -> context [s, b, h * d]."""
        s = self.session
        if s.mode == "prefill":
            out = self.inner(query, key, value, attention_mask, attn_mask_type=attn_mask_type,
                             attention_bias=attention_bias, packed_seq_params=packed_seq_params)
            # [s, b, g, d] -> [b, g, L_r, d]; the copy also frees the fused QKV buffer k/v view.
            s.keys[self.layer_index] = key.permute(1, 2, 0, 3)[:, :, s.keep].contiguous()
            s.values[self.layer_index] = value.permute(1, 2, 0, 3)[:, :, s.keep].contiguous()
            return out
        if packed_seq_params is not None or attention_bias is not None:
            raise ValueError("cached decoding takes neither packed_seq_params nor attention_bias")
        return self._decode(query, key, value)

    def _decode(self, query: Tensor, key: Tensor, value: Tensor) -> Tensor:
        st, i = self.session.state, self.layer_index
        inner = self.inner
        sq, b = query.shape[:2]
        if sq != 1:
            raise ValueError(f"cached decoding takes one token per step, got {sq}")
        cp_group = inner.cp_group
        cp = cp_group.size()
        if self.session.owner == cp_group.rank():
            k_new, v_new = key.permute(1, 2, 0, 3), value.permute(1, 2, 0, 3)
            tk, tv = st.tail_keys[i], st.tail_values[i]
            st.tail_keys[i] = k_new.contiguous() if tk is None else torch.cat([tk, k_new], dim=2)
            st.tail_values[i] = v_new.contiguous() if tv is None else torch.cat([tv, v_new], dim=2)
        q = query.permute(1, 2, 0, 3)  # [b, h, 1, d]
        out, lse = empty_accumulator(q)
        # Every cached token precedes the query: no mask, one block per buffer.
        for k, v in ((st.prefix.keys[i], st.prefix.values[i]), (st.tail_keys[i], st.tail_values[i])):
            if k is not None and k.size(2):
                block_out, block_lse = block_forward(q, k, v, inner.softmax_scale, False, inner.backend)
                merge_attention_(out, lse, block_out, block_lse)
        if cp > 1:
            packed = torch.cat([out, lse.unsqueeze(-1)], dim=-1)  # [b, h, 1, d + 1] fp32
            parts = [torch.empty_like(packed) for _ in range(cp)]
            dist.all_gather(parts, packed.contiguous(), group=cp_group)
            out, lse = merge_attention([p[..., :-1] for p in parts], [p[..., -1] for p in parts])
        return out.to(query.dtype).permute(2, 0, 1, 3).reshape(sq, b, -1)


def _core_attention_slots(model: torch.nn.Module) -> list[torch.nn.Module]:
    """Every layer's `self_attention` (the module owning the `core_attention` slot), in layer order."""
    return [layer.self_attention for layer in model.decoder.layers]


@contextlib.contextmanager
def install_cache(model: torch.nn.Module, session: _Session) -> Iterator[None]:
    """Wrap every layer's core attention for the duration of one forward, then restore it.

    The wrapper owns no parameters, so the model's state dict never changes."""
    slots = _core_attention_slots(model)
    originals = [slot.core_attention for slot in slots]
    try:
        for i, (slot, inner) in enumerate(zip(slots, originals)):
            slot.core_attention = CachedCoreAttention(inner, i, session)
        yield
    finally:
        for slot, inner in zip(slots, originals):
            slot.core_attention = inner


def prefill_session(keep: Tensor) -> _Session:
    """A session that caches the K/V of local tokens where keep [s_local] is True."""
    return _Session("prefill", keep=keep)


def prefix_from_session(session: _Session, counts: tuple[int, ...], length: int) -> DecodeState:
    """The decode state a finished prefill session leaves (layer order kept)."""
    n = len(session.keys)
    prefix = PrefixCache(tuple(session.keys[i] for i in range(n)), tuple(session.values[i] for i in range(n)),
                         counts, length)
    return DecodeState(prefix)


def decode_session(state: DecodeState) -> _Session:
    """A session that decodes one token into `state` (its owner chosen now; call `advance` after)."""
    return _Session("decode", state=state, owner=state.next_owner())


def advance(session: _Session) -> None:
    """Account for the token a decode session just appended."""
    st = session.state
    st.counts[session.owner] += 1
    st.length += 1
