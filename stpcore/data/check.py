"""`stpcore data check`: validate a dataset before training on it.

`ROOT` is a dataset root, `ROOT/<class>/<video>` (HMDB51 and UCF101 as published, or a transcoded copy), with
the split files in ROOT or in --splits. Checks every video under `ROOT/<class>/` and every entry of the three
official splits: missing files, zero-byte / unreadable (the header, and the first frame decoded) / truncated (a
warning for PyAV, which wraps; a problem for the DALI decoders, whose loader drops it) / too-short videos, codecs
the chosen decoder cannot read, symbolic links that lead out of the root (followed, but named), and privacy-label
coverage (a label file matching no video is a problem). A folder that holds videos directly (one class folder,
say) is not a dataset root: videos are keyed "<class>/<stem>" by their folder, so that is a ValueError naming the
layout expected (check the folder above it); so is a root with no videos in class folders at all.
"""

from __future__ import annotations

import os
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from stpcore.data.decode_pyav import VideoError, decode_frames, probe
from stpcore.data.labels import VIDEO_EXTENSIONS, load_labels, match_labels
from stpcore.data.sampling import DEFAULT_STRIDE, NUM_FRAMES, clip_span
from stpcore.data.splits import detect_kind, index_videos, list_records
from stpcore.media import open_video

TOO_SHORT = "too short (will be looped)"
TRUNCATED = "truncated (ends before its header says; decoding wraps)"
TRUNCATED_DALI = "truncated (ends before its header says; the DALI loader drops it)"
OUTSIDE_CLASS = "not in a class folder (ignored)"
LINKED_OUT = "symbolic link to a file outside the root (followed)"
NO_LABEL_MATCH = "label file matching no video"
# Reported, but training reads these videos (looped, wrapped, through the link) or never sees them: they do not make
# a check fail.
WARNINGS = frozenset({TOO_SHORT, TRUNCATED, OUTSIDE_CLASS, LINKED_OUT})


@dataclass
class CheckReport:
    """Problems found, by category, each with its offenders ("<path>" or "<path> (detail)")."""

    videos: int = 0
    problems: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))
    label_summary: str = ""

    @property
    def ok(self) -> bool:
        """No blocking problem (categories in WARNINGS are only reported, so they do not count)."""
        return not any(v for k, v in self.problems.items() if k not in WARNINGS)

    def summary(self, show: int = 5) -> str:
        lines = [f"videos found: {self.videos}"]
        for cat in sorted(self.problems):
            items = self.problems[cat]
            lines.append(f"{cat}: {len(items)}")
            lines.extend(f"  {p}" for p in items[:show])
        if self.label_summary:
            lines.append(self.label_summary)
        lines.append("OK" if self.ok else "PROBLEMS FOUND")
        return "\n".join(lines)


def readable_codecs(decoder: str) -> frozenset[str] | None:
    """Codecs `decoder` ("pyav", "dali-cpu", "dali-gpu") reads; None = anything FFmpeg opens (PyAV)."""
    from stpcore.data.decode_dali import DALI_CPU_CODECS, DALI_GPU_CODECS

    return {"pyav": None, "dali-cpu": DALI_CPU_CODECS, "dali-gpu": DALI_GPU_CODECS}[decoder]


def truncation(path: str | os.PathLike[str]) -> str | None:
    """Why a video ends before its header says it does ("ends at 1.44 s, header says 1.60 s"), or None.

    Reads every packet of the first video stream (demuxing only, nothing is decoded). The declared length is
    the header's frame count over the frame rate (AVI, MP4) or, with no frame count (WebM), the container's
    duration where the video is the file's only stream (an audio track may outlast the video). Up to 1.5
    frame intervals short counts as complete.
    """
    import av

    with open_video(path) as container:
        stream = container.streams.video[0]
        fps = float(stream.average_rate or stream.guessed_rate or 0)
        first = last = None
        for packet in container.demux(stream):
            t = packet.pts if packet.pts is not None else packet.dts
            if t is None:  # the empty packet that ends the demux
                continue
            first = t if first is None else min(first, t)
            last = t + (packet.duration or 0) if last is None else max(last, t + (packet.duration or 0))
        present = float((last - first) * stream.time_base) if last is not None and stream.time_base else 0.0
        if stream.frames and fps > 0:
            declared = stream.frames / fps
        elif len(container.streams) == 1 and container.duration:
            declared = container.duration / av.time_base
        else:
            return None
    slack = 1.5 / fps if fps > 0 else 0.1
    return f"ends at {present:.2f} s, header says {declared:.2f} s" if present < declared - slack else None


