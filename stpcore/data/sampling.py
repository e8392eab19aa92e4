"""Clip sampling: which frames, which crop, which flip; and DistributedSampler-like sharding.

[P] 16-frame clips at the dataset's stride (2 for HMDB51, 4 for UCF101), 112x112 crops, 5 clips x 3 crops per
test video. [G] (the paper does not say): the short side resized to 128 before cropping, a random temporal
offset, random crop and horizontal flip in training, the test crops at the start, centre and end of the long
side, and the ImageNet normalisation.

Everything here is pure index arithmetic shared by the PyAV and DALI paths, so both read the same frames
and crops for the same seed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

NUM_FRAMES = 16
CROP_SIZE = 112
RESIZE_SHORT = 128
TEST_CLIPS = 5
TEST_CROPS = 3
DEFAULT_STRIDE = {"hmdb51": 2, "ucf101": 4}


@dataclass(frozen=True)
class ClipSpec:
    """One clip to cut from a video.

    Attributes:
        frames: int64 (T,) frame indices into the video (already looped where the video is short).
        crop_x, crop_y: crop position in [0, 1] along the free width / height after the resize
            (0 = left/top, 1 = right/bottom), DALI's crop_pos convention.
        flip: mirror horizontally.
        clip_index: index of this view within its video (test: temporal * TEST_CROPS + spatial; train: 0).
        short: the video had fewer frames than the clip spans, so indices wrap around.
        along_long_side: test views: the position (crop_x == crop_y) applies along the frame's long side
            and the short side is centred; see :func:`crop_position`, which the decoders call.
    """

    frames: np.ndarray
    crop_x: float
    crop_y: float
    flip: bool
    clip_index: int = 0
    short: bool = False
    along_long_side: bool = False


def crop_position(spec: ClipSpec, height: int, width: int) -> tuple[float, float]:
    """(pos_y, pos_x) in [0, 1] of ``spec``'s crop in a frame of this size (any scale: only the aspect counts).
    Square frames count as landscape: the crops slide horizontally."""
    if not spec.along_long_side:
        return spec.crop_y, spec.crop_x
    return (0.5, spec.crop_x) if height <= width else (spec.crop_y, 0.5)


def clip_span(num_frames: int, stride: int) -> int:
    """Frames a clip covers: (num_frames - 1) * stride + 1."""
    return (num_frames - 1) * stride + 1


def clip_frames(start: int, video_frames: int, num_frames: int, stride: int) -> tuple[np.ndarray, bool]:
    """Indices start, start+stride, ... (num_frames of them), looped modulo the video length when it is short.

    Returns:
        (int64 (num_frames,), short) where short says the indices wrapped.
    """
    if video_frames <= 0:
        raise ValueError("video has no frames")
    idx = start + stride * np.arange(num_frames, dtype=np.int64)
    short = bool(idx[-1] >= video_frames)
    return idx % video_frames, short


def train_clip(
    video_frames: int, rng: np.random.Generator, num_frames: int = NUM_FRAMES, stride: int = 2, flip: bool = True
) -> ClipSpec:
    """Random temporal offset, random crop position, horizontal flip with probability 1/2 (if `flip`)."""
    free = video_frames - clip_span(num_frames, stride)
    start = int(rng.integers(0, free + 1)) if free > 0 else 0
    frames, short = clip_frames(start, video_frames, num_frames, stride)
    cx, cy = (float(v) for v in rng.random(2))
    do_flip = bool(rng.random() < 0.5) if flip else False
    return ClipSpec(frames=frames, crop_x=cx, crop_y=cy, flip=do_flip, short=short)


def eval_clips(
    video_frames: int,
    num_frames: int = NUM_FRAMES,
    stride: int = 2,
    num_clips: int = TEST_CLIPS,
    num_crops: int = TEST_CROPS,
) -> list[ClipSpec]:
    """`num_clips` uniformly spaced temporal clips x `num_crops` spatial crops (start, centre, end of the long
    side), no flip. clip_index = temporal * num_crops + spatial; num_clips * num_crops specs in that order."""
    free = max(video_frames - clip_span(num_frames, stride), 0)
    starts = np.linspace(0, free, num_clips).round().astype(np.int64) if num_clips > 1 else np.array([free // 2])
    positions = np.linspace(0.0, 1.0, num_crops) if num_crops > 1 else np.array([0.5])
    specs = []
    for t, start in enumerate(starts):
        frames, short = clip_frames(int(start), video_frames, num_frames, stride)
        for s, pos in enumerate(positions):
            # The crops slide along the long side; on the short side the crop is centred (crop_position).
            specs.append(
                ClipSpec(
                    frames=frames,
                    crop_x=float(pos),
                    crop_y=float(pos),
                    flip=False,
                    clip_index=t * num_crops + s,
                    short=short,
                    along_long_side=True,
                )
            )
    return specs


def resized_size(height: int, width: int, short_side: int = RESIZE_SHORT) -> tuple[int, int]:
    """(H', W') with the short side scaled to `short_side`, aspect kept (rounded), never below short_side."""
    if height <= width:
        return short_side, max(short_side, round(width * short_side / height))
    return max(short_side, round(height * short_side / width)), short_side


def crop_origin(size: int, crop: int, pos: float) -> int:
    """Top-left offset of a `crop` window at relative position `pos` in [0, 1] along a side of `size`: halves round
    up, as DALI's crop anchor does (Python's round() takes halves to even: a centre crop of an odd free space was
    then a pixel left of DALI's for half of the sizes)."""
    return math.floor(pos * max(size - crop, 0) + 0.5)


def view_window(spec: ClipSpec, height: int, width: int, crop: int) -> tuple[float, float, float, float, float]:
    """Where a clip cut by ``spec`` lies in its frame (the working-scale frame of ``height`` x ``width``), in
    coordinates relative to the frame: (y0, x0, h, w, flip) with flip 1.0 when the clip is mirrored. A box given on
    the whole frame maps into the clip with it (``Batch.views``)."""
    pos_y, pos_x = crop_position(spec, height, width)
    y0, x0 = crop_origin(height, crop, pos_y), crop_origin(width, crop, pos_x)
    return y0 / height, x0 / width, crop / height, crop / width, float(spec.flip)


def shard_indices(
    n: int,
    shard_id: int = 0,
    num_shards: int = 1,
    shuffle: bool = False,
    seed: int = 0,
    epoch: int = 0,
    pad: bool = False,
) -> np.ndarray:
    """Indices of `range(n)` that shard `shard_id` of `num_shards` handles (like DistributedSampler).

    Shuffled with (seed, epoch) identically on every rank, then taken round-robin, so shards never overlap
    and together cover every index exactly once. With `pad`, the list is first extended by wrapping so every
    shard has the same length (training: equal step counts keep DDP ranks in lockstep).

    Returns:
        int64 (ceil(n / num_shards),) with pad, else (n // num_shards or one more,).
    """
    if not 0 <= shard_id < num_shards:
        raise ValueError(f"shard_id {shard_id} not in [0, {num_shards})")
    order = np.arange(n, dtype=np.int64)
    if shuffle:
        order = np.random.default_rng([seed, epoch]).permutation(n).astype(np.int64)
    if pad and n > 0 and n % num_shards:
        extra = num_shards - n % num_shards
        order = np.concatenate([order, np.resize(order, extra)])
    return order[shard_id::num_shards]
