"""`stpcore data check`: validate a dataset before training on it.

Checks every video under `<root>/<class>/` and every entry of the three official splits: missing files,
zero-byte / unreadable / too-short videos, codecs the chosen decoder cannot read, and privacy-label coverage.
"""

from __future__ import annotations

import os
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from stpcore.data.decode_pyav import VideoError, probe
from stpcore.data.labels import load_labels, match_labels
from stpcore.data.sampling import DEFAULT_STRIDE, NUM_FRAMES, clip_span
from stpcore.data.splits import detect_kind, index_videos, list_records


@dataclass
class CheckReport:
    """Problems found, by category, each with its offenders ("<path>" or "<path> (detail)")."""

    videos: int = 0
    problems: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))
    label_summary: str = ""

    @property
    def ok(self) -> bool:
        """No blocking problem (short videos are looped and only warned about, so they do not count)."""
        return not any(v for k, v in self.problems.items() if k != "too short (will be looped)")

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
        decoder: "pyav", "dali-cpu" or "dali-gpu" (which codecs count as readable).
        stride: frame stride for the too-short check (default: the paper's for the dataset kind).
    """
    root = Path(root)
    split_dir = Path(split_dir) if split_dir is not None else root
    codecs = readable_codecs(decoder)
    report = CheckReport()
    files = index_videos(root)
    report.videos = len(files)
    try:
        kind = detect_kind(split_dir) if kind == "auto" else kind
    except ValueError as e:
        report.problems["split files"].append(str(e))
        kind = ""
    span = clip_span(num_frames, stride if stride is not None else DEFAULT_STRIDE.get(kind, 2))
    for _key, path in sorted(files.items()):
        try:
            info = probe(path)
        except VideoError as e:
            report.problems[e.reason].append(str(path) + (f" ({e.detail[:120]})" if e.detail else ""))
            continue
        if codecs is not None and info.codec not in codecs:
            report.problems[f"codec not readable by {decoder}"].append(f"{path} ({info.codec})")
        if info.num_frames < span:
            report.problems["too short (will be looped)"].append(f"{path} ({info.num_frames} < {span} frames)")
    if kind:
        for split in (1, 2, 3):
            for train in (True, False):
                try:
                    listing = list_records(root, kind, split, train, split_dir)
                except (FileNotFoundError, ValueError) as e:
                    report.problems["split files"].append(str(e))
                    continue
                for key in listing.missing:
                    report.problems["missing file (split entry)"].append(
                        f"{key} (split {split} {'train' if train else 'test'})"
                    )
    if labels is not None:
        report.label_summary = match_labels(files.keys(), load_labels(labels)).summary()
    return report
