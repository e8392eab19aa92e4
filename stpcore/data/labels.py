"""VP privacy labels: the released pickles (read safely), a plain CSV format, and matching to videos.

A label set is a dict {"<class>/<stem>": int64 array (5,)} with columns PRIVACY_ATTRIBUTES, 1 meaning
"the attribute is identifiable throughout the video". The released pickles key videos as
"<class>/<video>.mp4" while the published files are .avi, so everything matches on "<class>/<stem>".
"""

from __future__ import annotations

import codecs
import csv
import importlib
import io
import os
import pickle
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import numpy as np

PRIVACY_ATTRIBUTES: tuple[str, ...] = ("skin_color", "face", "gender", "nudity", "relationship")
CSV_HEADER: tuple[str, ...] = ("video", *PRIVACY_ATTRIBUTES)

# The only globals a label pickle may name: numpy's array reconstruction (both module spellings, numpy 1 and 2;
# _frombuffer is what pickle protocol 5, Python 3.14's default, uses for contiguous arrays: np.frombuffer,
# which refuses object dtypes, then a reshape).
_ALLOWED_GLOBALS = frozenset(
    {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.numeric", "_frombuffer"),
        ("numpy._core.numeric", "_frombuffer"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),  # protocols 2-3 store bytes as encode(text, "latin1"), as torch's weights_only allows
    }
)


class LabelError(ValueError):
    """A label file or label key is malformed; the message names the file and line."""


class UnsafePickleError(pickle.UnpicklingError):
    """The pickle names a global other than numpy's array reconstruction."""


class _NumpyOnlyUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):  # noqa: D102 - pickle hook
        if (module, name) not in _ALLOWED_GLOBALS:
            raise UnsafePickleError(
                f"refusing to load global {module}.{name}: a label pickle may only hold numpy arrays "
                "(numpy.core.multiarray._reconstruct, numpy.core.numeric._frombuffer, numpy.ndarray, numpy.dtype)"
            )
        if module == "numpy":
            return getattr(np, name)
        if module == "_codecs":
            return codecs.encode
        # numpy 2 keeps numpy.core as a shim over numpy._core; import whichever spelling this numpy provides.
        try:
            mod = importlib.import_module(module)
        except ImportError:
            mod = importlib.import_module(module.replace("numpy.core", "numpy._core", 1))
        return getattr(mod, name)


# The video containers stpcore reads; a key's suffix is dropped only when it is one of these.
VIDEO_EXTENSIONS: tuple[str, ...] = (".avi", ".mp4", ".webm", ".mkv", ".mov")


def video_key(path: str | os.PathLike[str]) -> str:
    """The matching key "<class>/<stem>" of a video path (last two components kept, a video extension dropped:
    "wave/Mr.Bean_wave_0" and "wave/Mr.Bean_wave_0.avi" are both "wave/Mr.Bean_wave_0")."""
    p = PurePosixPath(str(path).replace(os.sep, "/"))
    name = p.stem if p.suffix.lower() in VIDEO_EXTENSIONS else p.name
    return f"{p.parent.name}/{name}"


def validate_key(key: str, where: str = "") -> str:
    """Check that a label key "<class>/<stem>[.ext]" stays inside the dataset root; return "<class>/<stem>".

    Rejects absolute paths, backslashes, ".." components, empty parts and anything but exactly two parts.
    """
    at = f"{where}: " if where else ""
    if not key:
        raise LabelError(f"{at}empty video key")
    if "\\" in key:
        raise LabelError(f"{at}video key {key!r} contains a backslash; use '<class>/<video>'")
    if key.startswith("/") or (len(key) > 1 and key[1] == ":"):
        raise LabelError(f"{at}video key {key!r} is an absolute path; use '<class>/<video>'")
    parts = key.split("/")
    if any(p in ("..", ".") for p in parts):
        raise LabelError(f"{at}video key {key!r} escapes the dataset root")
    if len(parts) != 2 or not all(parts):
        raise LabelError(f"{at}video key {key!r} is not of the form '<class>/<video>'")
    return video_key(key)


def load_privacy_pickle(path: str | os.PathLike[str]) -> dict[str, np.ndarray]:
    """Load a released VP label pickle with an unpickler that admits numpy arrays only.

    Returns:
        {"<class>/<stem>": int64 array (5,)}; keys are validated with `validate_key`.
    Raises:
        UnsafePickleError if the pickle names any other global (e.g. os.system or a builtin);
        LabelError if the content is not a dict of (1, 5) or (5,) 0/1 arrays.
    """
    with open(path, "rb") as f:
        try:
            obj = _NumpyOnlyUnpickler(f).load()
        except UnsafePickleError:
            raise
        except (EOFError, pickle.UnpicklingError, ValueError, TypeError, AttributeError, IndexError) as exc:
            why = "empty or truncated file" if isinstance(exc, EOFError) else str(exc) or type(exc).__name__
            raise LabelError(f"{path}: not a readable label pickle ({why}); use the released VP-HMDB51/VP-UCF101 "
                             f"pickle or a label CSV") from exc
    if not isinstance(obj, dict):
        raise LabelError(f"{path}: expected a dict of label arrays, got {type(obj).__name__}")
    out: dict[str, np.ndarray] = {}
    for raw_key, value in obj.items():
        if not isinstance(raw_key, str):
            raise LabelError(f"{path}: key {raw_key!r} is not a string")
        key = validate_key(raw_key, where=str(path))
        arr = np.asarray(value)
        if arr.size != len(PRIVACY_ATTRIBUTES) or not np.isin(arr, (0, 1)).all():
            raise LabelError(f"{path}: label of {raw_key!r} is not {len(PRIVACY_ATTRIBUTES)} values in {{0, 1}}")
        if key in out:
            raise LabelError(f"{path}: duplicate video {key!r}")
        out[key] = arr.reshape(-1).astype(np.int64)
    return out


