"""Media writers and readers: videos, pictures, atomic files."""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest
import torch

av = pytest.importorskip("av")  # PyAV: CI installs it; a GPU machine without it skips these modules

from stpcore import media  # noqa: E402


def _decode(path):
    with av.open(str(path)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])


def test_write_video_round_trip_and_atomic(tmp_path):
    frames = np.zeros((6, 34, 50, 3), dtype=np.uint8)
    frames[:, 10:20, 10:30] = 200
    path = media.write_video(tmp_path / "a.mp4", frames, fps=10)
    decoded = _decode(path)
    assert decoded.shape == frames.shape
    assert np.abs(decoded.astype(int) - frames).mean() < 3
    assert [p.name for p in tmp_path.iterdir()] == ["a.mp4"]  # no temporary left behind
    assert oct(os.stat(path).st_mode & 0o777) != oct(0o600)


def test_odd_sizes_are_padded_with_the_edge_pixels_not_black(tmp_path):
    """4:2:0 needs even sizes: a 97x71 frame is encoded as 98x72, its last row and column repeated (black padding
    would read as a dropped tubelet)."""
    frames = np.full((3, 71, 97, 3), 128, dtype=np.uint8)  # grey: no chroma, so the luma round trip is near exact
    frames[:, -1, :] = 220  # the last row and column differ from the inside, so the padding must copy them
    frames[:, :, -1] = 220
    with media.VideoWriter(tmp_path / "odd.mp4", fps=10, crf=0) as writer:
        assert writer.size is None
        writer.write(frames)
        assert writer.size == (98, 72)  # (W, H) as encoded
    decoded = _decode(tmp_path / "odd.mp4").astype(int)
    assert decoded.shape == (3, 72, 98, 3)
    assert np.abs(decoded[:, :71, :97] - frames).max() <= 3
    assert np.abs(decoded[:, 71, :97] - frames[:, 70]).max() <= 3  # the extra row repeats the last one
    assert np.abs(decoded[:, :71, 97] - frames[:, :, 96]).max() <= 3  # the extra column repeats the last one
    assert np.abs(decoded[:, 71, 97] - 220).max() <= 3


def test_atomic_path_leaves_nothing_on_failure(tmp_path):
    with pytest.raises(RuntimeError):
        with media.atomic_path(tmp_path / "x.txt") as tmp:
            tmp.write_text("partial")
            raise RuntimeError("interrupted")
    assert list(tmp_path.iterdir()) == []


def test_write_video_rejects_bad_frames(tmp_path):
    with pytest.raises(ValueError, match="uint8"):
        media.write_video(tmp_path / "a.mp4", np.zeros((2, 8, 8, 3), dtype=np.float32))
    with pytest.raises(ValueError, match="codec"):
        media.write_video(tmp_path / "a.mp4", np.zeros((2, 8, 8, 3), dtype=np.uint8), codec="divx")


def test_to_uint8_inverts_normalisation():
    pixels = torch.randint(0, 256, (2, 4, 4, 3), dtype=torch.uint8)
    x = pixels.float().div(255).permute(3, 0, 1, 2)
    mean = torch.tensor(media.IMAGENET_MEAN).reshape(3, 1, 1, 1)
    std = torch.tensor(media.IMAGENET_STD).reshape(3, 1, 1, 1)
    assert np.array_equal(media.to_uint8((x - mean) / std), pixels.numpy())


def _stored_sideways(path, rotation, codec="libx264", frames=4):
    """A 64x48 video stored as coded (landscape), its display matrix saying: turn it ``rotation`` degrees
    counterclockwise (what a phone writes for portrait video). A bright block marks the stored top-left corner."""
    img = np.full((48, 64, 3), 30, np.uint8)
    img[:8, :16] = 230
    with av.open(str(path), "w") as c:
        s = c.add_stream(codec, rate=10)
        s.width, s.height, s.pix_fmt = 64, 48, "yuv420p"
        s.set_display_rotation(rotation)
        for _ in range(frames):
            for p in s.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return path


