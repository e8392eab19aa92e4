"""Clip <-> tubelet tokens.

A clip (B, C, T, H, W) is cut into tubelets of (pt, ph, pw) frames x pixels; tokens are t-major
(slot = t // pt outermost, then rows, then columns), so token n of a 16x112x112 clip with 2x16x16
tubelets is slot n // 49, position n % 49. A tubelet's pixels flatten in (pt, ph, pw, C) order,
channel innermost, as the release's reconstruction head emits them.
"""

from __future__ import annotations

import torch
from einops import rearrange


def check_clip(video: torch.Tensor, tubelet: tuple[int, int, int], *, name: str = "video",
               channels: int | None = 3) -> None:
    """Raise ValueError unless video is (B, C, T, H, W) with T, H, W divisible by the tubelet."""
    if video.dim() != 5:
        raise ValueError(f"{name} must be (B, C, T, H, W), got shape {tuple(video.shape)}")
    if channels is not None and video.shape[1] != channels:
        raise ValueError(f"{name} must have {channels} channels (B, C, T, H, W), got C={video.shape[1]} "
                         f"in shape {tuple(video.shape)}")
    for axis, size, step in zip("THW", video.shape[2:], tubelet, strict=True):
        if size % step:
            raise ValueError(f"{name}: {axis}={size} is not divisible by the tubelet's {step} (tubelet "
                             f"{tubelet}); crop or resize the clip so that it is")


def check_finite(video: torch.Tensor, *, name: str = "video") -> None:
    """Raise ValueError if ``video`` holds NaN or Inf values: one host sync (a reduction read back), so the
    callers at the API boundary run it once per batch, outside any compiled or captured region."""
    if not bool(torch.isfinite(video).all()):
        raise ValueError(f"{name} contains NaN or Inf values; expected finite pixel values")


def grid_shape(video_shape: tuple[int, ...] | torch.Size, tubelet: tuple[int, int, int]) -> tuple[int, int, int]:
    """(slots, rows, cols) of the tubelet grid of a (B, C, T, H, W) clip."""
    T, H, W = video_shape[-3:]
    return T // tubelet[0], H // tubelet[1], W // tubelet[2]


def to_tubelets(video: torch.Tensor, tubelet: tuple[int, int, int]) -> torch.Tensor:
    """(B, C, T, H, W) -> (B, N, pt*ph*pw*C) pixels per token, channel innermost."""
    check_clip(video, tubelet, channels=None)
    pt, ph, pw = tubelet
    return rearrange(video, "b c (t pt) (h ph) (w pw) -> b (t h w) (pt ph pw c)", pt=pt, ph=ph, pw=pw)


def from_tubelets(tokens: torch.Tensor, grid: tuple[int, int, int], tubelet: tuple[int, int, int]) -> torch.Tensor:
    """Inverse of :func:`to_tubelets`: (B, N, pt*ph*pw*C) -> (B, C, T, H, W)."""
    t, h, w = grid
    pt, ph, pw = tubelet
    return rearrange(tokens, "b (t h w) (pt ph pw c) -> b c (t pt) (h ph) (w pw)", t=t, h=h, w=w, pt=pt, ph=ph, pw=pw)


def keep_to_pixels(keep: torch.Tensor, grid: tuple[int, int, int], tubelet: tuple[int, int, int]) -> torch.Tensor:
    """(B, N) keep mask -> (B, 1, T, H, W) pixel mask (each tubelet's value repeated over its pixels)."""
    t, h, w = grid
    pt, ph, pw = tubelet
    m = keep.reshape(keep.shape[0], 1, t, 1, h, 1, w, 1)
    m = m.expand(-1, -1, -1, pt, -1, ph, -1, pw)
    return m.reshape(keep.shape[0], 1, t * pt, h * ph, w * pw)
