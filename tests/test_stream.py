"""Live streams (stpcore.stream): served by the test itself on the loopback address (UDP, HTTP) and through stdin.
RTSP servers and V4L2 devices cannot be served here: their argument handling and open failures are tested."""

from __future__ import annotations

import functools
import http.server
import io
import json
import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

av = pytest.importorskip("av")  # the video extra: CI installs it

from stpcore.inference import ClipAnonymizer  # noqa: E402
from stpcore.models import STPrivacy, STPrivacyConfig, save_anonymizer  # noqa: E402
from stpcore.stream import StreamError, _Reader, anonymize_stream, is_stream  # noqa: E402
from stpcore.testing import separate_keep_scores  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def _frames(n: int, width: int = 96, height: int = 72, seed: int = 0) -> np.ndarray:
    """A bright square moving over a grey background: uint8 (n, H, W, 3)."""
    rng = np.random.default_rng(seed)
    frames = np.full((n, height, width, 3), 110, dtype=np.uint8)
    frames += rng.integers(0, 8, frames.shape, dtype=np.uint8)
    for i in range(n):
        x = (5 + 3 * i) % (width - 20)
        frames[i, 20:40, x:x + 20] = (230, 180, 150)
    return frames


def _mux_ts(target, frames: np.ndarray, fps: int, real_time: bool = False, times=None) -> None:
    """Encode the frames as MPEG-TS (MPEG-4 part 2) into ``target`` (a file object or a URL); with ``real_time``,
    one frame every 1 / fps seconds; with ``times``, each frame at its own time (seconds, to the millisecond)."""
    from fractions import Fraction

    with av.open(target, "w", format="mpegts") as out:
        stream = out.add_stream("mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        stream.options = {"qscale": "3"}
        if times is not None:
            stream.codec_context.time_base = Fraction(1, 1000)
        for i, f in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(f, format="rgb24")
            if times is not None:
                frame.pts, frame.time_base = round(times[i] * 1000), Fraction(1, 1000)
            for packet in stream.encode(frame):
                out.mux(packet)
            if real_time:
                time.sleep(1 / fps)
        for packet in stream.encode():
            out.mux(packet)


def _ts(frames: np.ndarray, fps: int = 25, times=None) -> bytes:
    """MPEG-TS bytes (MPEG-4 part 2) of the frames (at ``times``, seconds, if given)."""
    buf = io.BytesIO()
    _mux_ts(buf, frames, fps, times=times)
    return buf.getvalue()


def _free_port(kind=socket.SOCK_STREAM) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def anonymizer():
    torch.manual_seed(0)
    anon = ClipAnonymizer(separate_keep_scores(STPrivacy(STPrivacyConfig.from_name("tiny")), scale=10.0),
                          precision="fp32", threads=1)
    anon.prepare()  # the first forward's one-time setup (seconds) now, not while a test's UDP sender already sends
    return anon


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, anonymizer):
    path = tmp_path_factory.mktemp("ckpt") / "stprivacy.pt"
    save_anonymizer(anonymizer.model, path, classes=["a", "b", "c"])
    return path


class _Slow:
    """An anonymizer that takes ``delay`` seconds per call: compute that falls behind the source."""

    def __init__(self, inner, delay):
        self.inner, self.delay, self.cfg = inner, delay, inner.cfg

    def __call__(self, clips, **kw):
        time.sleep(self.delay)
        return self.inner(clips, **kw)


def _decoded_times(path: Path) -> np.ndarray:
    with av.open(str(path)) as c:
        return np.array([float(f.time) for f in c.decode(video=0)])


