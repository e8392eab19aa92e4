"""`stpcore anonymize`: whole files, clip by clip, at the source frame rate; bad files skipped."""

from __future__ import annotations

import numpy as np
import pytest
import torch

av = pytest.importorskip("av")  # PyAV: CI installs it; a GPU machine without it skips these modules

from stpcore import media  # noqa: E402
from stpcore.anonymize import anonymize_files  # noqa: E402
from stpcore.models import STPrivacy, STPrivacyConfig  # noqa: E402
from stpcore.tubelets import keep_to_pixels  # noqa: E402


def _decode(path):
    with av.open(str(path)) as c:
        return np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return STPrivacy(STPrivacyConfig.from_name("tiny")).eval()


def _source(path, frames=21, h=40, w=56, fps=12):
    rng = np.random.default_rng(0)
    video = (rng.random((frames, h, w, 3)) * 255).astype(np.uint8)
    return media.write_video(path, video, fps=fps)


@pytest.mark.parametrize("stride", [1, 2])
def test_anonymize_whole_file_black_where_dropped(tmp_path, model, stride):
    src = _source(tmp_path / "cam.mp4")
    cfg = model.cfg
    report = anonymize_files(
        [src], tmp_path / "out", model, stride=stride, batch_size=3, side_by_side=True, verbose=False,
    )
    assert not report.failed
    out = _decode(tmp_path / "out" / "cam.anonymized.mp4")
    assert out.shape == (21, 32, 32, 3)  # every source frame, at the model's crop
    with av.open(str(tmp_path / "out" / "cam.anonymized.mp4")) as c:
        assert abs(float(c.streams.video[0].average_rate) - 12) < 0.01
    saved = np.load(tmp_path / "out" / "cam.keep.npz")
    chunk = cfg.num_frames * stride
    n_chunks = -(-21 // chunk)
    assert saved["keep"].shape == (n_chunks * stride, cfg.num_tokens)
    assert saved["keep"].sum(1).tolist() == [cfg.num_slots * cfg.kept_per_slot()[-1]] * (n_chunks * stride)
    # Pixels of dropped tubelets are black (up to H.264's rounding); kept ones are not all black.
    for i, (start, phase) in enumerate(zip(saved["start"], saved["phase"], strict=True)):
        mask = keep_to_pixels(torch.from_numpy(saved["keep"][i]).float()[None], cfg.grid, cfg.tubelet)[0, 0]
        frame_ids = np.arange(start - phase, start - phase + chunk)[phase::stride]
        valid = frame_ids < 21
        clip = out[frame_ids[valid]].astype(float)  # (T', H, W, 3)
        dropped = ~mask.bool().numpy()[valid]
        assert clip[dropped].mean() < 12
        assert clip[~dropped].mean() > 30
    sbs = _decode(tmp_path / "out" / "cam.side_by_side.mp4")
    assert sbs.shape == (21, 32, 32 * 2 + 4, 3)


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
    assert "skipped" in capsys.readouterr().err


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
    # Without the flag everything is written again.
    assert len(anonymize_files(srcs, tmp_path / "out", model, **kwargs).written) == 2


def test_unreadable_inputs_say_why(tmp_path, model):
    folder = tmp_path / "clips"
    folder.mkdir()
    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    text = tmp_path / "notes.mp4"
    text.write_text("not a video\n" * 50)
    report = anonymize_files([folder, empty, text, tmp_path / "gone.mp4"], tmp_path / "out", model,
                             verbose=False)
    why = report.failed
    assert "a folder" in why[str(folder)]
    assert why[str(empty)].startswith("empty file")
    assert why[str(text)].startswith("unreadable")
    assert why[str(tmp_path / "gone.mp4")].startswith("missing file")


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


@pytest.mark.parametrize("stride", [1, 2])
def test_frames_come_back_in_order_with_their_content(tmp_path, stride):
    """Every source frame is written once, in order, with its own content (stride phases interleaved back,
    the padded last chunk cut): each frame's brightness encodes its index."""
    frames = 21
    levels = (np.arange(frames) * 9 + 20).astype(np.uint8)  # frame i: grey level 20 + 9 i
    ramp = np.linspace(0, 30, 56, dtype=np.float32)[None, None, :, None]
    video = np.clip(levels[:, None, None, None] + ramp + np.zeros((1, 40, 56, 3), np.float32), 0, 255)
    src = media.write_video(tmp_path / "ramp.mp4", video.astype(np.uint8), fps=12)
    report = anonymize_files([src], tmp_path / "out", _Identity(), stride=stride, batch_size=3, verbose=False)
    assert not report.failed
    out = _decode(tmp_path / "out" / "ramp.anonymized.mp4").astype(float)
    want = np.stack(list(media.read_frames(src, short_side=32, crop=32))).astype(float)
    assert out.shape == want.shape == (frames, 32, 32, 3)
    assert np.abs(out.mean(axis=(1, 2, 3)) - want.mean(axis=(1, 2, 3))).max() < 3  # order and content
    assert np.abs(out - want).mean() < 3
