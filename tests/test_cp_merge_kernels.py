"""The log-sum-exp merge, the block kernels and the segment builder, against dense float64 math."""
from __future__ import annotations

import pytest
import torch
from cp_reference import dense_mask, reference_attention, reference_lse

from megatron_ultralong.attention.kernels import (
    attention_backward_into,
    attention_forward_into,
    block_backward,
    block_forward,
)
from megatron_ultralong.attention.segments import Segment, build_segments, parse_cu_seqlens
from megatron_ultralong.attention.softmax_merge import empty_accumulator, merge_attention, merge_attention_


def _partial(q, k, v, scale, mask=None):
    """Dense partial attention of q over (k, v) in float64: (out, lse); mask [sq, sk] True = visible."""
    scores = torch.einsum("bhqd,bhkd->bhqk", q.double(), k.double()) * scale
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(scores, -1)
    probs = torch.exp(scores - torch.where(torch.isinf(lse), 0, lse)[..., None])
    return probs @ v.double(), lse


def test_merge_equals_softmax_over_all_keys():
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 3, 5, 8), torch.randn(2, 3, 12, 8), torch.randn(2, 3, 12, 8)
    k[..., 7:, :] *= 6  # very different score ranges per block: exercises the max-free form
    parts = [_partial(q, k[:, :, a:b], v[:, :, a:b], 0.5) for a, b in ((0, 3), (3, 7), (7, 12))]
    out, lse = merge_attention([p[0].float() for p in parts], [p[1].float() for p in parts])
    want_out, want_lse = _partial(q, k, v, 0.5)
    torch.testing.assert_close(out.double(), want_out, atol=1e-5, rtol=0)
    torch.testing.assert_close(lse.double(), want_lse, atol=1e-5, rtol=0)


def test_merge_handles_rows_without_keys():
    # Row 0 sees no key in block A, row 1 none in block B, row 2 none anywhere.
    out, lse = empty_accumulator(torch.zeros(1, 1, 3, 2))
    a_out = torch.tensor([[[[0.0, 0.0], [1.0, 2.0], [0.0, 0.0]]]])
    a_lse = torch.tensor([[[float("-inf"), 0.5, float("-inf")]]])
    b_out = torch.tensor([[[[3.0, 4.0], [0.0, 0.0], [0.0, 0.0]]]])
    b_lse = torch.tensor([[[1.0, float("-inf"), float("-inf")]]])
    merge_attention_(out, lse, a_out, a_lse)
    merge_attention_(out, lse, b_out, b_lse)
    assert torch.equal(out[0, 0], torch.tensor([[3.0, 4.0], [1.0, 2.0], [0.0, 0.0]]))
    assert lse[0, 0, :2].tolist() == [1.0, 0.5] and torch.isneginf(lse[0, 0, 2])


@pytest.mark.parametrize("heads, kv_heads, causal", [(4, 4, True), (4, 2, False), (6, 2, True)])
def test_block_forward_backward_against_dense(heads, kv_heads, causal):
    torch.manual_seed(1)
    q = torch.randn(2, heads, 6, 16, requires_grad=True)
    k = torch.randn(2, kv_heads, 6, 16, requires_grad=True)
    v = torch.randn(2, kv_heads, 6, 16, requires_grad=True)
    out, lse = block_forward(q, k, v, 0.3, causal)
    ref = reference_attention(q, k, v, 0.3, causal)
    mask = dense_mask(6, 1, causal, None)[0]
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(lse.double(), reference_lse(q, k, 0.3, mask), atol=1e-5, rtol=0)
    dout = torch.randn_like(out)
    ref.backward(dout.double())
    dq, dk, dv = block_backward(dout, q.detach(), k.detach(), v.detach(), out, lse, 0.3, causal)
    for got, want in ((dq, q.grad), (dk, k.grad), (dv, v.grad)):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_causal_block_must_be_square():
    q = torch.randn(1, 1, 4, 8)
    with pytest.raises(ValueError, match="square"):
        block_forward(q, q[:, :, :3], q[:, :, :3], 1.0, True)


def test_segments_skip_masked_pairs_and_cut_documents():
    # Queries at chunk (8,12) and (20,24); keys at chunks (4,8) and (24,28): the first key chunk is
    # fully visible to both query chunks (coalesced into one segment), the second to neither.
    segs = build_segments([(8, 12), (20, 24)], [(4, 8), (24, 28)], causal=True)
    assert segs == [Segment(None, 0, 8, 0, 4, False)]
    assert build_segments([(0, 4)], [(0, 4)], causal=True) == [Segment(None, 0, 4, 0, 4, True)]
    # With documents starting at 0, 6, 10 (S=12): keys (4,8) meet docs 0 and 1.
    segs = build_segments([(8, 12)], [(4, 8)], causal=True, docs=((0, 6, 10, 12),))
    assert segs == [Segment(0, 0, 2, 2, 4, False)]


