"""Transcode the published .avi files (MPEG-4 Part 2 / Xvid) to constant-frame-rate H.264 or VP9 for DALI.

`transcode_dataset(src, dst, codec)` mirrors the videos of `src` to `dst`, one level deep: a dataset root
`<src>/<class>/<video>.*` becomes `<dst>/<class>/<video>.{mp4,webm}`, and a folder that holds videos directly
(one class folder, say) `<src>/<video>.*` becomes `<dst>/<video>.{mp4,webm}`; both at once is mirrored too.
`dst` itself is never read as a source when it lies inside `src`. A `src` with no video in either place is a
ValueError naming these layouts. Work runs in parallel processes, outputs that already exist are skipped (so
an interrupted run resumes), each file is written atomically (temporary name in the destination folder, then
os.replace), and the split files (*.txt) and label files (*.pickle, *.csv) at the top of `src` are copied
alongside. Frames are re-stamped 0, 1, 2, ... at the source's average rate, which makes the output
constant-frame-rate. 4:2:0 video needs even sizes: an odd width or height loses its last column or row (one pixel
of the picture, where a resize would move every pixel); a video stored sideways is written upright.
"""

from __future__ import annotations

import os
import shutil
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

import numpy as np

from stpcore.data.labels import VIDEO_EXTENSIONS
from stpcore.data.synth import CODEC_EXT, ENCODER, ENCODER_OPTIONS
from stpcore.media import atomic_path, display_turns, display_width, open_video, stream_sar, upright_rgb


@dataclass
class TranscodeReport:
    """Files written, skipped (already done), failed ((source, error)), and side files copied."""

    written: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)
    copied: list[str] = field(default_factory=list)

    def summary(self, show: int = 5) -> str:
        lines = [
            f"written: {len(self.written)}",
            f"skipped (already done): {len(self.skipped)}",
            f"failed: {len(self.failed)}",
            *(f"  {p}: {e}" for p, e in self.failed[:show]),
            f"split/label files copied: {len(self.copied)}",
        ]
        return "\n".join(lines)


def transcode_file(src: str | os.PathLike[str], dst: str | os.PathLike[str], codec: str = "h264") -> int:
    """Re-encode one video's first video stream as constant-frame-rate `codec`; returns frames written.

    Written to a unique temporary name beside `dst`, then os.replace'd, so `dst` is either absent or complete.
    """
    import av

    src, dst = Path(src), Path(dst)
    n = 0
    # A unique temporary name (mkstemp) beside dst: parallel jobs never share one, and it is removed on failure.
    with atomic_path(dst) as tmp:
        with open_video(src) as inp, open_video(tmp, "w", options={"fflags": "+bitexact"}) as out:
            if not inp.streams.video:
                raise ValueError("no video stream (audio only?)")
            in_stream = inp.streams.video[0]
            rate = Fraction(in_stream.average_rate or in_stream.guessed_rate or 25)
            stream = out.add_stream(ENCODER[codec], rate=rate)
            stream.pix_fmt = "yuv420p"
            stream.options = dict(ENCODER_OPTIONS[codec])
            for frame in inp.decode(in_stream):
                if n == 0:
                    # A source stored sideways with a display rotation (phone video) is written upright: decoders
                    # that ignore the rotation (DALI's) then read it as players show it.
                    turns, sar = display_turns(frame), stream_sar(in_stream)  # square pixels, as PyAV reads it
                    shown = display_width(frame.width, sar)
                    height, width = (shown, frame.height) if turns % 2 else (frame.height, shown)
                    # yuv420p needs even sizes; the odd last row/column of an odd-sized source is dropped.
                    stream.width, stream.height = width // 2 * 2, height // 2 * 2
                    # Cropped, not resized: a resize to the even size would move every pixel, and the copy would
                    # no longer hold what PyAV reads from the source.
                    through_rgb = bool(turns or sar or width % 2 or height % 2)
                if through_rgb:
                    rgb = upright_rgb(frame, sar)[: stream.height, : stream.width]
                    frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24")
                img = frame.reformat(width=stream.width, height=stream.height, format="yuv420p")  # sizes equal now
                # Constant frame rate: frame n is shown at n / rate whatever the source's timestamps said.
                img.pts = n
                img.time_base = 1 / rate
                for packet in stream.encode(img):
                    out.mux(packet)
                n += 1
            for packet in stream.encode():
                out.mux(packet)
        if n == 0:
            raise RuntimeError("no frames decoded")
    return n


