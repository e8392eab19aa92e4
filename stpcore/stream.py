"""Anonymize a live stream (``stpcore anonymize rtsp://... -o OUT``): frames in as they arrive, rolling segment files
out, with bounded latency.

Sources (PyAV / FFmpeg): ``rtsp://``, ``rtsps://``, ``rtmp://``, ``udp://``, ``tcp://``, ``srt://``, ``http://``,
``https://`` URLs, a V4L2 device (``/dev/videoN``), or ``-`` for standard input (a container FFmpeg can probe, or
name it with ``input_format``, e.g. "mpegts").

How it runs. A reader thread decodes frames as they arrive and cuts them into chunks of one clip's span
(``num_frames * stride`` frames), the unit the model works on. The model side takes the newest finished chunk and
anonymizes it with the full-frame path of ``stpcore anonymize`` (:class:`stpcore.anonymize.WindowAnonymizer`:
working scale, model windows stitched back). At most one finished chunk waits: when a new one is finished while
another still waits (compute has fallen behind), the waiting one is dropped and its frames are counted in
``frames_dropped``, so the output never drifts further and further behind the camera. A recording (a source that
declares a duration, or ``drop=False``) is read at the model's pace instead: the reader waits, and no frame is
dropped. A frame's latency, from its
arrival to its anonymized frame being handed to the encoder, is therefore at most the rest of its chunk's span,
plus the wait for the chunk in progress, plus its own chunk's compute: one clip plus two computes at worst, one
clip plus one compute when compute keeps up. The exception is the last partial chunk, which waits for the stream's
end or for its loss to be declared (``timeout``); the report gives that wait apart (``tail_wait``).

Output: ``<name>.NNNNN.mp4`` segment files of about ``segment_seconds`` each (whole chunks), each written to a
temporary name and renamed when complete, so a finished segment is always intact; and ``<name>.segments.jsonl``,
one line per finished segment (file, frames, size, frame rate, first input frame, input frames dropped before it,
``runs``: the input frames it holds as [first, count] runs, ``seconds``: its span, wall times). A change of frame
size or of frame rate (measured per chunk from the median interval of the frames' timestamps, more than 25% away from
the current rate) ends the segment and starts the next one at the new size or rate. A segment's frames keep their
source times (from its first frame; :func:`frame_times`), so a variable-rate camera does not drift within a segment
and where compute fell behind and chunks were dropped, the frame before the gap is shown for its span (``runs``
gives the gaps in the input's frame count). Segments end after about ``segment_seconds`` of that time.

Ending: at the end of the stream, on stream loss (a read error, or nothing for ``timeout`` seconds), or when
``stop`` is set (the CLI sets it on SIGTERM and Ctrl-C), the last partial chunk is anonymized (padded as for files;
after ``stop``, only if the reader hands it over within a second, which a stalled source may not: its frames are then
counted as dropped), the open segment is closed intact, and :class:`StreamReport` says what happened. An error on
the model side abandons the open segment (its temporary file is removed) and is raised. The loss timeout applies to
network sources; standard input and V4L2 devices have none (FFmpeg has no read timeout for them), so a silent one
ends only when it closes or the run is stopped (standard input is read in short polls, so a stop ends it at once,
also while it is being opened). A rerun into the same folder numbers its segments after the ones
already there. A source that cannot be opened
raises :class:`StreamError` naming it, before anything is written.
"""

from __future__ import annotations

import glob
import json
import math
import os
import queue
import re
import stat
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from stpcore import media
from stpcore.anonymize import (
    WindowAnonymizer,
    check_view,
    plan_windows,
    prepare_model,
    prepare_output_dir,
    to_source_size,
)
from stpcore.data.preprocess import to_working_scale, working_short_side
from stpcore.data.sampling import resized_size

STREAM_SCHEMES = ("rtsp", "rtsps", "rtmp", "udp", "tcp", "srt", "http", "https")
HISTORY = 100_000  # latency statistics cover the last this many frames (chunks), so a run of days stays small
STALL = 2.0  # seconds: source times further apart than the frames' index span plus this are a discontinuity (live:
# unless the frames also arrived at least half as far apart)
RATE_CHANGE = 0.25  # a chunk whose measured frame rate is this far (relative) from the current one starts a segment
SEGMENT_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,99}")  # a plain file name: segments stay in the folder


class StreamError(ValueError):
    """The stream cannot be opened (the message names it and why)."""


