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

# The model's input normalisation (ImageNet's, on the [0, 1] scale): the decoders apply it, to_uint8 undoes it.
IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

# codec name -> (PyAV encoder, container suffix, pixel format)
CODECS = {
    "h264": ("libx264", ".mp4", "yuv420p"),
    "vp9": ("libvpx-vp9", ".webm", "yuv420p"),
    "mpeg4": ("mpeg4", ".avi", "yuv420p"),
}


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` (same suffix); rename it to ``path`` on success.

    The file is flushed to disk (fsync) before the rename and the folder after it, so after a crash or a
    power loss ``path`` holds either the old or the new complete file, never an empty one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; the final file gets the usual permissions
    try:
        yield Path(tmp)
        _fsync(tmp)
        os.replace(tmp, path)
        _fsync(path.parent)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _fsync(path: str | os.PathLike) -> None:
    """Flush a file's or a folder's contents to disk (folders: where the OS allows opening them)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # e.g. folders on Windows
        return
    try:
        os.fsync(fd)
    except OSError:  # file systems without fsync on folders
        pass
    finally:
        os.close(fd)


def to_uint8(video: torch.Tensor, mean=IMAGENET_MEAN, std=IMAGENET_STD, mask: torch.Tensor | None = None) -> np.ndarray:
    """A normalised clip (3, T, H, W) float -> uint8 frames (T, H, W, 3).

    mask: optional (1, T, H, W) 0/1 pixel mask (e.g. ``tubelets.keep_to_pixels`` of a keep mask); pixels
    where it is 0 are written black. The model's dropped tubelets are zero in normalised space, which is
    the mean colour, not black, so anonymized output passes its keep mask here.
    """
    if video.dim() != 4 or video.shape[0] != 3:
        raise ValueError(f"to_uint8: expected a (3, T, H, W) clip, got {tuple(video.shape)}")
    m = torch.tensor(mean, dtype=torch.float32).reshape(3, 1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).reshape(3, 1, 1, 1)
    pixels = (video.detach().float().cpu() * s + m).clamp(0, 1) * 255
    if mask is not None:
        pixels = pixels * mask.detach().float().cpu()
    return pixels.round().to(torch.uint8).permute(1, 2, 3, 0).contiguous().numpy()


class VideoWriter:
    """Streaming encoder: ``with VideoWriter(path, fps) as w: w.write(frames)``; atomic on success.

    Frames are uint8 (T, H, W, 3) (or one (H, W, 3) frame); the size is fixed by the first write.
    codec: h264 (.mp4), vp9 (.webm), mpeg4 (.avi).

    Timing: frames are shown ``1 / fps`` apart, or at the ``times`` given to :meth:`write` (seconds from the
    first frame, as :func:`read_timed_frames` reads them), so a variable-frame-rate source (phones record so)
    keeps its timing. A writer whose first write gives times stores them to 1/90000 s (H.264, VP9); MPEG-4 in AVI
    has a fixed frame period, and its times are rounded to multiples of ``1 / fps``. Times are made strictly
    increasing (a frame at or before the previous one's time is shown one tick after it: 1/90000 s, 1 ms in WebM,
    whose container keeps milliseconds, one period in AVI, where frames that come faster than ``fps`` are therefore
    pushed later, more and more while they do: give MPEG-4 at least the source's highest rate); frames written
    without times follow the previous one by ``1 / fps``. ``fps`` is also the rate the file declares.

    4:2:0 chroma needs even sizes, so an odd height or width is padded by one row or column at the bottom or
    right that repeats the last one (edge pixels, not black: in anonymized output black means a dropped
    tubelet). The file is then one pixel larger than the frames given; ``size`` says what is encoded.

    Attributes:
        size: (W, H) of the encoded frames, the given size rounded up to even; None before the first write.
        frames_written: the number of frames encoded so far.
    """

    def __init__(self, path: str | os.PathLike, fps: float = 25.0, codec: str = "h264", crf: int | None = None):
        if codec not in CODECS:
            raise ValueError(f"VideoWriter: codec must be one of {sorted(CODECS)}, got {codec!r}")
        self.path, self.fps, self.codec, self.crf = Path(path), fps, codec, crf
        self.frames_written = 0
        self.size: tuple[int, int] | None = None  # (W, H) as encoded, set by the first write
        self._pts = -1  # the last frame's presentation time, in the codec's time base

    def __enter__(self) -> VideoWriter:
        self._atomic = atomic_path(self.path)
        tmp = self._atomic.__enter__()
        self._container = open_video(tmp, "w")
        self._stream = None
        return self

    def _open_stream(self, height: int, width: int, timed: bool) -> None:
        from fractions import Fraction

        encoder, _, pix_fmt = CODECS[self.codec]
        rate = Fraction(self.fps).limit_denominator(1001)
        self._stream = self._container.add_stream(encoder, rate=rate)
        # The codec's time base: one frame period, or finer where the frames carry their own times (MPEG-4 part 2
        # allows at most 65535 ticks a second, and AVI has one frame period: times are rounded to it there).
        self._time_base = Fraction(1, 90000) if timed and self.codec != "mpeg4" else 1 / rate
        self._stream.codec_context.time_base = self._time_base
        self._step = max(1, round(1 / (rate * self._time_base)))  # ticks per frame at fps
        self._tick = 90 if timed and self.codec == "vp9" else 1  # the least step: WebM stores milliseconds
        self.size = (width + width % 2, height + height % 2)  # 4:2:0 needs even sizes
        self._stream.width, self._stream.height = self.size
        self._stream.pix_fmt = pix_fmt
        # libswscale converts the RGB frames with the BT.601 matrix into limited-range YUV; say so in the stream.
        # Untagged, players decode HD video with BT.709's, which shifts every colour (RGB 200,60,40 showed as
        # 212,72,36).
        ctx = self._stream.codec_context
        ctx.colorspace, ctx.color_range = 6, 1  # AVCOL_SPC_SMPTE170M (BT.601), AVCOL_RANGE_MPEG (limited)
        if self.crf is not None:
            self._stream.options = {"crf": str(self.crf)}
        self._size = (height, width)

    def write(self, frames: np.ndarray, times=None) -> None:
        """Encode ``frames``; ``times`` (optional): each frame's presentation time in seconds from the first frame
        of the video (see the class's Timing)."""
        import av

        if frames.ndim == 3:
            frames = frames[None]
        if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
            raise ValueError(f"VideoWriter: frames must be uint8 (T, H, W, 3), got {frames.dtype} {frames.shape}")
        if times is not None:
            times = np.asarray(times, dtype=np.float64).reshape(-1)
            if len(times) != len(frames) or not np.isfinite(times).all():
                raise ValueError(f"VideoWriter: times must be {len(frames)} finite numbers (one per frame), "
                                 f"got {len(times)}: {times[:4].tolist()}...")
        if self._stream is None:
            self._open_stream(*frames.shape[1:3], timed=times is not None)
        if frames.shape[1:3] != self._size:
            raise ValueError(f"VideoWriter: frame size changed from {self._size} to {frames.shape[1:3]}")
        H, W = self._size
        if H % 2 or W % 2:  # repeat the last row/column: black would read as a dropped tubelet
            frames = np.pad(frames, ((0, 0), (0, H % 2), (0, W % 2), (0, 0)), mode="edge")
        for i, frame in enumerate(frames):
            picture = av.VideoFrame.from_ndarray(frame, format="rgb24")
            if times is None:  # 1 / fps after the previous frame
                self._pts += self._step
            else:
                self._pts = max(self._pts + self._tick, round(times[i] / self._time_base))
            picture.pts, picture.time_base = self._pts, self._time_base
            for packet in self._stream.encode(picture):
                self._container.mux(packet)
        self.frames_written += len(frames)

    def __exit__(self, exc_type, exc, tb) -> bool:
        failure = exc
        try:
            try:
                if failure is None and self._stream is None:
                    failure = ValueError(f"VideoWriter: no frames were written to {self.path}")
                if failure is None:
                    for packet in self._stream.encode():  # flush the encoder
                        self._container.mux(packet)
            finally:
                self._container.close()  # writes the trailer: a full disk fails here
        except BaseException as e:  # noqa: BLE001 - a Ctrl-C too: the temporary file is removed below, then it is raised
            if failure is None:
                failure = e
                if hasattr(e, "add_note"):  # Python 3.11+
                    e.add_note(f"while writing {self.path} (nothing was left there)")
        if failure is None:
            self._atomic.__exit__(None, None, None)  # rename into place
            return False
        self._atomic.__exit__(type(failure), failure, failure.__traceback__)  # delete the temporary file
        if exc is None:
            raise failure
        return False


def write_video(path: str | os.PathLike, frames: np.ndarray, fps: float = 25.0, codec: str = "h264",
                crf: int | None = None) -> Path:
    """Encode uint8 frames (T, H, W, 3) to ``path`` in one call (see :class:`VideoWriter`)."""
    if not (isinstance(frames, np.ndarray) and frames.ndim == 4 and frames.shape[-1] == 3
            and frames.dtype == np.uint8):
        raise ValueError(f"write_video: frames must be uint8 (T, H, W, 3), got {getattr(frames, 'dtype', None)} "
                         f"{getattr(frames, 'shape', None)}")
    with VideoWriter(path, fps, codec, crf) as writer:
        writer.write(frames)
    return Path(path)


def display_turns(frame) -> int:
    """Quarter turns counterclockwise (0-3) that show a decoded PyAV frame as its file says it is shown: the rotation
    of its display matrix (phones store portrait video sideways and say so there; players, and FFmpeg's own tools,
    turn it upright). 0 for none, and for an angle that is not a multiple of 90 (flips are not applied either)."""
    rotation = int(getattr(frame, "rotation", 0) or 0)
    return (rotation // 90) % 4 if rotation % 90 == 0 else 0


def stream_sar(stream):
    """A video stream's sample (pixel) aspect ratio as a Fraction when its pixels are not square (DV, HDV, DVD and
    broadcast video store 4:3 or 16:9 pictures in other widths), else None."""
    sar = stream.sample_aspect_ratio or stream.codec_context.sample_aspect_ratio
    return sar if sar and sar > 0 and sar != 1 else None


def display_width(width: int, sar) -> int:
    """The width a stored picture is shown at: ``width`` times the sample aspect ratio (None: square pixels)."""
    return max(1, round(width * sar)) if sar else width


def upright_rgb(frame, sar=None) -> np.ndarray:
    """A decoded PyAV frame as uint8 (H, W, 3) RGB as it is displayed: stretched to square pixels by the stream's
    sample aspect ratio ``sar`` (:func:`stream_sar`; the height kept), and turned by its display rotation
    (:func:`display_turns`)."""
    if sar:
        image = frame.reformat(width=display_width(frame.width, sar), height=frame.height, format="rgb24").to_ndarray()
    else:
        image = frame.to_ndarray(format="rgb24")
    turns = display_turns(frame)
    return np.ascontiguousarray(np.rot90(image, turns) if turns else image)


def open_video(path: str | os.PathLike, mode: str = "r", **kwargs):
    """``av.open`` of a local file by its absolute path: FFmpeg reads a name that starts like a URL ("tcp:host:port/"
    or "data:", a folder of that name relative to the working folder) as that protocol, so a dataset could make it
    connect somewhere; an absolute path is always a file."""
    import av

    return av.open(os.path.abspath(os.fspath(path)), mode, **kwargs)


def read_frames(path: str | os.PathLike):
    """Decode a video's frames in order: yields uint8 (H, W, 3) RGB (PyAV's conversion, as the loaders decode),
    as the file is displayed (square pixels, upright: :func:`upright_rgb`)."""
    for image, _ in read_timed_frames(path):
        yield image


REPEAT = 0.001  # seconds: a frame whose source time repeats the previous frame's follows it by this much


class FrameClock:
    """Places frames on one timeline (seconds from the first frame) from their source times, so a variable frame
    rate keeps its timing, and bridges what is not time: the output always increases.

    - A frame with the previous frame's very time (a repeated timestamp) follows it by ``REPEAT`` (1 ms), and the
      frames after it keep their source times: one repeat does not shift the rest. A clock stuck on one time for
      several frames (or a repeat across dropped frames) is bridged frame by frame instead, at the span.
    - A frame with no time, or one before the previous frame's (files joined end to end, a camera whose clock
      restarted, a wrapped MPEG-TS clock), follows the previous one by its span (``frames`` periods), and the frames
      after it keep their spacing from there; if the next frame's time fits the timeline from before better, that
      one frame was out of place and the timeline goes on as before.
    - A jump forward is kept (a recording paused, a motion-triggered camera), unless ``max_jump`` is set and the jump
      exceeds the span by more than that while the frames did not arrive at least half as far apart either
      (``waited``, a live source): a clock step or a reconnect, bridged by the span.

    Args:
        period: seconds of one frame at the stream's rate.
        max_jump: see above (None: any jump forward is kept).
    """

    def __init__(self, period: float, max_jump: float | None = None) -> None:
        self.period, self.max_jump = period, max_jump
        self.last: float | None = None  # the previous frame's place
        self.last_time: float | None = None  # the previous frame's source time
        self.origin: float | None = None  # source time minus place, while the source's times run on
        self.before: float | None = None  # the origin before the clock went back (for one frame)
        self.repeats = 0  # frames in a row with the same source time as the one before

    def place(self, time: float | None, frames: int = 1, waited: float | None = None) -> float:
        """The frame's place; ``frames``: input frames from the previous frame to this one (more than 1 where frames
        were dropped between); ``waited``: seconds between their arrivals (a live source; None otherwise)."""
        if frames < 1:
            raise ValueError(f"FrameClock.place: frames must be >= 1 (input frames since the previous), got {frames}")
        before, self.before = self.before, None
        if self.last is None:
            at = 0.0
            self.origin = time
        elif time is None or self.origin is None:
            at = self.last + frames * self.period
            if time is not None:  # the first time the source gives
                self.origin = time - at
        elif time == self.last_time:
            at = self.last + (REPEAT if frames == 1 and self.repeats == 0 else frames * self.period)
            self.repeats += 1
        else:
            at = self._moved_on(time, frames * self.period, waited, before)
        self.last, self.last_time = at, time
        return at

    def _moved_on(self, time: float, span: float, waited: float | None, before: float | None) -> float:
        self.repeats = 0
        bridged = self.last + span
        candidate = time - self.origin
        if before is not None:  # the previous frame went back: does this one fit the timeline from before it?
            earlier = time - before
            if earlier > self.last - span and abs(earlier - bridged) < abs(candidate - bridged):
                self.origin, candidate = before, earlier
        if candidate > self.last:
            jump = candidate - self.last
            if self.max_jump is None or jump <= span + self.max_jump or (waited is not None and waited >= jump / 2):
                return candidate
            self.origin = time - bridged  # a clock step or a reconnect: bridged, the times run on from here
            return bridged
        if candidate > self.last - REPEAT:  # a hair behind (just after a repeat): no drift for it
            return self.last + REPEAT
        self.before, self.origin = self.origin, time - bridged  # the clock went back
        return bridged


def read_timed_frames(path: str | os.PathLike):
    """:func:`read_frames` with each frame's presentation time: yields (uint8 (H, W, 3) RGB, seconds from the first
    frame), always increasing (:class:`FrameClock`, at the stream's average rate: a repeated time, a missing one, a
    clock that goes back are bridged; a jump forward is kept)."""
    with open_video(path) as container:
        if not container.streams.video:
            raise ValueError(f"{path}: no video stream")
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        sar = stream_sar(stream)
        rate = stream.average_rate or stream.guessed_rate
        clock = FrameClock(1 / float(rate) if rate else 1 / 25)
        for frame in container.decode(stream):
            yield upright_rgb(frame, sar), clock.place(frame.time)


def video_fps(path: str | os.PathLike, default: float = 25.0) -> float:
    """The average frame rate of a video's first video stream (``default`` when the file does not say)."""
    with open_video(path) as container:
        if not container.streams.video:
            raise ValueError(f"{path}: no video stream")
        rate = container.streams.video[0].average_rate or container.streams.video[0].guessed_rate
        return float(rate) if rate else default


def side_by_side(left: np.ndarray, right: np.ndarray, gap: int = 4) -> np.ndarray:
    """Two uint8 (T, H, W, 3) clips next to each other with a white gap."""
    if left.shape != right.shape:
        raise ValueError(f"side_by_side: clips differ in shape {left.shape} vs {right.shape}")
    white = np.full((*left.shape[:2], gap, 3), 255, dtype=np.uint8)
    return np.concatenate([left, white, right], axis=2)
