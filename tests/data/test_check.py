"""`stpcore data check`, through the command line, one test per problem it reports.

Every test builds its own small dataset (HMDB51 layout: `ROOT/<class>/<video>`, `<class>_test_split{1,2,3}.txt`,
a label CSV) from `_dataset`, breaks one thing, and asserts the report names that problem and that file. The
first test shows the intact dataset reports nothing, so each listing below comes from the one thing broken.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from stpcore.cli import main
from stpcore.data.labels import CSV_HEADER
from stpcore.data.synth import render_video, write_video

av = pytest.importorskip("av")

FRAMES = 32  # a clip covers (16 - 1) * 2 + 1 = 31 frames at HMDB51's stride: 32 is long enough


def _frames(n: int = FRAMES) -> np.ndarray:
    return render_video(0, np.zeros(5, int), np.random.default_rng(0), 64, 48, n)


def _dataset(root: Path) -> Path:
    """jump/ holds MPEG-4 .avi (the published codec), wave/ VP9 .webm; video 0 trains, video 1 tests."""
    for cls, codec, ext in (("jump", "mpeg4", ".avi"), ("wave", "vp9", ".webm")):
        for i in (0, 1):
            write_video(root / cls / f"{cls}_{i}{ext}", _frames(), fps=25, codec=codec)
        for split in (1, 2, 3):
            (root / f"{cls}_test_split{split}.txt").write_text(f"{cls}_0.avi 1\n{cls}_1.avi 2\n")
    _labels(root / "labels.csv", ["jump/jump_0", "jump/jump_1", "wave/wave_0", "wave/wave_1"])
    return root


def _labels(path: Path, keys: list[str]) -> None:
    path.write_text("".join(f"{line}\n" for line in [",".join(CSV_HEADER), *(f"{k},1,0,1,0,1" for k in keys)]))


def _check(capsys, root: Path, *flags: str) -> tuple[int, str]:
    code = main(["data", "check", str(root), *flags])
    return code, capsys.readouterr().out.rstrip("\n")


def _listed(report: str, category: str) -> list[str]:
    """The offenders the report lists under `category` (the lines indented below "<category>: <count>")."""
    lines = report.splitlines()
    heads = [i for i, line in enumerate(lines) if line.startswith(f"{category}: ")]
    assert heads, f"no {category!r} in the report:\n{report}"
    out = []
    for line in lines[heads[0] + 1 :]:
        if not line.startswith("  "):
            break
        out.append(line.strip())
    assert len(out) == int(lines[heads[0]].rsplit(": ", 1)[1]), report
    return out


def test_intact_dataset_reports_nothing(tmp_path, capsys):
    root = _dataset(tmp_path / "ds")
    code, report = _check(capsys, root, "--labels", str(root / "labels.csv"))
    assert code == 0, report
    assert report.splitlines() == [
        "videos found: 4", "labels matched: 4", "videos without a label: 0", "labels without a video: 0", "OK",
    ]


def test_corrupt_video(tmp_path, capsys):
    root = _dataset(tmp_path / "ds")
    bad = root / "wave" / "wave_1.webm"
    bad.write_bytes(np.random.default_rng(0).integers(0, 256, 4000, dtype=np.uint8).tobytes())
    code, report = _check(capsys, root)
    assert code == 1 and report.endswith("PROBLEMS FOUND")
    [entry] = _listed(report, "unreadable")
    assert entry.startswith(f"{bad} (")  # the detail says what FFmpeg could not read


@pytest.mark.parametrize("name", ["jump/jump_1.avi", "wave/wave_1.webm"], ids=["avi-frame-count", "webm-duration"])
def test_truncated_video(tmp_path, capsys, name):
    """Cut after 20 of 32 frames: an AVI header still counts 32 frames, a WebM header still says 1.28 s. The
    loader wraps such a video like a short one, so the check warns (exit 0) instead of failing."""
    root = _dataset(tmp_path / "ds")
    bad = root / name
    with av.open(str(bad)) as container:
        cut = [p.pos for p in container.demux(container.streams.video[0]) if p.size > 0][20]
    bad.write_bytes(bad.read_bytes()[:cut])
    code, report = _check(capsys, root)
    assert code == 0 and report.endswith("OK")
    [entry] = _listed(report, "truncated (ends before its header says; decoding wraps)")
    assert entry == f"{bad} (ends at 0.80 s, header says 1.28 s)"


def test_a_truncated_video_is_a_problem_for_the_dali_loader(tmp_path, capsys):
    """PyAV wraps a truncated video's frame indices into what is there; the DALI loader fails its clips and drops
    the video every epoch: with --decoder dali-* the check fails on it instead of warning."""
    root = _dataset(tmp_path / "ds")
    bad = root / "wave" / "wave_1.webm"
    with av.open(str(bad)) as container:
        cut = [p.pos for p in container.demux(container.streams.video[0]) if p.size > 0][20]
    bad.write_bytes(bad.read_bytes()[:cut])
    (root / "jump" / "jump_0.avi").unlink()  # DALI-CPU reads no MPEG-4: leave the VP9 videos alone
    (root / "jump" / "jump_1.avi").unlink()
    for split in (1, 2, 3):
        (root / f"jump_test_split{split}.txt").unlink()
    code, report = _check(capsys, root, "--decoder", "dali-cpu")
    assert code == 1, report
    assert _listed(report, "truncated (ends before its header says; the DALI loader drops it)") == [
        f"{bad} (ends at 0.80 s, header says 1.28 s)"]


def _mjpeg_with_blank_pictures(path: Path) -> None:
    """An MJPEG AVI whose header and index are intact and whose JPEG data are zeros: it probes, it does not
    decode."""
    import struct

    with av.open(str(path), "w") as out:
        stream = out.add_stream("mjpeg", rate=25)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuvj420p"
        for i in range(FRAMES):
            image = np.full((48, 64, 3), i * 5, np.uint8)
            out.mux(stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24").reformat(format="yuvj420p")))
        out.mux(stream.encode())
    data = bytearray(path.read_bytes())
    at = data.find(b"movi")
    while (at := data.find(b"00dc", at)) >= 0:
        size = struct.unpack("<I", data[at + 4:at + 8])[0]
        data[at + 8:at + 8 + size] = bytes(size)
        at += 8 + size
    path.write_bytes(bytes(data))


def test_a_video_whose_pictures_do_not_decode_is_unreadable(tmp_path, capsys):
    """Its header reads (frame count, size, codec), so the check said OK; the loaders skip it every epoch as
    unreadable. The check decodes the first frame."""
    root = _dataset(tmp_path / "ds")
    bad = root / "jump" / "jump_1.avi"
    _mjpeg_with_blank_pictures(bad)
    code, report = _check(capsys, root)
    assert code == 1 and report.endswith("PROBLEMS FOUND")
    [entry] = _listed(report, "unreadable")
    assert entry.startswith(f"{bad} (") and "InvalidData" in entry


def test_codec_the_decoder_cannot_read(tmp_path, capsys):
    """DALI's CPU decoder reads VP8/VP9/MJPEG, not the published MPEG-4 Part 2 (which PyAV reads: the intact
    dataset passes with the default decoder)."""
    root = _dataset(tmp_path / "ds")
    code, report = _check(capsys, root, "--decoder", "dali-cpu")
    assert code == 1
    assert _listed(report, "codec not readable by dali-cpu") == [
        f"{root / 'jump' / 'jump_0.avi'} (mpeg4)", f"{root / 'jump' / 'jump_1.avi'} (mpeg4)",
    ]


def test_too_short_video(tmp_path, capsys):
    root = _dataset(tmp_path / "ds")
    short = root / "wave" / "wave_0.webm"
    write_video(short, _frames(10), fps=25, codec="vp9")
    code, report = _check(capsys, root)
    assert code == 0 and report.endswith("OK")  # looped by the loader: a warning
    assert _listed(report, "too short (will be looped)") == [f"{short} (10 < 31 frames)"]


def test_split_entry_without_a_file(tmp_path, capsys):
    root = _dataset(tmp_path / "ds")
    with (root / "wave_test_split2.txt").open("a") as f:
        f.write("wave_lost.avi 1\n")
    code, report = _check(capsys, root)
    assert code == 1
    assert _listed(report, "missing file (split entry)") == ["wave/wave_lost (split 2 train)"]


def test_label_without_a_video(tmp_path, capsys):
    root = _dataset(tmp_path / "ds")
    _labels(root / "labels.csv", ["jump/jump_0", "jump/jump_1", "wave/wave_0", "wave/wave_1", "wave/wave_9"])
    code, report = _check(capsys, root, "--labels", str(root / "labels.csv"))
    assert code == 0  # label coverage is reported, not a reason to stop
    assert "labels matched: 4" in report
    assert _listed(report, "labels without a video") == ["wave/wave_9"]
    assert _listed(report, "videos without a label") == []


def test_video_without_a_label(tmp_path, capsys):
    root = _dataset(tmp_path / "ds")
    _labels(root / "labels.csv", ["jump/jump_0", "wave/wave_0", "wave/wave_1"])
    code, report = _check(capsys, root, "--labels", str(root / "labels.csv"))
    assert code == 0
    assert "labels matched: 3" in report
    assert _listed(report, "videos without a label") == ["jump/jump_1"]
    assert _listed(report, "labels without a video") == []


def test_a_label_file_that_matches_no_video_stops_the_check_and_the_loader(tmp_path, capsys):
    """The other dataset's label file (VP-UCF101's for HMDB51): the check said "labels matched: 0 ... OK" and the
    loader built; phase 2 would have trained with no privacy supervision, warned only after phase 1."""
    from stpcore.data import DataConfig, get_loader

    root = _dataset(tmp_path / "ds")
    _labels(tmp_path / "other.csv", ["ApplyEyeMakeup/v_ApplyEyeMakeup_g01_c01", "Archery/v_Archery_g01_c01"])
    code, report = _check(capsys, root, "--labels", str(tmp_path / "other.csv"))
    assert code == 1 and "labels matched: 0" in report
    (line,) = _listed(report, "label file matching no video")
    assert "none of its 2 keys names a video here" in line and "other dataset's label file" in line
    with pytest.raises(ValueError, match=r"none of its 2 label keys names one of the 2 videos .* other dataset's"):
        get_loader(DataConfig(root=str(root), labels=str(tmp_path / "other.csv"), train=True, decoder="pyav"))


def test_empty_file(tmp_path, capsys):
    root = _dataset(tmp_path / "ds")
    (root / "jump" / "jump_0.avi").write_bytes(b"")
    code, report = _check(capsys, root)
    assert code == 1
    assert _listed(report, "empty file") == [str(root / "jump" / "jump_0.avi")]


def test_no_video_stream(tmp_path, capsys):
    root = _dataset(tmp_path / "ds")
    sound = root / "wave" / "wave_1.webm"
    with av.open(str(sound), "w") as out:
        stream = out.add_stream("libopus", rate=48000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 960), np.float32), format="fltp", layout="mono")
        frame.sample_rate = 48000
        for packet in [*stream.encode(frame), *stream.encode()]:
            out.mux(packet)
    code, report = _check(capsys, root)
    assert code == 1
    assert _listed(report, "no video stream") == [str(sound)]


def test_no_frames(tmp_path, capsys):
    root = _dataset(tmp_path / "ds")
    empty = root / "jump" / "jump_1.avi"
    with av.open(str(empty), "w") as out:  # a header with a video stream, and no frame after it
        stream = out.add_stream("mpeg4", rate=25)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        out.start_encoding()
    code, report = _check(capsys, root)
    assert code == 1
    assert _listed(report, "no frames") == [str(empty)]


def test_split_files_absent_or_malformed(tmp_path, capsys):
    root = _dataset(tmp_path / "ds")
    code, report = _check(capsys, root, "--splits", str(tmp_path))
    assert code == 1
    [entry] = _listed(report, "split files")
    assert entry.startswith(f"{tmp_path}: neither classInd.txt (UCF101) nor <class>_test_split1.txt")
    (root / "jump_test_split3.txt").write_text("jump_0.avi train\n")
    code, report = _check(capsys, root)
    assert code == 1
    listed = _listed(report, "split files")  # split 3's train and test lists both read the file: listed once
    assert listed == [f"{root / 'jump_test_split3.txt'}:1: expected '<video>.avi <0|1|2>', got 'jump_0.avi train'"]


def test_video_outside_a_class_folder(tmp_path, capsys):
    root = _dataset(tmp_path / "ds")
    write_video(root / "stray.webm", _frames(), fps=25, codec="vp9")
    code, report = _check(capsys, root)
    assert code == 0 and "videos found: 4" in report
    assert _listed(report, "not in a class folder (ignored)") == [str(root / "stray.webm")]


def test_folder_of_videos_is_not_a_dataset_root(tmp_path, capsys):
    """One class folder holds videos directly: its videos would have no "<class>/<stem>" key to match split
    and label entries, so the check stops at once, naming the layout it expects."""
    root = _dataset(tmp_path / "ds")
    code = main(["data", "check", str(root / "wave")])
    captured = capsys.readouterr()
    assert code == 2 and captured.out == ""
    error = captured.err.splitlines()[0]
    assert error.startswith(f"error: {root / 'wave'} holds videos directly (2, e.g. wave_0.webm)")
    assert "ROOT/<class>/<video>" in error and "check the dataset folder above it" in error


@pytest.mark.parametrize("make", ["empty folder", "nested too deep", "not a folder"])
def test_no_dataset_root(tmp_path, capsys, make):
    target = tmp_path / "x"
    if make == "empty folder":
        target.mkdir()
    elif make == "nested too deep":
        _dataset(target / "hmdb51")
    code = main(["data", "check", str(target)])
    captured = capsys.readouterr()
    assert code == 2 and captured.out == ""
    error = captured.err.splitlines()[0]
    if make == "not a folder":
        assert error == f"error: {target} is not a folder"
    else:
        assert error.startswith(f"error: no videos (.avi, .mp4, .webm, .mkv, .mov) in the class folders of {target}")
        assert error.endswith("data check expects a dataset root ROOT/<class>/<video>")


def test_codec_ffmpeg_has_no_decoder_for(tmp_path, capsys):
    """An AVI whose FourCC names a codec FFmpeg does not know: reported under its own category with the tag and
    what to do (it used to read "unreadable (AttributeError: 'NoneType' object has no attribute 'name')")."""
    root = _dataset(tmp_path / "ds")
    odd = root / "jump" / "jump_1.avi"
    data = odd.read_bytes()
    assert data.count(b"FMP4") >= 1  # PyAV's mpeg4 writes this FourCC in the stream header and the format
    odd.write_bytes(data.replace(b"FMP4", b"QQ9Z"))
    code, report = _check(capsys, root)
    assert code == 1
    [entry] = _listed(report, "no decoder for its codec")
    assert entry.startswith(f"{odd} (codec tag 'QQ9Z'") and "stpcore data transcode" in entry


def test_a_link_out_of_the_root_is_named_and_followed(tmp_path, capsys):
    """Links are followed (datasets are often linked in from another disk), but one leading out of the root is
    named, so a dataset someone else made cannot point the loaders at other files unseen. A warning: exit 0."""
    root = _dataset(tmp_path / "ds")
    elsewhere = tmp_path / "elsewhere.webm"
    (root / "wave" / "wave_0.webm").rename(elsewhere)
    (root / "wave" / "wave_0.webm").symlink_to(elsewhere)
    (root / "jump" / "inside.avi").symlink_to(root / "jump" / "jump_0.avi")  # a link within the root: fine
    code, report = _check(capsys, root)
    assert code == 0, report
    assert _listed(report, "symbolic link to a file outside the root (followed)") == [
        f"{root / 'wave' / 'wave_0.webm'} -> {elsewhere}"]


def test_a_video_displayed_rotated_is_no_problem_for_either_decoder(tmp_path, capsys):
    """A phone's portrait video (stored sideways, its display matrix turning it): PyAV turns it upright, and the DALI
    loader turns DALI's sideways frames (tests/data/test_preprocess.py), so neither decoder lists it."""
    from tests.test_media import _stored_sideways

    root = _dataset(tmp_path / "ds")
    phone = _stored_sideways(root / "wave" / "wave_0.webm", 90, codec="libvpx-vp9", frames=FRAMES)
    assert _check(capsys, root)[0] == 0
    code, report = _check(capsys, root, "--decoder", "dali-cpu")  # jump/'s MPEG-4 is not for DALI-CPU: listed
    assert code == 1 and str(root / "jump" / "jump_0.avi") in report and str(phone) not in report, report


def test_a_split_file_that_cannot_be_read_is_listed_once(tmp_path, capsys):
    """--kind ucf101 on an HMDB51 layout: each missing split file was listed twice (read for train and for test)."""
    root = _dataset(tmp_path / "ds")
    code, report = _check(capsys, root, "--kind", "ucf101")
    assert code == 1
    listed = _listed(report, "split files")
    assert listed and len(listed) == len(set(listed)), report
