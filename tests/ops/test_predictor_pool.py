"""The predictor_pool reference: a hand-computed case, empty slots and videos, gradients, bad input."""

from __future__ import annotations

import pytest
import torch

from stpcore import ops


def test_predictor_pool_hand_computed():
    # B=1, 2 slots x 2 tokens, C=3 (one channel per level).
    x = torch.tensor([[[1.0, 10.0, 100.0], [2.0, 20.0, 200.0], [3.0, 30.0, 300.0], [4.0, 40.0, 400.0]]])
    keep = torch.tensor([[1.0, 0.0, 1.0, 1.0]])
    out = ops.predictor_pool(x, keep, num_slots=2)
    frame = [10.0, 10.0, 35.0, 35.0]  # slot 0: only token 0 kept; slot 1: mean(30, 40)
    video = (100.0 + 300.0 + 400.0) / 3
    expected = torch.tensor([[[1.0, f, video] for f in frame]])
    expected[0, :, 0] = x[0, :, 0]
    torch.testing.assert_close(out, expected)


def test_predictor_pool_empty_slot_and_video_pool_to_zero():
    x = torch.randn(2, 6, 6)
    keep = torch.tensor([[0, 0, 0, 1, 1, 1], [0, 0, 0, 0, 0, 0]], dtype=torch.float32)
    out = ops.predictor_pool(x, keep, num_slots=2)
    assert torch.isfinite(out).all()
    assert (out[0, :3, 2:4] == 0).all()  # empty slot 0 of video 0
    assert (out[1, :, 2:] == 0).all()  # nothing kept in video 1


def test_predictor_pool_fp16_empty_slot_has_a_finite_gradient_of_x():
    """fp16 with a slot where nothing is kept: the reference pools in fp32, as the kernel accumulates (in fp16 a
    guard of 1e-6 squared underflowed, and the empty slot's backward was 0/0 = NaN in x's gradient)."""
    x = torch.randn(1, 4, 6, generator=torch.Generator().manual_seed(0)).half().requires_grad_()
    keep = torch.tensor([[1.0, 1.0, 0.0, 0.0]])  # slot 1: nothing kept
    out = ops.predictor_pool(x, keep, 2, backend="reference")
    assert out.dtype == torch.float16
    out.float().sum().backward()
    assert torch.isfinite(x.grad).all(), x.grad
    x32 = x.detach().float().requires_grad_()
    ops.predictor_pool(x32, keep, 2, backend="reference").sum().backward()
    torch.testing.assert_close(x.grad.float(), x32.grad, rtol=1e-3, atol=1e-3)


def test_an_empty_slots_keep_gradient_is_the_mean_with_the_token_alone_kept():
    """The sums of the weights are clamped to 1, not 1e-6: for 0/1 weights no mean changes, and keeping token m of an
    empty slot moves the slot's pool from 0 to x_m, which is its gradient (it was a million times that)."""
    x = torch.randn(1, 4, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    keep = torch.tensor([[1.0, 1.0, 0.0, 0.0]], dtype=torch.float64, requires_grad=True)  # slot 1 empty
    out = ops.predictor_pool(x, keep, 2, backend="reference")
    frame_of_slot1 = out[0, 2:, 1].sum()  # the frame channel of slot 1's two tokens
    (grad,) = torch.autograd.grad(frame_of_slot1, keep)
    torch.testing.assert_close(grad[0, 2:], 2 * x[0, 2:, 1])
    for token in (2, 3):  # the secant: keeping the token alone
        alone = keep.detach().clone()
        alone[0, token] = 1.0
        moved = ops.predictor_pool(x, alone, 2, backend="reference")[0, 2:, 1].sum() - frame_of_slot1
        torch.testing.assert_close(moved, grad[0, token])
    soft = torch.tensor([[0.5, 0.25, 1.0, 1.0]], dtype=torch.float64)  # slot 0's weights sum below 1: their sum
    torch.testing.assert_close(ops.predictor_pool(x, soft, 2)[0, 0, 1], 0.5 * x[0, 0, 1] + 0.25 * x[0, 1, 1])


def test_predictor_pool_gradcheck():
    x = torch.randn(2, 6, 6, dtype=torch.float64, requires_grad=True)
    keep = torch.rand(2, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: ops.predictor_pool(a, b, 3), (x, keep))


def test_predictor_pool_bad_input():
    with pytest.raises(ValueError, match="divisible by 3"):
        ops.predictor_pool(torch.zeros(1, 4, 4), torch.ones(1, 4), 2)
    with pytest.raises(ValueError, match="multiple of num_slots"):
        ops.predictor_pool(torch.zeros(1, 5, 3), torch.ones(1, 5), 2)
