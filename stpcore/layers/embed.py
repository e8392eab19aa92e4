"""Tubelet embedding: a clip (B, 3, T, H, W) -> t-major tokens (B, N, D)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
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
        """video (B, C, T, H, W) float -> tokens (B, N, D), N = (T/pt)(H/ph)(W/pw), t-major.

        A convolution whose kernel equals its stride is a matmul over non-overlapping patches; written as
        one (the Conv3d weight viewed as (D, C*pt*ph*pw)) it is several times faster on CPU, in the
        backward most of all (mkldnn's conv3d backward dominated a small model's training step), and the
        output is (B, N, D) contiguous, so the residual stream needs no strided copies downstream.
        """
        B, C, T, H, W = video.shape
        pt, ph, pw = self.tubelet
        patches = video.reshape(B, C, T // pt, pt, H // ph, ph, W // pw, pw)
        patches = patches.permute(0, 2, 4, 6, 1, 3, 5, 7).reshape(B, -1, C * pt * ph * pw)  # (B, N, C*pt*ph*pw)
        return F.linear(patches, self.proj.weight.reshape(self.proj.out_channels, -1), self.proj.bias)
