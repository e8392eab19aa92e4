"""A synthetic privacy dataset in the HMDB51 layout: actions carried by motion, privacy by appearance.

Each video shows an actor (head, torso, arms) on a smooth background. The action is how the actor moves;
the five privacy attributes (PRIVACY_ATTRIBUTES) are drawn independently of the action, each with
probability 1/2, and change only how the actor looks:

- skin_color: dark vs light skin tone (head, arms, and torso when uncovered)
- face: a face (bold dark eye band and mouth on the head) vs a featureless head
- gender: broad vs narrow torso
- nudity: skin-toned torso vs a coloured shirt covering it
- relationship: a second actor standing close by (moving along) vs alone

Actions are flip-invariant (horizontal flip is a training augmentation), so "sideways" covers both
directions. Rendering is vectorised numpy (boolean masks over a coordinate grid); encoding is PyAV.
Output: `<out>/<class>/<class>_vNNN.webm` (VP9) or `.mp4` (H.264), HMDB51 split files
`<class>_test_split{1,2,3}.txt`, and the labels as `vp_labels.csv` and `vp_labels.pickle` (the released
pickle's shape: {"<class>/<video>.mp4": int64 (1, 5)}).
"""

from __future__ import annotations

import os
import re
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from stpcore.data.labels import PRIVACY_ATTRIBUTES, save_privacy_pickle, write_labels_csv
from stpcore.media import atomic_path, open_video

SYNTH_ACTIONS: tuple[str, ...] = ("sideways", "up", "down", "grow", "shrink", "circle", "flash")
CODEC_EXT = {"vp9": ".webm", "h264": ".mp4"}
ENCODER = {"vp9": "libvpx-vp9", "h264": "libx264"}
# Encoder settings: fast, and single-threaded so the same input gives the same bitstream.
ENCODER_OPTIONS = {
    "vp9": {"deadline": "realtime", "cpu-used": "8", "crf": "30", "b:v": "0", "threads": "1", "row-mt": "0"},
    "h264": {"preset": "ultrafast", "crf": "20", "threads": "1"},
}
_SKIN = {0: (228, 188, 156), 1: (112, 72, 48)}  # synthetic skin_color: 0 = light tone, 1 = dark tone
_SHIRTS = np.array([(40, 80, 200), (40, 160, 70), (200, 50, 50), (220, 200, 40), (150, 60, 170)], dtype=np.float32)


@dataclass(frozen=True)
class SynthVideo:
    """One synthetic video: its relative path, action index and privacy attributes int64 (5,)."""

    rel_path: str
    action: int
    privacy: np.ndarray


def write_video(
    path: str | os.PathLike[str], frames: np.ndarray, fps: int = 25, codec: str = "vp9", options: dict | None = None
) -> None:
    """Encode uint8 RGB frames (T, H, W, 3) (H, W even) at a constant `fps`, atomically (temp name, os.replace).

    codec: "vp9" (.webm), "h264" (.mp4) or "mpeg4" (.avi, the published datasets' codec).
    """
    import av

    path = Path(path)
    encoder = {"vp9": "libvpx-vp9", "h264": "libx264", "mpeg4": "mpeg4"}[codec]
    opts = dict(ENCODER_OPTIONS.get(codec, {}))
    opts.update(options or {})
    if frames.ndim != 4 or len(frames) == 0:
        raise ValueError(f"{path}: need at least one (H, W, 3) frame to encode, got shape {frames.shape}")
    # A unique temporary name beside path (removed on failure), then os.replace.
    with atomic_path(path) as tmp:
        # bitexact keeps encoder/muxer version strings and random ids out of the file: same input, same bytes.
        with open_video(tmp, "w", options={"fflags": "+bitexact"}) as out:
            stream = out.add_stream(encoder, rate=fps)
            stream.width, stream.height = int(frames.shape[2]), int(frames.shape[1])
            stream.pix_fmt = "yuv420p"
            stream.options = opts
            stream.codec_context.flags |= av.codec.context.Flags.bitexact
            for i, img in enumerate(frames):
                frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(img), format="rgb24")
                frame.pts = i
                for packet in stream.encode(frame):
                    out.mux(packet)
            for packet in stream.encode():
                out.mux(packet)


