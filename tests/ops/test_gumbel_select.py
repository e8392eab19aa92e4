"""The gumbel_select reference: hand-computed cases, the straight-through gradient, seeded statistics."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from stpcore import ops


def test_gumbel_select_hand_computed_with_injected_noise():
    # log p(keep) = log 0.6 vs log p(drop) = log 0.4; noise decides the argmax.
    lp = torch.log(torch.tensor([[[0.6, 0.4], [0.6, 0.4], [0.6, 0.4]]]))
    noise = torch.tensor([[[0.0, 0.0], [0.0, 1.0], [0.5, 0.0]]])
    prev = torch.tensor([[1.0, 1.0, 0.0]])
    keep = ops.gumbel_select(lp, prev, noise=noise)
    # token 0: 0.6 > 0.4 keep; token 1: log .4 + 1 > log .6 drop; token 2: keep but previously dropped.
    assert keep.tolist() == [[1.0, 0.0, 0.0]]


def test_gumbel_select_soft_matches_softmax_and_tau():
    lp = torch.log_softmax(torch.randn(2, 5, 2), dim=-1)
    noise = torch.zeros(2, 5, 2)
    prev = torch.ones(2, 5)
    soft = ops.gumbel_select(lp, prev, noise=noise, hard=False, tau=2.0)
    torch.testing.assert_close(soft, (lp / 2.0).softmax(-1)[..., 0])


def test_gumbel_select_straight_through_gradient_is_softmax_gradient():
    lp = torch.log_softmax(torch.randn(1, 4, 2, dtype=torch.float64), dim=-1).requires_grad_()
    prev = torch.ones(1, 4, dtype=torch.float64, requires_grad=True)
    noise = torch.zeros(1, 4, 2, dtype=torch.float64)
    keep = ops.gumbel_select(lp, prev, noise=noise)
    keep.sum().backward()
    y = lp.detach().softmax(-1)
    expected = torch.stack([y[..., 0] * y[..., 1], -y[..., 0] * y[..., 1]], dim=-1)  # d y0 / d logits
    torch.testing.assert_close(lp.grad, expected)
    torch.testing.assert_close(prev.grad, keep.detach())  # d(keep)/d(prev) = the hard value


def test_gumbel_select_seeded_is_deterministic_and_frequency_matches_softmax():
    n = 20000
    p_keep = torch.tensor([0.1, 0.5, 0.8])
    lp = torch.log(torch.stack([p_keep, 1 - p_keep], dim=-1)).reshape(1, 3, 2).expand(n, 3, 2).contiguous()
    prev = torch.ones(n, 3)
    a = ops.gumbel_select(lp, prev, generator=torch.Generator().manual_seed(7))
    b = ops.gumbel_select(lp, prev, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a, b)
    freq = a.mean(dim=0)
    bound = 5 * torch.sqrt(p_keep * (1 - p_keep) / n)  # 5 binomial standard deviations
    assert ((freq - p_keep).abs() <= bound).all(), (freq, p_keep, bound)


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 3), st.integers(1, 40), st.floats(0.2, 3.0), st.integers(0, 2**16))
def test_hard_decisions_exactly_binary_and_never_revive(B, N, tau, seed):
    g = torch.Generator().manual_seed(seed)
    lp = torch.log_softmax(torch.randn(B, N, 2, generator=g) * 3, dim=-1).requires_grad_()
    prev = (torch.rand(B, N, generator=g) < 0.6).float()
    keep = ops.gumbel_select(lp, prev, tau=tau, generator=g)
    assert set(keep.detach().unique().tolist()) <= {0.0, 1.0}
    assert (keep.detach() <= prev).all()


def test_gumbel_select_bad_input():
    with pytest.raises(ValueError, match="log_probs must be"):
        ops.gumbel_select(torch.zeros(2, 3), torch.ones(2, 3))
    with pytest.raises(ValueError, match="prev_keep must be"):
        ops.gumbel_select(torch.zeros(2, 3, 2), torch.ones(2, 4))
    with pytest.raises(ValueError, match="tau"):
        ops.gumbel_select(torch.zeros(2, 3, 2), torch.ones(2, 3), tau=0.0)


def test_sample_gumbel_half_precision_is_drawn_in_fp32():
    """fp16 noise is fp32 noise rounded: drawn in fp16, an Exp(1) draw below ~3e-8 rounded to 0 (3 in 1e8) and its
    sample was +inf, a NaN keep decision."""
    for dtype in (torch.float16, torch.bfloat16):
        low = ops.sample_gumbel((4096,), generator=torch.Generator().manual_seed(3), dtype=dtype)
        full = ops.sample_gumbel((4096,), generator=torch.Generator().manual_seed(3), dtype=torch.float32)
        assert low.dtype == dtype and torch.equal(low, full.to(dtype))


def test_gumbel_select_backward_on_an_empty_batch():
    """B = 0: the backward's (empty) gradients may not alias its inputs (a custom-op rule; it raised)."""
    log_probs = torch.randn(0, 6, 2).log_softmax(-1).requires_grad_()
    prev = torch.ones(0, 6, requires_grad=True)
    keep = ops.gumbel_select(log_probs, prev, noise=torch.zeros(0, 6, 2))
    keep.sum().backward()
    assert log_probs.grad.shape == (0, 6, 2) and prev.grad.shape == (0, 6)


def test_sample_gumbel_moments():
    x = ops.sample_gumbel((200000,), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert torch.isfinite(x).all()
    assert abs(x.mean().item() - 0.5772156649) < 0.01  # Euler-Mascheroni
    assert abs(x.var().item() - math.pi**2 / 6) < 0.03
