from __future__ import annotations

import math

import pytest
import torch

from stpcore import losses


def test_sparsity_loss_hand_computed():
    # 1 video, 2 slots of 4 tokens, 2 stages. Targets 0.5 and 0.25.
    d1 = torch.tensor([[1.0, 1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0]])  # fractions 0.5, 1.0
    d2 = torch.tensor([[1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]])  # fractions 0.25, 0.0
    expected = ((0.0**2 + 0.5**2) / 2 + (0.0**2 + 0.25**2) / 2) / 2
    assert losses.sparsity_loss([d1, d2], 0.5, 2).item() == pytest.approx(expected)


def test_sparsity_loss_zero_at_target_and_differentiable():
    d = torch.tensor([[1.0, 1.0, 1.0, 0.0]], requires_grad=True)
    loss = losses.sparsity_loss([d], 0.75, 1)
    assert loss.item() == pytest.approx(0.0)
    loss2 = losses.sparsity_loss([d * 0.5], 0.75, 1)
    loss2.backward()
    assert (d.grad < 0).all()  # keeping more moves toward the target


def test_anonymizer_loss_signs():
    s, a, p = torch.tensor(0.1), torch.tensor(2.0), torch.tensor(0.7)
    assert losses.anonymizer_loss(s, a, p).item() == pytest.approx(0.1 + 1.0 - 0.35)


def test_privacy_and_action_losses():
    logits = torch.zeros(2, 5)
    assert losses.privacy_loss(logits, torch.ones(2, 5)).item() == pytest.approx(0.6931, abs=1e-4)
    assert losses.action_loss(torch.zeros(3, 4), torch.tensor([0, 1, 2])).item() == pytest.approx(1.3863, abs=1e-4)


def test_sparsity_loss_empty_raises():
    with pytest.raises(ValueError, match="empty"):
        losses.sparsity_loss([], 0.7, 8)


def test_masked_privacy_entropy_is_the_binary_entropy_of_labelled_clips():
    logits = torch.tensor([[0.0, 2.0, -1.0, 3.0, 0.5], [4.0, 4.0, 4.0, 4.0, 4.0], [-0.3, 0.1, 0.0, 1.0, -2.0]],
                          requires_grad=True)
    has = torch.tensor([True, False, True])
    p = torch.sigmoid(logits.detach().double())
    entropy = -(p * p.log() + (1 - p) * (1 - p).log())  # (3, 5) nats
    expected = entropy[[0, 2]].mean()
    value = losses.masked_privacy_entropy(logits, has)
    assert value.item() == pytest.approx(expected.item(), rel=1e-6)
    value.backward()
    assert torch.all(logits.grad[1] == 0)  # the unlabelled clip contributes nothing
    # dH/dx = -x p (1 - p): zero at x = 0 (the maximum, ln 2), pulling every other logit towards 0.
    x = logits.detach().double()
    expected_grad = -x * p * (1 - p) / 10  # mean over 2 clips x 5 attributes
    assert torch.allclose(logits.grad[[0, 2]].double(), expected_grad[[0, 2]], atol=1e-6)
    assert losses.masked_privacy_entropy(torch.zeros(2, 5), torch.ones(2, dtype=torch.bool)).item() == \
        pytest.approx(math.log(2))
    assert losses.masked_privacy_entropy(logits, torch.zeros(3, dtype=torch.bool)).item() == 0.0