def _draw_actor(
    img: np.ndarray, yy: np.ndarray, xx: np.ndarray, cx: float, cy: float, s: float, attrs: np.ndarray,
    shirt: np.ndarray, u: float,
) -> None:
    """Paint one actor in place. (cx, cy) is the head centre, s the size in pixels per unit, u the frame unit."""
    skin_color, face, gender, nudity, _ = (int(a) for a in attrs)
    skin = np.array(_SKIN[skin_color], dtype=np.float32)
    r = 26 * s * u  # head radius
    torso_w = (88 if gender else 44) * s * u
    torso_h = 100 * s * u
    top = cy + r * 0.9
    torso = (np.abs(xx - cx) <= torso_w / 2) & (yy >= top) & (yy <= top + torso_h)
    arm_w = 12 * s * u
    arms = (np.abs(np.abs(xx - cx) - (torso_w / 2 + arm_w / 2 + 2 * u)) <= arm_w / 2) & (yy >= top + 4 * u) & (
        yy <= top + 0.8 * torso_h
    )
    head = (yy - cy) ** 2 + (xx - cx) ** 2 <= r**2
    img[arms] = skin
    img[torso] = skin if nudity else shirt
    img[head] = skin
    if face:
        band = head & (np.abs(yy - (cy - 0.2 * r)) <= 0.22 * r) & (np.abs(np.abs(xx - cx) - 0.4 * r) <= 0.3 * r)
        mouth = head & (np.abs(yy - (cy + 0.45 * r)) <= 0.15 * r) & (np.abs(xx - cx) <= 0.5 * r)
        img[band | mouth] = (20, 20, 20)


