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
import math
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


# A label file is small (VP-UCF101's: 13,320 videos, under 2 MB); a larger one is refused before it is read.
MAX_LABEL_FILE_BYTES = 64 * 1024 * 1024
# No array in a label pickle needs more elements than this (a label is 5 values): numpy's constructors, which the
# pickle may call, would otherwise allocate whatever a 100-byte file asks for.
_MAX_ARRAY_ELEMENTS = 64


def _small_shape(shape, where: str) -> None:
    dims = (shape,) if isinstance(shape, int) else tuple(shape)
    if not all(isinstance(d, int) and 0 <= d <= _MAX_ARRAY_ELEMENTS for d in dims) \
            or math.prod(dims) > _MAX_ARRAY_ELEMENTS:
        raise UnsafePickleError(f"refusing {where} of shape {shape!r}: a label pickle holds arrays of at most "
                                f"{_MAX_ARRAY_ELEMENTS} elements")


def _plain_dtype(dtype, where: str) -> np.dtype:
    dt = np.dtype(dtype)
    if dt.kind not in "biuf":  # object, string, void (structured) dtypes: none is a label
        raise UnsafePickleError(f"refusing {where} of dtype {dt}: a label pickle holds numeric arrays only")
    return dt


class _CheckedArray(np.ndarray):
    """numpy.ndarray as a label pickle sees it: the class _reconstruct is given, and a constructor it may call
    directly, for small numeric arrays only."""

    def __new__(cls, shape, dtype=float, *args, **kwargs):
        _small_shape(shape, "numpy.ndarray")
        return np.ndarray.__new__(np.ndarray, shape, _plain_dtype(dtype, "numpy.ndarray"), *args, **kwargs)


def _safe_dtype(obj, *args, **kwargs):
    return _plain_dtype(np.dtype(obj, *args, **kwargs), "numpy.dtype")


def _checked(name: str, real):
    """numpy's array reconstruction (``_reconstruct(subtype, shape, dtype)``, ``_frombuffer(buf, dtype, shape,
    order)``) with the shape and dtype checked first; the array it makes is a plain ndarray."""
    if name == "_reconstruct":
        def reconstruct(subtype, shape, dtype):
            if not (isinstance(subtype, type) and issubclass(subtype, np.ndarray)):
                raise UnsafePickleError(f"refusing _reconstruct of {subtype!r}: a label pickle holds numpy arrays")
            _small_shape(shape, "_reconstruct")
            return real(np.ndarray, shape, _plain_dtype(dtype, "_reconstruct"))  # "(N,)O" hides a shape and objects
        return reconstruct

    def frombuffer(buf, dtype, shape, order):
        _small_shape(shape, "_frombuffer")
        return real(buf, _plain_dtype(dtype, "_frombuffer"), shape, order)
    return frombuffer


class _NumpyOnlyUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):  # noqa: D102 - pickle hook
        if (module, name) not in _ALLOWED_GLOBALS:
            raise UnsafePickleError(
                f"refusing to load global {module}.{name}: a label pickle may only hold numpy arrays "
                "(numpy.core.multiarray._reconstruct, numpy.core.numeric._frombuffer, numpy.ndarray, numpy.dtype)"
            )
        if module == "numpy":  # the constructors a pickle can call directly: numeric and small only
            return _CheckedArray if name == "ndarray" else _safe_dtype
        if module == "_codecs":
            return codecs.encode
        # numpy 2 keeps numpy.core as a shim over numpy._core; import whichever spelling this numpy provides.
        try:
            mod = importlib.import_module(module)
        except ImportError:
            mod = importlib.import_module(module.replace("numpy.core", "numpy._core", 1))
        return _checked(name, getattr(mod, name))


def _label_values(value) -> np.ndarray | None:
    """A pickled label as a (5,) array, or None when it is not one: a numeric array of 5 elements, or a list of 5
    numbers (or one such list). Checked before any conversion: np.asarray of nested lists that share references
    builds an array as large as they unfold to."""
    if isinstance(value, (list, tuple)) and len(value) == 1 and isinstance(value[0], (list, tuple, np.ndarray)):
        value = value[0]
    if isinstance(value, (list, tuple)):
        if len(value) != len(PRIVACY_ATTRIBUTES) or not all(
                isinstance(v, (int, float, np.integer, np.floating)) for v in value):
            return None
        value = np.asarray(value)
    if not isinstance(value, np.ndarray) or value.size != len(PRIVACY_ATTRIBUTES) or value.dtype.kind not in "biuf":
        return None
    return value.reshape(-1)


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
    size = os.path.getsize(path)
    if size > MAX_LABEL_FILE_BYTES:
        raise LabelError(f"{path}: {size} bytes, larger than any label file ({MAX_LABEL_FILE_BYTES} bytes at most); "
                         f"is it the right file?")
    with open(path, "rb") as f:
        try:
            obj = _NumpyOnlyUnpickler(f).load()
        except UnsafePickleError:
            raise
        except (EOFError, pickle.UnpicklingError, ValueError, TypeError, AttributeError, IndexError, MemoryError,
                RecursionError) as exc:
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
        arr = _label_values(value)
        if arr is None or not np.isin(arr, (0, 1)).all():
            raise LabelError(f"{path}: label of {raw_key!r} is not {len(PRIVACY_ATTRIBUTES)} values in {{0, 1}}")
        if key in out:
            raise LabelError(f"{path}: duplicate video {key!r}")
        out[key] = arr.astype(np.int64)
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
