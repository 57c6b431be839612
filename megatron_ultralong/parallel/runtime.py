"""The runtime layer: torch.distributed, Megatron-Core parallel state, devices and seeds.

This is also the ONE place where the plugin accommodates megatron-core's CUDA assumptions so the
same model runs on a CPU (gloo) as on GPUs (NCCL). Each accommodation is listed here, and
tests/test_runtime.py fails if megatron-core changes under one of them:

1. Weight initialisation. megatron-core's GPU init path (`_initialize_affine_weight_gpu`) draws from
   the CUDA RNG tracker; on CPU we set `use_cpu_initialization=True`, which builds each full master
   weight from the default (CPU) generator and hands every TP rank its slice. Same seed on all TP
   ranks -> TP=2 weights are exactly TP=1's.
2. Fusions. Masked-softmax, bias-GeLU/SwiGLU, bias-dropout-add, persistent layer norm, gradient
   accumulation fusion and TE/apex RoPE fusion are CUDA kernels; `megatron_config_overrides()`
   turns them off on CPU. Gradient accumulation fusion stays on for GPU runs whenever megatron-core
   found apex's `fused_weight_gradient_mlp_cuda` (its private flag
   `tensor_parallel.layers._grad_accum_fusion_available`; megatron's linear layers raise without
   it, and TE's layers fuse the same accumulation themselves). RoPE fusion (`rope_fusion_choice`)
   is on where megatron-core found Transformer Engine's fused RoPE (sbhd), on the GPU, at micro-batch
   1: TE's kernel takes one row of angles ([s, 1, 1, d]; ours come from position ids, one row
   when b = 1) and no mscale, and the plugin passes none (the YaRN attention factor is folded into
   the softmax scale, model/gpt.py). Elsewhere megatron's unfused RoPE runs, which keeps cos/sin of
   the angles for q and k per layer.
3. Rotary embedding. megatron-core's `RotaryEmbedding` allocates on `torch.cuda.current_device()`;
   the plugin never builds it (GPTModel gets position_embedding_type="none" and our
   `RotaryAngles` supplies `rotary_pos_emb`), so nothing to patch.
4. Core attention. megatron-core's `DotProductAttention` fetches its score buffer from a CUDA
   global memory buffer and asserts CP == 1; the plugin's layer spec puts its own module there.
5. RNG states of activation recompute. `model_parallel_cuda_manual_seed` touches CUDA generators;
   on CPU only the default generator is seeded. megatron-core's recompute (`tensor_parallel.checkpoint`
   = `CheckpointFunction`, and `CheckpointWithoutOutput` for selective "layernorm") records and
   replays the RNG streams through `tensor_parallel.random._get_all_rng_states` /
   `_set_all_rng_states`, which read the CUDA generator with `_get_cuda_rng_state` (an assertion on
   a CPU-only torch). `use_cpu_rng_states()` points that one reader, and its writer
   `_set_cuda_rng_state`, at torch's CPU generator in a process without CUDA, so full and selective
   recompute run on CPU through megatron's own code (the tracker's `fork` swaps CPU states the same
   way). Installed by `init_runtime` on CPU only; a process with CUDA is never touched.
   Selective "layernorm" recompute also needs `fill_missing_te_recompute_names()`: megatron-core
   0.16.1's `CheckpointWithoutOutput.__init__` sets `self.fp8 = fp8 is not None`, so its default
   fp8=False counts as FP8, and its forward then calls Transformer Engine's
   `FP8GlobalStateManager`, `activation_recompute_forward` and `fp8_autocast`, names its module
   imports only when TE is installed: without TE (CPU, or a GPU image without TE, the local spec)
   the norm recompute raises NameError. Where TE did not define them, they get stand-ins that
   report FP8 off and do nothing; with TE nothing is touched.
6. TP collectives that allocate. megatron-core's gathers and reduce-scatters along a dim
   (`tensor_parallel/mappings.py`: sequence parallelism, `parallel_output=False` logits) allocate
   their output on `torch.cuda.current_device()`. On CPU, sequence parallelism is refused and
   models keep vocab-parallel logits (`model.gpt.gather_tp_logits` gathers them on any device);
   the TP all-reduces that plain TP needs work in place on gloo.
7. DDP and optimizers. megatron-core's DDP allocates its gradient buffers on CUDA and its
   optimizers create CUDA tensors; a CPU run reduces gradients with `TorchDataParallel` and steps
   torch AdamW, behind the interface the training loop uses on both devices
   (training/optimizer.py; GPU runs use megatron-core's DDP and distributed optimizer).
8. Tied embeddings across pipeline stages. megatron-core copies the last stage's output weight to
   CUDA (`weight.data.cuda()` in LanguageModule.setup_embeddings_and_output_layer) to sync it with
   the first stage's embedding; on CPU a tied model with pipeline_parallel > 1 is refused.

Private megatron-core symbols the project touches (underscore names, or internals a release may
change without notice), everywhere in the package; revisit these on a megatron-core upgrade:

- `GPTModel._preprocess` (model/gpt.py overrides it; eval/megatron_backend.py calls it): its
  return layout (decoder_input, rotary_pos_emb, cos, sin, sequence_len_offset, ...), pinned by
  tests/test_runtime.py.
- `GPTModel._postprocess` and its `mtp_process` attribute (model/gpt.py overrides it to return the
  chunked loss).
- `TransformerBlock.__call__`'s keywords (hidden_states, rotary_pos_emb, rotary_pos_cos/sin,
  sequence_len_offset) and `output_layer(hidden, weight=...)` (eval/megatron_backend.py runs the
  decoder without GPTModel.forward to take only the last position's logits).
- The keywords `SelfAttention` calls its `core_attention` builder with (attention/core_attention.py,
  model/layer_spec.py).
- `dist_checkpointing.strategies.torch._replace_state_dict_keys_with_sharded_keys`,
  `mcore_to_pyt_state_dict`, `MCoreSavePlanner` and `TorchDistSaveShardedStrategy.save`
  (checkpoint/torch_dist.py: the synchronous CPU save).
- `TorchDistLoadShardedStrategy.load` and `dist_checkpointing.dict_utils`
  (checkpoint/chunk_load.py: collective-free chunk loads).
- The .idx layout `datasets.indexed_dataset._IndexWriter` writes (header, version 1, `DType` codes):
  data/preprocess/indexed.py writes the same bytes without importing megatron-core, and
  tests/test_data_build.py compares them byte for byte with megatron-core's own builder.
- The layout of `get_cuda_rng_tracker().get_states()` (checkpoint/train_state.py saves it).
- `tensor_parallel.random._get_cuda_rng_state` / `_set_cuda_rng_state`, looked up by
  `_get_all_rng_states` / `_set_all_rng_states` and the tracker's `fork` at call time
  (accommodation 5 replaces them in CPU processes).
- DDP's `zero_grad_buffer` / `finish_grad_sync` method names (training/optimizer.py's CPU
  `TorchDataParallel` mirrors them) and `finalize_model_grads(..., pg_collection=)`.
"""
from __future__ import annotations

