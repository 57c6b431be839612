"""GPU attention backends, checked on CPU through stand-ins.

- The CUDA SDPA-op branch of kernels.py runs on meta tensors behind a recorder: the flash
  backward must receive what the dense forward returns for cum_seq_q/k (None), not a defined
  empty tensor (which sends PyTorch's CUDA kernel down its varlen branch).
- flash-attn is replaced by stand-in modules with the two call conventions of the real package
  (Dao-AILab/flash-attention, flash_attn/flash_attn_interface.py): >= 2.7 registers
  `_flash_attn_backward` as a torch.library.custom_op (window left/right ints), 2.6 is a plain
  function taking a window tuple. Their arithmetic is PyTorch's CPU attention ops, so a correct
  binding reproduces F.scaled_dot_product_attention.
"""
from __future__ import annotations

import inspect

import pytest
import torch

from flash_standins import standin_fa26, standin_fa27
from megatron_ultralong.attention import flash_backends, kernels


class _Recorder:
    """Stands in for torch.ops.aten: records each call, then runs the real op (meta kernels)."""

    def __init__(self):
        self.calls: dict[str, tuple] = {}

    def __getattr__(self, name):
        real = getattr(torch.ops.aten, name)

        def call(*args, **kwargs):
            self.calls[name] = args
            return real(*args, **kwargs)

        return call


def test_cuda_flash_backward_gets_the_forwards_undefined_cum_seq(monkeypatch):
    rec = _Recorder()
    monkeypatch.setattr(kernels, "_aten", rec)
    q = torch.randn(1, 4, 16, 8, device="meta", dtype=torch.bfloat16)
    kv = torch.randn(1, 2, 16, 8, device="meta", dtype=torch.bfloat16)
    out, lse = kernels._sdpa_forward(q, kv, kv, 0.3, True)
    dq, dk, dv = kernels._sdpa_backward(out, q, kv, kv, out, lse, 0.3, True)
    fwd = torch.ops.aten._scaled_dot_product_flash_attention(q, q, q, 0.0, True, False, scale=0.3)
    args = rec.calls["_scaled_dot_product_flash_attention_backward"]
    assert args[6] is fwd[2] is None and args[7] is fwd[3] is None  # cum_seq_q, cum_seq_k
    assert (args[8], args[9]) == (16, 16)
    assert dq.shape == q.shape and dk.shape == dv.shape == kv.shape  # GQA grads folded back


def test_cuda_cudnn_path_passes_lse_and_undefined_varlen_args(monkeypatch):
    rec = _Recorder()
    monkeypatch.setattr(kernels, "_aten", rec)
    q = torch.randn(1, 4, 16, 8, device="meta", dtype=torch.bfloat16)
    kv = torch.randn(1, 1, 16, 8, device="meta", dtype=torch.bfloat16)
    out, lse = kernels._cudnn_forward(q, kv, kv, 0.3, False)
    assert lse.shape == (1, 4, 16) and lse.dtype == torch.float32
    dq, dk, dv = kernels._cudnn_backward(out, q, kv, kv, out, lse, 0.3, False)
    args = rec.calls["_scaled_dot_product_cudnn_attention_backward"]
    assert args[8] is None and args[9] is None and args[10] is None  # attn_bias, cum_seq_q, cum_seq_k
    assert args[5].shape == (1, 4, 16, 1)
    assert dk.shape == kv.shape


# --- flash-attn stand-ins (tests/flash_standins.py) ---------------------------------------------

def test_standin_custom_op_hides_its_parameters_like_flash_attn_27():
    # Why keyword binding by inspect.signature cannot work with flash-attn >= 2.7.
    params = inspect.signature(standin_fa27()._flash_attn_backward).parameters
    assert "softmax_lse" not in params


@pytest.mark.parametrize("standin,version", [(standin_fa27, (2, 7, 4)), (standin_fa26, (2, 6, 3))])
def test_flash_attn_binding_matches_sdpa(standin, version):
    binding = flash_backends.bind_flash_attn2(standin(), version)
    ok, reason = kernels.self_check(binding.forward, binding.backward, torch.device("cpu"), torch.float32, tol=1e-4)
    assert ok, reason


