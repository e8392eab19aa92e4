"""Tubelet embedding: a clip (B, 3, T, H, W) -> t-major tokens (B, N, D)."""

from __future__ import annotations

import torch
from torch import nn


class TubeletEmbed(nn.Module):
    """Conv3d with kernel = stride = tubelet (module name ``proj`` as in the release).

    Tokens come out t-major (slot outermost, then rows, then columns), matching
    :func:`stpcore.tubelets.to_tubelets` and the release's positional embedding.

    Args:
        embed_dim: token channels D.
        tubelet: (pt, ph, pw) frames x pixels per token.
        in_chans: input channels (3, RGB).
    """

    def __init__(self, embed_dim: int, tubelet: tuple[int, int, int], in_chans: int = 3) -> None:
        super().__init__()
        self.tubelet = tuple(tubelet)
        self.proj = nn.Conv3d(in_chans, embed_dim, kernel_size=self.tubelet, stride=self.tubelet)

    def forward(self, video: torch.Tensor) -> torch.Tensor:
        """video (B, C, T, H, W) float -> tokens (B, N, D), N = (T/pt)(H/ph)(W/pw), t-major."""
        x = self.proj(video)  # (B, D, T/pt, H/ph, W/pw)
        # Contiguous, so the residual stream that starts here is (B, N, D) in memory too: a transposed view
        # would propagate through every residual add until the first gather, and each LayerNorm and
        # Linear reading it would make a strided copy (about 10% of a CPU inference forward).
        return x.flatten(2).transpose(1, 2).contiguous()  # (B, N, D)