def is_stream(source: str | os.PathLike) -> bool:
    """Whether ``source`` names a live source: a URL of :data:`STREAM_SCHEMES`, a V4L2 device or ``-`` (stdin)."""
    text = str(source)
    scheme = text.split("://", 1)[0].lower() if "://" in text else ""
    return text == "-" or scheme in STREAM_SCHEMES or _is_device(text)


def _is_device(text: str) -> bool:
    """A V4L2 device: /dev/videoN, or a camera by a stable name (/dev/v4l/by-id/usb-...-video-index0, a link to
    /dev/videoN): a character device under /dev."""
    if text.startswith("/dev/video"):
        return True
    try:
        return text.startswith("/dev/") and stat.S_ISCHR(os.stat(text).st_mode)
    except OSError:
        return False


class _StoppableStdin:
    """Standard input for PyAV, read so that a run can stop while the source is silent: each read waits for data in
    short polls and returns end of file once ``stop`` is set (a plain blocking read of a silent pipe cannot be
    interrupted, and would keep the reader thread, and the process, alive)."""

    POLL_S = 0.2

    def __init__(self, stop: threading.Event, fd: int | None = None) -> None:
        import sys

        self.stop, self.fd = stop, sys.stdin.fileno() if fd is None else fd

    def read(self, n: int = -1) -> bytes:
        import select

        size = n if n and n > 0 else 1 << 16
        while not self.stop.is_set():
            ready, _, _ = select.select([self.fd], [], [], self.POLL_S)
            if ready:
                return os.read(self.fd, size)
        return b""


def open_source(source: str, *, input_format: str | None = None, timeout: float = 10.0,
                stop: threading.Event | None = None):
    """An open PyAV container with a video stream for ``source`` (see the module docstring). Standard input is
    read so that setting ``stop`` ends it, even while it is silent or still being probed.

    Raises:
        StreamError: it cannot be opened within ``timeout`` seconds, or holds no video stream, or ``stop`` was set
            before it opened.
    """
    import av

    fmt = input_format or ("v4l2" if _is_device(str(source)) else None)
    stop = stop or threading.Event()
    target = _StoppableStdin(stop) if source == "-" else source
    options = {}
    scheme = source.split("://", 1)[0].lower() if "://" in source else ""
    if scheme in ("udp", "tcp", "http", "https", "rtmp", "srt"):
        options["rw_timeout"] = str(int(timeout * 1e6))  # microseconds: a stalled read fails instead of hanging
    if scheme in ("rtsp", "rtsps"):
        options["timeout"] = str(int(timeout * 1e6))
    shown = "- (standard input)" if source == "-" else source
    try:
        container = av.open(target, mode="r", format=fmt, options=options, timeout=timeout)
    except Exception as exc:  # noqa: BLE001 - FFmpeg raises one of many types; all mean "cannot open"
        if stop.is_set():
            raise StreamError(f"stopped before the stream {shown} could be opened") from exc
        raise StreamError(f"cannot open the stream {shown}: {str(exc).splitlines()[0][:300]}") from exc
    if not container.streams.video:
        container.close()
        raise StreamError(f"the stream {shown} has no video stream")
    return container


@dataclass
class _Chunk:
    first: int  # index of its first frame in the input
    frames: list[np.ndarray]
    arrivals: list[float]  # time.monotonic() of each frame's arrival
    fps: float
    times: list[float | None] = field(default_factory=list)  # each real frame's source time (seconds), if it has one
    real: int = 0  # frames from the input (the rest repeat the last one)
    last: bool = False  # the partial chunk left when the stream ended or was lost
    posted: float = 0.0  # time.monotonic() when the reader handed it over
    dropped_before: int = 0  # input frames dropped before this chunk (those after it are not counted yet)