import contextlib
import os
import random
import socket
from dataclasses import dataclass
from datetime import timedelta
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.process_groups_config import ProcessGroupCollection

# ParallelConfig and CpCommType live in parallel/config.py (no torch / megatron import: CLIs parse
# configs fast); re-exported here for callers that build a runtime.
from megatron_ultralong.parallel.config import CpCommType, ParallelConfig  # noqa: E402,F401


@dataclass(frozen=True)
class Runtime:
    """What `init_runtime` set up; pass it (not globals) to the model and the training loop."""

    device: torch.device
    """cuda:<local rank> with NCCL, or cpu with gloo."""

    rank: int
    world_size: int
    parallel: ParallelConfig
    data_parallel_size: int
    pg_collection: ProcessGroupCollection
    """Megatron's process groups (tp, pp, cp, dp, dp_cp, ...), passed explicitly to modules."""

    @property
    def is_cuda(self) -> bool:
        return self.device.type == "cuda"


def init_runtime(
    parallel: ParallelConfig = ParallelConfig(),
    seed: int = 1234,
    device: Optional[str] = None,
    timeout_minutes: int = 30,
) -> Runtime:
    """Initialise torch.distributed (env:// as torchrun sets it) and Megatron-Core's parallel state.

    device: "cuda", "cpu" or None (CUDA when available). A single process without torchrun
    variables gets a 1-rank world, so tools and notebooks can build models too.
    """
    use_cuda = torch.cuda.is_available() if device is None else device == "cuda"
    if use_cuda and not torch.cuda.is_available():
        raise ValueError("device='cuda' requested but torch.cuda.is_available() is False")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        configure_cuda_allocator()
        torch.cuda.set_device(local_rank)
    dev = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")

    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        lone_port = "MASTER_PORT" not in os.environ
        if lone_port:
            if int(os.environ.get("WORLD_SIZE", "1")) > 1:
                raise ValueError("WORLD_SIZE > 1 but MASTER_PORT is unset: launch with torchrun")
            os.environ["MASTER_PORT"] = str(free_port())  # a lone process: any free port
        dist.init_process_group(
            backend="nccl" if use_cuda else "gloo",
            rank=int(os.environ.get("RANK", "0")),
            world_size=int(os.environ.get("WORLD_SIZE", "1")),
            timeout=timedelta(minutes=timeout_minutes),
            device_id=dev if use_cuda else None,
        )
        if lone_port:
            # The port was ours to pick: do not leave it in the environment, where every process this
            # one starts later (a converter, a torchrun) would inherit it and find it taken.
            del os.environ["MASTER_PORT"]
    world_size = dist.get_world_size()
    dp = parallel.data_parallel_size(world_size)
    check_device_support(parallel, dev)

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=parallel.tensor_parallel,
        pipeline_model_parallel_size=parallel.pipeline_parallel,
        context_parallel_size=parallel.context_parallel,
    )
    seed_everything(seed, use_cuda)
    fill_missing_te_recompute_names()
    if not use_cuda:
        use_cpu_rng_states()
    return Runtime(
        device=dev,
        rank=dist.get_rank(),
        world_size=world_size,
        parallel=parallel,
        data_parallel_size=dp,
        pg_collection=ProcessGroupCollection.use_mpu_process_groups(),
    )


