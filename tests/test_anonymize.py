"""`stpcore anonymize`: whole files, clip by clip, at the source frame rate; bad files skipped."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

av = pytest.importorskip("av")  # PyAV: CI installs it; a GPU machine without it skips these modules

from stpcore import media  # noqa: E402
from stpcore.anonymize import (  # noqa: E402
    WindowAnonymizer,
    anonymize_files,
    output_settings,
    plan_windows,
    read_record,
    to_source_size,
)
from stpcore.data.preprocess import to_working_scale  # noqa: E402
from stpcore.models import STPrivacy, STPrivacyConfig  # noqa: E402
from stpcore.tubelets import keep_to_pixels  # noqa: E402


def _decode(path):
    with av.open(str(path)) as c:
        return np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return STPrivacy(STPrivacyConfig.from_name("tiny")).eval()


def _source(path, frames=21, h=40, w=56, fps=12, seed=0):
    rng = np.random.default_rng(seed)
    video = (rng.random((frames, h, w, 3)) * 255).astype(np.uint8)
    return media.write_video(path, video, fps=fps)


def _working(src, short_side=37):
    """The source's frames at the working scale, uint8 (T, H', W', 3): what every window is cut from."""
    return to_working_scale(_decode(src), short_side).permute(0, 2, 3, 1).numpy()