def _segments_ok(out: Path, report, name="stream") -> int:
    """Every segment listed is a complete, decodable file with the frames its index line gives; returns their sum."""
    lines = _index(out, name)
    assert [out / line["file"] for line in lines] == report.segments
    total = 0
    for line in lines:
        with av.open(str(out / line["file"])) as c:
            decoded = list(c.decode(video=0))
        got = len(decoded)
        assert got == line["frames"] > 0, line
        assert [decoded[0].width, decoded[0].height] == line["size"], line  # the size as encoded
        # The runs account for the segment's frames, start at its first frame, and never overlap or go back.
        runs = line["runs"]
        assert runs[0][0] == line["first_frame"] and sum(n for _, n in runs) == line["frames"], line
        assert all(a[0] + a[1] < b[0] for a, b in zip(runs, runs[1:], strict=False)), line
        # Frames keep their input times: at 1 / fps per input frame from the segment's first (these sources keep an
        # even rate), so the span of a dropped chunk is a gap, not squeezed out.
        shown = np.concatenate([np.arange(a, a + n) for a, n in runs]) - line["first_frame"]
        np.testing.assert_allclose(_decoded_times(out / line["file"]), shown / line["fps"], atol=2e-3, err_msg=line)
        assert line["seconds"] == pytest.approx((shown[-1] + 1) / line["fps"], abs=2e-3), line
        total += got
    # Frames dropped before a segment: exactly the input frames before it that no earlier segment holds.
    held = 0
    for line in lines:
        assert line["dropped_before"] == line["first_frame"] - held, line
        held += line["frames"]
    assert not list(out.glob("*.tmp*")) and not list(out.glob(".*"))  # no temporary files left
    return total


def _serve_http(directory: Path):
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(directory))
    handler.log_message = lambda *a: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def _stream_over_http(tmp_path: Path, data: bytes | None, anonymizer, name: str = "cam.ts", **kwargs):
    """Serve ``data`` as tmp_path/www/<name> (None: the file is there already) and anonymize it into tmp_path/out
    (``kwargs``: anonymize_stream's, timeout 5 s unless given); returns the report."""
    (tmp_path / "www").mkdir(exist_ok=True)
    if data is not None:
        (tmp_path / "www" / name).write_bytes(data)
    server = _serve_http(tmp_path / "www")
    try:
        return anonymize_stream(f"http://127.0.0.1:{server.server_port}/{name}", tmp_path / "out", anonymizer,
                                **{"timeout": 5, **kwargs})
    finally:
        server.shutdown()


def _index(out: Path, name: str = "stream") -> list[dict]:
    """The lines of a stream's segment index."""
    return [json.loads(x) for x in (out / f"{name}.segments.jsonl").read_text().splitlines()]


def test_is_stream_names_the_live_sources():
    for live in ("rtsp://cam.local/1", "RTSP://x", "udp://127.0.0.1:5000", "http://h/x.ts", "https://h/a",
                 "srt://h:1", "rtmp://h/a", "tcp://h:1", "/dev/video0", "-"):
        assert is_stream(live), live
    for not_live in ("video.mp4", "/data/cam.avi", "file://x.mp4", "dev/video0"):
        assert not is_stream(not_live), not_live
    assert is_stream("/dev/null")  # a character device under /dev (a camera's /dev/v4l/by-id/... name is a link to one)
    assert not is_stream("/dev/shm")  # a folder



def test_a_camera_by_its_stable_name_is_opened_as_v4l2(monkeypatch):
    """/dev/v4l/by-id/... names a camera as /dev/videoN does (a link to it): it must be opened with FFmpeg's v4l2
    input too, not probed as a file. /dev/null stands in for the character device."""
    import av

    from stpcore.stream import open_source

    seen = {}

    def fake_open(target, mode="r", format=None, **kw):
        seen["format"] = format
        raise OSError("no camera here")

    monkeypatch.setattr(av, "open", fake_open)
    with pytest.raises(StreamError, match="cannot open the stream /dev/null"):
        open_source("/dev/null", timeout=1)
    assert seen["format"] == "v4l2"


@pytest.mark.parametrize("source", ["rtsp://127.0.0.1:{port}/cam", "http://127.0.0.1:{port}/x.ts",
                                    "tcp://127.0.0.1:{port}", "/dev/video97"])
def test_a_stream_that_cannot_be_opened_names_it_and_writes_nothing(source, anonymizer, tmp_path):
    source = source.format(port=_free_port())  # nothing listens there
    out = tmp_path / "out"
    with pytest.raises(StreamError, match=f"cannot open the stream {source}"):
        anonymize_stream(source, out, anonymizer, timeout=2)
    assert not out.exists()


def test_http_stream_faster_than_compute_drops_whole_chunks_and_keeps_every_segment(anonymizer, tmp_path):
    """An HTTP source delivers as fast as it can; the model side is slowed down so it must fall behind."""
    out = tmp_path / "out"
    report = _stream_over_http(tmp_path, _ts(_frames(120)), _Slow(anonymizer, 0.25), segment_seconds=1.0)
    assert report.ended == "end of stream" and report.frames_in == 120
    assert report.frames_dropped > 0 and report.frames_dropped % 8 == 0  # whole chunks of 8 frames
    assert report.frames_out + report.frames_dropped == report.frames_in
    assert _segments_ok(out, report) == report.frames_out
    assert "dropped" in report.summary() and "end of stream" in report.summary()
    # Segments end by time (1 s here), dropped spans counted: every one but the last spans at least that.
    lines = _index(out)
    assert all(line["seconds"] >= 1.0 - 0.5 / line["fps"] for line in lines[:-1]), lines


