"""STPrivacy's losses (docs/method.md).

The sparsity target of stage m is keep_ratio ** m (cumulative, 0.7 ** m) [P].

[G] choices, fixed here (the training config weighs the losses but does not change these reductions):
- the kept fraction is measured per video and per temporal slot, squared against the target, then
  averaged over videos, slots and stages (DynamicViT's ratio loss, per slot as the paper says); the
  spec's "mean kept fraction" could also be read as a batch mean taken before squaring;
- the privacy loss is the mean binary cross-entropy over the 5 attributes and the batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def sparsity_loss(decisions: list[torch.Tensor], keep_ratio: float, num_slots: int) -> torch.Tensor:
    """Mean over stages m and slots l of (kept fraction of slot l after stage m - keep_ratio ** m) ** 2.

    Args:
        decisions: one (B, N) cumulative keep mask per stage (differentiable, straight-through), N slot-major.
        keep_ratio: alpha per stage (0.7).
        num_slots: temporal slots (8).

    Returns:
        scalar.
    """
    if not decisions:
        raise ValueError("sparsity_loss: decisions is empty; the model has no sparsification stage")
    losses = []
    for m, keep in enumerate(decisions, start=1):
        B, N = keep.shape
        frac = keep.reshape(B, num_slots, N // num_slots).float().mean(dim=-1)  # (B, S)
        losses.append((frac - keep_ratio**m).pow(2).mean())
    return torch.stack(losses).mean()


def action_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of (B, C) logits against (B,) int64 labels."""
    return F.cross_entropy(logits.float(), labels)


def privacy_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean binary cross-entropy of (B, 5) logits against (B, 5) 0/1 labels (sigmoid inside, fp32)."""
    return F.binary_cross_entropy_with_logits(logits.float(), labels.float())


def masked_privacy_loss(logits: torch.Tensor, labels: torch.Tensor, has: torch.Tensor) -> torch.Tensor:
    """Mean BCE over the clips that carry privacy labels (0 when none does), without a host sync.

    Args:
        logits: (B, 5) float.
        labels: (B, 5) 0/1 float (anything where ``has`` is False).
        has: (B,) bool, which clips have privacy labels.

    Returns:
        scalar float32; equals ``privacy_loss(logits[has], labels[has])`` when any clip has labels.
    """
    per_clip = F.binary_cross_entropy_with_logits(logits.float(), labels.float(), reduction="none").mean(-1)  # (B,)
    return _mean_over(per_clip, has)


def masked_privacy_entropy(logits: torch.Tensor, has: torch.Tensor) -> torch.Tensor:
    """Mean binary entropy (nats, at most ln 2) of the privacy predictions over the clips with labels.

    The anonymizer's alternative privacy term (``TrainConfig.privacy_objective="entropy"``): maximising it
    drives the recognizer towards p = 0.5 on every attribute, where maximising BCE can also be met by making
    the recognizer confidently wrong, which keeps the attribute in the video in a flipped form.

    Args:
        logits: (B, 5) float.
        has: (B,) bool, which clips have privacy labels.
    """
    logits = logits.float()
    per_clip = F.binary_cross_entropy_with_logits(logits, torch.sigmoid(logits), reduction="none").mean(-1)
    return _mean_over(per_clip, has)


def _mean_over(per_clip: torch.Tensor, has: torch.Tensor) -> torch.Tensor:
    """Mean of (B,) per-clip values over the clips where ``has`` is True (0 when none is), with no host sync."""
    weight = has.to(per_clip.dtype)
    return (per_clip * weight).sum() / weight.sum().clamp_min(1.0)


def anonymizer_loss(
    sparsity: torch.Tensor,
    action: torch.Tensor,
    privacy: torch.Tensor,
    *,
    action_weight: float = 0.5,
    privacy_weight: float = 0.5,
) -> torch.Tensor:
    """Phase 2, STPrivacy's side: sparsity + w_a CE(action) - w_p BCE(privacy) (the paper's 0.5 / 0.5)."""
    return sparsity + action_weight * action - privacy_weight * privacy
