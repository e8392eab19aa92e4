"""Anonymize whole video files with a trained STPrivacy model (``stpcore anonymize``).

Each input is decoded frame by frame, resized (short side = the model's image size, aspect kept) and
centre-cropped to the model's square input [G: the output shows exactly what the model saw; nothing
outside the crop is ever written]. Frames are cut into clips of ``num_frames`` frames taken ``stride``
apart; with a stride s > 1 the s interleaved phases of a chunk are processed as separate clips, so every
frame of the video is anonymized and the output keeps the source's frame rate and length. The last
partial chunk is padded by repeating its last frame; padded outputs are discarded.

Outputs per input, named after it (``<stem>`` is made unique within one run):
- ``<stem>.anonymized.mp4``: the anonymized video (dropped tubelets black);
- ``<stem>.keep.npz``: ``keep`` uint8 (clips, N) masks in t-major tubelet order, ``start`` and ``phase`` of
  each clip (first source frame, stride phase), ``stride``, ``grid``, ``tubelet``;
- ``<stem>.side_by_side.mp4`` on request: the model's input and output next to each other.
A file that cannot be read is reported and skipped; the others are still written.
"""

from __future__ import annotations

import os
import sys
import traceback
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from stpcore import media
from stpcore.tubelets import keep_to_pixels


@dataclass
class AnonymizeReport:
    written: dict[str, list[Path]] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)

    def summary(self) -> str:
        lines = [f"anonymized {len(self.written)} file(s), failed {len(self.failed)}"]
        lines += [f"  ok     {src} -> {', '.join(str(p) for p in outs)}" for src, outs in self.written.items()]
        lines += [f"  FAILED {src}: {why}" for src, why in self.failed.items()]
        return "\n".join(lines)


def _chunks(frames: Iterator[np.ndarray], length: int) -> Iterator[tuple[int, np.ndarray, int]]:
    """(start, frames (length, H, W, 3) padded by repeating the last frame, number of real frames)."""
    buf, start = [], 0
    for f in frames:
        buf.append(f)
        if len(buf) == length:
            yield start, np.stack(buf), length
            start += length
            buf = []
    if buf:
        real = len(buf)
        buf += [buf[-1]] * (length - real)
        yield start, np.stack(buf), real


def _to_clip(frames: np.ndarray, mean, std) -> torch.Tensor:
    """uint8 (T, H, W, 3) -> normalised float (3, T, H, W)."""
    x = torch.from_numpy(frames).float().div_(255).permute(3, 0, 1, 2)
    m = torch.tensor(mean).reshape(3, 1, 1, 1)
    s = torch.tensor(std).reshape(3, 1, 1, 1)
    return (x - m) / s


def anonymize_file(
    path: str | os.PathLike,
    out_dir: str | os.PathLike,
    anonymizer: Callable[..., object],
    *,
    num_frames: int,
    image_size: int,
    grid: tuple[int, int, int],
    tubelet: tuple[int, int, int],
    stride: int = 1,
    batch_size: int = 8,
    keep_ratio: float | None = None,
    adaptive_threshold: float | None = None,
    side_by_side: bool = False,
    stem: str | None = None,
    mean=media.IMAGENET_MEAN,
    std=media.IMAGENET_STD,
) -> list[Path]:
    """Anonymize one video file; returns the paths written (see the module docstring).

    ``anonymizer(clips, keep_ratio=..., adaptive_threshold=...)`` takes normalised float clips
    (B, 3, T, H, W) and returns an object with ``video`` (B, 3, T, H, W) and ``keep`` (B, N).
    """
    if stride < 1:
        raise ValueError(f"stride must be >= 1, got {stride}")
    path, out_dir = Path(path), Path(out_dir)
    stem = stem or path.stem
    fps = media.video_fps(path)
    out_path = out_dir / f"{stem}.anonymized.mp4"
    sbs_path = out_dir / f"{stem}.side_by_side.mp4"
    keeps, starts, phases = [], [], []
    chunk_len = num_frames * stride
    kwargs = {"keep_ratio": keep_ratio, "adaptive_threshold": adaptive_threshold}
    with media.VideoWriter(out_path, fps) as writer, (
        media.VideoWriter(sbs_path, fps) if side_by_side else _NullWriter()
    ) as sbs:
        pending: list[tuple[int, np.ndarray, int]] = []

        def flush() -> None:
            # Every chunk contributes `stride` clips (its interleaved phases); run them as one batch.
            clips = [_to_clip(chunk[p::stride], mean, std) for _, chunk, _ in pending for p in range(stride)]
            outputs = []
            for i in range(0, len(clips), batch_size):
                with torch.no_grad():
                    result = anonymizer(torch.stack(clips[i : i + batch_size]), **kwargs)
                outputs += list(zip(result.video.float().cpu(), result.keep.cpu(), strict=True))
            for c, (start, chunk, real) in enumerate(pending):
                out = np.empty_like(chunk)
                for p in range(stride):
                    video, keep = outputs[c * stride + p]
                    mask = keep_to_pixels(keep.float()[None], grid, tubelet)[0]  # (1, T, H, W)
                    out[p::stride] = media.to_uint8(video, mean, std, mask=mask)
                    keeps.append(keep.to(torch.uint8).numpy())
                    starts.append(start + p)
                    phases.append(p)
                writer.write(out[:real])
                sbs.write(media.side_by_side(chunk[:real], out[:real]))
            pending.clear()

        frames = media.read_frames(path, short_side=image_size, crop=image_size)
        for item in _chunks(frames, chunk_len):
            pending.append(item)
            if len(pending) * stride >= batch_size:
                flush()
        if pending:
            flush()
    keep_path = out_dir / f"{stem}.keep.npz"
    with media.atomic_path(keep_path) as tmp:
        with open(tmp, "wb") as f:
            np.savez_compressed(f, keep=np.stack(keeps), start=np.array(starts), phase=np.array(phases),
                                stride=stride, grid=np.array(grid), tubelet=np.array(tubelet))
    return [out_path, keep_path] + ([sbs_path] if side_by_side else [])


class _NullWriter:
    def __enter__(self):
        return self

    def __exit__(self, *exc) -> bool:
        return False

    def write(self, frames) -> None:
        pass


def _unique_stems(paths: Iterable[Path]) -> list[str]:
    seen: dict[str, int] = {}
    stems = []
    for p in paths:
        n = seen.get(p.stem, 0)
        seen[p.stem] = n + 1
        stems.append(p.stem if n == 0 else f"{p.stem}-{n}")
    return stems


def anonymize_files(paths: list[str | os.PathLike], out_dir: str | os.PathLike, anonymizer, *, verbose: bool = True,
                    **kwargs) -> AnonymizeReport:
    """Anonymize several files; one that fails is reported and skipped, the others are still written."""
    report = AnonymizeReport()
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    paths = [Path(p) for p in paths]
    for path, stem in zip(paths, _unique_stems(paths), strict=True):
        try:
            if not path.is_file():
                raise FileNotFoundError("no such file")
            report.written[str(path)] = anonymize_file(path, out_dir, anonymizer, stem=stem, **kwargs)
            if verbose:
                print(f"ok: {path} -> {report.written[str(path)][0]}")
        except (KeyboardInterrupt, SystemExit):
            raise
        except Exception as exc:  # noqa: BLE001 - one unreadable file must not stop the others
            report.failed[str(path)] = f"{type(exc).__name__}: {exc}".splitlines()[0]
            if verbose:
                print(f"skipped {path}: {report.failed[str(path)]}", file=sys.stderr)
                if os.environ.get("STPCORE_DEBUG"):
                    traceback.print_exc()
    return report