@pytest.mark.parametrize("name, drop", [("rec.mp4", None), ("cam.ts", False)], ids=["mp4-auto", "ts-no-drop"])
def test_a_recording_over_http_keeps_every_frame(anonymizer, tmp_path, name, drop):
    """A file served over HTTP is a recording, not a camera: it was read as fast as the server sends and most of it
    dropped (88 of 100 frames, exit 0). One that declares its duration (MP4) is read without dropping by default;
    any source with drop=False (--no-drop) is."""
    from stpcore import media

    (tmp_path / "www").mkdir()
    if name.endswith(".mp4"):
        media.write_video(tmp_path / "www" / name, _frames(64), fps=25)
    report = _stream_over_http(tmp_path, None if name.endswith(".mp4") else _ts(_frames(64)), _Slow(anonymizer, 0.1),
                               name=name, segment_seconds=1.0, drop=drop)
    assert report.ended == "end of stream" and report.frames_in == 64
    assert report.frames_dropped == 0 and report.frames_out == 64 and not report.drop
    assert _segments_ok(tmp_path / "out", report) == 64


def _send_udp(port: int, frames: np.ndarray, fps: int, delay: float = 0.5) -> threading.Thread:
    def send():
        time.sleep(delay)  # the receiver listens by then
        _mux_ts(f"udp://127.0.0.1:{port}?pkt_size=1316", frames, fps, real_time=True)

    thread = threading.Thread(target=send, daemon=True)
    thread.start()
    return thread


def test_udp_stream_in_real_time_keeps_up_with_bounded_latency_and_ends_on_loss(anonymizer, tmp_path):
    port = _free_port(socket.SOCK_DGRAM)
    frames = _frames(64)
    sender = _send_udp(port, frames, fps=25)
    out = tmp_path / "out"
    report = anonymize_stream(f"udp://127.0.0.1:{port}", out, anonymizer, segment_seconds=1.0, timeout=3)
    sender.join()
    assert report.ended.startswith("stream lost")  # UDP has no end: the silence after the sender is the loss
    assert "ExitError" not in report.ended, report.ended  # said as "no data for 3 s (--stream-timeout)"
    assert report.frames_dropped == 0 and report.frames_out == report.frames_in >= 56  # the decoder may hold a few
    assert _segments_ok(out, report) == report.frames_out and len(report.segments) >= 2  # 25-frame segments
    # One clip of 8 frames at 25 fps is 0.32 s; compute of a tiny model's chunk is a few ms. The demuxer releases a
    # frame when the next one begins, so the last chunk before the silence waits for the loss timeout.
    assert report.latency["p50"] < 0.32 + 0.5, report.latency
    assert max(lat for _, lat in list(report.chunk_latency)[:-1]) < 0.32 + 1.0, report.chunk_latency
    with av.open(str(report.segments[0])) as c:
        assert float(c.streams.video[0].average_rate) == pytest.approx(25, rel=0.01)


def test_a_size_change_midway_starts_a_new_segment(anonymizer, tmp_path):
    data = _ts(_frames(20, 96, 72)) + _ts(_frames(20, 128, 72, seed=1))  # one stream, the size changes at frame 20
    # Read as a recording (no chunk dropped): an HTTP source outruns compute, and with drops which chunk is the first
    # written at the new size would depend on the machine's load.
    report = _stream_over_http(tmp_path, data, anonymizer, drop=False)
    assert report.ended == "end of stream"
    sizes = [c for c in report.changes if "size" in c]
    assert sizes == ["size 96x72 -> 128x72 at frame 20: a new segment"], report.changes
    lines = _index(tmp_path / "out")
    assert [(line["first_frame"], line["frames"]) for line in lines] == [(0, 20), (20, 20)]
    assert lines[0]["size"] != lines[1]["size"]
    assert report.frames_dropped == 0 and report.frames_out == report.frames_in == 40


