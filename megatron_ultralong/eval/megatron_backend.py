"""Evaluation backend for the plugin's Megatron model: prefill split over CP ranks, greedy decoding.

How a prompt of n tokens is run (every rank of the TP x CP world calls the same method with the
same ids; all of them are collectives):

1. Pad the ids on the right to n_pad, the next multiple of 2*CP (the zigzag layout cuts the
   sequence into 2*CP equal chunks). Causal attention means the padding cannot change the logits
   of any real position, so its value does not matter.
2. Shard ids and their *global* position ids with `parallel/cp_layout.shard_tensor` (rank r keeps chunks
   r and 2*CP-1-r). The model computes RoPE from those positions and its core attention runs the
   plugin's CP attention (ring / all-gather / a2a, `ParallelConfig.cp_comm_type`) over the CP group.
   Each rank holds n_pad/CP tokens of activations and KV: that is what makes a 1M prompt fit.
3. Only the last real position (n - 1) needs logits. The CP rank holding it applies the final
   output layer to that one hidden state (never [n, V] logits: 1M x 128K fp32 = 512 GB), gathers the
   vocab over TP, and an all-reduce over CP hands the [V] row to every rank.

Decoding re-runs step 1-3 on the prompt plus the tokens generated so far, once per new token:
O(T * n^2) attention for T new tokens instead of O(n^2 + T * n) with a KV cache. It is that way
because the plugin has no KV cache for CP attention yet (the cache would be sharded over CP in the
zigzag layout and every new token's query would need a ring pass over it). Evaluation prompts
generate few tokens (NIAH <= 16, RULER <= 128), so this costs T full prefills; for long generations
convert to HF (`mcore-to-hf`) and use the HF backend, which has a cache.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from megatron_ultralong.parallel.cp_layout import gather_tensor, local_positions, shard_tensor
from megatron_ultralong.eval.backends import check_prompt
from megatron_ultralong.model import build_model, gather_tp_logits
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

    @classmethod
    def from_checkpoint(cls, path: str, runtime: Runtime, params_dtype: Optional[torch.dtype] = None,
                        loss_chunk_tokens: int = 4096) -> "MegatronBackend":
        """Build the model recorded in a `save_megatron_checkpoint` directory and load its weights
        (loss_chunk_tokens: the model's chunk for `token_losses`)."""
        from megatron_ultralong.checkpoint.torch_dist import load_megatron_checkpoint, read_checkpoint_info

        model_dir = resolve_megatron_checkpoint(path)
        if model_dir is None:
            raise ValueError(f"--model={path!r}: not a Megatron checkpoint (no metadata.json, model/ or latest)")
        info = read_checkpoint_info(model_dir)
        model = build_model(info.model_config, runtime, params_dtype=params_dtype or info.torch_dtype,
                            vocab_divisible_by=info.vocab_divisible_by, loss_chunk_tokens=loss_chunk_tokens)
        load_megatron_checkpoint(model, model_dir)
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

    def _decoder_hidden(self, local_ids: Tensor, positions: Tensor) -> Tensor:
        """Final-norm hidden states [n_pad/cp, 1, H]: GPTModel.forward without the output layer
        (pinned against transformers' logits by tests/test_eval_megatron.py)."""
        m = self.model
        pre = m._preprocess(input_ids=local_ids, position_ids=positions)
        return m.decoder(hidden_states=pre[0], attention_mask=None, rotary_pos_emb=pre[1],
                         rotary_pos_cos=pre[2], rotary_pos_sin=pre[3], sequence_len_offset=pre[4])

    @torch.no_grad()
    def next_token_logits(self, ids: Sequence[int]) -> Tensor:
        t = check_prompt(ids, self.vocab_size)
        n = t.shape[1]
        local_ids, positions, _ = self._shard(t)
        hidden = self._decoder_hidden(local_ids, positions)
        row = torch.zeros(self.vocab_size, dtype=torch.float32, device=self.device)
        where = (positions[0] == n - 1).nonzero()
        if where.numel():  # this CP rank holds the last real token (all its TP ranks do)
            m = self.model
            weight = m.shared_embedding_or_output_weight() if m.share_embeddings_and_output_weights else None
            i = int(where[0, 0])
            logits, _ = m.output_layer(hidden[i : i + 1], weight=weight)  # [1, 1, V_pad/TP]
            row = gather_tp_logits(logits.float(), self.tp_group, self.vocab_size)[0, 0]
        if self.cp_size > 1:
            dist.all_reduce(row, group=self.cp_group)  # exactly one CP rank contributed non-zeros
        return row.cpu()

    def generate(self, ids: Sequence[int], max_new_tokens: int, stop_ids: Sequence[int] = ()) -> list[int]:
        """Greedy, re-running the CP prefill per generated token (module docstring: O(T n^2))."""
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={max_new_tokens}: expected >= 1")
        seq, out, stops = list(ids), [], set(stop_ids)
        while True:
            # Every rank computes the same argmax from the same all-reduced row: no broadcast needed.
            token = int(self.next_token_logits(seq).argmax())
            out.append(token)
            seq.append(token)
            if token in stops or len(out) == max_new_tokens:
                return out

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