def _source_videos(src: Path, dst: Path) -> list[Path]:
    """The videos directly in `src` and in its subfolders (not `dst`, where it is one of them), sorted.

    Hidden files are left out: they include the temporary files of an interrupted run.
    """
    skip = dst.resolve()
    folders = [src, *sorted(p for p in src.iterdir() if p.is_dir() and p.resolve() != skip)]
    return [
        f
        for folder in folders
        for f in sorted(folder.iterdir())
        if f.suffix.lower() in VIDEO_EXTENSIONS and not f.name.startswith(".") and f.is_file()
    ]


def _job(args: tuple[str, str, str]) -> tuple[str, str | None]:
    src, dst, codec = args
    try:
        transcode_file(src, dst, codec)
    except Exception as e:  # report and go on: one bad source must not stop a long batch job
        return src, f"{type(e).__name__}: {e}"
    return src, None


def transcode_dataset(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    codec: str = "h264",
    workers: int = 1,
    progress: bool = True,
) -> TranscodeReport:
    """Transcode every `<src>/<class>/<video>` and `<src>/<video>` to `<stem>.mp4|.webm` at its place under `dst`.

    See the module docstring.

    Raises:
        FileNotFoundError if src is not a folder; ValueError if neither src nor its subfolders hold a video.
    """
    if codec not in CODEC_EXT:
        raise ValueError(f"codec must be one of {sorted(CODEC_EXT)}, got {codec!r}")
    src, dst = Path(src), Path(dst)
    if not src.is_dir():
        raise FileNotFoundError(f"{src} is not a folder")
    report = TranscodeReport()
    jobs = []
    claimed: dict[Path, str] = {}
    sources = _source_videos(src, dst)
    if not sources:
        raise ValueError(
            f"no videos ({', '.join(VIDEO_EXTENSIONS)}) in {src} or in its subfolders; transcode expects a dataset "
            f"root SRC/<class>/<video> or a folder of videos SRC/<video>"
        )
    for f in sources:
        out = dst / f.parent.relative_to(src) / f"{f.stem}{CODEC_EXT[codec]}"
        if out in claimed:  # e.g. v.avi and v.mkv: both would become v.mp4
            report.failed.append((str(f), f"its output {out} is also {claimed[out]}'s; rename one of the two"))
            continue
        claimed[out] = f.name
        if out.is_file() and out.stat().st_size > 0:
            report.skipped.append(str(f))
        else:
            jobs.append((str(f), str(out), codec))
    dst.mkdir(parents=True, exist_ok=True)
    for f in sorted(src.iterdir()):
        if f.is_file() and f.suffix.lower() in (".txt", ".pickle", ".pkl", ".csv"):
            if (dst / f.name).resolve() != f.resolve():  # transcoding in place: the file is already there
                shutil.copy2(f, dst / f.name)
            report.copied.append(f.name)
    bar = _progress_bar(len(jobs)) if progress else None
    done = 0
    with ProcessPoolExecutor(max(workers, 1)) as pool:
        futures = [pool.submit(_job, j) for j in jobs]
        for fut in as_completed(futures):
            path, err = fut.result()
            if err is None:
                report.written.append(path)
            else:
                report.failed.append((path, err))
            done += 1
            if bar is not None:
                bar.update(1)
            elif progress and (done % 50 == 0 or done == len(jobs)):
                print(f"transcode: {done}/{len(jobs)}", flush=True)
    if bar is not None:
        bar.close()
    report.written.sort()
    report.failed.sort()
    return report


def _progress_bar(total: int):
    from stpcore.progress import progress

    return progress(total, "transcode", unit="videos", every=50, leave=True)
