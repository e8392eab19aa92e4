"""Synthetic dataset (determinism, layout, labels), transcoding round trip, and the `data` CLI."""

from __future__ import annotations

import argparse

import numpy as np
import pytest

from stpcore.cli import main
from stpcore.data.cli import add_data_parser
from stpcore.data.decode_pyav import probe
from stpcore.data.labels import load_privacy_pickle, read_labels_csv
from stpcore.data.splits import list_records
from stpcore.data.synth import SYNTH_ACTIONS, make_synthetic_dataset, render_video, write_video
from stpcore.data.transcode import transcode_dataset

pytest.importorskip("av")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="stpcore")
    add_data_parser(parser.add_subparsers(dest="command", required=True))
    return parser


def _run(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    return args.func(args)


def test_synth_deterministic_and_layout(tmp_path):
    a = make_synthetic_dataset(tmp_path / "a", videos=9, seed=4, width=64, height=48, frames=12)
    make_synthetic_dataset(tmp_path / "b", videos=9, seed=4, width=64, height=48, frames=12)
    c = make_synthetic_dataset(tmp_path / "c", videos=9, seed=5, width=64, height=48, frames=12)
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(tmp_path / "b") for p in (tmp_path / "b").rglob("*") if p.is_file())
    for f in files:
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f
    assert any((tmp_path / "a" / v.rel_path).read_bytes() != (tmp_path / "c" / v.rel_path).read_bytes()
               for v in c)
    # HMDB51 layout: class folders, three split files per class, labels as CSV and as the release's pickle.
    for cls in SYNTH_ACTIONS:
        assert all((tmp_path / "a" / f"{cls}_test_split{s}.txt").is_file() for s in (1, 2, 3))
    csv_labels = read_labels_csv(tmp_path / "a" / "vp_labels.csv")
    pkl_labels = load_privacy_pickle(tmp_path / "a" / "vp_labels.pickle")
    assert csv_labels.keys() == pkl_labels.keys() == {v.rel_path.rsplit(".", 1)[0] for v in a}
    train = list_records(tmp_path / "a", "auto", 1, True, labels=csv_labels)
    test = list_records(tmp_path / "a", "auto", 1, False, labels=csv_labels)
    assert len(train.records) + len(test.records) == 9 and not train.missing and not test.missing
    assert {r.action for r in train.records} | {r.action for r in test.records} == set(range(7))
    assert all(r.privacy is not None for r in train.records)
    info = probe(tmp_path / "a" / a[0].rel_path)
    assert (info.codec, info.width, info.height, info.num_frames) == ("vp9", 64, 48, 12)


def test_synth_appearance_carries_attributes():
    rng = lambda: np.random.default_rng(0)  # noqa: E731 - same background and motion for both renders
    base = np.array([0, 0, 0, 0, 0])
    plain = render_video(0, base, rng(), 160, 120, 4)
    for attr in range(5):
        attrs = base.copy()
        attrs[attr] = 1
        changed = np.abs(render_video(0, attrs, rng(), 160, 120, 4).astype(int) - plain).sum(-1) > 30
        assert changed.mean() > 0.005, attr  # each attribute changes >= 0.5% of the pixels (the face ~0.6%)
    still = render_video(6, base, rng(), 160, 120, 8)
    moving = render_video(1, base, rng(), 160, 120, 8)
    assert np.abs(moving[0].astype(int) - moving[-1]).mean() > np.abs(still[0].astype(int) - still[4]).mean() / 10


def test_transcode_round_trip(tmp_path):
    src = tmp_path / "src"
    (src / "wave").mkdir(parents=True)
    frames = render_video(1, np.ones(5, int), np.random.default_rng(0), 64, 48, 15)
    write_video(src / "wave" / "w1.avi", frames, fps=30, codec="mpeg4")
    write_video(src / "wave" / "w2.avi", frames[:9], fps=30, codec="mpeg4")
    (src / "wave_test_split1.txt").write_text("w1.avi 1\nw2.avi 2\n")
    (src / "labels.csv").write_text("video,skin_color,face,gender,nudity,relationship\nwave/w1,1,1,1,1,1\n")
    assert probe(src / "wave" / "w1.avi").codec == "mpeg4"
    for codec, ext in (("vp9", ".webm"), ("h264", ".mp4")):
        dst = tmp_path / codec
        report = transcode_dataset(src, dst, codec=codec, workers=2, progress=False)
        assert len(report.written) == 2 and not report.failed
        assert sorted(report.copied) == ["labels.csv", "wave_test_split1.txt"]
        for name, n in (("w1", 15), ("w2", 9)):
            info = probe(dst / "wave" / f"{name}{ext}")
            assert (info.codec, info.num_frames, info.width, info.height) == (codec, n, 64, 48)
            assert info.fps == pytest.approx(30)
        assert not [p for p in (dst / "wave").iterdir() if p.name.startswith(".")]
        again = transcode_dataset(src, dst, codec=codec, workers=1, progress=False)
        assert len(again.skipped) == 2 and not again.written
        # The copied split files find the transcoded videos (matched on "<class>/<stem>").
        assert [r.path.suffix for r in list_records(dst, "auto", 1, True).records] == [ext]


