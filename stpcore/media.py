"""Writing what a person looks at: videos (PyAV) and pictures (Pillow), each written atomically.

Frames are uint8 (T, H, W, 3) RGB. Writers go to a temporary name in the destination folder and are
renamed into place, so an interrupted job never leaves a half-written file under the final name.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# codec name -> (PyAV encoder, container suffix, pixel format)
CODECS = {
    "h264": ("libx264", ".mp4", "yuv420p"),
    "vp9": ("libvpx-vp9", ".webm", "yuv420p"),
    "mpeg4": ("mpeg4", ".avi", "yuv420p"),
}


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` (same suffix); rename it to ``path`` on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; the final file gets the usual permissions
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def to_uint8(video: torch.Tensor, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> np.ndarray:
    """A normalised clip (3, T, H, W) float -> uint8 frames (T, H, W, 3)."""
    if video.dim() != 4 or video.shape[0] != 3:
        raise ValueError(f"to_uint8: expected a (3, T, H, W) clip, got {tuple(video.shape)}")
    m = torch.tensor(mean, dtype=torch.float32).reshape(3, 1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).reshape(3, 1, 1, 1)
    pixels = (video.detach().float().cpu() * s + m).clamp(0, 1) * 255
    return pixels.round().to(torch.uint8).permute(1, 2, 3, 0).contiguous().numpy()


def write_video(path: str | os.PathLike, frames: np.ndarray, fps: float = 25.0, codec: str = "h264",
                crf: int | None = None) -> Path:
    """Encode uint8 frames (T, H, W, 3) to ``path`` with PyAV (h264: .mp4, vp9: .webm, mpeg4: .avi).

    Odd frame sizes are padded by one pixel of black (4:2:0 needs even sizes).
    """
    from fractions import Fraction

    import av  # optional dependency (stpcore[video])

    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"write_video: frames must be uint8 (T, H, W, 3), got {frames.dtype} {frames.shape}")
    if codec not in CODECS:
        raise ValueError(f"write_video: codec must be one of {sorted(CODECS)}, got {codec!r}")
    encoder, _, pix_fmt = CODECS[codec]
    T, H, W, _ = frames.shape
    pad_h, pad_w = H % 2, W % 2
    if pad_h or pad_w:
        frames = np.pad(frames, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)))
    with atomic_path(path) as tmp:
        with av.open(str(tmp), mode="w") as container:
            stream = container.add_stream(encoder, rate=Fraction(fps).limit_denominator(1001))
            stream.width, stream.height, stream.pix_fmt = W + pad_w, H + pad_h, pix_fmt
            if crf is not None:
                stream.options = {"crf": str(crf)}
            for frame in frames:
                for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                    container.mux(packet)
            for packet in stream.encode():
                container.mux(packet)
    return Path(path)


def save_png(path: str | os.PathLike, image: np.ndarray) -> Path:
    """uint8 (H, W, 3) or (H, W) -> PNG, atomically."""
    from PIL import Image

    with atomic_path(path) as tmp:
        Image.fromarray(image).save(tmp, format="PNG")
    return Path(path)


def keep_mask_figure(frames: np.ndarray, keep: torch.Tensor, grid: tuple[int, int, int],
                     tubelet: tuple[int, int, int], gap: int = 4) -> np.ndarray:
    """One panel per temporal slot: the slot's first frame, dropped tubelets darkened and tinted red.

    Args:
        frames: uint8 (T, H, W, 3) input clip.
        keep: (N,) 0/1 keep mask of one clip, t-major.
        grid: (slots, rows, cols) of the tubelet grid.
        tubelet: (pt, ph, pw).

    Returns:
        uint8 (H, slots * (W + gap) - gap, 3).
    """
    slots, rows, cols = grid
    pt, ph, pw = tubelet
    mask = keep.detach().cpu().reshape(slots, rows, cols).numpy().astype(bool)
    panels = []
    for s in range(slots):
        frame = frames[s * pt].astype(np.float32)
        m = np.kron(mask[s], np.ones((ph, pw), dtype=bool))[..., None]  # (H, W, 1)
        dropped = frame * 0.35 + np.array([110.0, 0.0, 0.0], dtype=np.float32)
        panels.append(np.where(m, frame, dropped).clip(0, 255).astype(np.uint8))
        if s + 1 < slots:
            panels.append(np.full((frames.shape[1], gap, 3), 255, dtype=np.uint8))
    return np.concatenate(panels, axis=1)


def side_by_side(left: np.ndarray, right: np.ndarray, gap: int = 4) -> np.ndarray:
    """Two uint8 (T, H, W, 3) clips next to each other with a white gap."""
    if left.shape != right.shape:
        raise ValueError(f"side_by_side: clips differ in shape {left.shape} vs {right.shape}")
    white = np.full((*left.shape[:2], gap, 3), 255, dtype=np.uint8)
    return np.concatenate([left, white, right], axis=2)
