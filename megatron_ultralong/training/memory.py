"""The one memory model: per-GPU device and host bytes by component.

The trainer logs it at start-up, benchmarks/memory_plan.py prints the tables of
docs/parallelism_plan.md from it, and a dry run calls `estimate_memory`. The memory-saving ladder
and the fit to a device are in training/memory_fit.py, the seconds per step in training/step_time.py.

Saved activations (Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer
Models", arXiv 2205.05198, §4). Their per-layer count for GPT, sbh(34 + 5as/h) bytes, lists each
tensor a layer keeps for backward. For a Llama layer (RMSNorm, no dropout, SwiGLU, GQA, a flash
kernel that keeps no s x s matrix), per token, with e bytes per activation, h hidden, hq = nq*d
query width, hkv = nkv*d KV width, F the FFN width:

    norm inputs      2 * h*e   (+ fp32 rstd)   both RMSNorms keep their input (the residual stream)
    norm outputs     2 * h*e                   the QKV and fc1 GEMMs keep their input
    q, k, v          (hq + 2 hkv)*e            kept by the attention kernel (after RoPE)
    attention out    hq*e                      kernel output = linear_proj's input (one tensor)
    lse              4*nq                      fp32, kept by the kernel
    fc1 out          2F*e                      gate and up, SwiGLU's input
    SwiGLU out       F*e                       fc2's input
    total, Llama-3.1-8B, e = 2:  32,768 + 12,288 + 8,192 + 128 + 57,344 + 28,672 = 139,392 B (+8 rstd)

What this implementation keeps beyond that minimal set (measured on CPU, tests/test_memory_model.py):
    rope cos/sin     4*d*e                     megatron's unfused RoPE (rope fusion is off: it cannot
                                               apply YaRN's attention factor) builds cos and sin for q
                                               and for k in every layer, and its multiplies keep them;
                                               not split by TP: 1,024 B per token per layer for the 8B.
Two more were removed in attention/: the value view pinned the whole fused QKV output
(core_attention.py makes it contiguous), and the CP output was stored [b, h, s, d] so linear_proj
kept a second, [s, b, h*d] copy (softmax_merge.final_output stores it in Megatron's order).

Korthikanti's tensor parallelism divides everything but the norm/residual tensors by t; sequence
parallelism divides those too (megatron's column-parallel GEMM keeps its sequence-sharded input and
re-gathers it in backward). So at TP 8 with SP: 139,400 / 8 = 17,425 B per token per layer, and
18,449 with the RoPE tensors above.

Recompute, as megatron-core 0.16.1 implements it (`recompute_granularity`, `recompute_modules`):
    selective "core_attn"  drops only the lse: q, k, v stay (the checkpoint's inputs; v, a view,
                           pins the fused QKV output, see below) and the attention output stays
                           (linear_proj's input); the attention forward reruns.
    selective "layernorm"  drops both norm outputs (CheckpointWithoutOutput).
    selective "mlp"        drops fc1 out and SwiGLU out (the MLP is re-run from its input).
    full                   keeps each chunk's input, 2h*e per layer chunk, and re-runs whole layers.
So megatron's selective ["core_attn"] saves 16 B (the lse) and costs 1,280 B (the pinned QKV
output) per token per layer at TP8+SP: 19,713 B with the RoPE tensors, more than "none" (18,449).
["layernorm", "mlp"] keeps 5,649 B with the local spec, 6,673 B with TE's.

Layer spec (`Layout.transformer_engine`). Megatron-core's TE spec folds both RMSNorms into
`TELayerNormColumnParallelLinear` (linear_qkv, linear_fc1) and leaves `IdentityOp` in the norm slots
(model/layer_spec.py `norms_folded_into_linears`). Selective "layernorm" re-runs only norms that
are modules (TransformerLayer.__init__), and TE's fused norm+linear keeps its norm output for its
wgrad GEMM, so under TE "layernorm" drops nothing; "mlp" re-runs the whole MLP including its folded
norm, so under TE ["layernorm", "mlp"] keeps the attention norm's output only (+h*e/TP per token
per layer over the local spec: 1,024 B at TP 8 with SP).
Selective "core_attn": megatron's checkpoint saves its inputs q, k, v, and v is a view of the fused
QKV output, which it therefore pins: +(hq + hkv)*e/TP per token per layer (1,280 B at TP 8).
Tiled MLP (`mlp_tiles` > 1, model/tiled_mlp.py): the MLP keeps only its input, as with "mlp".

Backward working set of one layer, per local token, widths per TP rank (the largest phase counts):
    SwiGLU backward      3F*e/t       its incoming gradient and the gradient of fc1's output
    fc1 backward         2F*e/t + h*e (+ h*e with SP)   fc1's output gradient, the full-size input
                                      gradient before TP's reduce(-scatter), and with sequence
                                      parallelism the all-gathered input its wgrad GEMM needs
    QKV backward         (hq+2hkv)*e/t + h*e (+ h*e with SP)   the same for linear_qkv
    attention kernel     ((hq+2hkv)*e + 4hq + 4nq)/t   dQ/dK/dV, fp32 dQ accumulator, row sums (CP 1;
                                      with CP the ring's buffers, `cp_buffer_bytes`)
    MLP re-run           3F*e/t       selective "mlp", tiles, full: the re-run fc1/SwiGLU outputs
                                      live during that MLP's backward
    full recompute       + the re-run chunk's whole saved set
The MLP's phases and re-run divide by `mlp_tiles`, and so does the QKV phase: the tiles also split
the attention's projections (model/sequence_tiles.py; under SP the output projection then saves
its per-tile input rows, a copy: +hq*e/TP).
Loss: one chunk's fp32 logits, softmax and gradient, and its input rows; the final norm runs inside
each chunk's checkpoint, so only its input is kept across the loss; under SP each chunk gathers
its rows over TP inside its checkpoint (model/lm_loss.py), so the whole gathered final hidden state
(T*h*e, 8 GiB at 1M tokens per TP group) never exists.

Offload. `activation_offload` = f: the first round(f*L) layers' saved sets go to host memory
(model/activation_offload.py); the device holds at most two of those layers' sets at once (the
copy in flight in forward, the layer in use and the one prefetched in backward). What is copied is
taken before megatron discards a "layernorm" output, so under selective recompute the host copy of
a layer includes its norm outputs. `optimizer_offload` = f: megatron-core's HybridDeviceOptimizer
keeps f of the distributed optimizer's shard on the host: fp32 master weights, Adam m and v
(12 B/param) plus its pinned copies of the fp32 gradient and the bf16 parameter (6 B/param).

Everything else: bf16 weights, fp32 main gradients (megatron DDP with grad_reduce_in_fp32), fp32
master weights + Adam m, v = 12 B/param sharded over DP x CP by the distributed optimizer (CPU:
torch AdamW, 12 B/param unsharded); chunked cross entropy's fp32 logits, softmax and gradient for
`loss_chunk_tokens` tokens; and the CP attention buffers of one layer at a time (`cp_buffer_bytes`).
Not modelled: allocator fragmentation, NCCL and CUDA-context memory (the callers add a margin).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Optional

from megatron_ultralong.model.config import LlamaConfig, load_model_config
from megatron_ultralong.training.metrics import matmul_params

MLP_TILE_TOKENS = 65536
"""Tokens per MLP tile when a rung asks for tiles (`mlp_tiles=0`): tiles = ceil(local tokens / this).
At TP 8 one tile's MLP working set is then ~2 GiB for Llama-3.1-8B."""


