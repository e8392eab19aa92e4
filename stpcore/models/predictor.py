"""STPrivacy's score predictor (multi-level aggregation of local, frame and video features)."""

from __future__ import annotations

import torch
from torch import nn

from stpcore import ops


class ScorePredictor(nn.Module):
    """Per-token keep/drop log-probabilities (index 0: keep).

    LayerNorm -> Linear(D, D) -> GELU (``in_conv``); channels split in thirds and pooled by
    ``stpcore.ops.predictor_pool`` (own features, masked slot mean, masked video mean, with the
    previous cumulative decision as mask); then Linear(D, D/2) -> GELU -> Linear(D/2, D/4) -> GELU ->
    Linear(D/4, 2) -> LogSoftmax (``out_conv``). Module names equal the release's, so the state dict
    keys are ``in_conv.0/1`` and ``out_conv.0/2/4``.

    Args:
        dim: token channels D, divisible by 12.
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        if dim % 12:
            raise ValueError(f"ScorePredictor: dim={dim} must be divisible by 12")
        # LayerNorm with PyTorch's default eps (1e-5), as in DynamicViT's predictor that the release builds on [G];
        # the eps is not part of the state dict, so either choice loads the release's weights.
        self.in_conv = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim), nn.GELU())
        self.out_conv = nn.Sequential(
            nn.Linear(dim, dim // 2),
            nn.GELU(),
            nn.Linear(dim // 2, dim // 4),
            nn.GELU(),
            nn.Linear(dim // 4, 2),
            nn.LogSoftmax(dim=-1),
        )

    def forward(self, x: torch.Tensor, keep: torch.Tensor, num_slots: int) -> torch.Tensor:
        """Keep/drop log-probabilities of every token.

        Args:
            x: (B, N, D) float tokens, slot-major with N / num_slots tokens per slot.
            keep: (B, N) float in [0, 1], the previous cumulative decision (all ones at stage 1 and
                on gathered sequences); differentiable.
            num_slots: temporal slots in x.

        Returns:
            (B, N, 2) log-probabilities in x's dtype; [..., 0] is "keep".
        """
        h = self.in_conv(x)  # (B, N, D)
        h = ops.predictor_pool(h, keep.to(h.dtype), num_slots)  # (B, N, D)
        return self.out_conv(h)