def render_video(
    action: int, attrs: np.ndarray, rng: np.random.Generator, width: int = 320, height: int = 240, frames: int = 40
) -> np.ndarray:
    """Render one synthetic video.

    Args:
        action: index into SYNTH_ACTIONS.
        attrs: int (5,) privacy attributes in PRIVACY_ATTRIBUTES order.
    Returns:
        uint8 (frames, height, width, 3) RGB.
    """
    u = height / 240.0  # every size below is in pixels of a 240-line frame
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    c0, c1 = rng.uniform(60, 200, size=(2, 3)).astype(np.float32)
    angle = rng.uniform(0, 2 * np.pi)
    ramp = (np.cos(angle) * xx / width + np.sin(angle) * yy / height + 1) / 2
    background = c0 + (c1 - c0) * ramp[..., None]  # (H, W, 3)
    background += rng.normal(0, 6, size=background.shape).astype(np.float32)
    shirt = _SHIRTS[rng.integers(len(_SHIRTS))]
    s0 = rng.uniform(0.85, 1.0)
    t = np.linspace(0.0, 1.0, frames)
    cx0 = width / 2 + rng.uniform(-20, 20) * u
    cy0 = 50 * u + rng.uniform(0, 10) * u
    cx, cy, scale = np.full(frames, cx0), np.full(frames, cy0), np.full(frames, s0)
    name = SYNTH_ACTIONS[action]
    if name == "sideways":
        direction = rng.choice([-1.0, 1.0])
        cx = cx0 + direction * (t - 0.5) * 110 * u
    elif name in ("up", "down"):
        # Up: from low to high on screen (y decreases); both stay inside the 240-line frame.
        travel = (0.5 - t) if name == "up" else (t - 0.5)
        cy = 45 * u + (travel + 0.5) * 45 * u
    elif name == "grow":
        scale = s0 * (0.7 + 0.45 * t)
    elif name == "shrink":
        scale = s0 * (1.15 - 0.45 * t)
    elif name == "circle":
        phase = rng.uniform(0, 2 * np.pi)
        cx = cx0 + 40 * u * np.cos(phase + 2 * np.pi * t)
        cy = cy0 + 18 * u * np.sin(phase + 2 * np.pi * t)
    flash = (np.arange(frames) // 4) % 2 == 1 if name == "flash" else np.zeros(frames, dtype=bool)
    partner_dx = rng.choice([-1.0, 1.0]) * 95 * u
    # The partner shares the actor's labelled appearance (skin, face, clothing) so labels stay true of the
    # whole scene; only its build is drawn afresh.
    partner_attrs = np.array(attrs, dtype=np.int64).copy()
    partner_attrs[2] = rng.integers(0, 2)
    partner_attrs[4] = 0
    out = np.empty((frames, height, width, 3), dtype=np.uint8)
    for i in range(frames):
        img = background.copy()
        if attrs[4]:  # relationship: a second actor close by, behind the first
            _draw_actor(img, yy, xx, cx[i] + partner_dx * scale[i], cy[i], scale[i] * 0.95, partner_attrs, shirt[::-1],
                        u)
        _draw_actor(img, yy, xx, cx[i], cy[i], scale[i], attrs, shirt, u)
        if flash[i]:
            img = img * 0.45 + 140  # the whole scene flashes bright
        out[i] = np.clip(img, 0, 255).astype(np.uint8)
    return out


def _render_and_write(args: tuple) -> None:
    path, action, attrs, seed, index, width, height, frames, fps, codec = args
    rng = np.random.default_rng([seed, index, 1])
    write_video(path, render_video(action, attrs, rng, width, height, frames), fps=fps, codec=codec)


def make_synthetic_dataset(
    out: str | os.PathLike[str],
    videos: int = 70,
    seed: int = 0,
    codec: str = "vp9",
    width: int = 320,
    height: int = 240,
    frames: int = 40,
    fps: int = 25,
    workers: int = 1,
    progress: bool = False,
    overwrite: bool = False,
) -> list[SynthVideo]:
    """Write the synthetic dataset to `out` (see the module docstring for the layout); deterministic per seed.

    A folder that holds anything is refused (its labels and splits would be replaced and the videos of a larger
    earlier dataset left without either) unless ``overwrite``: then an earlier synthetic dataset's files there (its
    videos, splits and label files) are removed first, and anything else is left.

    Videos are spread round-robin over the SYNTH_ACTIONS classes; video j of a class is a test video (2) in
    split s when (j + s - 1) % 3 == 0, else a training video (1).
    Returns the videos written, in order.
    """
    if codec not in CODEC_EXT:
        raise ValueError(f"codec must be one of {sorted(CODEC_EXT)}, got {codec!r}")
    if width % 2 or height % 2 or width < 16 or height < 16:
        raise ValueError(f"width and height must be even (yuv420p) and at least 16, got {width}x{height}")
    if videos < 1 or frames < 1 or fps <= 0:
        raise ValueError(f"videos and frames must be >= 1 and fps > 0, got videos={videos}, frames={frames}, fps={fps}")
    if Path(out).exists() and not Path(out).is_dir():
        raise ValueError(f"{out} is an existing file; give a folder path for the dataset")
    out = Path(out)
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise ValueError(f"{out} is not empty: write the dataset into a new or empty folder, or pass --overwrite "
                             f"to replace an earlier synthetic dataset there (its videos, splits and labels; other "
                             f"files are left)")
        for old in synthetic_files(out):
            old.unlink()
    rng = np.random.default_rng([seed, 0])
    attrs_all = rng.integers(0, 2, size=(videos, len(PRIVACY_ATTRIBUTES)))
    listing: list[SynthVideo] = []
    jobs = []
    per_class: dict[str, list[str]] = {a: [] for a in SYNTH_ACTIONS}
    for i in range(videos):
        action = i % len(SYNTH_ACTIONS)
        cls = SYNTH_ACTIONS[action]
        name = f"{cls}_v{len(per_class[cls]):03d}{CODEC_EXT[codec]}"
        per_class[cls].append(name)
        (out / cls).mkdir(parents=True, exist_ok=True)
        listing.append(SynthVideo(f"{cls}/{name}", action, attrs_all[i].astype(np.int64)))
        jobs.append((out / cls / name, action, attrs_all[i], seed, i, width, height, frames, fps, codec))
    _run_jobs(jobs, workers, progress)
    for cls, names in per_class.items():
        for split in (1, 2, 3):
            lines = [f"{n} {2 if (j + split - 1) % 3 == 0 else 1}\n" for j, n in enumerate(names)]
            (out / f"{cls}_test_split{split}.txt").write_text("".join(lines))
    labels = {str(Path(v.rel_path).with_suffix("")): v.privacy for v in listing}
    write_labels_csv(labels, out / "vp_labels.csv")
    save_privacy_pickle(labels, out / "vp_labels.pickle")
    return listing


def synthetic_files(out: str | os.PathLike[str]) -> list[Path]:
    """The files of a synthetic dataset in ``out`` (any size or codec): what ``overwrite`` removes."""
    out = Path(out)
    files = [out / name for name in ("vp_labels.csv", "vp_labels.pickle")]
    for cls in SYNTH_ACTIONS:
        files += [out / f"{cls}_test_split{split}.txt" for split in (1, 2, 3)]
        files += [p for ext in CODEC_EXT.values() for p in sorted((out / cls).glob(f"{cls}_v*{ext}"))
                  if re.fullmatch(rf"{cls}_v\d{{3,}}", p.stem)]  # _v000 ... _v999, _v1000 ...
    return [f for f in files if f.is_file()]


def _run_jobs(jobs: list[tuple], workers: int, progress: bool) -> None:
    from stpcore.progress import progress as progress_bar

    bar = progress_bar(len(jobs), "synth", unit="videos", every=50, leave=True) if progress else None
    done = 0
    if workers > 1:
        with ProcessPoolExecutor(workers) as pool:
            for _ in pool.map(_render_and_write, jobs):
                done += 1
                _tick(bar, progress, done, len(jobs))
    else:
        for job in jobs:
            _render_and_write(job)
            done += 1
            _tick(bar, progress, done, len(jobs))
    if bar is not None:
        bar.close()


def _tick(bar, progress: bool, done: int, total: int) -> None:
    if bar is not None:
        bar.update(1)