@dataclass(frozen=True)
class Layout:
    """How one training run is laid out: everything the estimate needs besides the architecture."""

    seq_length: int
    """Tokens per sequence (global, before CP sharding)."""
    tp: int = 1
    """Tensor-parallel size."""
    cp: int = 1
    """Context-parallel size."""
    dp: int = 1
    """Data-parallel size."""
    pp: int = 1
    """Pipeline-parallel size (the first stage, which holds the most activations, is estimated)."""
    micro_batch_size: int = 1
    """Sequences per micro-batch."""
    global_batch_size: int = 1
    """Sequences per optimizer step (for the step time)."""
    sequence_parallel: bool = False
    """Megatron sequence parallelism (norm/residual activations split over TP)."""
    cp_comm_type: str = "p2p"
    """"p2p" (ring), "all_gather" or "a2a"."""
    recompute: str = "none"
    """"none", "selective" or "full"."""
    recompute_modules: tuple[str, ...] = ()
    """With selective: any of "core_attn", "layernorm", "mlp"."""
    recompute_num_layers: int = 1
    """With full: layers per recompute chunk."""
    loss_chunk_tokens: int = 16384
    """Tokens per chunk of the output layer + cross entropy."""
    act_bytes: int = 2
    """Bytes per activation/weight element (bf16: 2; fp32: 4)."""
    distributed_optimizer: bool = True
    """megatron-core's distributed optimizer (GPU runs); False: torch AdamW on every rank (CPU)."""
    fused_kernels: bool = True
    """GPU: RMSNorm and SwiGLU are fused kernels that keep only their inputs (+ rstd). False (CPU):
    PyTorch's composite RMSNorm also keeps x * rstd, and the unfused SwiGLU keeps silu(gate) and
    its product, h*e per norm and 2F*e per MLP more."""
    transformer_engine: bool = False
    """Megatron-core's TE layer spec (norms folded into the QKV / fc1 linears) instead of the local
    spec (module docstring)."""
    rope_fusion: bool = False
    """Megatron's TE-fused RoPE (GPU with TE at micro-batch 1, parallel/runtime.py): its backward
    needs only the shared angles, so no per-layer cos/sin are kept."""
    mlp_tiles: int = 1
    """`model.mlp_tiles`: the MLP (and the attention's projections) run in this many sequence tiles
    (1 = off)."""
    activation_offload: float = 0.0
    """`model.activation_offload`: fraction of layers whose saved sets wait in host memory."""
    optimizer_offload: float = 0.0
    """`optim.cpu_offload_fraction`: fraction of the optimizer state kept and stepped on the host."""

    @property
    def world_size(self) -> int:
        return self.tp * self.cp * self.dp * self.pp

    @property
    def local_tokens(self) -> int:
        """Tokens of one micro-batch on one GPU."""
        return self.micro_batch_size * self.seq_length // self.cp

    @classmethod
    def from_train_config(cls, cfg, world_size: int) -> "Layout":
        """From a resolved `training.config.TrainConfig` and the world size (DP = what remains)."""
        p, m, t = cfg.parallel, cfg.model, cfg.train
        return cls(
            seq_length=cfg.data.seq_length, tp=p.tensor_parallel, cp=p.context_parallel,
            dp=p.data_parallel_size(world_size), pp=p.pipeline_parallel, micro_batch_size=t.micro_batch_size,
            global_batch_size=t.global_batch_size, sequence_parallel=p.sequence_parallel,
            cp_comm_type=p.cp_comm_type, recompute=m.recompute,
            recompute_modules=tuple(m.recompute_modules) if m.recompute == "selective" else (),
            recompute_num_layers=m.recompute_num_layers, loss_chunk_tokens=t.loss_chunk_tokens,
            act_bytes=2 if m.params_dtype == "bfloat16" else 4, distributed_optimizer=t.device != "cpu",
            fused_kernels=t.device != "cpu",
            # Unset: TE where the run is on GPUs (the NGC container has it), the costlier spec here.
            transformer_engine=m.use_transformer_engine if m.use_transformer_engine is not None else t.device != "cpu",
            rope_fusion=(m.use_transformer_engine is not False and t.device != "cpu" and t.micro_batch_size == 1),
            mlp_tiles=m.mlp_tiles, activation_offload=m.activation_offload,
            optimizer_offload=cfg.optim.cpu_offload_fraction if t.device != "cpu" else 0.0,
        )