# A camera whose frames come 40 ms apart but stall for 200 ms once in every 8 (the median interval, and so the
# measured rate, stays 25 fps): written back to back at 25 fps, the segment fell 0.16 s further behind every chunk.
STALLED = np.cumsum([0.0] + [0.2 if i % 8 == 5 else 0.04 for i in range(39)])


def test_a_variable_rate_camera_keeps_its_frame_times(anonymizer, tmp_path):
    report = _stream_over_http(tmp_path, _ts(_frames(40), times=STALLED), anonymizer, drop=False)
    assert report.frames_out == 40 and len(report.segments) == 1 and not report.changes
    np.testing.assert_allclose(_decoded_times(report.segments[0]), STALLED, atol=2e-3)
    (line,) = _index(tmp_path / "out")
    assert line["fps"] == 25.0 and line["seconds"] == pytest.approx(STALLED[-1] + 0.04, abs=1e-6)


def test_frame_times_place_chunks_by_index_span_and_arrivals():
    """frame_times hands the segment's clock each frame's input-index span (dropped chunks between) and, for a live
    source, how far apart the frames arrived."""
    from stpcore import media
    from stpcore.stream import STALL, _Chunk, frame_times

    def segment():
        return {"clock": media.FrameClock(1 / 25, max_jump=STALL), "last": None}

    def chunk(first, times, arrivals):
        return _Chunk(first, [None] * len(times), list(arrivals), 25.0, list(times), len(times))

    live = segment()
    assert frame_times(live, chunk(100, [5.0, 5.04], [0.0, 0.04]), live=True) == pytest.approx([0.0, 0.04])
    # After a dropped chunk (input frames 102-109): at the source's time, within the span of 9 frames.
    assert frame_times(live, chunk(110, [5.40, 5.44], [0.4, 0.44]), live=True) == pytest.approx([0.40, 0.44])
    # A camera silent for 10 s (it arrived 10 s later too) is kept; a 10 s clock step arriving on time is bridged.
    assert frame_times(live, chunk(112, [15.48], [10.48]), live=True) == pytest.approx([10.48])
    recording = segment()
    frame_times(recording, chunk(0, [1.0], [0.0]), live=False)
    assert frame_times(recording, chunk(1, [11.0], [0.001]), live=False) == pytest.approx([0.04])


def test_the_frame_rate_is_measured_per_chunk():
    class Stub:
        def __init__(self):
            self.frames_dropped = 0

    reader = _Reader(None, 8, 25.0, Stub(), threading.Event())
    assert reader._rate([i / 25 for i in range(8)]) == 25.0
    assert reader._rate([i / 24 for i in range(8)]) == 25.0  # within 25%: the same rate
    assert reader._rate([i / 10 for i in range(8)]) == pytest.approx(10.0)
    assert reader._rate([None] * 8) == pytest.approx(10.0)  # no timestamps: the rate stands


def test_one_jump_in_the_timestamps_is_not_a_new_rate():
    """A reconnect or clock step (+10 s once) made one chunk read as about 1 fps: a bogus segment."""
    class Stub:
        frames_dropped = 0

    reader = _Reader(None, 8, 25.0, Stub(), threading.Event())
    times = [i / 25 + (10.0 if i >= 4 else 0.0) for i in range(8)]
    assert reader._rate(times) == 25.0


