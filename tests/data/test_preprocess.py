"""One preprocessing: the same frame comes out of the loaders, training/evaluation and anonymize identically
(DALI within a stated tolerance)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from stpcore import media
from stpcore.data.decode_dali import dali_available
from stpcore.data.decode_pyav import decode_frames
from stpcore.data.loader import DataConfig, get_loader
from stpcore.data.preprocess import clip_tensor, to_working_scale, working_short_side
from stpcore.data.sampling import ClipSpec, eval_clips, resized_size
from stpcore.data.synth import make_synthetic_dataset, render_video, write_video
from stpcore.media import IMAGENET_STD
from stpcore.models import STPrivacyConfig

pytest.importorskip("av")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """The demo's geometry: 96x72 VP9 videos of 24 frames, clips of 8 frames at stride 3, 32 px crops."""
    root = tmp_path_factory.mktemp("pre")
    make_synthetic_dataset(root, videos=7, seed=2, width=96, height=72, frames=24)
    return root


class _Recorder:
    """A stand-in anonymizer (the tiny preset's 8 x 32 x 32 clips) that records what the model would be given."""

    cfg = STPrivacyConfig.from_name("tiny")

    def __init__(self):
        self.clips = []

    def __call__(self, clips, **kwargs):
        self.clips += list(clips)
        return SimpleNamespace(video=clips, keep=torch.ones(clips.shape[0], 64))


def test_working_scale_and_filter():
    assert working_short_side(112) == 128 and working_short_side(32) == 37
    frames = np.random.default_rng(0).integers(0, 256, (2, 72, 96, 3), dtype=np.uint8)
    work = to_working_scale(frames, 37)
    assert work.dtype == torch.uint8 and tuple(work.shape) == (2, 3, *resized_size(72, 96, 37)) == (2, 3, 37, 49)
    want = torch.nn.functional.interpolate(torch.from_numpy(frames).permute(0, 3, 1, 2).float(), size=(37, 49),
                                           mode="bilinear", antialias=True, align_corners=False)
    assert (work.float() - want).abs().max() <= 0.5  # the antialiased bilinear, rounded
    assert torch.equal(to_working_scale(frames, 72), torch.from_numpy(frames).permute(0, 3, 1, 2))  # no resize
    with pytest.raises(ValueError, match="uint8"):
        to_working_scale(frames.astype(np.float32), 37)



def test_working_scale_resizes_in_chunks_with_the_same_result(monkeypatch):
    """Large frames are resized a few at a time (a 2048x2048 video's float32 copy took 2.5 GB at once): the frames
    come out as the one-shot resize gives them, and the float32 copy is bounded."""
    from stpcore.data import preprocess

    frames = np.random.default_rng(1).integers(0, 256, (7, 72, 96, 3), dtype=np.uint8)
    whole = to_working_scale(frames, 37)
    sizes = []
    real = preprocess.F.interpolate
    monkeypatch.setattr(preprocess.F, "interpolate", lambda x, **kw: sizes.append(x.shape[0]) or real(x, **kw))
    monkeypatch.setattr(preprocess, "_FLOAT_CHUNK_BYTES", 3 * 72 * 96 * 3 * 4)  # three frames' float32
    assert torch.equal(to_working_scale(frames, 37), whole)
    assert sizes == [3, 3, 1]


