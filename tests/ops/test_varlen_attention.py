"""The varlen_attention reference: dense attention per packed sequence, and bad input."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from stpcore import ops


def test_varlen_attention_matches_dense_per_sequence_and_handles_empty():
    lengths = torch.tensor([3, 0, 5, 1])
    cu = ops.cu_seqlens(lengths)
    total, H, D = int(lengths.sum()), 2, 4
    q, k, v = (torch.randn(total, H, D) for _ in range(3))
    out = ops.varlen_attention(q, k, v, cu, ops.max_seqlen(cu))
    assert out.shape == (total, H, D)
    for s, e in zip(cu[:-1].tolist(), cu[1:].tolist(), strict=True):
        if e > s:
            dense = F.scaled_dot_product_attention(*(t[s:e].transpose(0, 1) for t in (q, k, v))).transpose(0, 1)
            torch.testing.assert_close(out[s:e], dense)


def test_varlen_attention_bad_input():
    q = torch.randn(5, 2, 4)
    with pytest.raises(ValueError, match="int32"):
        ops.varlen_attention(q, q, q, torch.tensor([0, 5]), 5)
    with pytest.raises(ValueError, match=r"\(total, H, D\)"):
        ops.varlen_attention(q[None], q[None], q[None], torch.tensor([0, 5], dtype=torch.int32), 5)