FOLDED_NORMS_TE: tuple[str, ...] = ("attention", "mlp")
"""The norms megatron-core's TE spec folds into the next linear (model/layer_spec.py
`norms_folded_into_linears` reads them off the spec; tests/test_memory_stack.py checks the two agree)."""


def _mlp_rerun(lay: Layout) -> bool:
    """The MLP keeps only its input and re-runs in backward (selective "mlp", or tiles)."""
    return lay.mlp_tiles > 1 or (lay.recompute == "selective" and "mlp" in lay.recompute_modules)


def layer_saved_bytes(cfg: LlamaConfig, lay: Layout, offload_copy: bool = False) -> dict[str, float]:
    """Bytes one layer keeps for backward per local token on one TP rank, by tensor (module docstring).

    offload_copy: what activation offload copies out of the layer instead (norm outputs that
    "layernorm" recompute discards later are copied before the discard)."""
    e, t = lay.act_bytes, lay.tp
    h, hq, hkv, f = cfg.hidden_size, cfg.num_attention_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim, cfg.ffn_hidden_size
    norm_div = t if lay.sequence_parallel else 1
    if lay.recompute == "full":
        return {"layer input": h * e / norm_div / lay.recompute_num_layers}
    drop = set(lay.recompute_modules) if lay.recompute == "selective" else set()
    folded = FOLDED_NORMS_TE if lay.transformer_engine else ()
    mlp_rerun = _mlp_rerun(lay)
    # A norm output is dropped by "layernorm" only when the norm is its own module, and the MLP's
    # by the MLP re-run only when the norm is folded into fc1 (then it is inside the re-run).
    ln_drop = "layernorm" in drop and not offload_copy
    attn_norm_kept = not (ln_drop and "attention" not in folded)
    mlp_norm_kept = not ((ln_drop and "mlp" not in folded) or (mlp_rerun and "mlp" in folded))
    parts = {
        "norm inputs": (2 * h * e + 2 * 4) / norm_div,
        "norm outputs": (attn_norm_kept + mlp_norm_kept) * h * e / norm_div,
        "q, k, v": (hq + 2 * hkv) * e / t,
        "attention out": hq * e / t,
        "lse": 0.0 if "core_attn" in drop else 4 * cfg.num_attention_heads / t,
        "rope cos/sin": 0.0 if lay.rope_fusion else 4 * cfg.head_dim * e,
        "fc1 out": 0.0 if mlp_rerun else 2 * f * e / t,
        "swiglu out": 0.0 if mlp_rerun else f * e / t,
    }
    if "core_attn" in drop:
        parts["qkv pinned by core_attn"] = (hq + hkv) * e / t
    if lay.mlp_tiles > 1 and lay.sequence_parallel and t > 1:
        # The tiled output projection saves its input rows picked per tile (a copy; sequence_tiles.py).
        parts["tiled linear_proj input"] = hq * e / t
    if not lay.fused_kernels:  # composite norms kept x*rstd unless re-run (no grad); unfused SwiGLU (CPU)
        norm_modules_kept = sum(1 for n in ("attention", "mlp") if n not in folded and "layernorm" not in drop)
        parts["unfused norm/swiglu"] = norm_modules_kept * h * e / norm_div + (0.0 if mlp_rerun else 2 * f * e / t)
    return parts