def test_one_frame_is_the_same_through_every_path(dataset):
    """The evaluation's centre view of a video's first clip: the PyAV loader (decoded per call and cached),
    the loader training and evaluation build (``runtime.clip_loader``), and the centre window of
    ``stpcore anonymize`` give the model the same tensor, bit for bit; its full-frame windows are the same
    function's crops at their origins."""
    from stpcore.anonymize import WindowAnonymizer, plan_windows
    from stpcore.runtime import clip_loader

    common = dict(labels=dataset / "vp_labels.csv", num_frames=8, crop=32, stride=3, decoder="pyav", workers=0,
                  batch_size=1)
    loaders = [get_loader(DataConfig(root=dataset, train=False, **common)),
               get_loader(DataConfig(root=dataset, train=False, cache=True, **common)),
               clip_loader(dataset, train=False, **common)]
    views = []
    for loader in loaders:
        assert loader.cfg.short_side == 37
        batch = next(iter(loader))
        views.append(batch.clips[(batch.video_index == 0) & (batch.clip_index == 1)][0])  # clip 0, centre crop
    assert all(torch.equal(views[0], v) for v in views[1:])
    path = loaders[0].records[0].path
    spec = eval_clips(24, 8, 3)[1]
    assert spec.frames.tolist() == list(range(0, 24, 3))

    frames = np.stack(list(media.read_frames(path)))  # what anonymize decodes
    work = to_working_scale(frames[:24], 37)
    recorder = _Recorder()
    WindowAnonymizer(recorder, plan_windows(37, 49, 32, "center"), stride=3, batch_size=4).run([work])
    assert torch.equal(recorder.clips[0], views[0])  # phase 0: frames 0, 3, ..., 21

    recorder = _Recorder()
    grid = plan_windows(37, 49, 32, "full")
    WindowAnonymizer(recorder, grid, stride=3, batch_size=4).run([work])
    raw, _ = decode_frames(path, spec.frames)
    for (y, x), clip in zip(grid.origins, recorder.clips, strict=False):  # phase 0's windows come first
        at = ClipSpec(spec.frames, crop_x=x / (49 - 32), crop_y=y / (37 - 32), flip=False)
        assert torch.equal(clip, clip_tensor(raw, at, short_side=37, crop=32))


@pytest.mark.skipif(not dali_available(), reason="nvidia-dali not installed")
def test_dali_cpu_matches_pyav(tmp_path):
    """DALI-CPU and PyAV decode the same VP9 clip to nearly the same input.

    Measured on a 160x120 synthetic video (sharp-edged shapes): mean |diff| 1.8 of 255 levels, max 47
    (colour-edge pixels: the two paths convert YUV 4:2:0 to RGB with different chroma upsampling, and
    resize with slightly different filters). Bounds: mean <= 3 levels, 99th percentile <= 25 levels.
    """
    from stpcore.data.decode_dali import DaliClipDecoder, DaliItem

    frames = render_video(5, np.array([1, 1, 1, 0, 1]), np.random.default_rng(0), 160, 120, 20)
    path = tmp_path / "c.webm"
    write_video(path, frames, codec="vp9")
    decoder = DaliClipDecoder("cpu", max_batch=2)
    specs = [ClipSpec(np.arange(2, 18), 0.25, 0.8, False), ClipSpec(np.arange(0, 16)[::-1] % 20, 1.0, 0.0, True)]
    out, kept, failed = decoder.decode([DaliItem(path, 120, 160, s) for s in specs])
    assert out.shape == (2, 3, 16, 112, 112) and kept == [0, 1] and not failed
    for i, spec in enumerate(specs):
        raw, _ = decode_frames(path, spec.frames)
        ref = clip_tensor(raw, spec)
        levels = ((out[i] - ref).abs() * torch.tensor(IMAGENET_STD).view(3, 1, 1, 1) * 255).flatten()
        assert levels.mean() <= 3.0, levels.mean()
        assert torch.quantile(levels, 0.99) <= 25.0