def test_wrong_binding_fails_the_self_check_and_auto_skips_it():
    # The 2.6 layout bound as if it were 2.7 (the window tuple split) must not pass.
    wrong = flash_backends.bind_flash_attn2(standin_fa26(), (2, 7, 0))
    ok, reason = kernels.self_check(wrong.forward, wrong.backward, torch.device("cpu"), torch.float32)
    assert not ok and ("AssertionError" in reason or "TypeError" in reason), reason


def test_too_old_flash_attn_is_refused_by_name():
    with pytest.raises(ValueError, match=r"flash-attn 2\.5\.9 is too old"):
        flash_backends.bind_flash_attn2(standin_fa27(), (2, 5, 9))
    assert flash_backends.parse_version("2.7.4.post1") == (2, 7, 4)
    assert flash_backends.parse_version("3.0.0b1+cu124") == (3, 0, 0)


def test_auto_uses_only_a_backend_that_passed(monkeypatch):
    # Two CUDA candidates on a CPU "device": one broken, one correct; auto takes the correct one,
    # and an explicit unavailable backend is refused by name.
    good = flash_backends.bind_flash_attn2(standin_fa27(), (2, 7, 4))
    monkeypatch.setitem(kernels._FORWARD, "fa3", lambda q, k, v, s, c: (torch.zeros_like(q), torch.zeros(q.shape[:-1])))
    monkeypatch.setitem(kernels._BACKWARD, "fa3", good.backward)
    monkeypatch.setitem(kernels._FORWARD, "flash_attn", good.forward)
    monkeypatch.setitem(kernels._BACKWARD, "flash_attn", good.backward)
    monkeypatch.setattr(kernels, "_available", lambda name, q: name in ("fa3", "flash_attn", "sdpa"))
    kernels._auto_choice.cache_clear()
    try:
        assert kernels._auto_choice(torch.device("cpu"), torch.float32) == "flash_attn"
    finally:
        kernels._auto_choice.cache_clear()
    with pytest.raises(ValueError, match=r"attention backend='cudnn' needs CUDA"):
        kernels.select_backend("cudnn", torch.zeros(1, 1, 1, 1))
    assert kernels.select_backend("auto", torch.zeros(1, 1, 1, 1)) == "sdpa"


def test_sdpa_self_check_passes_on_cpu():
    ok, reason = kernels.self_check(kernels._sdpa_forward, kernels._sdpa_backward, torch.device("cpu"), torch.float32,
                                    tol=1e-4)
    assert ok, reason


def test_cuda_fp32_efficient_backward_gets_the_lse_padded_to_32_rows(monkeypatch):
    # The forward returns lse [b, h, ceil(s/32)*32] (kAlignLSE) and the backward reads it in blocks of
    # 32 rows; the merged lse the ring passes back has s rows and must be padded again.
    rec = _Recorder()
    monkeypatch.setattr(kernels, "_aten", rec)
    q = torch.randn(1, 4, 40, 8, device="meta", dtype=torch.float32)
    kv = torch.randn(1, 2, 40, 8, device="meta", dtype=torch.float32)
    out, lse = kernels._sdpa_forward(q, kv, kv, 0.3, True)
    assert lse.shape == (1, 4, 40)
    kernels._sdpa_backward(out, q, kv, kv, out, lse, 0.3, True)
    assert rec.calls["_scaled_dot_product_efficient_attention_backward"][6].shape == (1, 4, 64)
    real = torch.randn(1, 2, 40)
    padded = kernels._pad_lse(real)
    assert padded.shape == (1, 2, 64) and torch.equal(padded[..., :40], real) and bool(padded[..., 40:].isinf().all())
    aligned = torch.randn(1, 2, 64)
    assert kernels._pad_lse(aligned) is aligned