def _stdin_run(checkpoint, out, first: bytes, hold: float, after: bytes = b"STPrivacy"):
    """The CLI on standard input: ``first`` written, the pipe then held open (silent) and SIGTERM sent ``hold``
    seconds after the line starting ``after`` (default: the model is loaded; b"stream -: open": the stream is open
    and read). Returns (returncode, stdout, stderr, seconds from SIGTERM to exit)."""
    proc = subprocess.Popen([sys.executable, "-m", "stpcore", "anonymize", "-", "-o", str(out), "--checkpoint",
                             str(checkpoint), "--input-format", "mpegts", "--segment-seconds", "1", "--threads", "1"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT)
    lines, ready = [], threading.Event()

    def read():
        for line in proc.stdout:
            lines.append(line.decode())
            if line.startswith(after):
                ready.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    proc.stdin.write(first)
    proc.stdin.flush()
    assert ready.wait(120), "".join(lines)
    time.sleep(hold)
    proc.send_signal(15)
    sent = time.monotonic()
    try:
        proc.wait(timeout=30)
    finally:
        took = time.monotonic() - sent
        proc.kill()
        proc.stdin.close()
    reader.join(timeout=10)
    return proc.returncode, "".join(lines), proc.stderr.read().decode(), took


@pytest.mark.parametrize("frames, expect", [(5, "opening"), (60, "silent")])
def test_sigterm_ends_a_silent_stdin_stream_at_once(checkpoint, tmp_path, frames, expect):
    """A pipe that sent a little and then fell silent (held open): SIGTERM hung the run while FFmpeg probed it, or
    ended it only after the reader thread's long join, in an interpreter abort (rc -6), frames uncounted."""
    data = _ts(_frames(frames))
    if expect == "opening":
        data = data[: len(data) // 2]  # too little for the probe: the open is still reading
    # "silent": stopped while the reader waits for more (the stream open); "opening": while FFmpeg still probes.
    rc, stdout, stderr, took = _stdin_run(checkpoint, tmp_path / "out", data, hold=2.0,
                                          after=b"stream -: open" if expect == "silent" else b"STPrivacy")
    # The bug took the reader's join, timeout + 1 = 11 s, or hung; 6.5 s was measured once on a loaded 2-core machine.
    assert took < 9.0, (took, stdout, stderr[-2000:])
    assert "Fatal Python error" not in stderr and rc in (0, 130), (rc, stderr[-2000:])
    if expect == "silent":
        assert rc == 0 and "stream -: stopped;" in stdout, stdout
        counts = [int(x) for x in re.findall(r"(\d+) frames in, (\d+) written .*?, (\d+) dropped", stdout)[0]]
        assert counts[0] == counts[1] + counts[2], stdout  # every frame in is written or counted as dropped
        assert counts[0] >= frames - 8, stdout  # the demuxer and decoder may still hold a few when the stop comes
    elif rc == 130:  # stopped while FFmpeg still probed the pipe
        assert "stopped before the stream - (standard input) could be opened" in stderr, stderr[-2000:]
    else:  # the probe had enough: the reader was waiting for more
        assert "stream -: stopped;" in stdout, stdout


def test_stdin_through_the_cli(checkpoint, tmp_path):
    out = tmp_path / "out"
    run = subprocess.run([sys.executable, "-m", "stpcore", "anonymize", "-", "-o", str(out), "--checkpoint",
                          str(checkpoint), "--input-format", "mpegts", "--segment-seconds", "1", "--threads", "1"],
                         input=_ts(_frames(48)), capture_output=True, timeout=300, cwd=ROOT)
    text = run.stdout.decode()
    assert run.returncode == 0, run.stderr.decode()[-2000:]
    assert "stream standard input" not in text  # the source is shown as given
    assert "stream -: end of stream; 48 frames in" in text
    assert list(out.glob("stream.*.mp4")) and (out / "stream.segments.jsonl").is_file()


def test_sigterm_ends_a_live_run_cleanly(checkpoint, tmp_path):
    port = _free_port(socket.SOCK_DGRAM)
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "stpcore", "anonymize", f"udp://127.0.0.1:{port}", "-o", str(out),
                             "--checkpoint", str(checkpoint), "--segment-seconds", "0.5", "--threads", "1",
                             "--name", "cam", "--stream-timeout", "60"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, cwd=ROOT, text=True)
    lines, ready = [], threading.Event()

    def read():
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("STPrivacy"):  # the model is loaded: the stream is opened next
                ready.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    assert ready.wait(120), "".join(lines) + proc.stderr.read()
    sender = _send_udp(port, _frames(250), fps=25, delay=1.0)  # 10 s of video
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not (out / "cam.segments.jsonl").is_file():
        time.sleep(0.2)
    proc.send_signal(15)
    proc.wait(timeout=60)
    reader.join(timeout=10)
    sender.join()
    stdout = "".join(lines)
    assert proc.returncode == 0, proc.stderr.read()[-2000:]
    assert "stopped" in stdout and "segment" in stdout
    lines = _index(out, "cam")
    files = sorted(out.glob("cam.*.mp4"))
    assert [f.name for f in files] == [line["file"] for line in lines]  # every file finished and indexed
    for f, line in zip(files, lines, strict=True):
        with av.open(str(f)) as c:
            assert sum(1 for _ in c.decode(video=0)) == line["frames"]


def test_a_rerun_into_the_same_folder_continues_the_numbering(anonymizer, tmp_path):
    (tmp_path / "www").mkdir()
    (tmp_path / "www" / "cam.ts").write_bytes(_ts(_frames(24)))
    server = _serve_http(tmp_path / "www")
    try:
        url = f"http://127.0.0.1:{server.server_port}/cam.ts"
        first = anonymize_stream(url, tmp_path / "out", anonymizer, segment_seconds=0.2, timeout=5)
        kept = {p: p.read_bytes() for p in first.segments}
        second = anonymize_stream(url, tmp_path / "out", anonymizer, segment_seconds=0.2, timeout=5)
    finally:
        server.shutdown()
    assert first.segments and second.segments and not set(first.segments) & set(second.segments)
    assert all(p.read_bytes() == data for p, data in kept.items())  # the first recording is untouched
    numbers = [int(p.name.split(".")[1]) for p in first.segments + second.segments]
    assert numbers == list(range(len(numbers)))
    files = [line["file"] for line in _index(tmp_path / "out")]
    assert files == [p.name for p in first.segments + second.segments]


def test_an_error_on_the_model_side_abandons_the_open_segment_and_keeps_the_finished(anonymizer, tmp_path):
    class FailsThird:
        def __init__(self):
            self.cfg, self.calls = anonymizer.cfg, 0

        def __call__(self, clips, **kw):
            self.calls += 1
            if self.calls == 3:
                raise RuntimeError("the accelerator went away")
            return anonymizer(clips, **kw)

    port = _free_port(socket.SOCK_DGRAM)
    sender = _send_udp(port, _frames(48), fps=25)  # real time: compute keeps up, so every chunk reaches the model
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="accelerator went away"):
        # 8-frame chunks, 1-chunk segments (0.32 s at 25 fps): the first segment closes before the third chunk
        anonymize_stream(f"udp://127.0.0.1:{port}", out, FailsThird(), segment_seconds=0.3, timeout=5)
    sender.join()
    lines = _index(out)
    assert [line["file"] for line in lines] == ["stream.00000.mp4"]  # the finished one only
    assert sorted(p.name for p in out.iterdir()) == ["stream.00000.mp4", "stream.segments.jsonl"]
    with av.open(str(out / "stream.00000.mp4")) as c:
        assert sum(1 for _ in c.decode(video=0)) == lines[0]["frames"]


