"""CPU decoding with PyAV (FFmpeg) and the clip transform shared by the CPU path.

`probe` reads a video's codec, size and frame count without decoding pictures; `decode_frames` decodes
sequentially from the start and stops at the last frame a clip needs (clips are short and the published
videos are a few seconds, so a seek-free decode is simpler and exact); `clip_tensor` resizes the short side,
crops, flips and normalises to the model's input.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from stpcore.data.sampling import CROP_SIZE, RESIZE_SHORT, ClipSpec, crop_origin, crop_position, resized_size
from stpcore.media import IMAGENET_MEAN, IMAGENET_STD


class VideoError(RuntimeError):
    """A video cannot be used; `reason` is a short category ("empty file", "unreadable", ...)."""

    def __init__(self, path: str | os.PathLike[str], reason: str, detail: str = "") -> None:
        self.path = str(path)
        self.reason = reason
        self.detail = detail
        super().__init__(f"{path}: {reason}" + (f" ({detail})" if detail else ""))


@dataclass(frozen=True)
class VideoInfo:
    """What `probe` learns from the container: codec name (FFmpeg's), frame count, size, frame rate."""

    codec: str
    num_frames: int
    width: int
    height: int
    fps: float


def _avi_fourcc(path: Path) -> str | None:
    """The video FourCC of an AVI file (BITMAPINFOHEADER.biCompression of its first 'strf'), or None: what to
    name when FFmpeg has no decoder for a stream (PyAV then gives no codec context to ask)."""
    with open(path, "rb") as f:
        head = f.read(1 << 16)
    at = head.find(b"strf")
    if not head.startswith(b"RIFF") or at < 0 or len(head) < at + 28:
        return None
    tag = head[at + 24 : at + 28]  # chunk id (4), size (4), biSize, biWidth, biHeight (12), planes, bits (4)
    return tag.decode("ascii") if all(32 <= b < 127 for b in tag) else None


def probe(path: str | os.PathLike[str]) -> VideoInfo:
    """Codec, frame count, size and fps of the first video stream, without decoding pictures.

    The frame count comes from the container header where it has one (AVI, MP4); otherwise (WebM) the
    packets are counted by demuxing, which reads the file but decodes nothing.
    Raises VideoError("missing file" | "empty file" | "unreadable" | "no video stream" | "no decoder for its codec"
    | "no frames").
    """
    import av

    path = Path(path)
    if not path.is_file():
        raise VideoError(path, "missing file")
    if path.stat().st_size == 0:
        raise VideoError(path, "empty file")
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise VideoError(path, "no video stream")
            stream = container.streams.video[0]
            ctx = stream.codec_context
            if ctx is None:  # a codec tag this FFmpeg build has no decoder for
                tag = _avi_fourcc(path) or "unknown"
                raise VideoError(path, "no decoder for its codec",
                                 f"codec tag {tag!r}; transcode it (stpcore data transcode) or install an FFmpeg "
                                 "build that decodes it")
            n = int(stream.frames or 0)
            if n <= 0:
                n = sum(1 for p in container.demux(stream) if p.size > 0)
            fps = float(stream.average_rate or stream.guessed_rate or 0.0)
            info = VideoInfo(codec=ctx.name, num_frames=n, width=int(ctx.width), height=int(ctx.height), fps=fps)
    except VideoError:
        raise
    except Exception as e:  # FFmpeg raises many error types for damaged input; all mean "cannot read"
        raise VideoError(path, "unreadable", f"{type(e).__name__}: {e}") from e
    if info.num_frames <= 0:
        raise VideoError(path, "no frames")
    if info.width <= 0 or info.height <= 0:
        raise VideoError(path, "unreadable", "zero frame size")
    return info


def decode_frames(path: str | os.PathLike[str], indices: np.ndarray) -> tuple[np.ndarray, int]:
    """Decode the frames at `indices` (any order, repeats allowed) as RGB.

    Decodes sequentially from frame 0 and stops after max(indices). If the stream ends early (a header that
    overstates the length, a truncated file) the indices are wrapped modulo the frames actually decoded.

    Returns:
        (uint8 (len(indices), H, W, 3), frames decoded). Raises VideoError if no frame decodes.
    """
    import av

    indices = np.asarray(indices, dtype=np.int64)
    need = set(indices.tolist())
    last = int(indices.max())
    got: dict[int, np.ndarray] = {}
    count = 0
    try:
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            for frame in container.decode(stream):
                if count in need:
                    got[count] = frame.to_ndarray(format="rgb24")
                count += 1
                if count > last:
                    break
    except Exception as e:  # a corrupt packet mid-stream: keep what decoded, fail only if nothing did
        if count == 0:
            raise VideoError(path, "unreadable", f"{type(e).__name__}: {e}") from e
    if count == 0:
        raise VideoError(path, "no frames")
    if len(got) < len(need):
        # Fewer frames than the header promised: wrap the missing indices into the decoded range, decoding
        # again only the frames that were skipped over the first time.
        wrapped = indices % count
        if not set(wrapped.tolist()) <= got.keys():
            frames, _ = decode_frames(path, wrapped)
            return frames, count
        indices = wrapped
    return np.stack([got[int(i)] for i in indices]), count


def resize_frames(frames: np.ndarray | torch.Tensor, short_side: int = RESIZE_SHORT) -> torch.Tensor:
    """Resize the short side to `short_side` (bilinear, antialiased when shrinking), keeping the aspect ratio.

    Args:
        frames: uint8 (T, H, W, 3) RGB.
    Returns:
        float32 (T, 3, H', W') on the [0, 255] scale.
    """
    x = torch.as_tensor(frames)
    _, h, w, _ = x.shape
    x = x.permute(0, 3, 1, 2).float()  # (T, 3, H, W)
    rh, rw = resized_size(h, w, short_side)
    if (rh, rw) != (h, w):
        x = F.interpolate(x, size=(rh, rw), mode="bilinear", align_corners=False, antialias=True)
    return x


def crop_normalize(
    resized: torch.Tensor,
    spec: ClipSpec,
    crop: int = CROP_SIZE,
    mean: tuple[float, ...] = IMAGENET_MEAN,
    std: tuple[float, ...] = IMAGENET_STD,
) -> torch.Tensor:
    """Crop `crop` x `crop` at the spec's position, flip if asked, normalise with mean/std ([0, 1] scale).

    Args:
        resized: float32 (T, 3, H', W') on the [0, 255] scale (from `resize_frames`).
    Returns:
        float32 (3, T, crop, crop).
    """
    rh, rw = resized.shape[-2:]
    pos_y, pos_x = crop_position(spec, rh, rw)
    y0, x0 = crop_origin(rh, crop, pos_y), crop_origin(rw, crop, pos_x)
    x = resized[:, :, y0 : y0 + crop, x0 : x0 + crop]
    if spec.flip:
        x = x.flip(-1)
    m = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1) * 255.0
    s = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1) * 255.0
    x = (x - m) / s
    return x.permute(1, 0, 2, 3).contiguous()  # (3, T, crop, crop)


def clip_tensor(
    frames: np.ndarray | torch.Tensor,
    spec: ClipSpec,
    short_side: int = RESIZE_SHORT,
    crop: int = CROP_SIZE,
    mean: tuple[float, ...] = IMAGENET_MEAN,
    std: tuple[float, ...] = IMAGENET_STD,
) -> torch.Tensor:
    """`resize_frames` then `crop_normalize`: the whole CPU transform of one clip.

    Args:
        frames: uint8 (T, H, W, 3) RGB, the clip's frames in order.
    Returns:
        float32 (3, T, crop, crop).
    """
    return crop_normalize(resize_frames(frames, short_side), spec, crop, mean, std)
