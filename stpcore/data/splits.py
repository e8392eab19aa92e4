"""HMDB51 and UCF101 as published: folder layouts, official split files, and `VideoRecord`s.

HMDB51: `<root>/<class>/<video>.avi`; split files `<class>_test_split{1,2,3}.txt` with lines
`<video>.avi <0|1|2>` (1 train, 2 test, 0 unused). Classes are numbered in sorted order.
UCF101: `<root>/<Class>/v_<Class>_gXX_cYY.avi`; `classInd.txt` ("1 ApplyEyeMakeup", 1-based),
`trainlist0{1,2,3}.txt` ("ApplyEyeMakeup/v_..._c01.avi 1") and `testlist0{1,2,3}.txt` (path only).

Split entries are matched to files on "<class>/<stem>", so a transcoded copy (.webm/.mp4 beside or instead
of the .avi) is found through the original split files. An entry whose file is missing is skipped and
reported in `SplitListing.missing`.
"""

from __future__ import annotations

import hashlib
import os
import re
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from stpcore.data.labels import video_key

DATASET_KINDS: tuple[str, ...] = ("hmdb51", "ucf101")
_HMDB_SPLIT = re.compile(r"^(?P<cls>.+)_test_split(?P<split>[123])\.txt$")


@dataclass(frozen=True)
class VideoRecord:
    """One video of a split.

    Attributes:
        path: the video file.
        video_id: "<class>/<stem>", the key shared with the privacy labels.
        action: action class index (0-based).
        privacy: int64 (5,) privacy labels, or None where the label set has none for this video.
    """

    path: Path
    video_id: str
    action: int
    privacy: np.ndarray | None = field(default=None, compare=False)


@dataclass
class SplitListing:
    """Records of one split and phase, the class names, and the split entries whose file is missing."""

    records: list[VideoRecord]
    classes: list[str]
    missing: list[str] = field(default_factory=list)


def detect_kind(split_dir: str | os.PathLike[str]) -> str:
    """'ucf101' if classInd.txt is present, 'hmdb51' if any `*_test_split1.txt` is; else ValueError."""
    d = Path(split_dir)
    if (d / "classInd.txt").is_file():
        return "ucf101"
    if any(d.glob("*_test_split1.txt")):
        return "hmdb51"
    raise ValueError(f"{d}: neither classInd.txt (UCF101) nor <class>_test_split1.txt (HMDB51) found")


def index_videos(root: str | os.PathLike[str]) -> dict[str, Path]:
    """Map "<class>/<stem>" -> file for every video under `<root>/<class>/`.

    Where several files share a stem (e.g. video.avi and its transcoded video.webm), the first extension in
    VIDEO_EXTENSIONS order after the transcoded ones wins: .webm/.mp4/.mkv/.mov before .avi.
    """
    root = Path(root).absolute()  # absolute paths: a relative one can read as a URL to FFmpeg (media.open_video)
    prefer = {ext: i for i, ext in enumerate((".webm", ".mp4", ".mkv", ".mov", ".avi"))}
    out: dict[str, Path] = {}
    if not root.is_dir():
        return out
    for cls_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        for f in sorted(cls_dir.iterdir()):
            ext = f.suffix.lower()
            if ext not in prefer or not f.is_file():
                continue
            key = f"{cls_dir.name}/{f.stem}"
            if key not in out or prefer[ext] < prefer[out[key].suffix.lower()]:
                out[key] = f
    return out


def hmdb51_split_entries(split_dir: str | os.PathLike[str], split: int) -> tuple[list[str], dict[str, int]]:
    """Parse HMDB51 split files of `split` (1..3).

    Returns:
        (classes sorted, {"<class>/<stem>": 0|1|2}) in file order.
    """
    _check_split(split)
    d = Path(split_dir)
    files = {}
    for f in d.glob(f"*_test_split{split}.txt"):
        m = _HMDB_SPLIT.match(f.name)
        if m:
            files[m.group("cls")] = f
    if not files:
        raise FileNotFoundError(f"{d}: no HMDB51 split files *_test_split{split}.txt")
    classes = sorted(files)
    entries: dict[str, int] = {}
    for cls in classes:
        for lineno, line in enumerate(files[cls].read_text().splitlines(), start=1):
            parts = line.split()
            if not parts:
                continue
            if len(parts) != 2 or parts[1] not in ("0", "1", "2"):
                raise ValueError(f"{files[cls]}:{lineno}: expected '<video>.avi <0|1|2>', got {line!r}")
            entries[f"{cls}/{Path(parts[0]).stem}"] = int(parts[1])
    return classes, entries