def _layout_error(root: Path) -> str:
    """The message for a root with no video in any `<root>/<class>/`, naming the layout expected."""
    loose = sorted(f.name for f in root.iterdir() if f.is_file() and f.suffix.lower() in VIDEO_EXTENSIONS)
    expected = "data check expects a dataset root ROOT/<class>/<video>"
    if loose:
        return (f"{root} holds videos directly ({len(loose)}, e.g. {loose[0]}) and no class folders of videos; "
                f"{expected}: for one class folder, check the dataset folder above it")
    return f"no videos ({', '.join(VIDEO_EXTENSIONS)}) in the class folders of {root}; {expected}"


def check_dataset(
    root: str | os.PathLike[str],
    split_dir: str | os.PathLike[str] | None = None,
    labels: str | os.PathLike[str] | None = None,
    decoder: str = "pyav",
    kind: str = "auto",
    num_frames: int = NUM_FRAMES,
    stride: int | None = None,
) -> CheckReport:
    """Probe every video and split entry of a dataset; see the module docstring.

    Args:
        root: dataset root holding `<class>/<video>.*`.
        decoder: "pyav", "dali-cpu" or "dali-gpu" (which codecs count as readable).
        stride: frame stride for the too-short check (default: the paper's for the dataset kind).
    Raises:
        FileNotFoundError if root is not a folder; ValueError if no `<root>/<class>/` folder holds a video
        (the message names the layout expected).
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root} is not a folder")
    split_dir = Path(split_dir) if split_dir is not None else root
    codecs = readable_codecs(decoder)
    report = CheckReport()
    files = index_videos(root)
    if not files:
        raise ValueError(_layout_error(root))
    report.videos = len(files)
    for f in sorted(root.iterdir()):
        if f.is_file() and f.suffix.lower() in VIDEO_EXTENSIONS and not f.name.startswith("."):
            report.problems[OUTSIDE_CLASS].append(str(f))
    try:
        kind = detect_kind(split_dir) if kind == "auto" else kind
    except ValueError as e:
        report.problems["split files"].append(str(e))
        kind = ""
    span = clip_span(num_frames, stride if stride is not None else DEFAULT_STRIDE.get(kind, 2))
    inside = root.resolve()
    for _key, path in sorted(files.items()):
        # Links are followed (datasets are often linked in from another disk); a link out of the root is named, so
        # a dataset someone else made cannot point the loaders at other files unseen.
        if not path.resolve().is_relative_to(inside):
            report.problems[LINKED_OUT].append(f"{path} -> {path.resolve()}")
        try:
            info = probe(path)
            decode_frames(path, np.zeros(1, np.int64))  # a header that reads may hold pictures that do not decode
        except VideoError as e:
            report.problems[e.reason].append(str(path) + (f" ({e.detail[:120]})" if e.detail else ""))
            continue
        if codecs is not None and info.codec not in codecs:
            report.problems[f"codec not readable by {decoder}"].append(f"{path} ({info.codec})")
        if info.num_frames < span:
            report.problems[TOO_SHORT].append(f"{path} ({info.num_frames} < {span} frames)")
        try:
            short = truncation(path)
        except Exception as e:  # the header read, a later packet did not: damaged past the start
            report.problems["unreadable"].append(f"{path} ({type(e).__name__}: {str(e)[:120]})")
            continue
        if short is not None:  # PyAV wraps its frame indices into what is there; DALI fails the clip
            report.problems[TRUNCATED_DALI if decoder.startswith("dali") else TRUNCATED].append(f"{path} ({short})")
    if kind:
        for split in (1, 2, 3):
            for train in (True, False):
                try:
                    listing = list_records(root, kind, split, train, split_dir)
                except (FileNotFoundError, ValueError) as e:
                    if str(e) not in report.problems["split files"]:  # one file read for train and test: once
                        report.problems["split files"].append(str(e))
                    continue
                for key in listing.missing:
                    report.problems["missing file (split entry)"].append(
                        f"{key} (split {split} {'train' if train else 'test'})"
                    )
    if labels is not None:
        label_set = load_labels(labels)
        match = match_labels(files.keys(), label_set)
        report.label_summary = match.summary()
        if files and label_set and match.matched == 0:  # the loaders refuse such a file
            report.problems[NO_LABEL_MATCH].append(
                f"{labels}: none of its {len(label_set)} keys names a video here (e.g. label "
                f"{next(iter(label_set))!r}, video {next(iter(files))!r}); is it the other dataset's label file?")
    return report