def test_own_zigzag_block_is_one_causal_call_equal_to_dense():
    # Ring step 0 of rank 1 at cp=4 (chunks 1 and 6 of 8, c=4): one causal segment over both chunks,
    # and attending with it equals dense attention under the exact global causal mask.
    ranges = [(4, 8), (24, 28)]
    segs = build_segments(ranges, ranges, causal=True)
    assert segs == [Segment(None, 0, 8, 0, 8, True)]
    assert len(build_segments(ranges, ranges, causal=True, docs=((0, 32),))) == 3  # documents: cut as before
    torch.manual_seed(3)
    q, k, v = torch.randn(1, 4, 8, 16), torch.randn(1, 2, 8, 16), torch.randn(1, 2, 8, 16)
    out, lse = empty_accumulator(q)
    attention_forward_into(out, lse, q, k, v, segs, 0.25)
    pos = torch.tensor([4, 5, 6, 7, 24, 25, 26, 27])
    mask = pos[None, :] <= pos[:, None]
    want, want_lse = _partial(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), 0.25, mask)
    torch.testing.assert_close(out.double(), want, atol=1e-5, rtol=0)
    torch.testing.assert_close(lse.double(), want_lse, atol=1e-5, rtol=0)


def test_segments_with_documents_equal_dense_masked_attention():
    torch.manual_seed(2)
    seq, docs = 16, ((0, 3, 9, 16), (0, 1, 16))
    cu = torch.tensor([0, 3, 9, 16, 17, 32])
    assert parse_cu_seqlens(cu, batch=2, seq_len=seq) == docs
    q, k, v = torch.randn(2, 2, seq, 8), torch.randn(2, 1, seq, 8), torch.randn(2, 1, seq, 8)
    # Local query rows = chunks (4,8)+(8,12) as two ranges, keys = four chunks: exercises merging.
    q_ranges, k_ranges = [(4, 8), (8, 12)], [(0, 4), (4, 8), (8, 12), (12, 16)]
    segs = build_segments(q_ranges, k_ranges, causal=True, docs=docs)
    out, lse = empty_accumulator(q[:, :, 4:12])
    attention_forward_into(out, lse, q[:, :, 4:12], k, v, segs, 0.4)
    qr = q[:, :, 4:12].clone().requires_grad_()
    kr, vr = k.clone().requires_grad_(), v.clone().requires_grad_()
    mask = dense_mask(seq, 2, True, docs)[:, None, 4:12]  # [b, 1, 8, 16]
    rep = 2
    scores = torch.einsum("bhqd,bhkd->bhqk", qr.double(), kr.double().repeat_interleave(rep, 1)) * 0.4
    ref = torch.softmax(scores.masked_fill(~mask, float("-inf")), -1) @ vr.double().repeat_interleave(rep, 1)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=0)
    dout = torch.randn(out.shape)
    ref.backward(dout.double())
    dq, dk, dv = torch.zeros(out.shape), torch.zeros(k.shape), torch.zeros(v.shape)
    attention_backward_into(dq, dk, dv, dout, q[:, :, 4:12], k, v, out, lse, segs, 0.4)
    for got, want in ((dq, qr.grad), (dk, kr.grad), (dv, vr.grad)):
        torch.testing.assert_close(got.double(), want.double(), atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    "cu, message",
    [
        (torch.tensor([0, 5, 30]), "end at batch\\*seq_len"),
        (torch.tensor([0, 5, 5, 32]), "strictly increasing"),
        (torch.tensor([0, 5, 20, 32]), "sample start 16"),
    ],
)
def test_bad_cu_seqlens_is_rejected(cu, message):
    with pytest.raises(ValueError, match=message):
        parse_cu_seqlens(cu, batch=2, seq_len=16)


def test_document_boundaries_read_once_per_step(monkeypatch):
    # Every layer gets the same cu_seqlens in a step: one device->host read, not one per layer.
    from megatron_ultralong.attention import segments

    calls = []
    real = segments.parse_cu_seqlens
    monkeypatch.setattr(segments, "parse_cu_seqlens", lambda *a: calls.append(1) or real(*a))
    cu = torch.tensor([0, 3, 16, 32], dtype=torch.int32)
    for _layer in range(4):
        assert segments.document_boundaries(cu, cu, 2, 16) == ((0, 3, 16), (0, 16))
    assert len(calls) == 1
    cu[1] = 5  # modified in place (next step reusing the buffer): read again
    assert segments.document_boundaries(cu, cu, 2, 16) == ((0, 5, 16), (0, 16))
    assert len(calls) == 2
    with pytest.raises(ValueError, match="cu_seqlens_kv differs"):
        segments.document_boundaries(cu.clone(), torch.tensor([0, 4, 16, 32]), 2, 16)
