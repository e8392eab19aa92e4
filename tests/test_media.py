"""Media writers and readers: videos, pictures, atomic files."""

from __future__ import annotations

import os

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