@pytest.mark.parametrize("codec", ["vp9", "h264"])
def test_transcode_of_an_odd_size_drops_the_last_row_and_column(tmp_path, codec):
    """A 65x49 source becomes 64x48 by dropping its last column and row, as documented: the copy holds the pixels
    PyAV reads from the source (it was resized, which moved every stripe edge: a mean difference of 13 levels)."""
    import av

    from stpcore.data.decode_pyav import decode_frames
    from stpcore.data.transcode import transcode_file

    x = np.arange(65)[None, :, None]
    image = np.broadcast_to(np.where((x // 8) % 2 == 0, 220, 30), (49, 65, 3)).astype(np.uint8)
    with av.open(str(tmp_path / "src.mkv"), "w") as out:  # lossless (FFV1, 4:4:4): odd sizes allowed
        stream = out.add_stream("ffv1", rate=25)
        stream.width, stream.height, stream.pix_fmt = 65, 49, "yuv444p"
        for _ in range(4):
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format="rgb24").reformat(format="yuv444p")
            out.mux(stream.encode(frame))
        out.mux(stream.encode())
    assert transcode_file(tmp_path / "src.mkv", tmp_path / "dst.mkv", codec=codec) == 4
    source, _ = decode_frames(tmp_path / "src.mkv", np.arange(4))
    copy, _ = decode_frames(tmp_path / "dst.mkv", np.arange(4))
    assert copy.shape == (4, 48, 64, 3)
    assert np.abs(copy.astype(int) - source[:, :48, :64]).mean() < 1.0


def test_transcode_clashing_names_audio_only_and_in_place(tmp_path):
    """v.avi and v.mkv would both become v.mp4: the second is reported, not silently lost (with 2 workers
    they also shared one temporary file). An audio-only file says so. Transcoding a folder into itself
    leaves the split files in place instead of failing to copy them onto themselves."""
    import av

    src = tmp_path / "src"
    (src / "cls").mkdir(parents=True)
    frames = render_video(1, np.ones(5, int), np.random.default_rng(0), 64, 48, 12)
    write_video(src / "cls" / "v.avi", frames, fps=30, codec="mpeg4")
    write_video(src / "cls" / "v.mkv", frames[:7], fps=30, codec="mpeg4")
    with av.open(str(src / "cls" / "sound.mp4"), "w") as out:
        stream = out.add_stream("aac", rate=8000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
        frame.sample_rate = 8000
        for packet in [*stream.encode(frame), *stream.encode()]:
            out.mux(packet)
    (src / "cls_test_split1.txt").write_text("v.avi 1\n")
    report = transcode_dataset(src, tmp_path / "dst", codec="h264", workers=2, progress=False)
    failed = dict(report.failed)
    assert report.written == [str(src / "cls" / "v.avi")]
    assert "also v.avi's" in failed[str(src / "cls" / "v.mkv")]
    assert "no video stream" in failed[str(src / "cls" / "sound.mp4")]
    assert probe(tmp_path / "dst" / "cls" / "v.mp4").num_frames == 12
    in_place = transcode_dataset(src, src, codec="vp9", workers=1, progress=False)
    assert in_place.copied == ["cls_test_split1.txt"] and (src / "cls" / "v.webm").is_file()


def test_cli_synth_check_labels(tmp_path, capsys, shared_dir):
    out = tmp_path / "ds"
    assert _run(["data", "synth", str(out), "--videos", "7", "--seed", "0", "--width", "64", "--height", "48",
                 "--frames", "34"]) == 0
    assert _run(["data", "check", str(out), "--labels", str(out / "vp_labels.pickle")]) == 0
    text = capsys.readouterr().out
    assert "videos found: 7" in text and "labels matched: 7" in text and "OK" in text
    (out / "up" / "up_v000.webm").write_bytes(b"")
    assert _run(["data", "check", str(out), "--decoder", "dali-cpu"]) == 1
    assert "empty file: 1" in capsys.readouterr().out
    assert _run(["data", "labels", "import", str(out / "vp_labels.csv"), str(tmp_path / "n.csv")]) == 0
    (tmp_path / "bad.csv").write_text("video,skin_color,face,gender,nudity,relationship\n../x,1,1,1,1,1\n")
    assert _run(["data", "labels", "import", str(tmp_path / "bad.csv"), str(tmp_path / "n2.csv")]) == 2
    assert "bad.csv:2" in capsys.readouterr().err and not (tmp_path / "n2.csv").exists()
    released = shared_dir / "data" / "vp_hmdb51_privacy_labels.pickle"
    if released.is_file():
        assert _run(["data", "labels", "export", str(released), str(tmp_path / "hmdb.csv")]) == 0
        assert len(read_labels_csv(tmp_path / "hmdb.csv")) == 6766


def test_synth_refuses_a_folder_that_holds_anything_unless_overwrite(tmp_path, capsys):
    """A smaller synthetic dataset written over a larger one replaced its labels and splits and left the other
    videos with neither, reporting success; now that needs --overwrite, which removes the earlier one's files."""
    out = tmp_path / "ds"
    args = ["data", "synth", str(out), "--width", "64", "--height", "48", "--frames", "4"]
    assert _run([*args, "--videos", "14"]) == 0
    (out / "notes.txt").write_text("mine")
    assert main([*args, "--videos", "7"]) == 2
    assert "is not empty" in capsys.readouterr().err and len(list(out.glob("*/*.webm"))) == 14
    assert _run([*args, "--videos", "7", "--overwrite"]) == 0
    assert len(list(out.glob("*/*.webm"))) == 7 and (out / "notes.txt").read_text() == "mine"
    assert len(read_labels_csv(out / "vp_labels.csv")) == 7


@pytest.mark.parametrize("kwargs, message", [
    ({"frames": 0}, "frames must be >= 1"), ({"videos": 0}, "videos and frames"), ({"width": 101}, "even"),
    ({"height": 8}, "at least 16"),
])
def test_synth_rejects_bad_sizes(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        make_synthetic_dataset(tmp_path / "d", **kwargs)
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match="existing file"):
        make_synthetic_dataset(tmp_path / "file", videos=1)


def test_cli_transcode_folder_of_videos(tmp_path, capsys):
    """A folder that holds videos directly (here one class folder) is mirrored as it is: SRC/<video> ->
    DST/<video>. A DST inside SRC is not read back as a source when the command is run again."""
    from stpcore.cli import main

    wave = tmp_path / "hmdb" / "wave"
    frames = render_video(1, np.ones(5, int), np.random.default_rng(0), 64, 48, 12)
    write_video(wave / "w1.avi", frames, fps=30, codec="mpeg4")
    write_video(wave / "w2.avi", frames[:7], fps=30, codec="mpeg4")
    assert main(["data", "transcode", str(wave), str(tmp_path / "out"), "--codec", "vp9"]) == 0
    assert "written: 2" in capsys.readouterr().out
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["w1.webm", "w2.webm"]
    assert [probe(tmp_path / "out" / f"w{i}.webm").num_frames for i in (1, 2)] == [12, 7]
    inside = wave / "vp9"
    for written, skipped in ((2, 0), (0, 2)):
        assert main(["data", "transcode", str(wave), str(inside), "--codec", "vp9", "--workers", "2"]) == 0
        assert f"written: {written}\nskipped (already done): {skipped}\nfailed: 0" in capsys.readouterr().out
    assert sorted(p.name for p in inside.iterdir()) == ["w1.webm", "w2.webm"]


@pytest.mark.parametrize("make", ["empty folder", "nested too deep", "not a folder"])
def test_cli_transcode_without_videos(tmp_path, capsys, make):
    """Nothing to transcode is an error naming the layouts expected, and DST is not created."""
    from stpcore.cli import main

    src = tmp_path / "src"
    if make == "empty folder":
        src.mkdir()
        (src / "notes.txt").write_text("")
    elif make == "nested too deep":
        frames = render_video(1, np.ones(5, int), np.random.default_rng(0), 64, 48, 4)
        write_video(src / "hmdb51" / "wave" / "w1.avi", frames, fps=30, codec="mpeg4")
    assert main(["data", "transcode", str(src), str(tmp_path / "out"), "--codec", "h264"]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and not (tmp_path / "out").exists()
    error = captured.err.splitlines()[0]
    if make == "not a folder":
        assert error == f"error: {src} is not a folder"
    else:
        assert error == (f"error: no videos (.avi, .mp4, .webm, .mkv, .mov) in {src} or in its subfolders; transcode "
                         "expects a dataset root SRC/<class>/<video> or a folder of videos SRC/<video>")
