"""CPU decoding with PyAV (FFmpeg).

`probe` reads a video's codec, size and frame count without decoding pictures; `decode_frames` decodes
sequentially from the start and stops at the last frame a clip needs (clips are short and the published
videos are a few seconds, so a seek-free decode is simpler and exact). The frames then go through
`stpcore.data.preprocess`, the one transform into the model's input.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from stpcore.media import display_turns, display_width, open_video, stream_sar, upright_rgb


class VideoError(RuntimeError):
    """A video cannot be used; `reason` is a short category ("empty file", "unreadable", ...)."""

    def __init__(self, path: str | os.PathLike[str], reason: str, detail: str = "") -> None:
        self.path = str(path)
        self.reason = reason
        self.detail = detail
        super().__init__(f"{path}: {reason}" + (f" ({detail})" if detail else ""))


# FFmpeg's decoders that draw text files (ANSI art, BIN, XBIN, iCEDraw) as pictures: any text file opens as a
# "video" through them (its tty demuxer takes what no other format claims), so they are not taken for video.
TEXT_CODECS = frozenset({"ansi", "bintext", "xbin", "idf"})


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


def probe(path: str | os.PathLike[str], count_frames: bool = True) -> VideoInfo:
    """Codec, frame count, size and fps of the first video stream, without decoding pictures.

    The frame count comes from the container header where it has one (AVI, MP4); otherwise (WebM, MKV) the
    packets are counted by demuxing, which reads the whole file but decodes nothing. ``count_frames=False``
    (a check that the file is a readable video, as ``anonymize`` makes) reads only up to the first packet there, and
    ``num_frames`` is -1 (unknown).
    Raises VideoError("missing file" | "not a regular file" (a pipe, a device) | "empty file" | "unreadable" | "no video
    stream" | "no decoder for its codec" | "not a video" (a text file, which FFmpeg can draw as pictures) | "no
    frames").
    """
    path = Path(path)
    if not path.is_file():
        if path.exists() and not path.is_dir():  # a pipe, a process substitution, a device: read once, not probed
            raise VideoError(path, "not a regular file", "a pipe or a device; stream it on standard input ('-', with "
                                                         "--input-format) or save it to a file first")
        raise VideoError(path, "missing file")
    if path.stat().st_size == 0:
        raise VideoError(path, "empty file")
    try:
        with open_video(path) as container:
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
            if n <= 0 and count_frames:
                n = sum(1 for p in container.demux(stream) if p.size > 0)
            elif n <= 0:
                n = -1 if any(p.size > 0 for p in container.demux(stream)) else 0  # any() stops at the first
            if ctx.name in TEXT_CODECS:
                raise VideoError(path, "not a video", f"FFmpeg reads it as text drawn as pictures ({ctx.name})")
            fps = float(stream.average_rate or stream.guessed_rate or 0.0)
            # The width as displayed (square pixels), which the loaders' frames have (media.upright_rgb).
            info = VideoInfo(codec=ctx.name, num_frames=n, width=display_width(int(ctx.width), stream_sar(stream)),
                             height=int(ctx.height), fps=fps)
    except VideoError:
        raise
    except Exception as e:  # FFmpeg raises many error types for damaged input; all mean "cannot read"
        raise VideoError(path, "unreadable", f"{type(e).__name__}: {e}") from e
    if info.num_frames == 0:
        raise VideoError(path, "no frames")
    if info.width <= 0 or info.height <= 0:
        raise VideoError(path, "unreadable", "zero frame size")
    return info


def first_frame_turns(path: str | os.PathLike[str]) -> int:
    """Quarter turns counterclockwise of the video's display rotation (:func:`stpcore.media.display_turns`), read from
    its first frame (one frame is decoded); 0 when none decodes (the decoding reports that)."""
    try:
        with open_video(path) as container:
            for frame in container.decode(video=0):
                return display_turns(frame)
    except Exception:  # noqa: BLE001 - damaged input: the decode that follows says why
        return 0
    return 0


def decode_frames(path: str | os.PathLike[str], indices: np.ndarray,
                  short_side: int | None = None) -> tuple[np.ndarray, int]:
    """Decode the frames at `indices` (any order, repeats allowed) as RGB, upright as the video is displayed.

    Decodes sequentially from frame 0 and stops after max(indices). If the stream ends early (a header that
    overstates the length, a truncated file) the indices are wrapped modulo the frames actually decoded.
    With ``short_side``, each frame is brought to the working scale as it is decoded
    (:func:`stpcore.data.preprocess.to_working_scale`, the same pixels as resizing them all after), so only the
    resized frames are held: a 4K video's frames take 25 MB each at full size.

    Returns:
        (uint8 (len(indices), H, W, 3), frames decoded). Raises VideoError if no frame decodes.
    """
    from stpcore.data.preprocess import to_working_scale

    indices = np.asarray(indices, dtype=np.int64)
    need = set(indices.tolist())
    last = int(indices.max())
    got: dict[int, np.ndarray] = {}
    count = 0
    try:
        with open_video(path) as container:
            stream = container.streams.video[0]
            sar = stream_sar(stream)
            for frame in container.decode(stream):
                if count in need:
                    got[count] = upright_rgb(frame, sar)
                    if short_side is not None:
                        got[count] = to_working_scale(got[count][None], short_side)[0].permute(1, 2, 0).numpy()
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
            frames, _ = decode_frames(path, wrapped, short_side)
            return frames, count
        indices = wrapped
    return np.stack([got[int(i)] for i in indices]), count