def test_stop_with_a_silent_source_returns_and_counts_every_frame(anonymizer, tmp_path):
    port = _free_port(socket.SOCK_DGRAM)
    frames = _frames(12)  # a chunk and a half, then silence
    sender = _send_udp(port, frames, fps=25)
    stop = threading.Event()
    threading.Timer(3.0, stop.set).start()
    start = time.monotonic()
    report = anonymize_stream(f"udp://127.0.0.1:{port}", tmp_path / "out", anonymizer, timeout=4, stop=stop)
    sender.join()
    assert time.monotonic() - start < 3.0 + 1.5 + 4 + 2  # stop, a second's grace, the read timeout, slack
    assert report.frames_in == report.frames_out + report.frames_dropped
    assert report.frames_out >= 8


@pytest.mark.parametrize("flag, value", [("--name", "../escape"), ("--name", "/abs/cam"), ("--name", ".hidden"),
                                         ("--stream-timeout", "0"), ("--stream-timeout", "-1"),
                                         ("--segment-seconds", "nan"), ("--segment-seconds", "inf")])
def test_bad_stream_flags_are_refused_by_the_parser(flag, value, capsys):
    from stpcore.cli import build_parser

    with pytest.raises(SystemExit):
        build_parser().parse_args(["anonymize", "udp://127.0.0.1:9", "-o", "o", "--checkpoint", "c.pt", flag, value])
    assert "expected" in capsys.readouterr().err


def test_a_segment_name_that_would_leave_the_folder_is_refused(anonymizer, tmp_path):
    with pytest.raises(ValueError, match="plain file name"):
        anonymize_stream("udp://127.0.0.1:9", tmp_path / "out", anonymizer, name="../x")
    assert not (tmp_path / "out").exists() and not (tmp_path / "x.segments.jsonl").exists()


@pytest.mark.parametrize("extra, message", [
    (["b.mp4"], "without several inputs"),
    (["--adaptive", "0.5"], "without --adaptive"),
    (["--side-by-side"], "without --side-by-side"),
])
def test_stream_arguments_are_checked_before_anything_runs(extra, message, tmp_path, capsys):
    from stpcore.cli import main

    assert main(["anonymize", "rtsp://cam.local/stream1", *extra, "-o", str(tmp_path / "o"), "--checkpoint",
                 "absent.pt"]) == 2
    assert message in capsys.readouterr().err and not (tmp_path / "o").exists()


