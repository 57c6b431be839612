"""FlashAttention-3 (hopper/flash_attn_interface.py) bound by signature, per released interface.

`flash_attn_func` has no `return_attn_probs` at v2.7.4.post1, v2.8.0 and v2.8.3 (passing it raises
TypeError) and returns only `out` from commit ed209409 (2025-07-11) until 203b9b3d (2025-08-29)
added the parameter. Every stand-in (tests/flash_standins.py) must bind to a forward/backward that
matches PyTorch's attention, and its varlen function to one that returns only `out`.
"""
from __future__ import annotations

import pytest
import torch

from flash_standins import FA3_TAGS, standin_fa3, varlen_math
from megatron_ultralong.attention import flash_backends, kernels


@pytest.mark.parametrize("tag", FA3_TAGS)
def test_fa3_binding_matches_sdpa(tag):
    binding = flash_backends.bind_fa3(standin_fa3(tag), (3, 0, 0))
    ok, reason = kernels.self_check(binding.forward, binding.backward, torch.device("cpu"), torch.float32, tol=1e-4)
    assert ok, reason


@pytest.mark.parametrize("tag", FA3_TAGS)
def test_fa3_varlen_returns_out(tag):
    binding = flash_backends.bind_fa3(standin_fa3(tag), (3, 0, 0))
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(24, 4, 16, generator=gen)
    k, v = torch.randn(24, 2, 16, generator=gen), torch.randn(24, 2, 16, generator=gen)
    cu = torch.tensor([0, 10, 24], dtype=torch.int32)
    out = binding.varlen(q, k, v, cu, 14, 0.25, True)
    assert torch.equal(out, varlen_math(q, k, v, cu, 0.25, True))


def test_fa3_without_an_inspectable_private_forward_is_refused():
    # A build whose public function has no return_attn_probs and whose private forward hides its
    # parameters cannot be bound by keyword: refused at bind time (load_binding logs it, "auto" skips it).
    module = standin_fa3("v2.8.3")
    module._flash_attn_forward = lambda *args, **kwargs: None
    with pytest.raises(ValueError, match="no inspectable signature"):
        flash_backends.bind_fa3(module, (3, 0, 0))
