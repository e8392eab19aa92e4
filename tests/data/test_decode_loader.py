"""Sampling, sharding, PyAV and DALI-CPU decoding, loaders, and every bad-input case (tiny VP9 videos)."""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from stpcore.data.decode_dali import dali_available
from stpcore.data.decode_pyav import decode_frames, probe
from stpcore.data.loader import DataConfig, DataWarning, get_loader
from stpcore.data.preprocess import clip_tensor, crop_normalize
from stpcore.data.sampling import ClipSpec, clip_frames, crop_position, eval_clips, shard_indices, train_clip
from stpcore.data.synth import make_synthetic_dataset, render_video, write_video
from stpcore.media import IMAGENET_MEAN, IMAGENET_STD

pytest.importorskip("av")

LO = min((0 - m) / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD, strict=True))
HI = max((1 - m) / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD, strict=True))


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    """14 VP9 videos, 80x60, 34 frames (one clip at stride 2 spans 31), HMDB51 layout."""
    root = tmp_path_factory.mktemp("synth")
    make_synthetic_dataset(root, videos=14, seed=1, width=80, height=60, frames=34)
    return root


def _cfg(root, **kw) -> DataConfig:
    base = dict(root=root, labels=Path(root) / "vp_labels.csv", batch_size=4, workers=0, decoder="pyav", device="cpu")
    base.update(kw)
    return DataConfig(**base)


def test_train_and_test_sampling():
    rng = np.random.default_rng(0)
    for _ in range(50):
        spec = train_clip(100, rng, 16, 2)
        assert spec.frames.shape == (16,) and spec.frames.min() >= 0 and spec.frames.max() < 100
        assert np.all(np.diff(spec.frames) == 2) and not spec.short
        assert 0 <= spec.crop_x <= 1 and 0 <= spec.crop_y <= 1
    views = eval_clips(100, 16, 4)
    assert [v.clip_index for v in views] == list(range(15))
    starts = sorted({int(v.frames[0]) for v in views})
    assert starts == [0, 10, 20, 29, 39]  # free = 100 - 61 = 39 -> linspace(0, 39, 5) rounded
    assert [v.crop_x for v in views[:3]] == [0.0, 0.5, 1.0]
    # The test crops slide along the long side; the short side stays centred (they ran diagonally before).
    assert [crop_position(v, 128, 171) for v in views[:3]] == [(0.5, 0.0), (0.5, 0.5), (0.5, 1.0)]
    assert [crop_position(v, 171, 128) for v in views[:3]] == [(0.0, 0.5), (0.5, 0.5), (1.0, 0.5)]
    train = train_clip(100, rng, 16, 2)
    assert crop_position(train, 128, 171) == (train.crop_y, train.crop_x)  # training crops: both free
    frames, short = clip_frames(0, 10, 16, 2)
    assert short and frames.max() < 10 and frames[5] == 0  # 10 wraps to 0


@pytest.mark.parametrize("n", [0, 1, 7, 10, 13])
@pytest.mark.parametrize("shards", [1, 2, 3, 4])
def test_shards_cover_every_index_once(n, shards):
    parts = [shard_indices(n, r, shards, shuffle=True, seed=3, epoch=2) for r in range(shards)]
    assert sorted(np.concatenate(parts).tolist()) == list(range(n))
    padded = [shard_indices(n, r, shards, shuffle=True, seed=3, epoch=2, pad=True) for r in range(shards)]
    assert len({len(p) for p in padded}) == 1 and set(np.concatenate(padded).tolist()) == set(range(n))


def test_loader_sharding_test_mode(dataset):
    seen = []
    for rank in range(3):
        loader = get_loader(_cfg(dataset, train=False, num_shards=3, shard_id=rank))
        ids = [vid for batch in loader for vid in batch.video_ids]
        seen.extend(dict.fromkeys(ids))
    full = get_loader(_cfg(dataset, train=False))
    assert sorted(seen) == sorted(r.video_id for r in full.records)


def test_pyav_train_batch(dataset):
    loader = get_loader(_cfg(dataset, train=True, batch_size=4))
    batch = next(iter(loader))
    assert batch.clips.shape == (4, 3, 16, 112, 112) and batch.clips.dtype == torch.float32
    assert LO - 1e-4 <= batch.clips.min() and batch.clips.max() <= HI + 1e-4
    assert batch.actions.dtype == torch.int64 and batch.actions.shape == (4,)
    assert batch.privacy.shape == (4, 5) and batch.privacy.dtype == torch.float32 and batch.has_privacy.all()
    for vid, p in zip(batch.video_ids, batch.privacy, strict=True):
        assert loader.records[[r.video_id for r in loader.records].index(vid)].privacy.tolist() == p.int().tolist()
    # Same seed and epoch -> the same clips, bit for bit.
    again = next(iter(get_loader(_cfg(dataset, train=True, batch_size=4))))
    torch.testing.assert_close(batch.clips, again.clips, rtol=0, atol=0)