def ucf101_split_entries(
    split_dir: str | os.PathLike[str], split: int, train: bool
) -> tuple[list[str], list[tuple[str, int]]]:
    """Parse UCF101 classInd.txt and trainlist0{split}.txt / testlist0{split}.txt.

    Returns:
        (classes in classInd order, [("<class>/<stem>", action 0-based)] in file order). The class of a
        test entry is its folder (UCF101's file names spell some classes differently from their folders).
    """
    _check_split(split)
    d = Path(split_dir)
    classes: list[str] = []
    for lineno, line in enumerate((d / "classInd.txt").read_text().splitlines(), start=1):
        parts = line.split()
        if not parts:
            continue
        if len(parts) != 2 or not parts[0].isdigit() or int(parts[0]) != len(classes) + 1:
            raise ValueError(f"{d / 'classInd.txt'}:{lineno}: expected '{len(classes) + 1} <Class>', got {line!r}")
        classes.append(parts[1])
    index = {c.lower(): i for i, c in enumerate(classes)}
    name = f"{'train' if train else 'test'}list0{split}.txt"
    out: list[tuple[str, int]] = []
    for lineno, line in enumerate((d / name).read_text().splitlines(), start=1):
        parts = line.split()
        if not parts:
            continue
        where = f"{d / name}:{lineno}"
        rel = parts[0].replace("\\", "/")
        key = video_key(rel)
        cls = key.split("/")[0]
        if train:
            if len(parts) != 2 or not parts[1].isdigit() or not 1 <= int(parts[1]) <= len(classes):
                raise ValueError(f"{where}: expected '<Class>/<video>.avi <1..{len(classes)}>', got {line!r}")
            action = int(parts[1]) - 1
        else:
            if cls.lower() not in index:
                raise ValueError(f"{where}: class {cls!r} is not in classInd.txt")
            action = index[cls.lower()]
        out.append((key, action))
    return classes, out


def list_records(
    root: str | os.PathLike[str],
    kind: str = "auto",
    split: int = 1,
    train: bool = True,
    split_dir: str | os.PathLike[str] | None = None,
    labels: dict[str, np.ndarray] | None = None,
) -> SplitListing:
    """List the videos of one official split and phase.

    Args:
        root: dataset root holding `<class>/<video>.*`.
        kind: "hmdb51", "ucf101" or "auto" (from the split files present).
        split: 1, 2 or 3.
        train: the training list if True, else the test list.
        split_dir: folder of the split files (default: root).
        labels: optional privacy labels {"<class>/<stem>": (5,)}; attached to matching records.
    Returns:
        SplitListing; entries with no file under root go to `.missing` ("<class>/<stem>").
    """
    split_dir = Path(split_dir) if split_dir is not None else Path(root)
    if kind == "auto":
        kind = detect_kind(split_dir)
    files = index_videos(root)
    if kind == "hmdb51":
        classes, entries = hmdb51_split_entries(split_dir, split)
        want = 1 if train else 2
        cls_index = {c: i for i, c in enumerate(classes)}
        pairs = [(k, cls_index[k.split("/")[0]]) for k, v in entries.items() if v == want]
    elif kind == "ucf101":
        classes, pairs = ucf101_split_entries(split_dir, split, train)
    else:
        raise ValueError(f"unknown dataset kind {kind!r}; expected one of {DATASET_KINDS} or 'auto'")
    records, missing = [], []
    for key, action in pairs:
        path = files.get(key)
        if path is None:
            missing.append(key)
            continue
        privacy = labels.get(key) if labels is not None else None
        records.append(VideoRecord(path=path, video_id=key, action=action, privacy=privacy))
    return SplitListing(records=records, classes=classes, missing=missing)


PARTS = ("all", "fit", "validation")


# The published names tie clips of one scene together: UCF101's "v_<Class>_g<NN>_c<MM>" (group NN: the same
# actors and scene, clip MM of it) and HMDB51's "<source>_<action>_<body>_<camera>_np<N>_<view>_<quality>_<K>" (the
# source movie or video, whose clips may fall in several actions).
_UCF101_CLIP = re.compile(r"^(v_.+_g\d+)_c\d+$")
_HMDB51_TAGS = re.compile(r"_(?:f|h|u|l)_(?:cm|nm)_np\d+_(?:fr|ba|le|ri)_(?:bad|med|goo)_\d+$")


