"""The runtime layer's accommodations of megatron-core's CUDA assumptions, pinned.

Each test names the accommodation in megatron_ultralong/parallel/runtime.py it guards. If megatron-core
changes under one (a new release), the test fails and says what to revisit.
"""
import inspect

import pytest
import torch

from dist_utils import run_distributed
from megatron_ultralong.parallel.runtime import ParallelConfig, check_device_support


def test_parallel_config_checks():
    assert ParallelConfig(tensor_parallel=2, context_parallel=2).data_parallel_size(8) == 2
    with pytest.raises(ValueError, match=r"world size 6 is not divisible by TP\*PP\*CP = 2\*1\*4 = 8"):
        ParallelConfig(tensor_parallel=2, context_parallel=4).data_parallel_size(6)
    with pytest.raises(ValueError, match=r"cp_comm_type='allgather'"):
        ParallelConfig(cp_comm_type="allgather")
    with pytest.raises(ValueError, match=r"sequence_parallel=True needs tensor_parallel > 1"):
        ParallelConfig(sequence_parallel=True)


def test_sequence_parallel_refused_on_cpu_while_megatron_gathers_on_cuda():
    # Accommodation 6. If this first assertion fails, megatron-core stopped allocating TP gathers on
    # CUDA: sequence parallelism can then be allowed on CPU (drop check_device_support's refusal).
    from megatron.core.tensor_parallel import mappings

    assert "torch.cuda.current_device()" in inspect.getsource(mappings._gather_along_last_dim)
    with pytest.raises(ValueError, match=r"sequence_parallel=True is GPU-only"):
        check_device_support(ParallelConfig(tensor_parallel=2, sequence_parallel=True), torch.device("cpu"))


def test_tied_embeddings_across_pipeline_stages_refused_on_cpu():
    # Accommodation 8: megatron-core moves the last stage's embedding copy with .cuda().
    from megatron.core.models.common.language_module.language_module import LanguageModule

    assert ".cuda()" in inspect.getsource(LanguageModule.setup_embeddings_and_output_layer)
    with pytest.raises(ValueError, match=r"tie_word_embeddings with pipeline_parallel > 1 is GPU-only"):
        check_device_support(ParallelConfig(pipeline_parallel=2), torch.device("cpu"), tied_embeddings=True)
    check_device_support(ParallelConfig(pipeline_parallel=2), torch.device("cpu"), tied_embeddings=False)


@pytest.mark.skipif(torch.cuda.is_available(), reason="pins megatron-core's CPU behaviour")
def test_megatron_rotary_still_allocates_on_cuda():
    # Accommodation 3: the plugin never builds megatron-core's RotaryEmbedding. If this stops
    # raising, megatron's rotary no longer needs CUDA (nothing to change; the note can go).
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

    with pytest.raises(AssertionError, match="not compiled with CUDA"):
        RotaryEmbedding(kv_channels=16, rotary_percent=1.0)


def _pins(rank, world_size):
    from megatron.core.models.common.embeddings.yarn_rotary_pos_embedding import (
        _yarn_get_concentration_factor_from_config,
    )
    from megatron.core.models.gpt import GPTModel

    from megatron_ultralong.model import PRESETS, build_model
    from megatron_ultralong.rope import yarn_for_context_length
    from megatron_ultralong.parallel.runtime import init_runtime

    rt = init_runtime(ParallelConfig())
    cfg = PRESETS["tiny"].replace(rope=yarn_for_context_length(1 << 16, original_max_position_embeddings=8192))
    model = build_model(cfg, rt)
    # No mscale from megatron-core on top of ours: the attention factor is applied exactly once,
    # through softmax_scale (model/gpt.py). If megatron starts returning != 1 here, it doubles.
    assert _yarn_get_concentration_factor_from_config(model.config) == 1.0
    af = model.rotary_angles.attention_factor
    assert af > 1 and model.config.softmax_scale == pytest.approx(af * af / cfg.head_dim**0.5)
    core = model.decoder.layers[0].self_attention.core_attention
    assert core.softmax_scale == model.config.softmax_scale  # SelfAttention passes it through
    # GPTModel._preprocess's output layout, which UltraLongGPTModel fills at slot 1.
    ids = torch.randint(0, 1000, (1, 8))
    pos = torch.arange(100, 108)[None]
    base = GPTModel._preprocess(model, ids, pos)
    assert base[1] is None and base[0].shape == (8, 1, 64)
    ours = model._preprocess(ids, pos)
    assert torch.equal(ours[1], model.rotary_angles(pos)) and torch.equal(ours[0], base[0])
    assert len(ours) == len(base)

    # Accommodation 4: megatron-core's own DotProductAttention refuses CP > 1 (so the plugin's
    # core attention must stay in the layer spec).
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.transformer_config import TransformerConfig

    cp2 = TransformerConfig(num_layers=1, hidden_size=64, num_attention_heads=4, context_parallel_size=2,
                            use_cpu_initialization=True)
    with pytest.raises(AssertionError, match="Context parallelism is only supported by TEDotProductAttention"):
        DotProductAttention(cp2, 1, AttnMaskType.causal, "self", pg_collection=rt.pg_collection)

    # Accommodation 7: megatron-core's DDP allocates its gradient buffers on CUDA, so CPU runs reduce
    # with TorchDataParallel. If this stops raising, training/optimizer.py's CPU branch can go.
    if not torch.cuda.is_available():
        from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

        with pytest.raises(AssertionError, match="not compiled with CUDA"):
            DistributedDataParallel(config=model.config, ddp_config=DistributedDataParallelConfig(), module=model,
                                    pg_collection=rt.pg_collection)


def test_megatron_internals_the_model_relies_on():
    run_distributed(_pins, world_size=1)


def test_cuda_allocator_gets_expandable_segments_unless_the_user_chose():
    from megatron_ultralong.parallel import runtime

    env: dict = {}
    assert runtime.configure_cuda_allocator(env) and env == {"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"}
    for name in ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF"):  # the user's setting (either spelling) wins
        env = {name: "max_split_size_mb:512"}
        assert not runtime.configure_cuda_allocator(env) and env == {name: "max_split_size_mb:512"}
    # init_runtime sets it before its first CUDA call (set_device), while the allocator is still unread.
    source = inspect.getsource(runtime.init_runtime)
    assert 0 < source.index("configure_cuda_allocator()") < source.index("torch.cuda.set_device")
