"""Evaluation backend for the plugin's Megatron model: prefill split over CP ranks, cached decoding.

How a prompt of n tokens is run (every rank of the TP x CP world calls the same method with the
same ids; all of them are collectives):

1. Pad the ids on the right to n_pad, the next multiple of 2*CP (the zigzag layout cuts the
   sequence into 2*CP equal chunks). Causal attention means the padding cannot change the logits
   of any real position, so its value does not matter, and its K/V are never cached.
2. Shard ids and their *global* position ids with `parallel/cp_layout.shard_tensor` (rank r keeps
   chunks r and 2*CP-1-r). The model computes RoPE from those positions and its core attention runs
   the plugin's CP attention (ring / all-gather / a2a, `ParallelConfig.cp_comm_type`) over the CP
   group. Each rank holds n_pad/CP tokens of activations and KV: that is what makes a 1M prompt fit.
   `generate` keeps each rank's K/V as a CP-sharded cache (kv_cache.py).
3. Only the last real position needs logits. The CP rank holding it applies the output layer to
   that one hidden state (`model.stage_forward.stage_logits`; never [n, V] logits: 1M x 128K fp32
   = 512 GB), and an all-reduce over CP hands the [V] row to every rank.
4. Decoding (kv_cache.py): each new token runs through the model on every CP rank, attends to every
   rank's cache shard, partial results merge by log-sum-exp over CP. O(n^2 / CP) for the prefill,
   then O(n / CP) attention per new token instead of a full re-prefill.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from megatron_ultralong.eval.backends import check_budget, check_prompt, greedy
from megatron_ultralong.eval.identity import pick_tensors, weights_fingerprint
from megatron_ultralong.eval.kv_cache import (
    DecodeState, advance, decode_session, install_cache, prefill_session, prefix_from_session,
)
from megatron_ultralong.model import build_model
from megatron_ultralong.model.stage_forward import stage_hidden, stage_logits
from megatron_ultralong.parallel.cp_layout import gather_tensor, local_positions, shard_tensor
from megatron_ultralong.parallel.runtime import Runtime
from megatron_ultralong.checkpoint.paths import resolve_megatron_checkpoint  # noqa: F401 (one home: eval, convert, training)

PAD_ID = 0  # right padding up to a multiple of 2*CP; invisible to real positions (causal)


class MegatronBackend:
    """`Backend` over an `UltraLongGPTModel` stage; prompts are prefilled split over CP ranks."""

    def __init__(self, model: torch.nn.Module, runtime: Runtime):
        if runtime.parallel.pipeline_parallel != 1:
            raise ValueError(
                f"pipeline_parallel={runtime.parallel.pipeline_parallel}: evaluation runs TP x CP only "
                "(use --tp/--cp; PP adds nothing to a single prompt's memory that CP does not)"
            )
        self.model = model.eval()
        self.runtime = runtime
        self.cfg = model.model_config
        self.vocab_size = self.cfg.vocab_size
        self.tp_group = runtime.pg_collection.tp
        self.cp_group = runtime.pg_collection.cp
        self.cp_size = self.cp_group.size()
        self.cp_rank = self.cp_group.rank()
        self.device = runtime.device
        self.is_writer = runtime.rank == 0
        self.max_position_embeddings = self.cfg.max_position_embeddings
        self.trained_length = self.cfg.rope.original_max_position_embeddings or self.max_position_embeddings
        self.fingerprint = weights_fingerprint(self.cfg, pick_tensors(list(model.named_parameters())))
        """Identifies the weights for resume (identity.weights_fingerprint: the writer rank's shards)."""
        p = runtime.parallel
        self.identity = (f"megatron/tp={p.tensor_parallel}/cp={self.cp_size}/{p.cp_comm_type}/"
                         f"{next(model.parameters()).dtype}/{self.device.type}")
        self.prefilled_tokens = 0
        """Prompt tokens prefilled so far (how tests and benchmarks see that a fork re-prefilled nothing)."""

    @classmethod
    def from_checkpoint(cls, path: str, runtime: Runtime, params_dtype: Optional[torch.dtype] = None,
                        loss_chunk_tokens: int = 4096, allow_unverified: bool = False) -> "MegatronBackend":
        """Build the model recorded in a `save_megatron_checkpoint` directory and load its weights
        through the one checkpoint read path (manifest checked unless allow_unverified; nothing
        unpickled beyond weights). loss_chunk_tokens: the model's chunk for `token_losses`."""
        from megatron_ultralong.checkpoint.info import read_checkpoint_info
        from megatron_ultralong.checkpoint.torch_dist import load_megatron_checkpoint

        model_dir = resolve_megatron_checkpoint(path)
        if model_dir is None:
            raise ValueError(f"--model={path!r}: not a Megatron checkpoint (no metadata.json, model/ or latest)")
        info = read_checkpoint_info(model_dir)
        model = build_model(info.model_config, runtime, params_dtype=params_dtype or info.torch_dtype,
                            vocab_divisible_by=info.vocab_divisible_by, loss_chunk_tokens=loss_chunk_tokens)
        load_megatron_checkpoint(model, model_dir, allow_unverified=allow_unverified)
        return cls(model, runtime)

    def _shard(self, ids: Tensor) -> tuple[Tensor, Tensor, int]:
        """ids [1, n] -> (local ids [1, n_pad/cp], local global positions [1, n_pad/cp], n_pad)."""
        n = ids.shape[1]
        multiple = 2 * self.cp_size
        n_pad = -(-n // multiple) * multiple
        padded = torch.nn.functional.pad(ids, (0, n_pad - n), value=PAD_ID).to(self.device)
        local_ids = shard_tensor(padded, self.cp_size, self.cp_rank, seq_dim=1)
        positions = local_positions(n_pad, self.cp_size, self.cp_rank, device=self.device)[None]
        return local_ids, positions, n_pad

    def _last_logits(self, hidden: Tensor, positions: Tensor, n: int) -> Tensor:
        """Logits [V] fp32 of global position n - 1 on every rank, from this rank's hidden [s, 1, H]."""
        row = torch.zeros(self.vocab_size, dtype=torch.float32, device=self.device)
        where = (positions[0] == n - 1).nonzero()
        if where.numel():  # this CP rank holds the last real token (all its TP ranks do)
            i = int(where[0, 0])
            row = stage_logits(self.model, hidden[i : i + 1])[0, 0]
        if self.cp_size > 1:
            dist.all_reduce(row, group=self.cp_group)  # exactly one CP rank contributed non-zeros
        return row

    @torch.no_grad()
    def prefill(self, ids: Sequence[int], keep_cache: bool = True) -> tuple[Optional[DecodeState], Tensor]:
        """CP prefill of ids: (the decode state holding this rank's cache shard, or None without
        keep_cache; logits [V] fp32 of the token after ids, on this rank's device)."""
        t = check_prompt(ids, self.vocab_size)
        n = t.shape[1]
        local_ids, positions, n_pad = self._shard(t)
        self.prefilled_tokens += n
        if not keep_cache:
            return None, self._last_logits(stage_hidden(self.model, local_ids, positions), positions, n)
        session = prefill_session(positions[0] < n)
        with install_cache(self.model, session):
            hidden = stage_hidden(self.model, local_ids, positions)
        # Every rank knows every rank's share of the n real tokens: no communication needed.
        counts = tuple(int((local_positions(n_pad, self.cp_size, r) < n).sum()) for r in range(self.cp_size))
        return prefix_from_session(session, counts, n), self._last_logits(hidden, positions, n)

    @torch.no_grad()
    def step(self, state: DecodeState, token: int) -> Tensor:
        """Append `token` at position state.length (cached on one CP rank) and return the logits [V]
        fp32 of the token after it. Identical on every rank (same merge, same order)."""
        if not 0 <= token < self.vocab_size:
            raise ValueError(f"token id {token} is outside the model's vocabulary [0, {self.vocab_size})")
        ids = torch.tensor([[token]], device=self.device)
        positions = torch.tensor([[state.length]], device=self.device)
        session = decode_session(state)
        with install_cache(self.model, session):
            hidden = stage_hidden(self.model, ids, positions)  # [1, 1, H]
        advance(session)
        return stage_logits(self.model, hidden)[0, 0]

    def next_token_logits(self, ids: Sequence[int]) -> Tensor:
        return self.prefill(ids, keep_cache=False)[1].cpu()

    def generate(self, ids: Sequence[int], max_new_tokens: int, stop_ids: Sequence[int] = ()) -> list[int]:
        """Greedy: one CP prefill, then one cached step per new token."""
        check_budget(max_new_tokens)
        state, logits = self.prefill(ids)
        return greedy(lambda token: self.step(state, token), logits, self.vocab_size, max_new_tokens, stop_ids)

    def generate_many(self, context: Sequence[int], suffixes: Sequence[Sequence[int]], max_new_tokens: int,
                      stop_ids: Sequence[int] = ()) -> list[list[int]]:
        """Greedy continuations of context + each suffix, prefilling the context once (the cache is
        forked per suffix; suffix tokens go through cached steps)."""
        if not suffixes:
            raise ValueError("generate_many needs at least one suffix")
        check_budget(max_new_tokens)
        prefix, context_logits = self.prefill(context)
        outs = []
        for suffix in suffixes:
            state, logits = prefix.fork(), context_logits
            for token in suffix:
                logits = self.step(state, int(token))
            outs.append(greedy(lambda token, st=state: self.step(st, token), logits, self.vocab_size,
                               max_new_tokens, stop_ids))
        return outs

    def broadcast_from_writer(self, obj):
        """`obj` as the writer (global rank 0) has it, on every rank (e.g. which grid cells are done)."""
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    @torch.no_grad()
    def token_losses(self, ids: Sequence[int]) -> Tensor:
        """Per-token NLL [n - 1] via the model's chunked loss (padded vocab masked), gathered over CP."""
        t = check_prompt(ids, self.vocab_size)
        n = t.shape[1]
        if n < 2:
            raise ValueError("token_losses needs at least 2 tokens")
        local_ids, positions, n_pad = self._shard(t)
        labels = torch.nn.functional.pad(t[:, 1:], (0, n_pad - n + 1), value=PAD_ID).to(self.device)
        local_labels = shard_tensor(labels, self.cp_size, self.cp_rank, seq_dim=1)
        losses = self.model(local_ids, positions, None, labels=local_labels)  # [1, n_pad/cp]
        return gather_tensor(losses.float(), self.cp_group, seq_dim=1)[0, : n - 1].cpu()


def init_eval_runtime(tp: int, cp: int, cp_comm_type: str = "p2p", device: Optional[str] = None) -> Runtime:
    """Runtime for evaluation under torchrun: world = TP x CP (no PP; DP would only repeat work)."""
    from megatron_ultralong.parallel.runtime import ParallelConfig, init_runtime

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world != tp * cp:
        raise ValueError(f"WORLD_SIZE={world} but --tp {tp} x --cp {cp} = {tp * cp}: launch tp*cp processes")
    return init_runtime(ParallelConfig(tensor_parallel=tp, context_parallel=cp, cp_comm_type=cp_comm_type),
                        device=device)