def test_pyav_test_grouping(dataset):
    loader = get_loader(_cfg(dataset, train=False, batch_size=2))
    batches = list(loader)
    vids = torch.cat([b.video_index for b in batches])
    clips = torch.cat([b.clip_index for b in batches])
    assert batches[0].clips.shape == (30, 3, 16, 112, 112)
    for v in vids.unique():
        assert sorted(clips[vids == v].tolist()) == list(range(15))
    assert len(vids.unique()) == len(loader.records)
    # The 3 spatial crops of one temporal clip differ only by position (same frames).
    b = batches[0]
    assert not torch.equal(b.clips[0], b.clips[2])


@pytest.mark.skipif(not dali_available(), reason="nvidia-dali not installed")
def test_dali_loader_matches_contract(dataset):
    loader = get_loader(_cfg(dataset, train=False, batch_size=2, decoder="dali"))
    batch = next(iter(loader))
    assert batch.clips.shape == (30, 3, 16, 112, 112)
    assert sorted(batch.clip_index[batch.video_index == batch.video_index[0]].tolist()) == list(range(15))
    ref = next(iter(get_loader(_cfg(dataset, train=False, batch_size=2))))
    assert batch.video_ids == ref.video_ids
    assert (batch.clips - ref.clips).abs().mean() < 0.05
    assert torch.equal(batch.views, ref.views)  # where each clip lies in its frame (the blacken baseline maps by it)