def _block_corner(frame):
    """Which corner the bright block is in: (top?, left?)."""
    bright = frame.mean(axis=2) > 130
    ys, xs = np.nonzero(bright)
    return bool(ys.mean() < frame.shape[0] / 2), bool(xs.mean() < frame.shape[1] / 2)


# FFmpeg's display matrix rotation (av_display_rotation_get, what PyAV's VideoFrame.rotation reads) is the angle
# by which display turns the stored picture counterclockwise: +90 takes the stored top-left corner to the bottom
# left of an upright (portrait) picture, -90 to the top right, 180 to the bottom right.
@pytest.mark.parametrize("rotation, shape, corner", [(0, (48, 64), (True, True)), (90, (64, 48), (False, True)),
                                                     (-90, (64, 48), (True, False)), (180, (48, 64), (False, False))])
def test_videos_stored_sideways_are_read_upright(tmp_path, rotation, shape, corner):
    from stpcore.data.decode_pyav import decode_frames, first_frame_turns

    path = _stored_sideways(tmp_path / "phone.mp4", rotation)
    with av.open(str(path)) as c:
        assert next(c.decode(video=0)).rotation % 360 == rotation % 360  # the file says so, as a phone's would
    frames = list(media.read_frames(path))
    assert frames[0].shape == (*shape, 3) and _block_corner(frames[0]) == corner
    decoded, n = decode_frames(path, np.array([0, 3]))  # the loaders' decoder: the same orientation
    assert n == 4 and decoded.shape == (2, *shape, 3) and np.array_equal(decoded[0], frames[0])
    assert first_frame_turns(path) == (rotation // 90) % 4


def test_transcode_writes_a_sideways_video_upright(tmp_path):
    """Decoders that ignore the display rotation (DALI's) read the transcoded file as players show the source."""
    from stpcore.data.transcode import transcode_file

    src = _stored_sideways(tmp_path / "phone.mp4", 90, frames=6)
    assert transcode_file(src, tmp_path / "phone.webm", codec="vp9") == 6
    with av.open(str(tmp_path / "phone.webm")) as c:
        first = next(c.decode(video=0))
        assert first.rotation == 0 and (first.height, first.width) == (64, 48)
        assert _block_corner(first.to_ndarray(format="rgb24")) == (False, True)


class _Failing:
    """A PyAV object whose ``method`` raises ``exc`` (after the real call, when ``after``); the rest passes through."""

    def __init__(self, real, method: str, exc: BaseException, after: bool = False):
        self._real, self._method, self._exc, self._after = real, method, exc, after

    def __getattr__(self, name):
        attr = getattr(self._real, name)
        if name != self._method:
            return attr

        def call(*args):
            if self._after:
                attr(*args)
            if name != "encode" or not args:  # encode() with no frame: the flush
                raise self._exc
            return attr(*args)
        return call


@pytest.mark.parametrize("where, exc", [("close", OSError(27, "File too large")), ("encode", KeyboardInterrupt())],
                         ids=["full-disk-at-close", "ctrl-c-in-flush"])
def test_a_writer_that_fails_while_finishing_leaves_no_file(tmp_path, where, exc):
    """The trailer written at close (a full disk) or a Ctrl-C during the encoder's flush: the hidden temporary
    file was left behind (one per failed input), and the error named it. Now nothing is left, and the error says
    which output it was writing."""
    target = tmp_path / "out.mp4"
    with pytest.raises(type(exc)) as raised:
        with media.VideoWriter(target, fps=10) as writer:
            writer.write(np.zeros((3, 16, 16, 3), np.uint8))
            if where == "close":
                writer._container = _Failing(writer._container, "close", exc, after=True)
            else:
                writer._stream = _Failing(writer._stream, "encode", exc)
    assert list(tmp_path.iterdir()) == []
    if sys.version_info >= (3, 11):  # exception notes
        assert f"while writing {target}" in "\n".join(getattr(raised.value, "__notes__", []))


@pytest.mark.parametrize("codec, suffix", [("h264", ".mp4"), ("vp9", ".webm")])
def test_written_video_says_which_colour_matrix_it_was_converted_with(tmp_path, codec, suffix):
    """The RGB frames become YUV by BT.601's matrix, limited range; untagged, players read HD video with BT.709's
    (the review saw RGB 200,60,40 play as 212,72,36). The stream now carries the tags its pixels were made with."""
    import av

    frames = np.zeros((2, 720, 1280, 3), np.uint8)
    frames[...] = (200, 60, 40)
    path = media.write_video(tmp_path / f"hd{suffix}", frames, fps=10, codec=codec)
    with av.open(str(path)) as container:
        frame = next(container.decode(video=0))
        assert (frame.colorspace, frame.color_range) == (6, 1)  # SMPTE 170M (BT.601), MPEG (limited) range
        assert np.abs(frame.to_ndarray(format="rgb24")[360, 640].astype(int) - (200, 60, 40)).max() <= 2


def _anamorphic(path, frames=5):
    """72x48 stored pixels with a sample aspect ratio of 32:27 (shown 16:9, at 85x48): the left half white."""
    from fractions import Fraction

    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=25)
        stream.width, stream.height, stream.pix_fmt = 72, 48, "yuv420p"
        stream.codec_context.sample_aspect_ratio = Fraction(32, 27)
        image = np.zeros((48, 72, 3), np.uint8)
        image[:, :36] = 255
        for _ in range(frames):
            out.mux(stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")))
        out.mux(stream.encode())
    return path


def test_non_square_pixels_are_read_as_displayed(tmp_path):
    """DV/HDV/DVD video stores its pictures in non-square pixels; read as stored, people came out squeezed (a 16:9
    picture as 3:2) into the model and the output. Every reader now gives the displayed shape: 72x48 at 32:27 is
    85x48, the white half still half."""
    from stpcore.data.decode_pyav import decode_frames, probe
    from stpcore.data.transcode import transcode_file

    src = _anamorphic(tmp_path / "dv.mp4")
    frames = np.stack(list(media.read_frames(src)))
    assert frames.shape == (5, 48, 85, 3)
    white = (frames[0, 24, :, 0] > 128).sum()
    assert abs(white - 85 / 2) <= 2, white
    assert probe(src).width == 85 and decode_frames(src, np.arange(2))[0].shape == (2, 48, 85, 3)
    transcode_file(src, tmp_path / "square.webm", codec="vp9")  # square pixels, the odd column dropped
    square = np.stack(list(media.read_frames(tmp_path / "square.webm")))
    assert square.shape == (5, 48, 84, 3)
    assert np.abs(square.astype(int) - frames[:, :, :84]).mean() < 3


# A variable-frame-rate clip (phones record so): 15 frames 0.1 s apart, then 15 frames 1/30 s apart.
VFR_TIMES = [i / 10 for i in range(15)] + [1.5 + i / 30 for i in range(15)]


def _pyav_vfr(path, encoder="libx264", times=VFR_TIMES):
    """A VFR file written with PyAV directly (not through stpcore's writer): each frame has its own time."""
    from fractions import Fraction

    base = Fraction(1, 1000)
    with av.open(str(path), "w") as container:
        stream = container.add_stream(encoder, rate=30)
        stream.width, stream.height, stream.pix_fmt = 48, 32, "yuv420p"
        stream.codec_context.time_base = base
        for i, t in enumerate(times):
            frame = av.VideoFrame.from_ndarray(np.full((32, 48, 3), 8 * i, dtype=np.uint8), format="rgb24")
            frame.pts, frame.time_base = round(t / base), base
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def _times(path):
    with av.open(str(path)) as container:
        return np.array([float(f.time) for f in container.decode(video=0)])


@pytest.mark.parametrize("suffix", [".mp4", ".webm"])
def test_read_timed_frames_gives_each_frames_time(tmp_path, suffix):
    src = _pyav_vfr(tmp_path / f"vfr{suffix}", "libx264" if suffix == ".mp4" else "libvpx-vp9")
    read = list(media.read_timed_frames(src))
    assert len(read) == 30
    np.testing.assert_allclose([t for _, t in read], VFR_TIMES, atol=1e-3)
    np.testing.assert_array_equal(np.stack([f for f, _ in read]), np.stack(list(media.read_frames(src))))


@pytest.mark.parametrize("codec, tolerance", [("h264", 1e-4), ("vp9", 1e-3), ("mpeg4", 1 / 60)])
def test_video_writer_keeps_given_times(tmp_path, codec, tolerance):
    """Frames written with their times are shown at them (MPEG-4 in AVI: rounded to the 1 / fps period); written
    without, a writer at the same fps spaces them evenly and the timing drifts from the source's."""
    frames = np.stack([np.full((32, 48, 3), 8 * i, dtype=np.uint8) for i in range(30)])
    suffix = media.CODECS[codec][1]
    with media.VideoWriter(tmp_path / f"timed{suffix}", fps=30, codec=codec) as writer:
        writer.write(frames[:7], times=VFR_TIMES[:7])  # in pieces, as anonymize writes chunk by chunk
        writer.write(frames[7:], times=VFR_TIMES[7:])
    np.testing.assert_allclose(_times(tmp_path / f"timed{suffix}"), VFR_TIMES, atol=tolerance)
    media.write_video(tmp_path / f"even{suffix}", frames, fps=30, codec=codec)
    assert np.abs(_times(tmp_path / f"even{suffix}") - VFR_TIMES).max() > 0.4


@pytest.mark.parametrize("codec", ["h264", "vp9"])
def test_video_writer_times_made_increasing_and_checked(tmp_path, codec):
    """Also in WebM, whose container keeps milliseconds (a one-tick step, 1/90000 s, vanished there)."""
    frames = np.zeros((4, 16, 16, 3), dtype=np.uint8)
    suffix = media.CODECS[codec][1]
    with media.VideoWriter(tmp_path / f"a{suffix}", fps=10, codec=codec) as writer:
        writer.write(frames, times=[0.0, 0.1, 0.1, 0.05])  # a repeated and a backwards time (a damaged source)
        writer.write(frames[:1])  # no time: 1 / fps after the previous frame
    times = _times(tmp_path / f"a{suffix}")
    assert len(times) == 5 and (np.diff(times) > 0).all()
    np.testing.assert_allclose(times[[0, 1]], [0.0, 0.1], atol=1.5e-3)
    np.testing.assert_allclose(times[4] - times[3], 0.1, atol=1.5e-3)  # 1 / fps after the previous frame
    with pytest.raises(ValueError, match="times must be 4 finite numbers"):
        with media.VideoWriter(tmp_path / "b.mp4", fps=10) as writer:
            writer.write(frames, times=[0.0, 0.1, float("nan"), 0.3])
    assert not (tmp_path / "b.mp4").exists()


def test_frame_clock_keeps_source_times_and_bridges_what_is_not_time():
    # A repeated timestamp once in every 8 frames at 25 fps: 1 ms after the frame before, and no drift after it
    # (placed one period on and re-anchored there, 80 frames ended 0.4 s late).
    clock = media.FrameClock(1 / 25)
    source = [i / 25 for i in range(80)]
    times = [t if i % 8 != 7 else source[i - 1] for i, t in enumerate(source)]
    placed = [clock.place(t) for t in times]
    assert all(b > a for a, b in zip(placed, placed[1:], strict=False))
    np.testing.assert_allclose([p for i, p in enumerate(placed) if i % 8 != 7],
                               [t for i, t in enumerate(source) if i % 8 != 7], atol=1e-9)
    assert placed[7] == pytest.approx(placed[6] + media.REPEAT)
    # A missing time follows by one period, and the source's times go on unchanged after it.
    clock = media.FrameClock(0.1)
    assert [clock.place(t) for t in (3.0, 3.1, None, 3.3)] == pytest.approx([0.0, 0.1, 0.2, 0.3])
    # A clock that goes back continues one period on, keeping its spacing from there; a jump forward is kept
    # (max_jump None: a file).
    assert [clock.place(t) for t in (0.0, 0.1, 10.1)] == pytest.approx([0.4, 0.5, 10.5])
    # With max_jump (a live stream): a jump beyond the span by more than it is bridged unless the frames arrived that
    # far apart; a span of several frames (dropped ones between) is allowed for.
    clock = media.FrameClock(0.04, max_jump=2.0)
    assert clock.place(100.0) == 0.0
    assert clock.place(110.0, waited=0.04) == pytest.approx(0.04)  # a clock step: bridged
    assert clock.place(111.0, frames=50) == pytest.approx(1.04)  # 50 dropped frames' span plus a 1 s stall: kept
    assert clock.place(116.0, waited=5.0) == pytest.approx(6.04)  # a 5 s silence the arrivals confirm: kept


def test_frame_clock_bridges_a_stuck_clock_and_a_frame_out_of_place():
    # A clock stuck on one time for 160 frames at 25 fps spans 6.4 s, not 160 ms (1 ms a frame played 40x fast).
    clock = media.FrameClock(0.04)
    placed = [clock.place(5.0) for _ in range(160)]
    assert placed[1] == pytest.approx(media.REPEAT) and placed[-1] == pytest.approx(media.REPEAT + 158 * 0.04)
    assert clock.place(11.4) == pytest.approx(6.4)  # the clock moves on at its true time: kept
    # A repeat, then a time half a millisecond on: no period's shift for the frames after.
    clock = media.FrameClock(0.04)
    placed = [clock.place(t) for t in (0.0, 0.04, 0.04, 0.0405, 0.08, 0.12)]
    np.testing.assert_allclose(placed[-2:], [0.08, 0.12], atol=1e-9)
    assert all(b > a for a, b in zip(placed, placed[1:], strict=False))
    # One frame with a wrong time (0.0 in the middle of a file): bridged, and the timeline goes on as before it (the
    # clock re-anchored on it, and the next frame, on time again, read as a jump of 10 s: a frozen frame).
    clock = media.FrameClock(0.04)
    times = [i * 0.04 for i in range(250)] + [0.0, 10.04, 10.08]
    placed = [clock.place(t) for t in times]
    np.testing.assert_allclose(placed[-2:], [10.04, 10.08], atol=1e-9)
    with pytest.raises(ValueError, match="frames must be >= 1"):
        clock.place(11.0, frames=0)


def test_read_timed_frames_continues_across_a_clock_that_goes_back(tmp_path):
    """Two MPEG-TS recordings joined end to end (`cat a.ts b.ts`, as a camera's clock restart also looks): the
    second's times start again at 0. They continue one period after the last frame (the writer put every later frame
    one tick after the last: 50 frames in half a millisecond)."""
    parts = []
    for name in ("a", "b"):
        path = tmp_path / f"{name}.ts"
        with av.open(str(path), "w", format="mpegts") as container:
            stream = container.add_stream("mpeg2video", rate=25)
            stream.width, stream.height, stream.pix_fmt = 48, 32, "yuv420p"
            for i in range(10):
                frame = av.VideoFrame.from_ndarray(np.full((32, 48, 3), 20 * i, dtype=np.uint8), format="rgb24")
                for packet in stream.encode(frame):
                    container.mux(packet)
            for packet in stream.encode():
                container.mux(packet)
        parts.append(path.read_bytes())
    joined = tmp_path / "joined.ts"
    joined.write_bytes(b"".join(parts))
    raw = _times(joined)
    assert (np.diff(raw) < 0).any()  # the file's own clock goes back
    times = np.array([t for _, t in media.read_timed_frames(joined)])
    assert len(times) == 20
    np.testing.assert_allclose(times, np.arange(20) / 25, atol=2e-3)
