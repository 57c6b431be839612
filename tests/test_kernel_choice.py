"""What "auto" resolves to does not depend on where it is first resolved.

The CP attention resolves its kernel inside an autograd Function's forward (grad off) and
evaluation under torch.no_grad(); the backends' self-check compares against an autograd reference,
which must run with grad enabled there too, or every accelerated backend "fails" and the cached
answer pins "sdpa" for the whole process. The accelerated backend here is the flash-attn 2.8.3
stand-in (tests/flash_standins.py, the real call conventions) made eligible on CPU fp32.
"""
from __future__ import annotations

import pytest
import torch

from flash_standins import standin_fa27
from megatron_ultralong.attention import flash_backends, kernels
from megatron_ultralong.attention.ring import ring_attention

CPU = torch.device("cpu")


class _Group:
    """A one-rank CP group: the ring then never communicates."""

    def size(self) -> int:
        return 1

    def rank(self) -> int:
        return 0


def test_sdpa_self_check_passes_under_no_grad():
    with torch.no_grad():
        ok, reason = kernels.self_check(kernels._sdpa_forward, kernels._sdpa_backward, CPU, torch.float32, tol=1e-4)
    assert ok, reason


def test_sdpa_self_check_passes_inside_an_autograd_function_forward():
    results = []

    class Probe(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            assert not torch.is_grad_enabled()  # what RingAttnFunc.forward sees
            results.append(kernels.self_check(kernels._sdpa_forward, kernels._sdpa_backward, CPU, torch.float32,
                                              tol=1e-4))
            return x.clone()

        @staticmethod
        def backward(ctx, g):
            return g

    Probe.apply(torch.zeros(2, requires_grad=True))
    assert results[0] == (True, "ok")


@pytest.fixture
def stub_flash(monkeypatch):
    """flash-attn 2.8.3 stand-in as the only accelerated backend, eligible on CPU; counts forwards."""
    binding = flash_backends.bind_flash_attn2(standin_fa27(), (2, 8, 3))
    calls = {"forward": 0, "backward": 0}

    def forward(*args):
        calls["forward"] += 1
        return binding.forward(*args)

    def backward(*args):
        calls["backward"] += 1
        return binding.backward(*args)

    monkeypatch.setitem(kernels._FORWARD, "flash_attn", forward)
    monkeypatch.setitem(kernels._BACKWARD, "flash_attn", backward)
    monkeypatch.setattr(kernels, "_available", lambda name, q: name in ("sdpa", "flash_attn"))
    monkeypatch.setattr(kernels, "_auto_eligible", lambda q: True)
    kernels._auto_choice.cache_clear()
    yield calls
    kernels._auto_choice.cache_clear()


def test_auto_inside_a_function_forward_equals_top_level(stub_flash):
    seen = []

    class Resolve(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            seen.append(kernels.select_backend("auto", x))
            return x.clone()

        @staticmethod
        def backward(ctx, g):
            return g

    Resolve.apply(torch.zeros(1, 1, 1, 1, requires_grad=True))  # first resolution: inside, grad off
    kernels._auto_choice.cache_clear()
    top = kernels.select_backend("auto", torch.zeros(1, 1, 1, 1))
    assert seen == [top] == ["flash_attn"]


def _qkv(requires_grad: bool):
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, 4, 64, 32, generator=gen).requires_grad_(requires_grad)
    k, v = (torch.randn(1, 2, 64, 32, generator=gen).requires_grad_(requires_grad) for _ in range(2))
    return q, k, v


def test_auto_picks_the_accelerated_kernel_in_training_and_evaluation(stub_flash):
    docs = ((0, 20, 64),)  # a document mask: the ring path even at one rank
    # Training: the first resolution happens inside RingAttnFunc.forward.
    q, k, v = _qkv(True)
    ring_attention(q, k, v, _Group(), 32 ** -0.5, True, docs, "auto").sum().backward()
    assert stub_flash["forward"] > 0 and stub_flash["backward"] > 0
    # Evaluation: a fresh process-wide cache, first resolved under no_grad.
    kernels._auto_choice.cache_clear()
    before = stub_flash["forward"]
    with torch.no_grad():
        ring_attention(*_qkv(False), _Group(), 32 ** -0.5, True, docs, "auto")
        kernels.block_forward(*_qkv(False), 32 ** -0.5, False, "auto")
    assert stub_flash["forward"] > before
    assert kernels._auto_choice(CPU, torch.float32) == "flash_attn"
