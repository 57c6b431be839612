"""Build a Llama `GPTModel` on Megatron-Core whose RoPE comes from global position ids.

`UltraLongGPTModel` is Megatron-Core's `GPTModel` with one change: the rotary angles handed to every
layer are computed from the `position_ids` the caller passes (RoPE is built as
position_embedding_type="none" and `_preprocess` fills in our angles). Megatron-Core itself ignores
position ids for RoPE (Megatron-LM #453) and re-derives CP slices from the sequence length; here a
zigzag CP shard or a packed batch simply passes its global positions.

The YaRN attention factor af multiplies cos and sin in HF, i.e. scales the q.k logits by af^2. We
apply it once, as the softmax scale af^2 / sqrt(d) of the core attention (YaRN's "temperature"),
instead of through megatron-core's config-sniffing mscale (`_yarn_get_concentration_factor_from_config`
in megatron/core/models/common/embeddings/yarn_rotary_pos_embedding.py).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from megatron.core.models.gpt import GPTModel
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_config import TransformerConfig
from torch import Tensor

from megatron_ultralong.attention.kernels import AttentionBackend
from megatron_ultralong.model.config import LlamaConfig, check_parallel_fits
from megatron_ultralong.model.layer_spec import get_ultralong_layer_spec
from megatron_ultralong.model.lm_loss import chunked_lm_loss
from megatron_ultralong.rope.embedding import RotaryAngles
from megatron_ultralong.parallel.runtime import Runtime, check_device_support, megatron_config_overrides

# Megatron pads the vocabulary to a multiple of this x TP (Megatron-LM's default).
DEFAULT_VOCAB_DIVISIBLE_BY = 128


def padded_vocab_size(vocab_size: int, tp: int, divisible_by: int = DEFAULT_VOCAB_DIVISIBLE_BY) -> int:
    """Smallest multiple of divisible_by * tp that holds vocab_size (Megatron-LM's rule)."""
    multiple = divisible_by * tp
    return ((vocab_size + multiple - 1) // multiple) * multiple


def to_transformer_config(
    model: LlamaConfig,
    runtime: Runtime,
    params_dtype: torch.dtype = torch.float32,
    micro_batch_size: Optional[int] = None,
    **overrides,
) -> TransformerConfig:
    """Megatron-Core `TransformerConfig` for `model` under `runtime`'s parallelism.

    micro_batch_size: the training micro-batch (1 turns on TE's fused RoPE where it exists,
    runtime.rope_fusion_choice); None when unknown (evaluation). `overrides` are TransformerConfig
    fields (e.g. recompute settings from the trainer).
    """
    p = runtime.parallel
    tp = p.tensor_parallel
    check_parallel_fits(model, tp, p.pipeline_parallel)
    check_device_support(p, runtime.device, model.tie_word_embeddings)
    attention_factor = RotaryAngles(model.rope, model.head_dim).attention_factor
    softmax_scale = None
    if attention_factor != 1.0:
        softmax_scale = attention_factor * attention_factor / math.sqrt(model.head_dim)
    kwargs = dict(
        num_layers=model.num_layers,
        hidden_size=model.hidden_size,
        num_attention_heads=model.num_attention_heads,
        num_query_groups=model.num_kv_heads,
        kv_channels=model.head_dim,
        ffn_hidden_size=model.ffn_hidden_size,
        normalization="RMSNorm",
        layernorm_epsilon=model.rms_norm_eps,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        softmax_scale=softmax_scale,
        init_method_std=0.02,
        params_dtype=params_dtype,
        bf16=params_dtype == torch.bfloat16,
        fp16=params_dtype == torch.float16,
        # Activations sent between pipeline stages have the parameters' dtype.
        pipeline_dtype=params_dtype if p.pipeline_parallel > 1 else None,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=p.pipeline_parallel,
        context_parallel_size=p.context_parallel,
        cp_comm_type=p.cp_comm_type,
        sequence_parallel=p.sequence_parallel,
        **megatron_config_overrides(runtime.device, micro_batch_size),
    )
    kwargs.update(overrides)
    return TransformerConfig(**kwargs)


class UltraLongGPTModel(GPTModel):
    """Megatron-Core GPTModel whose rotary angles come from the caller's global position ids.

    forward(input_ids [b, s], position_ids [b, s], attention_mask=None, labels=None, ...) is
    GPTModel's. position_ids are required: they are the *global* positions of the tokens this rank
    holds (after CP sharding), which is what makes RoPE correct under context parallelism.
    """

    def __init__(
        self,
        config: TransformerConfig,
        transformer_layer_spec: ModuleSpec,
        model_config: LlamaConfig,
        vocab_size: int,
        pre_process: bool = True,
        post_process: bool = True,
        pg_collection: Optional[ProcessGroupCollection] = None,
        vp_stage: Optional[int] = None,
        loss_chunk_tokens: int = 16384,
    ):
        if loss_chunk_tokens < 1:
            raise ValueError(f"loss_chunk_tokens={loss_chunk_tokens}: expected >= 1")
        super().__init__(
            config=config,
            transformer_layer_spec=transformer_layer_spec,
            vocab_size=vocab_size,
            max_sequence_length=model_config.max_position_embeddings,
            pre_process=pre_process,
            post_process=post_process,
            parallel_output=True,
            share_embeddings_and_output_weights=model_config.tie_word_embeddings,
            position_embedding_type="none",
            pg_collection=pg_collection,
            vp_stage=vp_stage,
        )
        self.model_config = model_config
        self.rotary_angles = RotaryAngles(model_config.rope, config.kv_channels)
        self._deferred_final_norm: tuple = (None,)
        """The final norm while `forward` defers it to the loss chunks (None otherwise)."""
        self.loss_chunk_tokens = loss_chunk_tokens
        """Tokens per output-layer + cross-entropy chunk when forward gets labels (model/lm_loss.py)."""

    def _preprocess(self, input_ids: Tensor, position_ids: Tensor, *args, **kwargs):
        out = super()._preprocess(input_ids, position_ids, *args, **kwargs)
        if position_ids is None:
            raise ValueError("UltraLongGPTModel needs position_ids [b, s] (global token positions)")
        # GPTModel._preprocess returns (decoder_input, rotary_pos_emb, cos, sin, offset, mask[, cs]);
        # with position_embedding_type="none" slot 1 is None and we fill it
        # (tests/test_runtime.py pins this layout against the installed megatron-core).
        angles = self.rotary_angles(position_ids.to(self.rotary_angles.inv_freq.device))
        return (out[0], angles.to(out[0].device if out[0] is not None else angles.device)) + tuple(out[2:])

    def forward(self, input_ids: Tensor, position_ids: Tensor, attention_mask: Optional[Tensor] = None,
                decoder_input: Optional[Tensor] = None, labels: Optional[Tensor] = None, *args, **kwargs):
        """GPTModel.forward; with labels, the final norm moves into the loss chunks' checkpoints.

        The decoder would otherwise apply the final norm to the whole sequence and its output would
        be kept until the loss backward (h*e bytes per local token, 4 GiB at 4M tokens on one 8-GPU
        node); here the decoder runs without it for this call and `chunked_lm_loss` applies it per
        chunk (model/lm_loss.py). The module stays registered at decoder.final_layernorm, so state
        dicts and checkpoints are unchanged."""
        norm = self.decoder.final_layernorm if self.decoder.post_process else None
        if labels is None or norm is None or not self.post_process or self.mtp_process:
            return super().forward(input_ids, position_ids, attention_mask, decoder_input, labels, *args, **kwargs)
        self._deferred_final_norm = (norm,)  # a tuple: not registered as a second submodule
        self.decoder.final_layernorm = None
        try:
            return super().forward(input_ids, position_ids, attention_mask, decoder_input, labels, *args, **kwargs)
        finally:
            self.decoder.final_layernorm = norm
            self._deferred_final_norm = (None,)

    def _postprocess(self, hidden_states: Tensor, input_ids: Tensor, position_ids: Tensor, labels: Tensor,
                     *args, **kwargs):
        """With labels, return the per-token loss [b, s] computed in chunks (model/lm_loss.py), with
        padded vocabulary rows masked; without labels, GPTModel's logits."""
        if labels is None or not self.post_process or self.mtp_process:
            return super()._postprocess(hidden_states, input_ids, position_ids, labels, *args, **kwargs)
        weight = (
            self.shared_embedding_or_output_weight()
            if self.share_embeddings_and_output_weights
            else self.output_layer.weight
        )
        tp = self.pg_collection.tp
        return chunked_lm_loss(
            hidden_states, weight, labels, self.model_config.vocab_size, self.loss_chunk_tokens,
            tp_rank=tp.rank(), sequence_parallel=self.config.sequence_parallel, tp_group=tp,
            final_norm=self._deferred_final_norm[0],
        )


def build_model(
    model_config: LlamaConfig,
    runtime: Runtime,
    params_dtype: torch.dtype = torch.float32,
    use_transformer_engine: Optional[bool] = None,
    vocab_divisible_by: int = DEFAULT_VOCAB_DIVISIBLE_BY,
    attention_backend: AttentionBackend = "auto",
    loss_chunk_tokens: int = 16384,
    micro_batch_size: Optional[int] = None,
    mlp_tiles: int = 1,
    **config_overrides,
) -> UltraLongGPTModel:
    """Build this rank's model stage (its PP layers, its TP shard) on `runtime.device`.

    Weights are Megatron's random init (seeded by `init_runtime`); load real weights with
    `megatron_ultralong.convert`. The vocabulary is padded to a multiple of
    vocab_divisible_by x TP. Logits stay vocab-parallel ([b, s, V_pad / TP], what the vocab-parallel
    cross entropy wants); `gather_tp_logits` assembles them for inference.
    attention_backend: every layer's core-attention kernel (kernels.py). loss_chunk_tokens: tokens
    per output-layer + cross-entropy chunk when forward gets labels. micro_batch_size: see
    `to_transformer_config`. mlp_tiles: > 1 runs every layer's MLP in that many sequence tiles,
    each recomputed in backward (model/tiled_mlp.py), and its attention projections over the same
    tiles (model/sequence_tiles.py).
    """
    config = to_transformer_config(model_config, runtime, params_dtype, micro_batch_size, **config_overrides)
    pp = runtime.pg_collection.pp
    model = UltraLongGPTModel(
        config=config,
        transformer_layer_spec=get_ultralong_layer_spec(use_transformer_engine, attention_backend, mlp_tiles),
        model_config=model_config,
        vocab_size=padded_vocab_size(
            model_config.vocab_size, runtime.parallel.tensor_parallel, vocab_divisible_by
        ),
        pre_process=pp.rank() == 0,
        post_process=pp.rank() == pp.size() - 1,
        pg_collection=runtime.pg_collection,
        loss_chunk_tokens=loss_chunk_tokens,
    )
    return model.to(runtime.device)


def gather_tp_logits(logits: Tensor, tp_group: Optional[dist.ProcessGroup], vocab_size: int) -> Tensor:
    """Vocab-parallel logits [b, s, V_pad / TP] -> full logits [b, s, vocab_size] on every TP rank.

    Not differentiable (inference and evaluation). Uses torch.distributed directly rather than
    megatron-core's gather, which allocates on CUDA (runtime.py, accommodation 6).
    """
    if tp_group is not None and dist.get_world_size(tp_group) > 1:
        parts = [torch.empty_like(logits) for _ in range(dist.get_world_size(tp_group))]
        dist.all_gather(parts, logits.contiguous(), group=tp_group)
        logits = torch.cat(parts, dim=-1)
    return logits[..., :vocab_size]