def source_group(video_id: str) -> str:
    """The scene a video was cut from, as its published name says: "<class>/v_<Class>_g<NN>" for UCF101 (a group is
    one class's), "hmdb51:<source>" for HMDB51 (a source may hold clips of several actions); the video's own id for
    any other name (each video its own group)."""
    cls, _, stem = video_id.rpartition("/")
    if m := _UCF101_CLIP.match(stem):
        return f"{cls}/{m.group(1)}"
    if m := _HMDB51_TAGS.search(stem):
        source = stem[: m.start()]
        return "hmdb51:" + (source[: -len(cls) - 1] if cls and source.endswith("_" + cls) else source)
    return video_id


def validation_partition(records: list[VideoRecord], classes: list[str], fraction: float,
                         seed: int = 0) -> tuple[list[int], list[int]]:
    """Indices of the training videos kept for fitting and of those held out for validation (model selection).

    Whole scenes are held out (:func:`source_group`: a UCF101 group, an HMDB51 source movie), never part of one,
    so no validation video has a sibling clip (the same people, the same privacy attributes) in the fit part,
    which would inflate the attackers' scores on it. Per class about ``round(fraction * n)`` videos (at least one
    where the class has two or more) are held out: the groups are taken in the order of their SHA-256 of
    ``"<seed>:<group>"``, each while one of its classes still needs videos and none would be left without a fit
    video. The choice depends on the ids alone, not on a random stream, so training and a later ``--select`` hold
    out the same videos, on every rank; with one video per group (names of another form) it is the first
    ``round(fraction * n)`` videos of each class by hash. The validation part must let the selection measure what
    it scores: it must hold every class, and, among its videos with privacy labels, both values of every
    attribute; otherwise a ValueError says what is missing.

    Returns:
        (fit, validation): sorted indices into ``records``.
    """
    from stpcore.data.labels import PRIVACY_ATTRIBUTES

    if not 0 < fraction < 1:
        raise ValueError(f"validation fraction must be in (0, 1), got {fraction}")
    sizes = [sum(r.action == c for r in records) for c in range(len(classes))]
    want = [min(max(round(fraction * n), 1 if n >= 2 else 0), n - 1) if n else 0 for n in sizes]
    need, fit_left = list(want), list(sizes)
    groups: dict[str, list[int]] = {}
    for i, r in enumerate(records):
        groups.setdefault(source_group(r.video_id), []).append(i)
    held: list[int] = []
    for group in sorted(groups, key=lambda g: hashlib.sha256(f"{seed}:{g}".encode()).hexdigest()):
        per_class = Counter(records[i].action for i in groups[group])
        if any(need[c] > 0 for c in per_class) and all(fit_left[c] > k for c, k in per_class.items()):
            held += groups[group]
            for c, k in per_class.items():
                need[c] -= k
                fit_left[c] -= k
    taken = set(held)
    for c in range(len(classes)):  # a class whose videos are one scene: per video, the only way to hold any out
        if want[c] and not any(records[i].action == c for i in taken):
            members = sorted((i for i, r in enumerate(records) if r.action == c),
                             key=lambda i: hashlib.sha256(f"{seed}:{records[i].video_id}".encode()).hexdigest())
            held += members[: want[c]]
            warnings.warn(f"class {classes[c]!r}: its {sizes[c]} training videos come from one scene "
                          f"({source_group(records[members[0]].video_id)}), so its validation videos are held out "
                          f"one by one and have siblings in the fit part", RuntimeWarning, stacklevel=2)
    held = sorted(held)
    fit = sorted(set(range(len(records))) - set(held))
    if not held:
        raise ValueError(f"the validation part is empty: {len(records)} training video(s) and fraction {fraction}; "
                         f"raise the fraction or add videos")
    missing = [classes[c] for c in range(len(classes)) if not any(records[i].action == c for i in held)]
    if missing:
        raise ValueError(f"the validation part ({len(held)} videos, fraction {fraction}) has no video of class(es) "
                         f"{missing} (each needs two or more training videos); raise the fraction or add videos")
    labelled = [records[i].privacy for i in held if records[i].privacy is not None]
    if not labelled and any(r.privacy is not None for r in records):
        raise ValueError(f"none of the validation part's {len(held)} videos has privacy labels, so no attacker can be "
                         f"scored on it; raise the validation fraction or check the labels")
    if labelled:
        values = np.stack(labelled)
        lacking = [f"{a}={v}" for j, a in enumerate(PRIVACY_ATTRIBUTES) for v in (0, 1)
                   if not (values[:, j] == v).any()]
        if lacking:
            raise ValueError(f"the validation part's {len(labelled)} labelled video(s) lack attribute value(s) "
                             f"{lacking}, so their AP is undefined; raise the validation fraction")
    return fit, held


def _check_split(split: int) -> None:
    if split not in (1, 2, 3):
        raise ValueError(f"split must be 1, 2 or 3, got {split}")