CUDA_ALLOC_CONF = "expandable_segments:True"
"""The CUDA caching allocator's setting for training: the CP attention allocates K/V blocks, merge
buffers and gradients of many sizes per layer, which fragment fixed-size segments."""


def configure_cuda_allocator(environ: Optional[dict] = None) -> bool:
    """Set PYTORCH_CUDA_ALLOC_CONF=CUDA_ALLOC_CONF unless the user set it (or torch 2.9's
    PYTORCH_ALLOC_CONF). The allocator reads it when it first allocates, so this runs before any CUDA
    tensor exists; if CUDA is already initialised the setting cannot take effect and is left alone.
    Returns whether it was set."""
    env = os.environ if environ is None else environ
    if "PYTORCH_CUDA_ALLOC_CONF" in env or "PYTORCH_ALLOC_CONF" in env or torch.cuda.is_initialized():
        return False
    env["PYTORCH_CUDA_ALLOC_CONF"] = CUDA_ALLOC_CONF
    return True


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (for MASTER_PORT of local process groups)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def seed_everything(seed: int, use_cuda: bool) -> None:
    """Same seed on every rank (accommodation 5): CPU init then slices identical master weights."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if use_cuda:
        from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

        model_parallel_cuda_manual_seed(seed)


def _cpu_generator_state(device=None, clone: bool = False, graph_safe: bool = False) -> torch.Tensor:
    """Stand-in for megatron's `_get_cuda_rng_state` in a CPU process: the CPU generator's state."""
    return torch.get_rng_state()


def _set_cpu_generator_state(new_state: torch.Tensor, device: int = -1, graph_safe: bool = False) -> None:
    """Stand-in for megatron's `_set_cuda_rng_state` in a CPU process."""
    torch.set_rng_state(new_state)