@pytest.mark.parametrize("stride, view", [(1, "full"), (2, "full"), (2, "center")])
def test_anonymize_whole_file_black_where_dropped(tmp_path, model, stride, view):
    src = _source(tmp_path / "cam.mp4")  # 56 x 40: at the working scale (short side 37) 52 x 37
    cfg = model.cfg
    report = anonymize_files(
        [src], tmp_path / "out", model, stride=stride, batch_size=3, side_by_side=True, verbose=False, view=view,
    )
    assert not report.failed
    out = _decode(tmp_path / "out" / "cam.anonymized.mp4")
    size = (37, 52) if view == "full" else (32, 32)
    assert out.shape[:3] == (21, size[0] + size[0] % 2, size[1])  # every source frame; odd sizes padded by 1
    with av.open(str(tmp_path / "out" / "cam.anonymized.mp4")) as c:
        assert abs(float(c.streams.video[0].average_rate) - 12) < 0.01
    saved = np.load(tmp_path / "out" / "cam.keep.npz")
    windows = [(0, 0), (0, 20), (5, 0), (5, 20)] if view == "full" else [(3, 10)]  # 2.5 rounds up, as DALI
    assert saved["window"].tolist() == [list(w) for w in windows] and str(saved["view"]) == view
    assert saved["work_size"].tolist() == [37, 52] and saved["source_size"].tolist() == [40, 56]
    assert saved["pad"].tolist() == [0, 0] and int(saved["window_size"]) == 32
    chunk = cfg.num_frames * stride
    n_chunks = -(-21 // chunk)
    assert saved["keep"].shape == (n_chunks * stride, len(windows), cfg.num_tokens)
    assert (saved["keep"].sum(-1) == cfg.num_slots * cfg.kept_per_slot()[-1]).all()
    # Pixels whose owning window dropped the tubelet are black (up to H.264's rounding); kept ones are not.
    for i, (start, phase) in enumerate(zip(saved["start"], saved["phase"], strict=True)):
        frame_ids = np.arange(start - phase, start - phase + chunk)[phase::stride]
        valid = frame_ids < 21
        for k, (y0, y1, x0, x1) in enumerate(saved["owned"]):
            oy, ox = saved["window"][k]
            mask = keep_to_pixels(torch.from_numpy(saved["keep"][i, k]).float()[None], cfg.grid, cfg.tubelet)[0, 0]
            mask = mask[:, y0 - oy : y1 - oy, x0 - ox : x1 - ox].bool().numpy()[valid]
            if view == "center":
                y0, y1, x0, x1 = 0, 32, 0, 32
            clip = out[frame_ids[valid], y0:y1, x0:x1].astype(float)
            assert clip[~mask].mean() < 12
            assert clip[mask].mean() > 30
    sbs = _decode(tmp_path / "out" / "cam.side_by_side.mp4")
    assert sbs.shape[:3] == (21, out.shape[1], 2 * size[1] + 4)


def test_bad_files_are_reported_and_skipped(tmp_path, model, capsys):
    good = _source(tmp_path / "good.mp4", frames=8)
    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    corrupt = tmp_path / "corrupt.mp4"
    corrupt.write_bytes(b"\x00\x01garbage" * 100)
    report = anonymize_files(
        [empty, good, corrupt, tmp_path / "missing.mp4"], tmp_path / "out", model, )
    assert set(report.failed) == {str(empty), str(corrupt), str(tmp_path / "missing.mp4")}
    assert (tmp_path / "out" / "good.anonymized.mp4").is_file()
    assert not list((tmp_path / "out").glob("empty*")) and not list((tmp_path / "out").glob(".*"))
    assert f"failed {empty}: empty file" in capsys.readouterr().err  # as the summary counts it


def test_same_stem_twice_gets_unique_names(tmp_path, model):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    srcs = [_source(tmp_path / d / "cam.mp4", frames=8) for d in ("a", "b")]
    report = anonymize_files(srcs, tmp_path / "out", model, verbose=False)
    assert sorted(p.name for p in (tmp_path / "out").glob("*.anonymized.mp4")) == [
        "cam-1.anonymized.mp4", "cam.anonymized.mp4"]
    assert not report.failed


def test_output_names_never_collide(tmp_path, model):
    """b.mp4, b.mkv and b-1.mp4: renaming the second to b-1 must not take the third's name (it did)."""
    srcs = [_source(tmp_path / name, frames=f) for name, f in (("b.mp4", 5), ("b.mkv", 7), ("b-1.mp4", 9))]
    report = anonymize_files(srcs, tmp_path / "out", model, verbose=False)
    assert not report.failed and len(report.written) == 3
    outs = [report.written[str(s)][0] for s in srcs]
    assert len(set(outs)) == 3
    assert [len(_decode(o)) for o in outs] == [5, 7, 9]  # each output holds its own input's frames


def test_same_file_twice_is_processed_once(tmp_path, model):
    src = _source(tmp_path / "cam.mp4", frames=6)
    report = anonymize_files([src, tmp_path / "." / "cam.mp4"], tmp_path / "out", model, verbose=False)
    assert list(report.written) == [str(src)] and not report.failed
    assert len(report.skipped) == 1 and "same file" in report.skipped[0][1]
    assert "skipped 1" in report.summary()


def test_skip_existing_resumes_without_rewriting(tmp_path, model):
    srcs = [_source(tmp_path / f"{n}.mp4", frames=6) for n in ("a", "b")]
    kwargs = dict(verbose=False)
    anonymize_files(srcs[:1], tmp_path / "out", model, **kwargs)  # a run that stopped after the first file
    done = tmp_path / "out" / "a.anonymized.mp4"
    stamp = done.stat().st_mtime_ns
    report = anonymize_files(srcs, tmp_path / "out", model, skip_existing=True, **kwargs)
    assert list(report.written) == [str(srcs[1])]
    assert report.skipped == [(str(srcs[0]), f"already done ({done} exists; --skip-existing)")]
    assert done.stat().st_mtime_ns == stamp
    record = read_record(tmp_path / "out" / "a.keep.npz")  # what told the skip that a.mp4 is done
    assert record["source"] == str(srcs[0].resolve())
    assert [record["source_bytes"], record["source_mtime_ns"]] == [srcs[0].stat().st_size, srcs[0].stat().st_mtime_ns]
    assert record["settings"] == output_settings(model) and record["settings"]["short_side"] == 37
    assert record["outputs"] == {"a.anonymized.mp4": [done.stat().st_size, stamp]}
    # Without the flag everything is written again.
    assert len(anonymize_files(srcs, tmp_path / "out", model, **kwargs).written) == 2


class _Calibrated:
    """A model that wants calibration clips before its first batch (as OpenVINO int8 does): records what it is given."""

    def __init__(self, model):
        self.model, self.cfg, self.calibrated, self.batches = model, model.cfg, [], []

    @property
    def calibration_pending(self):
        return not self.calibrated

    def calibrate(self, clips):
        assert not self.batches, "calibrated after a batch ran"
        self.calibrated.append(clips.clone())

    def __call__(self, clips, **kw):
        self.batches.append(clips.clone())
        return self.model(clips, **kw)


def test_calibration_comes_from_the_first_readable_input_given_and_writes_nothing(tmp_path, model, capsys):
    """The calibration clips are the first batch an uninterrupted run gives the model, from the first input given that
    can be read (a folder and a broken file before it are passed over), and reading them writes nothing."""
    (tmp_path / "folder").mkdir()
    (tmp_path / "broken.mp4").write_bytes(b"not a video")
    srcs = [_source(tmp_path / f"{n}.mp4", frames=6, seed=i) for i, n in enumerate(("a", "b"))]
    calibrated = _Calibrated(model)
    report = anonymize_files([tmp_path / "folder", tmp_path / "broken.mp4", *srcs], tmp_path / "out", calibrated,
                             batch_size=2)
    assert len(calibrated.calibrated) == 1 and torch.equal(calibrated.calibrated[0], calibrated.batches[0])
    assert f"int8 calibrated on the first batch of {srcs[0]}" in capsys.readouterr().out
    assert sorted(report.written) == sorted(map(str, srcs)) and len(report.failed) == 2
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a.anonymized.mp4", "a.keep.npz",
                                                                      "b.anonymized.mp4", "b.keep.npz"]
    # Resumed after a.mp4 (b's outputs gone): calibrated again on a.mp4's first batch, which it skips.
    for path in (tmp_path / "out").glob("b.*"):
        path.unlink()
    again = _Calibrated(model)
    report = anonymize_files(srcs, tmp_path / "out", again, batch_size=2, skip_existing=True, verbose=False)
    assert list(report.written) == [str(srcs[1])] and torch.equal(again.calibrated[0], calibrated.batches[0])