@dataclass
class StreamReport:
    """What :func:`anonymize_stream` did.

    Attributes:
        source: the source as given.
        segments: the segment files written, in order.
        frames_in, frames_out, frames_dropped: frames decoded, written, dropped (compute fell behind).
        chunks: chunks anonymized.
        ended: why it ended ("end of stream", "stream lost: ...", "stopped").
        latency: per written frame of a whole chunk (the last HISTORY of them), seconds from arrival to output:
            {"p50", "p95", "max"} (empty if none).
        changes: what started new segments besides their length ("size 320x240 -> 640x480 at frame 90", ...).
        tail_wait: seconds the last partial chunk waited after its last frame for the stream to end or be declared
            lost (not in ``latency``: it is the source's silence, up to ``timeout``, not compute); None if none.
        chunk_latency: (first input frame, latency of its first frame: the chunk's longest) per whole chunk written
            (the last HISTORY). A demuxer hands a
            frame over when the next one starts, so the last whole chunk before the stream falls silent waits for
            that silence to end too.
        chunk_seconds: the model side's seconds per chunk (working scale, windows, model, stitching, encoding).
        drop: whether chunks were dropped when compute fell behind (a live source) or waited for (a recording).
    """

    source: str
    segments: list[Path] = field(default_factory=list)
    frames_in: int = 0
    frames_out: int = 0
    frames_dropped: int = 0
    chunks: int = 0
    ended: str = ""
    latency: dict[str, float] = field(default_factory=dict)
    changes: list[str] = field(default_factory=list)
    tail_wait: float | None = None
    chunk_latency: deque = field(default_factory=lambda: deque(maxlen=HISTORY))
    chunk_seconds: deque = field(default_factory=lambda: deque(maxlen=HISTORY))
    drop: bool = True

    def summary(self) -> str:
        lat = (f", latency p50 {self.latency['p50']:.2f} s, p95 {self.latency['p95']:.2f} s, max "
               f"{self.latency['max']:.2f} s" if self.latency else "")
        lines = [f"stream {self.source}: {self.ended}; {self.frames_in} frames in, {self.frames_out} written in "
                 f"{len(self.segments)} segment(s), {self.frames_dropped} dropped{lat}"]
        if self.frames_dropped and self.drop and self.source == "-":
            lines.append("  (compute fell behind the stream; for a recording piped in, --no-drop writes every frame)")
        lines += [f"  {c}" for c in self.changes]
        lines += [f"  segment {p}" for p in self.segments]
        return "\n".join(lines)


class _Reader(threading.Thread):
    """Decodes frames into chunks; at most one finished chunk waits in ``mailbox`` (older ones are dropped, or, with
    ``drop`` False, the reader waits for the mailbox to empty)."""

    def __init__(self, container, chunk_len: int, fps: float, report: StreamReport, stop: threading.Event,
                 drop: bool = True, timeout: float | None = None) -> None:
        super().__init__(daemon=True, name="stpcore-stream-reader")
        self.container, self.chunk_len, self.fps, self.report, self.stop = container, chunk_len, fps, report, stop
        self.drop = drop  # False: a recording; the reader waits for the model side instead of dropping a chunk
        self.timeout = timeout  # the read timeout the source was opened with, for the loss message
        self.mailbox: queue.Queue = queue.Queue(maxsize=1)
        self.lock = threading.Lock()
        self.consumer_gone = threading.Event()  # the model side has returned: nothing more is taken
        self.ended = ""

    def _drop_waiting(self) -> None:
        """Take the chunk waiting in the mailbox, if any, and count its frames as dropped (under ``lock``)."""
        try:
            old = self.mailbox.get_nowait()
        except queue.Empty:
            return
        if old is not None:
            self.report.frames_dropped += old.real

    def _post(self, chunk: _Chunk) -> None:
        chunk.posted = time.monotonic()
        while True:
            with self.lock:
                if self.consumer_gone.is_set():  # nobody will take it: its frames are dropped
                    self.report.frames_dropped += chunk.real
                    return
                if self.drop or self.mailbox.empty():
                    self._drop_waiting()
                    chunk.dropped_before = self.report.frames_dropped  # every earlier chunk is written or dropped
                    self.mailbox.put_nowait(chunk)
                    return
            time.sleep(0.01)  # a recording (no drop): the decoder waits until the model side takes the last chunk

    def drain(self) -> None:
        """The model side is gone: count what still waits as dropped, and let the reader end without waiting."""
        with self.lock:
            self.consumer_gone.set()
            self._drop_waiting()

    def _rate(self, times: list[float | None]) -> float:
        """The chunk's frame rate from its timestamps when they disagree with the current one by > RATE_CHANGE: one
        over the median interval between consecutive frames, so one jump in the timestamps (a reconnect, a clock
        step, a burst of lost packets) does not read as a new rate."""
        if len(times) > 2 and all(t is not None for t in times):
            gaps = np.diff(np.asarray(times, dtype=np.float64))
            median = float(np.median(gaps))
            if median > 0:
                measured = 1.0 / median
                if abs(measured / self.fps - 1) > RATE_CHANGE:
                    self.fps = round(measured, 2)
        return self.fps

    def run(self) -> None:
        frames, arrivals, times, first, index = [], [], [], 0, 0
        size = None
        try:
            stream = self.container.streams.video[0]
            sar = media.stream_sar(stream)
            for frame in self.container.decode(stream):
                if self.stop.is_set():  # the frame decoded after the stop is counted: in, and dropped
                    self.report.frames_in += 1
                    self.report.frames_dropped += 1
                    self.ended = "stopped"
                    break
                image = media.upright_rgb(frame, sar)
                now = time.monotonic()
                self.report.frames_in += 1
                if size is not None and image.shape != size and frames:  # a new size: the partial chunk ends here
                    self._post(self._finish(frames, arrivals, times, first))
                    frames, arrivals, times, first = [], [], [], index
                size = image.shape
                frames.append(image)
                arrivals.append(now)
                times.append(frame.time)
                index += 1
                if len(frames) == self.chunk_len:
                    self._post(self._finish(frames, arrivals, times, first))
                    frames, arrivals, times, first = [], [], [], index
            else:  # standard input ends (as end of file) when the run is stopped
                self.ended = "stopped" if self.stop.is_set() else "end of stream"
        except Exception as exc:  # noqa: BLE001 - any read failure is the stream's loss, reported in the summary
            if type(exc).__name__ == "ExitError" and self.timeout is not None:  # PyAV's read timeout interrupts
                self.ended = f"stream lost: no data for {self.timeout:g} s (--stream-timeout)"
            else:
                self.ended = f"stream lost: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
        finally:
            if frames:
                chunk = self._finish(frames, arrivals, times, first)
                chunk.last = True
                self._post(chunk)
            self._post_end()
            try:
                self.container.close()
            except Exception:  # noqa: BLE001, S110 - closing a broken stream may fail too; nothing is lost
                pass

    def _finish(self, frames, arrivals, times, first) -> _Chunk:
        real = len(frames)
        fps = self._rate(times)
        frames = frames + [frames[-1]] * (self.chunk_len - real)  # padded as for files; the padding is not written
        return _Chunk(first, frames, arrivals, fps, list(times), real)

    def _post_end(self) -> None:
        while not self.consumer_gone.is_set():  # the end marker must not drop a waiting chunk: wait for it to go
            try:
                self.mailbox.put(None, timeout=0.1)
                return
            except queue.Full:
                continue


