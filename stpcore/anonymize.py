"""Anonymize whole video files with a trained STPrivacy model (``stpcore anonymize``).

Each input is decoded frame by frame, resized (short side = the model's image size, aspect kept) and
centre-cropped to the model's square input [G: the output shows exactly what the model saw; nothing
outside the crop is ever written]. Frames are cut into clips of ``num_frames`` frames taken ``stride``
apart; with a stride s > 1 the s interleaved phases of a chunk are processed as separate clips, so every
frame of the video is anonymized and the output keeps the source's frame rate and length. The last
partial chunk is padded by repeating its last frame; padded outputs are discarded.

Outputs per input, named after it (``<stem>``, made unique within one run; see :func:`output_paths`):
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
    """What :func:`anonymize_files` did with each input.

    Attributes:
        written: input -> the paths written for it.
        failed: input -> why it could not be anonymized (the other inputs were still processed).
        skipped: (input, why) for inputs not processed: given twice, or already done (``skip_existing``).
    """

    written: dict[str, list[Path]] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def summary(self) -> str:
        lines = [f"anonymized {len(self.written)} file(s), failed {len(self.failed)}, skipped {len(self.skipped)}"]
        lines += [f"  ok      {src} -> {', '.join(str(p) for p in outs)}" for src, outs in self.written.items()]
        lines += [f"  FAILED  {src}: {why}" for src, why in self.failed.items()]
        lines += [f"  skipped {src}: {why}" for src, why in self.skipped]
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
    (B, 3, T, H, W) and returns an object with ``video`` (B, 3, T, H, W) and ``keep`` (B, N); its ``cfg`` (an
    :class:`~stpcore.models.STPrivacyConfig`: an ``STPrivacy`` or a ``ClipAnonymizer``) gives the clip size
    (``num_frames``, ``image_size``) and the tubelet grid (``grid``, ``tubelet``).
    """
    cfg = anonymizer.cfg
    num_frames, image_size, grid, tubelet = cfg.num_frames, cfg.image_size, cfg.grid, cfg.tubelet
    if stride < 1 or batch_size < 1:
        raise ValueError(f"stride and batch_size must be >= 1, got stride={stride}, batch_size={batch_size}")
    path, out_dir = Path(path), Path(out_dir)
    stem = stem or path.stem
    fps = media.video_fps(path)
    out_path, keep_path, sbs_path = output_paths(out_dir, stem, side_by_side=True)
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
    """One output name per input: its stem, or ``<stem>-N`` with the smallest N whose name is still free (so
    a.mp4, a.webm and a-1.mp4 get a, a-1 and a-1-1, never the same name twice)."""
    taken: set[str] = set()
    stems = []
    for p in paths:
        stem, n = p.stem, 0
        while stem in taken:
            n += 1
            stem = f"{p.stem}-{n}"
        taken.add(stem)
        stems.append(stem)
    return stems


def output_paths(out_dir: str | os.PathLike, stem: str, side_by_side: bool = False) -> list[Path]:
    """The files :func:`anonymize_file` writes for ``stem``: video, keep masks (and side by side)."""
    out_dir = Path(out_dir)
    names = [f"{stem}.anonymized.mp4", f"{stem}.keep.npz"] + ([f"{stem}.side_by_side.mp4"] if side_by_side else [])
    return [out_dir / n for n in names]


def prepare_output_dir(out_dir: str | os.PathLike) -> Path:
    """Create the output folder; a clear ValueError when it cannot be one (an existing file, no permission)."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"output folder {out_dir} is an existing file; give a folder path with -o")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ValueError(f"cannot create the output folder {out_dir}: {exc.strerror or exc}") from exc
    return out_dir


def _why(exc: Exception) -> str:
    from stpcore.data.decode_pyav import VideoError

    if isinstance(exc, VideoError):
        hint = {"missing file": "check the path", "empty file": "the file has no data",
                "unreadable": "FFmpeg cannot read it: damaged, or not a video",
                "no video stream": "the file holds no video (audio only?)", "no frames": "the video has no frames"}
        return f"{exc.reason}" + (f" ({exc.detail})" if exc.detail else "") + (
            f": {hint[exc.reason]}" if exc.reason in hint else "")
    return f"{type(exc).__name__}: {exc}".splitlines()[0]


def anonymize_files(paths: list[str | os.PathLike], out_dir: str | os.PathLike, anonymizer, *, verbose: bool = True,
                    skip_existing: bool = False, **kwargs) -> AnonymizeReport:
    """Anonymize several files (``kwargs``: those of :func:`anonymize_file`).

    A file that cannot be read or fails midway is reported in ``failed`` and the others are still written
    (each output appears only complete: written to a temporary name, then renamed). An input given twice
    (the same file) is processed once. With ``skip_existing``, an input whose outputs all exist already
    (from an earlier, interrupted run over the same inputs in the same order) is skipped, so a run can be
    resumed. Ctrl-C / SIGTERM (KeyboardInterrupt) stops at once, leaving no partial file; the report
    filled so far is attached to the exception as ``exc.report``.
    """
    from stpcore.data.decode_pyav import probe

    report = AnonymizeReport()
    out_dir = prepare_output_dir(out_dir)
    paths = [Path(p) for p in paths]
    seen: dict[Path, Path] = {}
    try:
        for path, stem in zip(paths, _unique_stems(paths), strict=True):
            key = path.resolve()
            if key in seen:
                report.skipped.append((str(path), f"the same file as {seen[key]}, given earlier"))
                continue
            seen[key] = path
            outs = output_paths(out_dir, stem, kwargs.get("side_by_side", False))
            if skip_existing and all(o.is_file() for o in outs):
                report.skipped.append((str(path), f"already done ({outs[0]} exists; --skip-existing)"))
                if verbose:
                    print(f"done already: {path} -> {outs[0]}")
                continue
            try:
                if path.is_dir():
                    raise ValueError("a folder, not a video file; give the video files inside it")
                probe(path)  # a clear reason (missing, empty, unreadable, no video stream) before any output
                report.written[str(path)] = anonymize_file(path, out_dir, anonymizer, stem=stem, **kwargs)
                if verbose:
                    print(f"ok: {path} -> {report.written[str(path)][0]}")
            except (KeyboardInterrupt, SystemExit):
                raise
            except Exception as exc:  # noqa: BLE001 - one unreadable file must not stop the others
                report.failed[str(path)] = _why(exc)
                if verbose:
                    print(f"skipped {path}: {report.failed[str(path)]}", file=sys.stderr)
                    if os.environ.get("STPCORE_DEBUG"):
                        traceback.print_exc()
    except KeyboardInterrupt as exc:
        exc.report = report
        raise
    return report
