"""slot_topk, gather/scatter and pack/unpack references."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from stpcore import ops


def test_slot_topk_hand_computed():
    scores = torch.tensor([[0.1, 0.9, 0.5, 0.3, 0.8, 0.7]])  # 2 slots of 3
    idx = ops.slot_topk(scores, num_slots=2, k=2)
    assert idx.tolist() == [[1, 2, 4, 5]]
    assert idx.dtype == torch.int64


def test_slot_topk_paper_counts():
    scores = torch.randn(3, 392)
    idx = ops.slot_topk(scores, 8, 34)
    assert idx.shape == (3, 272)
    slots = idx // 49
    assert (torch.bincount(slots[0], minlength=8) == 34).all()
    assert (idx[:, 1:] > idx[:, :-1]).all()  # ascending
    # Stage 2 on the gathered sequence: 8 slots of 34, keep 24.
    idx2 = ops.slot_topk(torch.randn(3, 272), 8, 24)
    assert idx2.shape == (3, 192)


@pytest.mark.parametrize("k", [0, 4])
def test_slot_topk_bad_k(k):
    with pytest.raises(ValueError, match="k must be"):
        ops.slot_topk(torch.zeros(1, 6), 2, k)


def test_gather_scatter_hand_computed():
    x = torch.arange(12.0).reshape(1, 4, 3)
    idx = torch.tensor([[1, 3]])
    kept = ops.gather_tokens(x, idx)
    assert kept.tolist() == [[[3.0, 4.0, 5.0], [9.0, 10.0, 11.0]]]
    back = ops.scatter_tokens(kept, idx, 4)
    assert back.tolist() == [[[0.0] * 3, [3.0, 4.0, 5.0], [0.0] * 3, [9.0, 10.0, 11.0]]]


def test_slot_topk_gather_equals_parts():
    s, x = torch.randn(2, 12), torch.randn(2, 12, 5)
    idx, kept = ops.slot_topk_gather(s, x, 3, 2)
    assert torch.equal(idx, ops.slot_topk(s, 3, 2))
    assert torch.equal(kept, ops.gather_tokens(x, idx))


def test_gather_scatter_gradients():
    x = torch.randn(2, 6, 3, dtype=torch.float64, requires_grad=True)
    idx = torch.tensor([[0, 2, 5], [1, 3, 4]])
    assert torch.autograd.gradcheck(lambda a: ops.gather_tokens(a, idx), (x,))
    y = torch.randn(2, 3, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a: ops.scatter_tokens(a, idx, 6), (y,))


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 4), st.integers(1, 30), st.integers(1, 5), st.integers(0, 2**16))
def test_pack_unpack_round_trip(B, N, C, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, N, C, generator=g)
    keep = torch.rand(B, N, generator=g) < 0.5
    packed = ops.pack(x, keep)
    lengths = keep.sum(1)
    assert packed.cu_seqlens.dtype == torch.int32
    assert packed.cu_seqlens.tolist() == [0, *lengths.cumsum(0).tolist()]
    assert packed.max_seqlen == int(lengths.max())
    assert torch.equal(ops.unpack(packed.values, packed.indices, B, N), x * keep.unsqueeze(-1))
    assert torch.equal(packed.values, x[keep])  # video-major, original order
    assert torch.equal(ops.seq_ids(packed.cu_seqlens, packed.values.shape[0]), packed.indices // N)


@settings(max_examples=20, deadline=None)
@given(st.integers(1, 4), st.integers(1, 8), st.integers(1, 10), st.integers(0, 2**16))
def test_gather_then_scatter_keeps_exactly_the_kept_rows(B, S, per_slot, seed):
    g = torch.Generator().manual_seed(seed)
    k = int(torch.randint(1, per_slot + 1, (1,), generator=g))
    x = torch.randn(B, S * per_slot, 3, generator=g)
    scores = torch.randn(B, S * per_slot, generator=g)
    idx = ops.slot_topk(scores, S, k)
    back = ops.scatter_tokens(ops.gather_tokens(x, idx), idx, S * per_slot)
    mask = torch.zeros(B, S * per_slot, dtype=torch.bool).scatter_(1, idx, True)
    assert torch.equal(back, x * mask.unsqueeze(-1))
    # every kept score beats every dropped score of its slot
    sc = scores.reshape(B, S, per_slot)
    m = mask.reshape(B, S, per_slot)
    low_kept = sc.masked_fill(~m, float("inf")).amin(-1)
    high_drop = sc.masked_fill(m, float("-inf")).amax(-1)
    assert (low_kept >= high_drop).all()