def test_rtsp_and_v4l2_through_the_cli_name_the_source(checkpoint, tmp_path, capsys):
    from stpcore.cli import main

    for source in (f"rtsp://127.0.0.1:{_free_port()}/cam", "/dev/video97"):
        assert main(["anonymize", source, "-o", str(tmp_path / "o"), "--checkpoint", str(checkpoint),
                     "--stream-timeout", "2"]) == 2
        assert f"cannot open the stream {source}" in capsys.readouterr().err
        assert not (tmp_path / "o").exists()


def test_a_frame_rate_change_midway_starts_a_new_segment_at_the_new_rate(anonymizer, tmp_path):
    data = _ts(_frames(24), fps=25) + _ts(_frames(32, seed=2), fps=10)  # the rate falls at frame 24
    # No drop (as above): with drops, every 25 fps chunk could be dropped on a loaded machine.
    report = _stream_over_http(tmp_path, data, _Slow(anonymizer, 0.0), drop=False)
    assert any("frame rate 25 -> 10 at frame 24" in c for c in report.changes), report.changes
    lines = _index(tmp_path / "out")
    assert [(line["fps"], line["first_frame"], line["frames"]) for line in lines] == [(25.0, 0, 24), (10.0, 24, 32)]
    with av.open(str(tmp_path / "out" / lines[-1]["file"])) as c:
        assert float(c.streams.video[0].average_rate) == pytest.approx(10, rel=0.01)


@pytest.mark.parametrize("kw, match", [({"output_size": "bogus"}, "output_size one of"),
                                       ({"view": "wide"}, "view must be one of"),
                                       ({"view": "center", "output_size": "source"}, "needs view='full'"),
                                       ({"view": "center", "min_overlap": 8}, "one window")])
def test_bad_view_settings_are_refused_before_the_source_opens(anonymizer, tmp_path, kw, match):
    """output_size='bogus' ran silently as 'work' (the CLI's choices hid it; the API did not check)."""
    with pytest.raises(ValueError, match=match):
        anonymize_stream("udp://127.0.0.1:9", tmp_path / "out", anonymizer, timeout=1, **kw)
    assert not (tmp_path / "out").exists()


def test_the_model_is_prepared_before_the_source_opens(anonymizer, tmp_path):
    """The one-time export or compile runs before the stream opens (not on its first chunk, while the camera's
    frames pile up); a model that cannot run fails there, with the source never opened and nothing written."""
    from stpcore.anonymize import ModelError

    order = []

    class Prepared:
        cfg = anonymizer.cfg

        def prepare(self, batch_size, **kw):
            order.append(("prepare", batch_size))
            raise RuntimeError("no compiler")

    port = _free_port(socket.SOCK_DGRAM)  # nothing sends: opening it would wait for the timeout
    start = time.monotonic()
    with pytest.raises(ModelError, match="no compiler"):
        anonymize_stream(f"udp://127.0.0.1:{port}", tmp_path / "out", Prepared(), batch_size=3, timeout=20)
    assert order == [("prepare", 3)] and time.monotonic() - start < 10
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("view, sizes", [("center", {1}), ("full", {4})])
def test_the_batch_sizes_the_stream_makes_are_prepared_before_its_first_frame(anonymizer, tmp_path, view, sizes):
    """A compiled model has one graph for a batch of one clip and another for 2 or more: the stream prepares the
    sizes its chunks make (known from the frame size once the source is open), before it reads a frame, so its
    first chunk does not compile (96x72 at the working scale 49x37: one centre window, or 2 x 2 windows of 32)."""
    calls = []

    class Recording:
        cfg = anonymizer.cfg

        def prepare(self, batch_sizes, **kw):
            calls.append(batch_sizes)
            return 0.0

        def __call__(self, clips, **kw):
            calls.append(("batch", clips.shape[0]))
            return anonymizer(clips, **kw)

    port = _free_port(socket.SOCK_DGRAM)
    sender = _send_udp(port, _frames(16), fps=25)
    anonymize_stream(f"udp://127.0.0.1:{port}", tmp_path / "out", Recording(), batch_size=4, view=view, timeout=5)
    sender.join()
    assert calls[:2] == [4, sizes]  # before the source opens, then once its frame size is known
    assert {n for what, n in calls[2:]} == sizes and all(what == "batch" for what, _ in calls[2:])
