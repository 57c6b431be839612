"""The plugin's GPT layer spec: Megatron-Core's Llama layer with our module in `core_attention`.

This is the only integration seam with Megatron-Core's transformer: we take its own spec (Transformer
Engine linears and fused norms when TE is importable, plain torch modules otherwise) and replace the
`core_attention` submodule, which is what Megatron-Core's design provides submodules for. Nothing is
patched, and whatever megatron-core does around the slot (QKV projection, RoPE application, output
projection, TP) stays its own.
"""
from __future__ import annotations

import functools
import importlib.util
from typing import Optional

from megatron.core.models.gpt.gpt_layer_specs import (
    get_gpt_layer_local_spec,
    get_gpt_layer_with_transformer_engine_spec,
)
from megatron.core.transformer.spec_utils import ModuleSpec

from megatron_ultralong.attention.core_attention import UltraLongCoreAttention
from megatron_ultralong.attention.kernels import AttentionBackend
from megatron_ultralong.model.sequence_tiles import sequence_tiled
from megatron_ultralong.model.tiled_mlp import TiledMLP, quiet_unknown_mlp_warning


def transformer_engine_available() -> bool:
    """True when Transformer Engine's PyTorch extension imports (GPU containers)."""
    if importlib.util.find_spec("transformer_engine") is None:
        return False
    try:
        import transformer_engine.pytorch  # noqa: F401
    except Exception:  # noqa: BLE001 - a broken TE install must not break CPU runs
        return False
    return True


def get_ultralong_layer_spec(
    use_transformer_engine: Optional[bool] = None, attention_backend: AttentionBackend = "auto",
    mlp_tiles: int = 1,
) -> ModuleSpec:
    """Llama layer spec with `UltraLongCoreAttention` as core attention.

    attention_backend: the block kernel every layer's core attention uses (kernels.py). It is bound
    into the builder here because megatron-core 0.16's `SelfAttention` calls its `core_attention`
    submodule directly with fixed keywords (no `ModuleSpec.params` for this slot).

    use_transformer_engine: None picks TE when available. With TE the norms are folded into the
    QKV / FC1 linears (`linear_qkv.layer_norm_weight`); without it they are separate modules
    (`input_layernorm.weight`). Megatron's sharded_state_dict uses the TE names for both, so
    distributed checkpoints do not depend on which spec wrote them.

    mlp_tiles: > 1 swaps the layer's `mlp` for `TiledMLP` (model/tiled_mlp.py) with the same
    submodules: the MLP runs in that many sequence tiles, each recomputed in backward; and the
    attention's linear_qkv / linear_proj run over the same tiles (model/sequence_tiles.py).
    """
    if use_transformer_engine is None:
        use_transformer_engine = transformer_engine_available()
    if use_transformer_engine:
        if not transformer_engine_available():
            raise ValueError("use_transformer_engine=True but transformer_engine is not importable")
        spec = get_gpt_layer_with_transformer_engine_spec()
    else:
        spec = get_gpt_layer_local_spec(normalization="RMSNorm")
    attention = spec.submodules.self_attention
    if not hasattr(attention.submodules, "core_attention"):
        raise RuntimeError(
            "megatron-core's GPT layer spec no longer has self_attention.submodules.core_attention; "
            "the plugin's attention cannot be installed"
        )
    attention.submodules.core_attention = functools.partial(UltraLongCoreAttention, backend=attention_backend)
    if mlp_tiles != 1:
        quiet_unknown_mlp_warning()
        mlp = spec.submodules.mlp
        spec.submodules.mlp = ModuleSpec(module=TiledMLP, params={**(mlp.params or {}), "num_tiles": mlp_tiles},
                                         submodules=mlp.submodules)
        # The attention's projections over the same tiles (model/sequence_tiles.py): their
        # sequence-parallel gather buffers are the next largest working set.
        sub = attention.submodules
        sub.linear_qkv = ModuleSpec(module=sequence_tiled(sub.linear_qkv, "column"), params={"num_tiles": mlp_tiles})
        sub.linear_proj = ModuleSpec(module=sequence_tiled(sub.linear_proj, "row"), params={"num_tiles": mlp_tiles})
    return spec


def norms_folded_into_linears(spec: ModuleSpec) -> tuple[str, ...]:
    """Which of a layer spec's two RMSNorms are fused into the following linear, not modules of their own.

    Megatron-core's TE spec leaves `IdentityOp` in `input_layernorm` / `pre_mlp_layernorm` and uses
    `TELayerNormColumnParallelLinear` for `linear_qkv` / `linear_fc1`; the local spec has both norms
    as modules. Selective recompute of "layernorm" only re-runs norms that are modules
    (`TransformerLayer.__init__`), and a fused norm+linear keeps its norm output for backward, so the
    memory model (training/memory.py) needs this. Returns a subset of ("attention", "mlp")."""
    from megatron.core.transformer.identity_op import IdentityOp

    sub = spec.submodules
    folded = []
    if sub.input_layernorm in (IdentityOp, None) or getattr(sub.input_layernorm, "module", None) is IdentityOp:
        folded.append("attention")
    if sub.pre_mlp_layernorm in (IdentityOp, None) or getattr(sub.pre_mlp_layernorm, "module", None) is IdentityOp:
        folded.append("mlp")
    return tuple(folded)