def save_privacy_pickle(labels: Mapping[str, np.ndarray], path: str | os.PathLike[str], ext: str = ".mp4") -> None:
    """Write labels in the released pickle shape {"<class>/<stem><ext>": int64 (1, 5)}, atomically."""
    obj = {f"{k}{ext}": np.asarray(v, dtype=np.int64).reshape(1, -1) for k, v in labels.items()}
    _atomic_write_bytes(Path(path), pickle.dumps(obj, protocol=4))


def read_labels_csv(path: str | os.PathLike[str]) -> dict[str, np.ndarray]:
    """Read (and validate) a label CSV with header `video,skin_color,face,gender,nudity,relationship`.

    Values must be 0 or 1 (surrounding spaces allowed), keys "<class>/<stem>" (an extension is dropped)
    that do not escape the root, no duplicates. Errors are `LabelError`s naming the file and line.

    Returns:
        {"<class>/<stem>": int64 array (5,)}
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")  # tolerate a BOM from spreadsheet exports
    except UnicodeDecodeError as exc:
        raise LabelError(f"{path}: not UTF-8 text ({exc}); save the label CSV as UTF-8") from exc
    reader = csv.reader(io.StringIO(text))
    rows = list(reader)
    if not rows:
        raise LabelError(f"{path}: empty file; expected header {','.join(CSV_HEADER)}")
    header = tuple(h.strip().lower() for h in rows[0])
    if header != CSV_HEADER:
        raise LabelError(f"{path}:1: header {','.join(header)!r} != {','.join(CSV_HEADER)!r}")
    out: dict[str, np.ndarray] = {}
    first_line: dict[str, int] = {}
    for lineno, row in enumerate(rows[1:], start=2):
        if not row or all(not c.strip() for c in row):
            continue
        where = f"{path}:{lineno}"
        if len(row) != len(CSV_HEADER):
            raise LabelError(f"{where}: expected {len(CSV_HEADER)} columns, got {len(row)}")
        key = validate_key(row[0].strip(), where=where)
        values = []
        for name, cell in zip(PRIVACY_ATTRIBUTES, row[1:], strict=True):
            cell = cell.strip()
            if cell not in ("0", "1"):
                raise LabelError(f"{where}: {name} = {cell!r}, expected 0 or 1")
            values.append(int(cell))
        if key in out:
            raise LabelError(f"{where}: duplicate video {key!r} (first on line {first_line[key]})")
        out[key] = np.asarray(values, dtype=np.int64)
        first_line[key] = lineno
    return out


def write_labels_csv(labels: Mapping[str, np.ndarray], path: str | os.PathLike[str]) -> None:
    """Write labels as CSV (sorted by key) atomically: a temporary file in the same folder, then os.replace."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(CSV_HEADER)
    for key in sorted(labels):
        validate_key(key)
        w.writerow([key, *(int(x) for x in np.asarray(labels[key]).reshape(-1))])
    _atomic_write_bytes(Path(path), buf.getvalue().encode("utf-8"))


def load_labels(path: str | os.PathLike[str]) -> dict[str, np.ndarray]:
    """Load a label file by extension: .csv via `read_labels_csv`, anything else via `load_privacy_pickle`."""
    if str(path).lower().endswith(".csv"):
        return read_labels_csv(path)
    return load_privacy_pickle(path)


@dataclass
class LabelMatch:
    """How a label set covers a list of videos (all keys "<class>/<stem>")."""

    matched: int = 0
    videos_without_label: list[str] = field(default_factory=list)
    labels_without_video: list[str] = field(default_factory=list)

    def summary(self, show: int = 5) -> str:
        lines = [
            f"labels matched: {self.matched}",
            f"videos without a label: {len(self.videos_without_label)}",
            *(f"  {k}" for k in self.videos_without_label[:show]),
            f"labels without a video: {len(self.labels_without_video)}",
            *(f"  {k}" for k in self.labels_without_video[:show]),
        ]
        return "\n".join(lines)


def match_labels(video_keys: Iterable[str], labels: Mapping[str, np.ndarray]) -> LabelMatch:
    """Count which videos (keys "<class>/<stem>") have labels and which labels have no video."""
    keys = list(dict.fromkeys(video_keys))
    key_set = set(keys)
    m = LabelMatch()
    for k in keys:
        if k in labels:
            m.matched += 1
        else:
            m.videos_without_label.append(k)
    m.labels_without_video = sorted(k for k in labels if k not in key_set)
    return m


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