def activation_bytes_per_token_per_layer(cfg: LlamaConfig, lay: Layout) -> float:
    return sum(layer_saved_bytes(cfg, lay).values())


def resolved_mlp_tiles(lay: Layout) -> int:
    """`mlp_tiles`, with 0 (a ladder rung's "as needed") resolved from the local tokens."""
    return lay.mlp_tiles if lay.mlp_tiles >= 1 else max(1, -(-lay.local_tokens // MLP_TILE_TOKENS))


def backward_working_bytes_per_token(cfg: LlamaConfig, lay: Layout) -> float:
    """Transient bytes per local token during one layer's backward (module docstring): the largest
    phase of the MLP's (over the tiles) or the QKV projection's backward, the re-run MLP's
    activations, and with full recompute the re-run chunk's whole saved set."""
    # The peak of a backward is in the last layer's. Unfused SwiGLU (CPU), measured with the
    # allocator's own events: MulBackward of silu(gate) * up holds the incoming F*e and both input
    # gradients (2F*e), 3F*e again; its later steps free the incoming gradient first. By then the
    # final norm's and fc2's saved inputs are already freed, so activations + this is an upper
    # bound (~7% over on CPU).
    e, t, h, f = lay.act_bytes, lay.tp, cfg.hidden_size, cfg.ffn_hidden_size
    qkv = (cfg.num_attention_heads + 2 * cfg.num_kv_heads) * cfg.head_dim
    gathered = h * e if lay.sequence_parallel and t > 1 else 0.0
    swiglu = 3 * f * e / t
    fc1 = 2 * f * e / t + h * e + gathered
    # The MLP re-run's own activations (with full recompute they are in the re-run set below).
    rerun = (3 * f + (0 if lay.fused_kernels else 2 * f)) * e / t if _mlp_rerun(lay) else 0.0
    mlp = (max(swiglu, fc1) + rerun) / resolved_mlp_tiles(lay)
    # Tiles also split the attention's projections (model/sequence_tiles.py).
    attention = (qkv * e / t + h * e + gathered) / resolved_mlp_tiles(lay)
    # The attention kernel's backward at CP 1 (CP > 1: cp_buffer_bytes): dQ, dK, dV and flash
    # attention's fp32 dQ accumulator and softmax row sums; not tiled.
    kernel = (qkv * e + 4 * cfg.num_attention_heads * (cfg.head_dim + 1)) / t if lay.cp == 1 else 0.0
    transient = max(mlp, attention, kernel)
    if lay.recompute == "full":
        # The re-run set's attention-norm input is the checkpoint's saved layer input (one storage,
        # already in the activations), but the incoming gradient of the layer's output, not counted
        # above, is the same size, so the set stands as is: the allocator probe measures 102% of
        # this at 2,048 tokens (tests/test_memory_model.py), and 108% with that input taken out.
        rerun_set = replace(lay, recompute="none", recompute_modules=())
        transient += lay.recompute_num_layers * activation_bytes_per_token_per_layer(cfg, rerun_set)
    return transient


def cp_buffer_bytes(cfg: LlamaConfig, lay: Layout) -> float:
    """Peak bytes of one layer's CP attention buffers (attention/ring.py, all_gather.py, all_to_all.py).

    Per local token, e = activation bytes, widths per TP rank (hq, hkv, nq):
      p2p backward (> forward): dQ fp32 4hq; K/V current + arriving 2*2hkv*e; fp32 dK/dV of the
          current block, the one in flight and the rank's own 3*2hkv*4; kernel outputs (hq+2hkv)*e.
      all_gather backward, phases in order (K/V over the whole sequence = cp x local):
          gather: gathered K/V + its natural-order copy 2 * cp*2hkv*e;
          attention: natural K/V cp*2hkv*e + fp32 dK/dV cp*2hkv*4 + kernel dK/dV up to cp*2hkv*e;
          reduce-scatter: fp32 dK/dV + its rank-ordered stacked copy 2 * cp*2hkv*4;
          plus dQ fp32 4hq throughout.
      a2a: the re-sharded q, k, v and output sent + received 2*(2hq+2hkv)*e, fp32 output/lse
          accumulators 4hq + 4nq, fp32 dQ/dK/dV 4(hq+2hkv).
    """
    if lay.cp == 1:
        return 0.0
    e, t, cp = lay.act_bytes, lay.tp, lay.cp
    hq, hkv, nq = cfg.num_attention_heads * cfg.head_dim / t, cfg.num_kv_heads * cfg.head_dim / t, cfg.num_attention_heads / t
    if lay.cp_comm_type == "p2p":
        per_token = 4 * hq + 2 * 2 * hkv * e + 3 * 2 * hkv * 4 + (hq + 2 * hkv) * e
    elif lay.cp_comm_type == "all_gather":
        kv_full = cp * 2 * hkv
        per_token = 4 * hq + max(2 * kv_full * e, kv_full * e + kv_full * 4 + kv_full * e, 2 * kv_full * 4)
    elif lay.cp_comm_type == "a2a":
        per_token = 2 * (2 * hq + 2 * hkv) * e + 4 * hq + 4 * nq + 4 * (hq + 2 * hkv)
    else:
        raise ValueError(f"cp_comm_type={lay.cp_comm_type!r}: expected 'p2p', 'all_gather' or 'a2a'")
    return per_token * lay.local_tokens


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes per GPU by component (the first pipeline stage)."""

    weights: float
    grads: float
    optimizer: float
    activations: float
    """Saved activations of all local layers + the final norm's input."""
    backward_working_set: float
    """Transient gradients of one layer (+ one re-run chunk with full recompute)."""
    cp_buffers: float
    logits: float
    """fp32 logits, softmax and gradient of one loss chunk, and the chunk's (gathered) input rows."""
    host_activations: float = 0.0
    """Host bytes of this GPU's offloaded saved activations (not in `total`)."""
    host_optimizer: float = 0.0
    """Host bytes of this GPU's offloaded optimizer state (not in `total`)."""

    DEVICE_FIELDS = ("weights", "grads", "optimizer", "activations", "backward_working_set", "cp_buffers", "logits")

    @property
    def total(self) -> float:
        """Device bytes per GPU."""
        return sum(getattr(self, k) for k in self.DEVICE_FIELDS)

    @property
    def host_total(self) -> float:
        """Host bytes per GPU (x GPUs per node for a node's host memory)."""
        return self.host_activations + self.host_optimizer

    def as_dict(self) -> dict[str, float]:
        return {**asdict(self), "total": self.total, "host_total": self.host_total}


def parameter_count(cfg: LlamaConfig) -> int:
    """All weights: matmuls (LM head included), the embedding if untied, the RMSNorm gains."""
    embed = 0 if cfg.tie_word_embeddings else cfg.vocab_size * cfg.hidden_size
    return matmul_params(cfg) + embed + (2 * cfg.num_layers + 1) * cfg.hidden_size


def estimate_layout(cfg: LlamaConfig, lay: Layout) -> MemoryEstimate:
    """The per-GPU estimate for an architecture and a layout."""
    from megatron_ultralong.model.activation_offload import offloaded_layer_count

    local_params = parameter_count(cfg) / (lay.tp * lay.pp)
    shard = local_params / (lay.dp * lay.cp) if lay.distributed_optimizer else local_params
    tokens, e = lay.local_tokens, lay.act_bytes
    layers = -(-cfg.num_layers // lay.pp)
    norm_div = lay.tp if lay.sequence_parallel else 1
    # The final norm's input only: it runs inside each loss chunk's checkpoint (model/lm_loss.py),
    # so neither its output nor a composite norm's x * rstd is kept.
    final_norm = cfg.hidden_size * e / norm_div
    # Full recompute's checkpoints also save the rotary angles [s, 1, 1, d] fp32, once for all layers.
    angles = 4 * cfg.head_dim if lay.recompute == "full" else 0.0
    chunk = min(lay.loss_chunk_tokens, tokens)
    lay = replace(lay, mlp_tiles=resolved_mlp_tiles(lay))
    kept = activation_bytes_per_token_per_layer(cfg, lay)
    copied = sum(layer_saved_bytes(cfg, lay, offload_copy=True).values())
    off = offloaded_layer_count(lay.activation_offload, layers)
    on_device = (layers - off) * kept + min(off, 2) * copied  # two offloaded layers in flight
    return MemoryEstimate(
        weights=local_params * e,
        grads=local_params * 4,
        optimizer=shard * 12 * (1 - lay.optimizer_offload),
        activations=tokens * (on_device + final_norm + angles),
        backward_working_set=tokens * backward_working_bytes_per_token(cfg, lay),
        cp_buffers=cp_buffer_bytes(cfg, lay),
        # + one gathered chunk of the final hidden state (the chunks gather over TP one at a time).
        logits=chunk * cfg.vocab_size / lay.tp * 4 * 3 + chunk * cfg.hidden_size * e,
        host_activations=tokens * off * copied,
        host_optimizer=shard * 18 * lay.optimizer_offload,
    )


def resolve_model_config(cfg, model_cfg: Optional[LlamaConfig]) -> LlamaConfig:
    # Context extension changes RoPE only, never a shape: the preset/HF config is enough.
    return model_cfg if model_cfg is not None else load_model_config(cfg.model.config)


def estimate_memory(cfg, world_size: int, model_cfg: Optional[LlamaConfig] = None) -> MemoryEstimate:
    """Per-GPU memory of a resolved `TrainConfig` on `world_size` ranks, by component (bytes)."""
    return estimate_layout(resolve_model_config(cfg, model_cfg), Layout.from_train_config(cfg, world_size))