@pytest.mark.skipif(not dali_available(), reason="nvidia-dali not installed")
@pytest.mark.parametrize("rotation", [90, -90, 180])
def test_dali_turns_a_video_stored_sideways_upright_as_pyav_does(tmp_path, rotation):
    """A video whose display matrix turns it (a phone's portrait video): DALI's decoder ignores the rotation, so the
    pipeline turns the resized frames (DaliItem.turns); the clips match PyAV's upright ones within the tolerance of
    test_dali_cpu_matches_pyav (sideways, they differ by far more: the crop's content is another part of the scene)."""
    import av

    from stpcore.data.decode_dali import DaliClipDecoder, DaliItem
    from stpcore.data.decode_pyav import first_frame_turns

    frames = render_video(5, np.array([1, 1, 1, 0, 1]), np.random.default_rng(0), 160, 120, 20)
    path = tmp_path / "phone.webm"
    with av.open(str(path), "w") as c:
        stream = c.add_stream("libvpx-vp9", rate=25)
        stream.width, stream.height, stream.pix_fmt = 160, 120, "yuv420p"
        stream.set_display_rotation(rotation)
        for img in frames:
            c.mux(stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")))
        c.mux(stream.encode())
    turns = first_frame_turns(path)
    assert turns == (rotation // 90) % 4
    specs = [ClipSpec(np.arange(2, 18), 0.25, 0.8, False), ClipSpec(np.arange(0, 16)[::-1] % 20, 1.0, 0.0, True)]
    decoder = DaliClipDecoder("cpu", max_batch=2)
    out, kept, failed = decoder.decode([DaliItem(path, 120, 160, s, turns) for s in specs])
    assert out.shape == (2, 3, 16, 112, 112) and kept == [0, 1] and not failed
    for i, spec in enumerate(specs):
        raw, _ = decode_frames(path, spec.frames)  # upright
        assert raw.shape[1:3] == ((160, 120) if turns % 2 else (120, 160))
        levels = ((out[i] - clip_tensor(raw, spec)).abs() * torch.tensor(IMAGENET_STD).view(3, 1, 1, 1) * 255)
        assert levels.mean() <= 3.0, levels.mean()
        assert torch.quantile(levels.flatten(), 0.99) <= 25.0


@pytest.mark.skipif(not dali_available(), reason="nvidia-dali not installed")
def test_dali_reports_a_bad_clip_in_a_batch_of_one(tmp_path):
    """A file that fails to decode (changed after it was probed) is reported and skipped whatever the batch size;
    in a decode call of one clip it used to raise, ending the epoch with an error that named no file."""
    from stpcore.data.decode_dali import DaliClipDecoder, DaliItem

    frames = render_video(5, np.array([1, 1, 1, 0, 1]), np.random.default_rng(0), 160, 120, 20)
    good = tmp_path / "good.webm"
    write_video(good, frames, codec="vp9")
    bad = tmp_path / "bad.webm"
    bad.write_bytes(good.read_bytes()[: len(good.read_bytes()) // 4])
    spec = ClipSpec(np.arange(0, 16), 1.0, 0.0, False)
    decoder = DaliClipDecoder("cpu", max_batch=1)
    out, kept, failed = decoder.decode([DaliItem(bad, 120, 160, spec)])
    assert out.shape[0] == 0 and kept == [] and len(failed) == 1 and failed[0][0] == 0 and failed[0][1]
    out, kept, failed = decoder.decode([DaliItem(good, 120, 160, spec)])  # the pipeline recovered
    assert out.shape == (1, 3, 16, 112, 112) and kept == [0] and not failed


@pytest.mark.skipif(not dali_available(), reason="nvidia-dali not installed")
@pytest.mark.parametrize("width", [338, 342, 346], ids=lambda w: f"W{w}")
def test_dali_and_pyav_test_crops_start_at_the_same_pixel(tmp_path, width):
    """The three test crops of a video whose working-scale width leaves an odd free space (338 -> 169: 57 free
    pixels, the centre at 28.5): PyAV's crop started at round-half-even (28), DALI's anchor rounds half up (29), so
    the two loaders' centre clips were a pixel apart. Fine vertical stripes make a one-pixel shift show."""
    from stpcore.data.decode_dali import DaliClipDecoder, DaliItem
    from stpcore.data.sampling import eval_clips

    x = np.arange(width)
    image = np.zeros((256, width, 3), np.uint8)
    image[..., 0], image[..., 1] = ((x // 2) * 7 % 256)[None], ((x // 2) * 13 % 256)[None]
    path = tmp_path / "stripes.webm"
    write_video(path, np.stack([image] * 20), codec="vp9", options={"crf": "4"})
    specs = eval_clips(20, num_frames=16, stride=1, num_clips=1)
    out, kept, _ = DaliClipDecoder("cpu", max_batch=3).decode([DaliItem(path, 256, width, s) for s in specs])
    assert kept == [0, 1, 2]
    for i, spec in enumerate(specs):
        raw, _ = decode_frames(path, spec.frames)
        levels = (out[i] - clip_tensor(raw, spec)).abs() * torch.tensor(IMAGENET_STD).view(3, 1, 1, 1) * 255
        assert levels.mean() <= 3.0, (spec.crop_x, levels.mean())  # a pixel's shift: about 10 levels