def anonymize_stream(
    source: str,
    out_dir: str | os.PathLike,
    anonymizer,
    *,
    name: str = "stream",
    segment_seconds: float = 10.0,
    stride: int = 1,
    batch_size: int = 8,
    keep_ratio: float | None = None,
    view: str = "full",
    output_size: str = "work",
    min_overlap: int = 0,
    short_side: int | None = None,
    input_format: str | None = None,
    timeout: float = 10.0,
    stop: threading.Event | None = None,
    verbose: bool = False,
    drop: bool | None = None,
) -> StreamReport:
    """Anonymize ``source`` into rolling segments in ``out_dir`` until it ends, is lost, or ``stop`` is set (see the
    module docstring). ``anonymizer``, ``stride``, ``batch_size``, ``keep_ratio``, ``view``, ``output_size``,
    ``min_overlap`` and ``short_side`` are as for :func:`stpcore.anonymize.anonymize_file` (top-k only: the adaptive
    mode's variable cost does not fit a real-time budget).

    ``drop``: whether a chunk is dropped when compute falls behind (True: a live source, latency bounded) or the
    decoder waits for the model (False: a recording, every frame written, however long it takes). None (default):
    False for a source that declares a duration (a file over HTTP), True otherwise (cameras, RTSP, a pipe on
    standard input: pass False for a recording piped in).

    Raises:
        StreamError: the source cannot be opened (nothing is written then).
        ValueError: bad settings.
    """
    if not (math.isfinite(segment_seconds) and segment_seconds > 0):
        raise ValueError(f"the segment length must be a number of seconds > 0, got {segment_seconds}")
    if not (math.isfinite(timeout) and timeout > 0):
        raise ValueError(f"the stream timeout must be a number of seconds > 0, got {timeout}")
    if not SEGMENT_NAME.fullmatch(name):
        raise ValueError(f"the segment name {name!r} must be a plain file name (letters, digits, '.', '_', '-'; not "
                         f"starting with '.'), so the segments stay inside the output folder")
    if stride < 1 or batch_size < 1:
        raise ValueError(f"stride and batch_size must be >= 1, got stride={stride}, batch_size={batch_size}")
    check_view(view, output_size, min_overlap)  # before the source is opened
    cfg = anonymizer.cfg
    chunk_len = cfg.num_frames * stride
    short_side = short_side or working_short_side(cfg.image_size)
    stop = stop or threading.Event()
    # The one-time work (ONNX export, compile) before the source opens, not on the first chunk, while the camera's
    # frames pile up and are dropped; a model that cannot run fails here, with nothing written.
    prepare_model(anonymizer, batch_size, keep_ratio)
    container = open_source(source, input_format=input_format, timeout=timeout, stop=stop)  # before any output
    try:
        out_dir = prepare_output_dir(out_dir)
        # The batch sizes this source's chunks make (from its frame size, known once it is open; a compiled model
        # has a graph of its own for a batch of one clip, e.g. --view center), prepared before a frame is read.
        coded = container.streams.video[0].codec_context
        if coded.width and coded.height:
            shown = media.display_width(coded.width, media.stream_sar(container.streams.video[0]))  # as read
            windows = stride * len(plan_windows(*resized_size(coded.height, shown, short_side), cfg.image_size,
                                                view, min_overlap))
            sizes = {min(batch_size, windows)} | ({windows % batch_size} if windows > batch_size else set())
            prepare_model(anonymizer, sizes - {0}, keep_ratio)
    except BaseException:
        container.close()
        raise
    video = container.streams.video[0]
    rate = video.average_rate or video.guessed_rate or video.base_rate
    report = StreamReport(str(source))
    if drop is None:  # a declared duration: a recording, whose frames all matter; a live source has none
        drop = not (container.duration and container.duration > 0)
    report.drop = drop
    reader = _Reader(container, chunk_len, float(rate) if rate else 25.0, report, stop, drop=drop, timeout=timeout)
    reader.start()
    if verbose:  # the model is ready and the source open: frames are read from here on
        print(f"stream {source}: open, reading ({video.codec_context.width}x{video.codec_context.height}, "
              f"{float(rate) if rate else 25.0:g} fps; "
              f"{'live: chunks dropped when compute falls behind' if drop else 'a recording: no frame dropped'})",
              flush=True)
    index_path = out_dir / f"{name}.segments.jsonl"
    # A rerun into the same folder continues the numbering: an earlier recording's segments are never overwritten.
    taken = [int(m.group(1)) for p in out_dir.glob(f"{glob.escape(name)}.*.mp4")
             if (m := re.fullmatch(re.escape(name) + r"\.(\d{5,})\.mp4", p.name))]
    first_number = max(taken, default=-1) + 1
    latencies: deque = deque(maxlen=HISTORY)
    writer = None
    segment: dict = {}
    runner = None
    plan_key = None
    stopped_at = None
    try:
        while True:
            try:
                chunk = reader.mailbox.get(timeout=0.2)
            except queue.Empty:
                if stop.is_set():  # the reader posts its last partial chunk at its next frame; a stalled one is
                    stopped_at = stopped_at or time.monotonic()  # not waited for beyond a second
                    if not reader.is_alive() or time.monotonic() - stopped_at > 1.0:
                        break
                continue
            if chunk is None:
                break
            began = time.monotonic()
            stack = np.stack(chunk.frames)
            work = to_working_scale(stack, short_side)
            key = (stack.shape[1:3], chunk.fps)
            if key != plan_key:
                if plan_key is not None:
                    what = (f"size {plan_key[0][1]}x{plan_key[0][0]} -> {key[0][1]}x{key[0][0]}"
                            if key[0] != plan_key[0] else f"frame rate {plan_key[1]:g} -> {key[1]:g}")
                    report.changes.append(f"{what} at frame {chunk.first}: a new segment")
                if key[0] != (plan_key or (None,))[0]:
                    grid = plan_windows(*work.shape[-2:], cfg.image_size, view, min_overlap)
                    runner = WindowAnonymizer(anonymizer, grid, stride=stride, batch_size=batch_size,
                                              keep_ratio=keep_ratio)
                writer = _close(writer, segment, report, index_path)
                plan_key = key
            (result,) = runner.run([work])
            frames = result.frames[: chunk.real]
            if output_size == "source":
                frames = to_source_size(frames, result.visible[: chunk.real], *stack.shape[1:3])
            # (Half a period short counts: summed float times fall a hair short of a whole number of chunks.)
            if writer is not None and segment["seconds"] >= segment_seconds - 0.5 / segment["fps"]:
                writer = _close(writer, segment, report, index_path)
            if writer is None:
                path = out_dir / f"{name}.{first_number + len(report.segments):05d}.mp4"
                writer = media.VideoWriter(path, chunk.fps).__enter__()
                segment.clear()
                segment.update(path=path, fps=chunk.fps, frames=0, first_frame=chunk.first,
                               dropped_before=chunk.dropped_before, runs=[], opened=time.time(),
                               size=[int(frames.shape[2]), int(frames.shape[1])], seconds=0.0,
                               clock=media.FrameClock(1.0 / chunk.fps, max_jump=STALL), last=None)
            times = frame_times(segment, chunk, live=drop)
            writer.write(np.ascontiguousarray(frames), times=times)
            segment["seconds"] = times[-1] + 1.0 / segment["fps"]  # the segment's span so far
            segment["size"] = list(writer.size)  # as encoded: an odd size is rounded up to even (edge pixels)
            runs = segment["runs"]  # the input frames this segment holds, as [first, count] runs
            if runs and runs[-1][0] + runs[-1][1] == chunk.first:
                runs[-1][1] += chunk.real
            else:
                runs.append([chunk.first, chunk.real])
            done = time.monotonic()
            if chunk.last:  # its frames waited for the end (or the loss timeout) of the stream, not for compute
                report.tail_wait = chunk.posted - chunk.arrivals[-1]
            else:
                latencies += [done - t for t in chunk.arrivals[: chunk.real]]
                report.chunk_latency.append((chunk.first, done - chunk.arrivals[0]))
            report.chunk_seconds.append(done - began)
            segment["frames"] += chunk.real
            report.frames_out += chunk.real
            report.chunks += 1
            if verbose:
                print(f"chunk at frame {chunk.first}: {chunk.real} frames, latency "
                      f"{done - chunk.arrivals[0]:.2f} s, {report.frames_dropped} dropped so far", flush=True)
    except BaseException as exc:  # the open segment is abandoned (its temporary file removed), not passed as complete
        if writer is not None:
            writer.__exit__(type(exc), exc, exc.__traceback__)
            writer = None
        raise
    finally:
        stop.set()  # the reader stops at its next frame
        reader.drain()
        if writer is not None:
            _close(writer, segment, report, index_path)
    reader.join(timeout=timeout + 1.0)  # a read blocked on a silent source ends at its timeout
    report.ended = reader.ended or "stopped"
    if latencies:
        values = np.array(latencies)
        report.latency = {"p50": float(np.percentile(values, 50)), "p95": float(np.percentile(values, 95)),
                          "max": float(values.max())}
    return report