@pytest.fixture(scope="module")
def bad_dataset(tmp_path_factory, dataset) -> Path:
    """The synthetic set plus every kind of broken video, each listed in the training split."""
    root = tmp_path_factory.mktemp("bad")
    shutil.copytree(dataset, root, dirs_exist_ok=True)
    cls = root / "up"
    good = sorted(cls.glob("*.webm"))[0].read_bytes()
    (cls / "zero.webm").write_bytes(b"")
    (cls / "truncated.webm").write_bytes(good[: len(good) // 3])
    (cls / "corrupt.webm").write_bytes(np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes())
    rng = np.random.default_rng(2)
    write_video(cls / "h264.mp4", render_video(1, np.ones(5, int), rng, 80, 60, 34), codec="h264")
    write_video(cls / "short.webm", render_video(1, np.ones(5, int), rng, 80, 60, 6), codec="vp9")
    write_video(cls / "odd.webm", render_video(1, np.ones(5, int), rng, 202, 34, 34), codec="vp9")
    extra = ["zero.avi 1", "truncated.avi 1", "corrupt.avi 1", "h264.avi 1", "short.avi 1", "odd.avi 1", "gone.avi 1"]
    split = root / "up_test_split1.txt"
    split.write_text(split.read_text() + "\n".join(extra) + "\n")
    return root


@pytest.mark.parametrize("decoder", ["pyav", pytest.param("dali", marks=pytest.mark.skipif(
    not dali_available(), reason="nvidia-dali not installed"))])
def test_bad_inputs_are_skipped_and_reported(bad_dataset, decoder):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loader = get_loader(_cfg(bad_dataset, train=True, batch_size=4, decoder=decoder))
        ids = [vid for batch in loader for vid in batch.video_ids]
        for batch in loader:  # a second epoch warns no more and still never crashes
            assert batch.clips.shape[1:] == (3, 16, 112, 112) and torch.isfinite(batch.clips).all()
    messages = [str(w.message) for w in caught if issubclass(w.category, DataWarning)]
    report = loader.report()
    assert report.counts["missing file (split entry)"] == 1 and any("gone" in m for m in messages)
    assert report.counts["empty file"] == 2 and any("zero.webm: empty file" in m for m in messages)
    assert any("corrupt.webm" in m for m in messages) and "up/corrupt" not in ids
    assert any("short.webm" in m and "looped" in m for m in messages) and "up/short" in ids
    assert "up/odd" in ids
    if decoder == "dali":
        assert any("h264.mp4" in m and "codec" in m for m in messages) and "up/h264" not in ids
    else:
        assert "up/h264" in ids
    good = {r.video_id for r in loader.records} - {"up/zero", "up/corrupt", "up/h264", "up/truncated"}
    assert good <= set(ids)
    assert len(messages) == len(set(messages))


@pytest.mark.parametrize("decoder, batch_size", [("pyav", 1), pytest.param("dali", 4, marks=pytest.mark.skipif(
    not dali_available(), reason="nvidia-dali not installed"))])
def test_start_at_a_batchs_order_end_resumes_exactly_after_unreadable_videos(bad_dataset, decoder, batch_size):
    """A resumed run starts where the batch it last trained on left the video order (Batch.order_end): the rest of
    the epoch is the uninterrupted one's, also after unreadable videos (PyAV drops a batch whose videos all failed,
    DALI refills a batch from the next videos), where counting whole batches lands elsewhere."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DataWarning)
        loader = get_loader(_cfg(bad_dataset, train=True, batch_size=batch_size, decoder=decoder, num_frames=8,
                                 crop=32, short_side=37))
        loader.set_epoch(2)
        full = list(loader)
        shifted = 0
        for k, done in enumerate(full):
            loader.set_epoch(2)
            loader.start_at(video=done.order_end)
            rest = list(loader)
            assert [b.video_ids for b in rest] == [b.video_ids for b in full[k + 1:]]
            assert all(torch.equal(a.clips, b.clips) for a, b in zip(rest, full[k + 1:], strict=True))
            loader.set_epoch(2)
            loader.start_at(k + 1)
            shifted += [b.video_ids for b in loader] != [b.video_ids for b in full[k + 1:]]
    assert full[-1].order_end == len(loader.shard())
    assert shifted  # the unreadable videos do move the batches: counting batches would resume elsewhere
    with pytest.raises(ValueError, match="either batch or video"):
        loader.start_at(1, video=4)


@pytest.mark.skipif(not dali_available(), reason="nvidia-dali not installed")
def test_dali_reads_a_video_displayed_rotated_upright_as_pyav_does(dataset, tmp_path):
    """DALI's decoder ignores a display rotation (a VP9 file turned 90 degrees comes out landscape); the loader turns
    the frames upright in its pipeline, so the clip is PyAV's (within DALI's tolerance: test_preprocess.py)."""
    from tests.test_media import _stored_sideways

    root = tmp_path / "rot"
    shutil.copytree(dataset, root)
    _stored_sideways(root / "up" / "phone.webm", 90, codec="libvpx-vp9", frames=34)
    split = root / "up_test_split1.txt"
    split.write_text(split.read_text() + "phone.avi 2\n")  # a test video: its clips are not random
    common = dict(train=False, batch_size=4, num_frames=8, crop=32, short_side=37)

    def clips(loader):  # each test video's clips
        return {v: c for b in loader for v, c in zip(b.video_ids, b.clips, strict=True)}

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dali = clips(get_loader(_cfg(root, decoder="dali", **common)))
    pyav = clips(get_loader(_cfg(root, **common)))
    assert "up/phone" in dali and not any("phone" in str(w.message) for w in caught)
    levels = (dali["up/phone"] - pyav["up/phone"]).abs() * torch.tensor(IMAGENET_STD).view(3, 1, 1, 1) * 255
    assert levels.mean() <= 3.0, levels.mean()


def test_probe_and_odd_sizes(bad_dataset):
    info = probe(bad_dataset / "up" / "odd.webm")
    assert (info.width, info.height, info.num_frames, info.codec) == (202, 34, 34, "vp9")
    raw, n = decode_frames(bad_dataset / "up" / "odd.webm", np.array([0, 33, 5]))
    assert raw.shape == (3, 34, 202, 3) and n == 34
    clip = clip_tensor(raw, ClipSpec(np.arange(3), 1.0, 0.0, True))
    assert clip.shape == (3, 3, 112, 112)


@pytest.mark.parametrize("indices", [[0, 33, 5, 5], [40, 2, 70]])  # repeats; past the end (wrapped)
def test_decode_resizes_each_frame_as_it_decodes_to_the_same_pixels(bad_dataset, indices):
    """With short_side only the working-scale frames are held (a 4K frame is 25 MB), and they are the frames
    to_working_scale gives for the full-size ones."""
    from stpcore.data.preprocess import to_working_scale

    path = bad_dataset / "up" / "odd.webm"
    raw, n = decode_frames(path, np.array(indices))
    small, m = decode_frames(path, np.array(indices), short_side=20)
    assert n == m == 34 and small.shape == (len(indices), 20, 119, 3)
    np.testing.assert_array_equal(small, to_working_scale(raw, 20).permute(0, 2, 3, 1).numpy())
    np.testing.assert_array_equal(to_working_scale(small, 20).permute(0, 2, 3, 1).numpy(), small)  # a fixed point


def test_cache_mode_decodes_once_and_matches_uncached(tmp_path, monkeypatch):
    from stpcore.data import DataConfig, decode_pyav, get_loader
    from stpcore.data.synth import make_synthetic_dataset

    make_synthetic_dataset(tmp_path, videos=7, seed=1, width=64, height=48, frames=20)
    common = dict(root=tmp_path, labels=tmp_path / "vp_labels.csv", batch_size=4, workers=0, decoder="pyav",
                  num_frames=8, short_side=37, crop=32, stride=2, seed=3)
    calls = []
    real = decode_pyav.decode_frames
    monkeypatch.setattr(decode_pyav, "decode_frames", lambda *a, **k: calls.append(a[0]) or real(*a, **k))
    cached, plain = get_loader(DataConfig(**common, cache=True)), get_loader(DataConfig(**common))
    for _ in range(2):  # two epochs: different random clips, the same in both loaders
        for a, b in zip(cached, plain, strict=True):
            assert a.video_ids == b.video_ids
            assert torch.equal(a.clips, b.clips)  # both paths resize to uint8 (data.preprocess)
    decoded_by_cache = len(calls) - len(plain.records) * 2
    assert decoded_by_cache == len(cached.records)  # once per video over both epochs


def test_start_at_resumes_an_epoch_without_decoding_its_first_batches(dataset):
    loader = get_loader(_cfg(dataset, train=True, batch_size=2, num_frames=8, crop=32, short_side=37))
    loader.set_epoch(3)
    full = list(loader)
    assert len(full) >= 3
    loader.set_epoch(3)
    loader.start_at(2)
    resumed = list(loader)
    assert len(resumed) == len(full) - 2
    for a, b in zip(full[2:], resumed, strict=True):
        assert torch.equal(a.video_index, b.video_index) and torch.equal(a.clips, b.clips)
    loader.set_epoch(3)
    assert len(list(loader)) == len(full)  # the start applies to one iteration only


@pytest.mark.parametrize("height, width", [(128, 171), (171, 128)])
def test_test_views_share_frames_and_slide_along_the_long_side(height, width):
    """The 3 spatial views of a temporal clip have the same frames; their crops start at the short side's
    centre and at the start, middle and end of the long side (pixel value = 1000 y + x identifies them)."""
    views = eval_clips(100, 16, 4)
    for t in range(5):
        frames = [v.frames for v in views[3 * t : 3 * t + 3]]
        assert all(np.array_equal(frames[0], f) for f in frames[1:])
    yy, xx = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    resized = (1000.0 * yy + xx).expand(2, 3, height, width).float()
    ones = dict(mean=(0.0, 0.0, 0.0), std=(1 / 255, 1 / 255, 1 / 255))  # leave the values as they are
    origins = []
    for v in views[:3]:
        corner = crop_normalize(resized, v, crop=112, **ones)[0, 0, 0, 0].item()
        origins.append((int(corner // 1000), int(corner % 1000)))
    free_y, free_x = height - 112, width - 112
    if width >= height:
        assert origins == [(free_y // 2, 0), (free_y // 2, round(free_x / 2)), (free_y // 2, free_x)]
    else:
        assert origins == [(0, free_x // 2), (round(free_y / 2), free_x // 2), (free_y, free_x // 2)]


def test_an_unknown_dataset_kind_is_a_clear_error(dataset):
    with pytest.raises(ValueError, match="kind must be 'auto', 'hmdb51', 'ucf101'.*got 'foo'"):
        get_loader(_cfg(dataset, kind="foo"))


def test_probe_without_counting_reads_a_webm_only_to_its_first_packet(dataset, monkeypatch):
    """anonymize only checks that an input is a readable video; a WebM/MKV header has no frame count, and probe
    demuxed the whole file to count its packets (a full extra read of a multi-GB recording)."""
    from stpcore.data import decode_pyav

    path = sorted(Path(dataset).glob("*/*.webm"))[0]
    read = []
    real_open = decode_pyav.open_video

    class Counting:
        def __init__(self, container):
            self.container = container

        def __enter__(self):
            self.container.__enter__()
            return self

        def __exit__(self, *exc):
            return self.container.__exit__(*exc)

        def __getattr__(self, name):
            return getattr(self.container, name)

        def demux(self, *streams):
            for packet in self.container.demux(*streams):
                read.append(packet.size)
                yield packet

    monkeypatch.setattr(decode_pyav, "open_video", lambda p, *a, **k: Counting(real_open(p, *a, **k)))
    assert probe(path).num_frames == 34 and len(read) >= 34
    read.clear()
    info = probe(path, count_frames=False)
    assert info.num_frames == -1 and (info.width, info.height) == (80, 60) and len(read) == 1