def use_cpu_rng_states() -> None:
    """Accommodation 5: megatron's recompute saves and restores "CUDA" RNG states through two module
    functions; in a process without CUDA they read and write the CPU generator instead. The CPU
    state is also what `_get_all_rng_states` saves first, so a replayed recompute draws the same
    numbers as its forward (tests/test_memory_stack.py checks losses and gradients are unchanged)."""
    if torch.cuda.is_available():
        return  # a GPU process keeps megatron's own CUDA RNG handling
    from megatron.core.tensor_parallel import random as mrandom

    mrandom._get_cuda_rng_state = _cpu_generator_state
    mrandom._set_cuda_rng_state = _set_cpu_generator_state


class _NoFP8State:
    """Stand-in for TE's `FP8GlobalStateManager` where TE is absent: FP8 is never on."""

    @staticmethod
    def is_fp8_enabled() -> bool:
        return False

    @staticmethod
    def get_fp8_recipe():
        return None


def _null_context(*args, **kwargs):
    return contextlib.nullcontext()


def fill_missing_te_recompute_names() -> None:
    """Accommodation 5, second part: the TE names `CheckpointWithoutOutput` calls unconditionally,
    defined as FP8-off no-ops in megatron's `tensor_parallel.random` only where TE did not."""
    from megatron.core.tensor_parallel import random as mrandom

    for name, value in (("FP8GlobalStateManager", _NoFP8State), ("activation_recompute_forward", _null_context),
                        ("fp8_autocast", _null_context)):
        if not hasattr(mrandom, name):
            setattr(mrandom, name, value)


def te_fused_rope_available() -> bool:
    """Whether megatron-core imported Transformer Engine's fused RoPE for the sbhd layout (what its
    `apply_rotary_pos_emb` calls when `apply_rope_fusion` is set)."""
    from megatron.core.models.common.embeddings import rope_utils

    return rope_utils.fused_apply_rotary_pos_emb is not None


def rope_fusion_choice(device: torch.device, micro_batch_size: Optional[int]) -> bool:
    """Use megatron's TE-fused RoPE (accommodation 2): GPU, TE's kernel importable, and micro-batch 1
    (TE's sbhd kernel takes angles [s, 1, 1, d]; None = unknown batch, e.g. evaluation: unfused)."""
    return device.type == "cuda" and micro_batch_size == 1 and te_fused_rope_available()


def megatron_config_overrides(device: torch.device, micro_batch_size: Optional[int] = None) -> dict:
    """TransformerConfig fields that depend on the device (accommodations 1 and 2); micro_batch_size
    decides the RoPE fusion (`rope_fusion_choice`)."""
    on_gpu = device.type == "cuda"
    return dict(
        use_cpu_initialization=not on_gpu,
        masked_softmax_fusion=False,  # our core attention never calls Megatron's softmax
        bias_activation_fusion=on_gpu,
        bias_dropout_fusion=on_gpu,
        persist_layer_norm=False,
        gradient_accumulation_fusion=on_gpu and grad_accum_fusion_available(),
        apply_rope_fusion=rope_fusion_choice(device, micro_batch_size),  # see accommodation 2
    )


def grad_accum_fusion_available() -> bool:
    """Whether megatron-core imported apex's fused wgrad-accumulation kernel (accommodation 2)."""
    from megatron.core.tensor_parallel import layers

    return bool(getattr(layers, "_grad_accum_fusion_available", False))


def check_device_support(parallel: ParallelConfig, device: torch.device, tied_embeddings: bool = False) -> None:
    """Refuse what megatron-core cannot do on this device (accommodations 6 and 8), naming the flag."""
    if device.type != "cuda" and parallel.sequence_parallel:
        raise ValueError(
            "sequence_parallel=True is GPU-only: megatron-core's sequence-parallel gathers allocate "
            "on torch.cuda.current_device()"
        )
    if device.type != "cuda" and tied_embeddings and parallel.pipeline_parallel > 1:
        raise ValueError(
            "tie_word_embeddings with pipeline_parallel > 1 is GPU-only: megatron-core syncs the "
            "last stage's copy of the embedding through .cuda()"
        )


def shutdown_runtime() -> None:
    """Tear down parallel state and the process group (idempotent)."""
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