@pytest.mark.parametrize("change", ["new content", "same size, touched", "other settings", "other weights",
                                    "video newer than record"])
def test_skip_existing_redoes_what_no_longer_matches_its_record(tmp_path, model, change):
    """--skip-existing skips only an output made from the input as it is now, with the same settings: an input
    rewritten in place, only touched, or run with another stride is done again, and so is an output whose video was
    replaced after its record was written (a run stopped between the two renames)."""
    src = _source(tmp_path / "a.mp4", frames=6)
    out = tmp_path / "out"
    assert not anonymize_files([src], out, model, verbose=False).failed
    video, frames, kwargs = out / "a.anonymized.mp4", 6, {}
    if change == "new content":
        _source(src, frames=9, seed=1)
        frames = 9
    elif change == "same size, touched":
        st = src.stat()
        os.utime(src, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    elif change == "other settings":
        kwargs = {"stride": 2}
    elif change == "other weights":  # another checkpoint of the same architecture
        torch.manual_seed(1)
        model = STPrivacy(STPrivacyConfig.from_name("tiny")).eval()
    else:
        st = video.stat()
        os.utime(video, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    report = anonymize_files([src], out, model, skip_existing=True, verbose=False, **kwargs)
    assert list(report.written) == [str(src)] and not report.skipped and not report.failed
    assert len(_decode(video)) == frames
    assert read_record(out / "a.keep.npz")["source_mtime_ns"] == src.stat().st_mtime_ns
    # Now the record matches again, and the next resume skips it.
    assert len(anonymize_files([src], out, model, skip_existing=True, verbose=False, **kwargs).skipped) == 1


def test_a_run_stopped_between_the_video_and_its_keep_file_resumes(tmp_path, model, monkeypatch):
    """Killed after the video's rename but before the final keep file: the record written first still names
    the input, so the resume redoes that video instead of refusing it as another input's."""
    import stpcore.anonymize as anonymize_module

    src = _source(tmp_path / "a.mp4", frames=6)
    out = tmp_path / "out"
    real, calls = anonymize_module._save_npz, []

    def stop_at_the_final_keep_file(path, **arrays):
        calls.append(path)
        if "keep" in arrays:
            raise KeyboardInterrupt
        real(path, **arrays)

    monkeypatch.setattr(anonymize_module, "_save_npz", stop_at_the_final_keep_file)
    with pytest.raises(KeyboardInterrupt):
        anonymize_files([src], out, model, verbose=False)
    monkeypatch.setattr(anonymize_module, "_save_npz", real)
    assert (out / "a.anonymized.mp4").is_file() and read_record(out / "a.keep.npz")["outputs"] == {}
    report = anonymize_files([src], out, model, skip_existing=True, verbose=False)
    assert list(report.written) == [str(src)] and not report.failed and not report.skipped
    assert "a.anonymized.mp4" in read_record(out / "a.keep.npz")["outputs"]


@pytest.mark.parametrize("record", ["keep file missing", "keep file from an older stpcore"])
def test_outputs_with_no_record_are_neither_skipped_nor_overwritten(tmp_path, model, record):
    """An output whose keep file is gone, or holds no record of its input (written before records were), may be
    another input's: with or without --skip-existing that input fails with the fix, and nothing is written."""
    src = _source(tmp_path / "a.mp4", frames=6)
    out = tmp_path / "out"
    assert not anonymize_files([src], out, model, verbose=False).failed
    keep = out / "a.keep.npz"
    if record == "keep file missing":
        keep.unlink()
    else:
        with np.load(keep) as saved:
            old = {k: saved[k] for k in saved.files if k not in ("source", "source_bytes", "source_mtime_ns",
                                                                     "settings", "outputs")}
        np.savez_compressed(keep, **old)
    assert read_record(keep) is None
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    for skip_existing in (True, False):
        report = anonymize_files([src], out, model, skip_existing=skip_existing, verbose=False)
        assert not report.skipped and not report.written, skip_existing
        why = report.failed[str(src)]
        assert "no record of its input" in why and str(out / "a.anonymized.mp4") in why and str(src) in why, why
        assert "another -o folder" in why
        assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_same_name_from_another_input_is_neither_skipped_nor_overwritten(tmp_path, model):
    """cam1/clip.mp4, then in a later run into the same folder cam2/clip.mp4, another video with the same name: it
    was taken for done by its output's name alone (--skip-existing), or written over the first's output. Now it
    fails, naming the output, both inputs and the way out, and the first output stays as it was."""
    (tmp_path / "cam1").mkdir()
    (tmp_path / "cam2").mkdir()
    first = _source(tmp_path / "cam1" / "clip.mp4", frames=6)
    second = _source(tmp_path / "cam2" / "clip.mp4", frames=9, seed=1)
    out = tmp_path / "out"
    assert not anonymize_files([first], out, model, verbose=False).failed
    done = out / "clip.anonymized.mp4"
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    for skip_existing in (True, False):
        report = anonymize_files([second], out, model, skip_existing=skip_existing, verbose=False)
        assert not report.skipped and not report.written, skip_existing
        why = report.failed[str(second)]
        assert str(done) in why and str(first.resolve()) in why and str(second) in why, why
        assert "another -o folder" in why and "remove" in why, why
        assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # nothing written, nothing left over
    assert len(_decode(done)) == 6
    assert "FAILED" in report.summary()


def test_unreadable_inputs_say_why(tmp_path, model):
    folder = tmp_path / "clips"
    folder.mkdir()
    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    text = tmp_path / "notes.mp4"
    text.write_text("not a video\n" * 50)
    ascii_art = tmp_path / "readme.txt"  # FFmpeg's tty demuxer opens any text file, and draws it as "video"
    ascii_art.write_text("a text file, which FFmpeg can draw as pictures\n" * 50)
    report = anonymize_files([folder, empty, text, ascii_art, tmp_path / "gone.mp4"], tmp_path / "out", model,
                             verbose=False)
    why = report.failed
    assert "a folder" in why[str(folder)]
    assert why[str(empty)].startswith("empty file")
    assert why[str(text)].startswith("unreadable")
    assert why[str(ascii_art)].startswith("not a video") and not report.written
    assert why[str(tmp_path / "gone.mp4")].startswith("missing file")


def test_a_rerun_without_side_by_side_removes_the_inputs_earlier_side_by_side(tmp_path, model):
    """The side-by-side of an earlier run showed the output this run replaces: it is removed, not left beside the
    new output unrecorded."""
    src = _source(tmp_path / "v.mp4")
    first = anonymize_files([src], tmp_path / "out", model, side_by_side=True, verbose=False)
    sbs = tmp_path / "out" / "v.side_by_side.mp4"
    assert sbs in first.written[str(src)] and sbs.is_file()
    anonymize_files([src], tmp_path / "out", model, keep_ratio=0.5, verbose=False)
    assert not sbs.exists() and (tmp_path / "out" / "v.anonymized.mp4").is_file()


def test_output_folder_that_is_a_file_is_refused(tmp_path, model):
    (tmp_path / "out").write_text("")
    with pytest.raises(ValueError, match="is an existing file"):
        anonymize_files([], tmp_path / "out", model)


class _Identity:
    """A stand-in model that keeps every tubelet and returns its input: the output must be the source."""

    cfg = STPrivacyConfig.from_name("tiny")  # 8 x 32 x 32 clips, 4 x 4 x 4 tubelets of 2 x 8 x 8

    def __call__(self, clips, **kwargs):
        from types import SimpleNamespace

        return SimpleNamespace(video=clips, keep=torch.ones(clips.shape[0], 64))


@pytest.mark.parametrize("stride, view", [(1, "full"), (2, "full"), (2, "center")])
def test_frames_come_back_in_order_with_their_content(tmp_path, stride, view):
    """Every source frame is written once, in order, with its own content (stride phases interleaved back,
    the padded last chunk cut): each frame's brightness encodes its index. With a model that returns its
    input, the output is the working-scale input (full) or its centre window."""
    frames = 21
    levels = (np.arange(frames) * 9 + 20).astype(np.uint8)  # frame i: grey level 20 + 9 i
    ramp = np.linspace(0, 30, 56, dtype=np.float32)[None, None, :, None]
    video = np.clip(levels[:, None, None, None] + ramp + np.zeros((1, 40, 56, 3), np.float32), 0, 255)
    src = media.write_video(tmp_path / "ramp.mp4", video.astype(np.uint8), fps=12)
    report = anonymize_files([src], tmp_path / "out", _Identity(), stride=stride, batch_size=3, verbose=False,
                             view=view)
    assert not report.failed
    out = _decode(tmp_path / "out" / "ramp.anonymized.mp4").astype(float)
    want = _working(src).astype(float)
    if view == "center":
        want = want[:, 2:34, 10:42]
    else:
        out = out[:, :37]  # the encoder's padding row of the odd height
    assert out.shape == want.shape
    assert np.abs(out.mean(axis=(1, 2, 3)) - want.mean(axis=(1, 2, 3))).max() < 3  # order and content
    assert np.abs(out - want).mean() < 3


class _WindowStamp:
    """Keeps every tubelet and paints window k of each batch-wide call with the grey level of its index, so a
    stitched frame shows which window each pixel came from."""

    cfg = STPrivacyConfig.from_name("tiny")

    def __init__(self):
        self.seen = 0

    def __call__(self, clips, **kwargs):
        from types import SimpleNamespace

        ids = torch.arange(self.seen, self.seen + clips.shape[0], dtype=torch.float32)
        self.seen += clips.shape[0]
        level = (ids + 1).view(-1, 1, 1, 1, 1) / 255  # grey (k + 1) / 255 on the [0, 1] scale
        mean = torch.tensor(media.IMAGENET_MEAN).view(1, 3, 1, 1, 1)
        std = torch.tensor(media.IMAGENET_STD).view(1, 3, 1, 1, 1)
        video = ((level - mean) / std).expand_as(clips).clone()
        return SimpleNamespace(video=video, keep=torch.ones(clips.shape[0], 64))


@pytest.mark.parametrize("height, width, overlap", [(37, 52, 0), (37, 52, 9), (64, 96, 0), (20, 70, 0), (33, 33, 3)])
def test_stitched_windows_cover_every_pixel_once(height, width, overlap):
    """Each pixel of the frame comes from exactly the window that owns it: nothing lost, nothing doubled."""
    grid = plan_windows(height, width, 32, "full", overlap)
    stamp = _WindowStamp()
    runner = WindowAnonymizer(stamp, grid, stride=1, batch_size=5)
    chunk = torch.zeros(8, 3, height, width, dtype=torch.uint8)
    (res,) = runner.run([chunk])
    assert res.frames.shape == (8, height, width, 3) and res.visible.all()
    expected = np.zeros((height, width), dtype=int)
    for k, (y0, y1, x0, x1) in enumerate(grid.owned):
        assert (expected[y0:y1, x0:x1] == 0).all()  # owned regions do not overlap
        expected[y0:y1, x0:x1] = k + 1
    assert (expected > 0).all()  # and cover the frame
    assert (res.frames[..., 0] == expected).all()
    assert res.keep.shape == (1, len(grid), 64)


def _expected_visible(res, grid, cfg, stride):
    """Where each pixel's owning window kept its tubelet, rebuilt from the saved keep masks alone."""
    L = res.frames.shape[0]
    want = np.zeros((L, grid.height, grid.width), dtype=bool)
    for p in range(stride):
        for k, ((oy, ox), (y0, y1, x0, x1)) in enumerate(zip(grid.origins, grid.owned, strict=True)):
            kept = torch.from_numpy(res.keep[p, k]).bool().view(cfg.grid)  # (slots, rows, cols)
            t, h, w = cfg.tubelet
            for f in range(p, L, stride):
                slot = (f // stride) // t
                ys, xs = np.arange(y0, y1) - oy, np.arange(x0, x1) - ox
                want[f, y0:y1, x0:x1] = kept[slot][ys[:, None] // h, xs[None, :] // w].numpy()
    return want


@pytest.mark.parametrize("stride", [1, 2])
def test_full_frame_of_a_real_model_is_exactly_black_where_dropped(model, stride):
    """Before any encoding, a stitched pixel is exactly 0 where the window owning it dropped its tubelet, by
    the keep masks the run reports (rebuilt here tubelet by tubelet, every phase and window), and the model's
    output elsewhere."""
    torch.manual_seed(1)
    chunks = [torch.randint(0, 256, (8 * stride, 3, 37, 52), dtype=torch.uint8) for _ in range(2)]
    grid = plan_windows(37, 52, 32)
    results = WindowAnonymizer(model, grid, stride=stride, batch_size=3).run(chunks)
    for res in results:
        want = _expected_visible(res, grid, model.cfg, stride)
        assert want.any() and not want.all()
        assert np.array_equal(res.visible, want)
        assert (res.frames[~want] == 0).all()
        assert (res.frames[want].reshape(-1, 3).max(1) > 0).mean() > 0.9


@pytest.mark.parametrize("stride", [1, 2])
def test_windows_phases_and_chunks_come_back_in_their_places(stride):
    """Windows of two chunks and every stride phase share batches that split them anywhere (batch 5): window
    k of phase p of chunk c is the (c * stride + p) * windows + k -th clip the model sees, and its pixels land
    on that window's owned region of that phase's frames."""
    grid = plan_windows(37, 52, 32)
    stamp = _WindowStamp()
    chunks = [torch.zeros(8 * stride, 3, 37, 52, dtype=torch.uint8) for _ in range(2)]
    results = WindowAnonymizer(stamp, grid, stride=stride, batch_size=5).run(chunks)
    n = len(grid)
    for c, res in enumerate(results):
        for p in range(stride):
            for k, (y0, y1, x0, x1) in enumerate(grid.owned):
                j = (c * stride + p) * n + k
                assert (res.frames[p::stride, y0:y1, x0:x1, 0] == j + 1).all(), (c, p, k)


def test_frames_smaller_than_a_window_are_padded_and_the_padding_recorded(tmp_path, model):
    src = _source(tmp_path / "small.mp4", frames=9, h=24, w=60)
    report = anonymize_files([src], tmp_path / "out", model, short_side=20, verbose=False)
    assert not report.failed
    saved = np.load(tmp_path / "out" / "small.keep.npz")
    assert saved["work_size"].tolist() == [20, 50] and saved["pad"].tolist() == [12, 0]
    assert saved["owned"][:, :2].tolist() == [[0, 20], [0, 20]]
    assert _decode(tmp_path / "out" / "small.anonymized.mp4").shape == (9, 20, 50, 3)


def test_source_size_output_keeps_dropped_pixels_black(tmp_path, model):
    yy, xx = np.mgrid[0:40, 0:56]
    smooth = np.stack([yy * 4 + 20, xx * 3 + 30, 180 - yy - xx], -1)[None] + np.arange(9)[:, None, None, None] * 5
    src = media.write_video(tmp_path / "cam.mp4", smooth.clip(0, 255).astype(np.uint8), fps=12)
    report = anonymize_files([src], tmp_path / "out", _Identity(), output_size="source", side_by_side=True,
                             verbose=False)
    assert not report.failed
    out = _decode(tmp_path / "out" / "cam.anonymized.mp4")
    assert out.shape == (9, 40, 56, 3)
    assert np.abs(out.astype(float) - _decode(src).astype(float)).mean() < 4  # the source, through 37 px
    assert _decode(tmp_path / "out" / "cam.side_by_side.mp4").shape == (9, 40, 116, 3)


@pytest.mark.parametrize("height, width", [(40, 56), (111, 156), (30, 41)])
def test_source_size_resize_of_a_real_model_is_black_exactly_where_dropped(model, height, width):
    """A real model's stitched frame (37 x 52) resized to the source's size: a source pixel (i, j) is exactly 0
    if and only if the working pixel under its centre, (floor((i + 1/2) 37 / H), floor((j + 1/2) 52 / W)), was
    dropped (mapped here by hand, not by the resize the code uses)."""
    torch.manual_seed(2)
    chunk = torch.randint(30, 256, (8, 3, 37, 52), dtype=torch.uint8)
    (res,) = WindowAnonymizer(model, plan_windows(37, 52, 32), batch_size=4).run([chunk])
    big = to_source_size(res.frames, res.visible, height, width)
    rows = np.floor((np.arange(height) + 0.5) * 37 / height).astype(int)
    cols = np.floor((np.arange(width) + 0.5) * 52 / width).astype(int)
    dropped = ~res.visible[:, rows[:, None], cols[None, :]]
    assert dropped.any() and not dropped.all()
    assert (big[dropped] == 0).all()
    assert (big[~dropped].reshape(-1, 3).max(1) > 0).mean() > 0.9


def test_frame_size_change_at_a_chunk_boundary_is_a_clear_error(tmp_path, model, monkeypatch):
    """The size may change exactly where a new chunk starts; it is still caught, with the frame's index."""
    src = _source(tmp_path / "cam.mp4", frames=4)

    def frames(_path):
        for i in range(16):
            yield np.full((40, 56, 3) if i < 8 else (60, 84, 3), 100, dtype=np.uint8), i / 12

    monkeypatch.setattr(media, "read_timed_frames", frames)
    report = anonymize_files([src], tmp_path / "out", model, output_size="source", verbose=False)
    assert "frame size changes mid-video, at frame 8 (56x40 to 84x60)" in report.failed[str(src)]
    assert not (tmp_path / "out" / "cam.anonymized.mp4").exists()


def test_variable_frame_rate_source_keeps_its_timing(tmp_path, model):
    """A phone-style VFR source (written with PyAV directly: 12 frames 0.1 s apart, then 12 frames 1/30 s apart):
    every anonymized frame, and the side-by-side's, is shown at its source frame's time (they were written at the
    average rate, about 15 fps: frame 11 at 0.73 s instead of 1.1 s)."""
    from fractions import Fraction

    times = [i / 10 for i in range(12)] + [1.2 + i / 30 for i in range(12)]
    src, base = tmp_path / "phone.mp4", Fraction(1, 1000)
    rng = np.random.default_rng(0)
    with av.open(str(src), "w") as container:
        stream = container.add_stream("libx264", rate=30)
        stream.width, stream.height, stream.pix_fmt = 56, 40, "yuv420p"
        stream.codec_context.time_base = base
        for t in times:
            frame = av.VideoFrame.from_ndarray((rng.random((40, 56, 3)) * 255).astype(np.uint8), format="rgb24")
            frame.pts, frame.time_base = round(t / base), base
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    report = anonymize_files([src], tmp_path / "out", model, stride=2, batch_size=3, side_by_side=True,
                             verbose=False)
    assert not report.failed
    for name in ("phone.anonymized.mp4", "phone.side_by_side.mp4"):
        with av.open(str(tmp_path / "out" / name)) as c:
            shown = [float(f.time) for f in c.decode(video=0)]
        np.testing.assert_allclose(shown, times, atol=2e-3)


def test_phases_of_only_padding_are_not_recorded(tmp_path, model):
    """A 3-frame video at stride 4: one chunk, phases 0-2 hold a real frame, phase 3 only padding."""
    src = _source(tmp_path / "short.mp4", frames=3)
    report = anonymize_files([src], tmp_path / "out", model, stride=4, verbose=False)
    assert not report.failed
    saved = np.load(tmp_path / "out" / "short.keep.npz")
    assert saved["start"].tolist() == [0, 1, 2] and saved["phase"].tolist() == [0, 1, 2]
    assert saved["keep"].shape[0] == 3


def test_output_size_source_needs_the_full_view(tmp_path, model):
    src = _source(tmp_path / "cam.mp4", frames=4)
    report = anonymize_files([src], tmp_path / "out", model, view="center", output_size="source", verbose=False)
    assert "needs view='full'" in report.failed[str(src)]


def test_an_overlap_with_the_centre_view_is_refused(tmp_path, model, capsys):
    """The centre view is one window: min_overlap was ignored without a word (and, recorded as a setting, made
    --skip-existing redo the file when it changed)."""
    src = _source(tmp_path / "cam.mp4", frames=4)
    report = anonymize_files([src], tmp_path / "out", model, view="center", min_overlap=8, verbose=False)
    assert "is one window" in report.failed[str(src)]
    from stpcore.cli import main

    assert main(["anonymize", str(src), "-o", str(tmp_path / "cli"), "--checkpoint", str(tmp_path / "none.pt"),
                 "--view", "center", "--overlap", "8"]) == 2
    assert "--view center is one window, so drop --overlap" in capsys.readouterr().err


@pytest.mark.parametrize("output_size", ["work", "source"])
def test_the_keep_file_records_the_written_video_size(tmp_path, model, output_size):
    """An odd size is rounded up to even for the codec, by repeating the last row or column (never black, which
    reads as a dropped tubelet); the keep file says what was written."""
    src = _source(tmp_path / "a.mp4", frames=6, h=42, w=58)  # 42x58 source: the working scale is 37 x 51 (odd)
    report = anonymize_files([src], tmp_path / "out", model, verbose=False, output_size=output_size)
    assert not report.failed
    video = _decode(tmp_path / "out" / "a.anonymized.mp4")
    with np.load(tmp_path / "out" / "a.keep.npz") as saved:
        assert tuple(saved["video_size"]) == video.shape[1:3]
        if output_size == "work":
            assert tuple(saved["work_size"]) != video.shape[1:3] and all(n % 2 == 0 for n in video.shape[1:3])


def test_an_output_folder_that_refuses_files_is_an_error_before_any_work(tmp_path, monkeypatch):
    """A folder that exists but cannot take files (permissions, a read-only mount; as root only the latter, so the
    refusal is simulated) used to pass the check and fail every input after the model had loaded."""
    import stpcore.anonymize as anonymize_module

    def refuse(*args, **kwargs):
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr(anonymize_module.tempfile, "NamedTemporaryFile", refuse)
    with pytest.raises(ValueError, match=r"cannot write in the output folder .*out: Read-only file system; give a "
                                         r"folder you can write with -o"):
        anonymize_module.prepare_output_dir(tmp_path / "out")
    monkeypatch.undo()
    assert anonymize_module.prepare_output_dir(tmp_path / "out") == tmp_path / "out"
    assert list((tmp_path / "out").iterdir()) == []  # the check leaves nothing behind


class _Broken:
    """A model that cannot run (as a failed compile, an export error or an out-of-memory would be)."""

    cfg = STPrivacyConfig.from_name("tiny")

    def __init__(self, in_prepare: bool):
        self.in_prepare, self.calls = in_prepare, 0

    def prepare(self, batch_size, **kwargs):
        if self.in_prepare:
            raise RuntimeError("export failed")
        return 0.0

    def __call__(self, clips, **kwargs):
        self.calls += 1
        raise RuntimeError("device lost")


@pytest.mark.parametrize("in_prepare", [True, False], ids=["prepare", "first-batch"])
def test_a_model_that_cannot_run_stops_the_run_with_one_error(tmp_path, in_prepare):
    """Every input would fail alike: one ModelError (what finished is attached), not one failure per input."""
    from stpcore.anonymize import ModelError

    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"not a video")
    srcs = [bad, _source(tmp_path / "a.mp4"), _source(tmp_path / "b.mp4", seed=1)]
    broken = _Broken(in_prepare)
    with pytest.raises(ModelError, match="export failed" if in_prepare else "device lost") as caught:
        anonymize_files(srcs, tmp_path / "out", broken, verbose=False)
    assert broken.calls == (0 if in_prepare else 1)
    assert "not the input" in str(caught.value)
    report = caught.value.report
    assert list(report.failed) == [str(bad)] and not report.written  # the unreadable file before it: its own reason
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == []


def test_anonymize_without_a_compiler_is_one_error_not_one_per_file(tmp_path):
    """--compile on a machine whose C++ compiler is missing (CXX names none): one error line naming the fix, exit 2,
    and no input tried (before: every file failed with the same compile error, after its own compile attempt)."""
    import subprocess
    import sys

    from stpcore.models import save_anonymizer

    torch.manual_seed(0)
    save_anonymizer(STPrivacy(STPrivacyConfig.from_name("tiny")).eval(), tmp_path / "m.pt", classes=["a", "b"])
    srcs = [_source(tmp_path / "a.mp4", frames=9), _source(tmp_path / "b.mp4", frames=9, seed=1)]
    env = {**os.environ, "CXX": str(tmp_path / "no-such-compiler"), "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "ind"),
           "STPCORE_DEBUG": "0", "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-m", "stpcore", "anonymize", *map(str, srcs), "-o", str(tmp_path / "out"),
                          "--checkpoint", str(tmp_path / "m.pt"), "--compile", "--precision", "fp32", "--device",
                          "cpu"], capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 2, run.stdout + run.stderr
    errors = [line for line in run.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "torch.compile failed" in errors[0] and "--compile" in errors[0], run.stderr
    assert "Traceback" not in run.stderr and "FAILED" not in run.stdout  # STPCORE_DEBUG=0 means off
    assert not list((tmp_path / "out").iterdir())


def test_a_video_stored_sideways_is_anonymized_upright(tmp_path):
    """A phone's portrait video (stored landscape, with a display rotation) comes out portrait, as players show the
    input; before, it was read as stored and written sideways, without the rotation."""
    from tests.test_media import _block_corner, _stored_sideways

    src = _stored_sideways(tmp_path / "phone.mp4", 90, frames=9)
    report = anonymize_files([src], tmp_path / "out", _Identity(), batch_size=4, verbose=False,
                             output_size="source")
    assert not report.failed
    out = _decode(tmp_path / "out" / "phone.anonymized.mp4")
    assert out.shape == (9, 64, 48, 3) and _block_corner(out[0]) == (False, True)
    keep = np.load(tmp_path / "out" / "phone.keep.npz")
    assert keep["source_size"].tolist() == [64, 48]


def test_skip_existing_redoes_an_output_made_with_other_numerics(tmp_path, model):
    """The record holds the runtime, precision and device, and for dynamic int8 (whose results depend on the other
    clips of a batch) the batch size: another precision, or int8 at another batch size, is done again; fp32 at another
    batch size is the same output and is skipped."""
    from stpcore.inference import ClipAnonymizer

    src = _source(tmp_path / "a.mp4", frames=6)
    out = tmp_path / "out"
    fp32, int8 = ClipAnonymizer(model, precision="fp32"), ClipAnonymizer(model, precision="int8")

    def run(anonymizer, batch_size):
        return anonymize_files([src], out, anonymizer, skip_existing=True, verbose=False, batch_size=batch_size)

    assert list(run(fp32, 4).written) == [str(src)]
    assert len(run(fp32, 2).skipped) == 1  # fp32: a clip's result does not depend on its batch
    assert list(run(int8, 4).written) == [str(src)]  # another precision
    assert read_record(out / "a.keep.npz")["settings"]["numerics"]["precision"] == "int8"
    assert len(run(int8, 4).skipped) == 1
    assert list(run(int8, 2).written) == [str(src)]  # int8 at another batch size
    assert read_record(out / "a.keep.npz")["settings"]["batch_size"] == 2


def test_skip_existing_finds_each_inputs_outputs_whatever_the_order(tmp_path, model):
    """Two inputs of one name get `long` and `long-1`; given in the other order next time (a glob that sorts
    otherwise), each still finds its own outputs by their records: skipped, not failed as "output name taken"."""
    one, two = tmp_path / "a" / "long.mp4", tmp_path / "b" / "long.mp4"
    one.parent.mkdir()
    two.parent.mkdir()
    _source(one, frames=6)
    _source(two, frames=6, seed=1)
    out = tmp_path / "out"
    first = anonymize_files([one, two], out, model, verbose=False)
    assert [p[0].name for p in first.written.values()] == ["long.anonymized.mp4", "long-1.anonymized.mp4"]
    again = anonymize_files([two, one], out, model, verbose=False, skip_existing=True)
    assert not again.failed and not again.written and len(again.skipped) == 2
    redo = anonymize_files([two, one], out, model, verbose=False)  # without the flag: each replaces its own
    assert not redo.failed and {k: v[0].name for k, v in redo.written.items()} == {
        str(one): "long.anonymized.mp4", str(two): "long-1.anonymized.mp4"}


def test_a_pipe_given_as_an_input_file_is_named_as_such(tmp_path, model):
    """A FIFO or a process substitution (/dev/fd/63) was reported as a "missing file: check the path"; it exists, it
    just cannot be probed and read again like a file: the message says what to do."""
    fifo = tmp_path / "feed.mp4"
    os.mkfifo(fifo)
    report = anonymize_files([fifo], tmp_path / "out", model, verbose=False)
    why = report.failed[str(fifo)]
    assert why.startswith("not a regular file") and "standard input ('-'" in why, why
