"""The transformer's position-wise feed-forward network."""

from __future__ import annotations

import torch
from torch import nn


class Mlp(nn.Module):
    """Linear -> GELU -> Linear (timm's ``Mlp``; module names ``fc1`` / ``fc2`` as in the release).

    Args:
        dim: input and output channels.
        hidden_dim: hidden channels (dim * mlp_ratio in the backbone).
    """

    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., dim) float -> (..., dim) same dtype."""
        return self.fc2(self.act(self.fc1(x)))