def frame_times(segment: dict, chunk: _Chunk, live: bool) -> list[float]:
    """Where a chunk's real frames go in their segment (seconds from its first frame): the segment's
    :class:`stpcore.media.FrameClock` places them by their source times, so that a variable-rate camera keeps its
    timing and the span of a dropped chunk stays a gap (the frame before it shown on). The span between two frames is
    their input indices' distance at the segment's rate; a jump of the source's time beyond it by more than ``STALL``
    seconds is a clock step or a reconnect (bridged by that span) unless the frames of a ``live`` source also arrived
    at least half as far apart (a camera that stalled, or sends on motion only). ``segment["last"]``: (input index,
    arrival) of its previous frame."""
    clock, out = segment["clock"], []
    for i in range(chunk.real):
        index, arrival = chunk.first + i, chunk.arrivals[i]
        frames, waited = 1, None
        if segment["last"] is not None:
            frames = index - segment["last"][0]
            waited = arrival - segment["last"][1] if live else None
        out.append(clock.place(chunk.times[i], frames=frames, waited=waited))
        segment["last"] = (index, arrival)
    return out


def _close(writer, segment: dict, report: StreamReport, index_path: Path):
    """Close the open segment (renamed into place, complete) and append its line to the index; returns None."""
    if writer is None:
        return None
    writer.__exit__(None, None, None)
    report.segments.append(segment["path"])
    line = {"file": segment["path"].name, "frames": segment["frames"], "size": segment["size"], "fps": segment["fps"],
            "first_frame": segment["first_frame"], "dropped_before": segment["dropped_before"],
            "runs": segment["runs"], "seconds": round(segment["seconds"], 6), "opened": segment["opened"],
            "closed": time.time()}
    with open(index_path, "a") as f:
        f.write(json.dumps(line) + "\n")
        f.flush()
        os.fsync(f.fileno())
    return None

