"""Split parsing (HMDB51, UCF101), label loading (real release, restricted unpickler), CSV round trip."""

from __future__ import annotations

import os
import pickle

import numpy as np
import pytest

from stpcore.data.labels import (
    PRIVACY_ATTRIBUTES,
    LabelError,
    UnsafePickleError,
    load_privacy_pickle,
    match_labels,
    read_labels_csv,
    save_privacy_pickle,
    validate_key,
    write_labels_csv,
)
from stpcore.data.splits import detect_kind, list_records


def _touch(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x")


def test_hmdb51_split_parsing(tmp_path):
    for name in ("brush_hair/a.avi", "brush_hair/b.avi", "brush_hair/c.avi", "wave/w1.avi", "wave/w2.webm"):
        _touch(tmp_path / name)
    (tmp_path / "brush_hair_test_split1.txt").write_text("a.avi 1\nb.avi 2\nc.avi 0\n")
    (tmp_path / "wave_test_split1.txt").write_text("w1.avi 1 \nw2.avi 2\ngone.avi 1\n")
    assert detect_kind(tmp_path) == "hmdb51"
    train = list_records(tmp_path, "auto", 1, True)
    test = list_records(tmp_path, "auto", 1, False)
    assert train.classes == ["brush_hair", "wave"]
    assert [(r.video_id, r.action) for r in train.records] == [("brush_hair/a", 0), ("wave/w1", 1)]
    # w2 is listed as .avi but exists only transcoded (.webm): matched on "<class>/<stem>".
    assert [(r.video_id, r.path.name) for r in test.records] == [("brush_hair/b", "b.avi"), ("wave/w2", "w2.webm")]
    assert train.missing == ["wave/gone"]
    with pytest.raises(FileNotFoundError):
        list_records(tmp_path, "hmdb51", 2, True)


def test_ucf101_split_parsing(tmp_path):
    for name in ("ApplyEyeMakeup/v_ApplyEyeMakeup_g01_c01.avi", "ApplyEyeMakeup/v_ApplyEyeMakeup_g08_c02.avi",
                 "Archery/v_Archery_g01_c01.avi"):
        _touch(tmp_path / name)
    (tmp_path / "classInd.txt").write_text("1 ApplyEyeMakeup\n2 Archery\n")
    (tmp_path / "trainlist01.txt").write_text(
        "ApplyEyeMakeup/v_ApplyEyeMakeup_g08_c02.avi 1\nArchery/v_Archery_g01_c01.avi 2\n"
    )
    (tmp_path / "testlist01.txt").write_text(
        "ApplyEyeMakeup/v_ApplyEyeMakeup_g01_c01.avi\nArchery/v_Archery_g09_c01.avi\n"
    )
    assert detect_kind(tmp_path) == "ucf101"
    train = list_records(tmp_path, "auto", 1, True)
    test = list_records(tmp_path, "auto", 1, False)
    assert train.classes == ["ApplyEyeMakeup", "Archery"]
    assert [(r.video_id, r.action) for r in train.records] == [
        ("ApplyEyeMakeup/v_ApplyEyeMakeup_g08_c02", 0),
        ("Archery/v_Archery_g01_c01", 1),
    ]
    assert [(r.video_id, r.action) for r in test.records] == [("ApplyEyeMakeup/v_ApplyEyeMakeup_g01_c01", 0)]
    assert test.missing == ["Archery/v_Archery_g09_c01"]
    (tmp_path / "trainlist01.txt").write_text("Archery/v_Archery_g01_c01.avi 7\n")
    with pytest.raises(ValueError, match="trainlist01.txt:1"):
        list_records(tmp_path, "ucf101", 1, True)


@pytest.mark.parametrize(
    ("name", "videos", "rates"),
    [
        ("vp_hmdb51_privacy_labels.pickle", 6766, (0.90, 0.62, 0.92, 0.27, 0.21)),
        ("vp_ucf101_privacy_labels.pickle", 13320, (0.91, 0.60, 0.90, 0.25, 0.25)),
    ],
    ids=["hmdb51", "ucf101"],
)
def test_released_labels(shared_dir, name, videos, rates):
    path = shared_dir / "data" / name
    if not path.is_file():
        pytest.skip(f"{path} absent")
    labels = load_privacy_pickle(path)
    assert len(labels) == videos
    assert all(v.shape == (len(PRIVACY_ATTRIBUTES),) and v.dtype == np.int64 for v in labels.values())
    assert all(k.count("/") == 1 and not k.endswith(".mp4") for k in labels)
    np.testing.assert_allclose(np.stack([np.asarray(v).reshape(-1) for v in labels.values()]).mean(axis=0), rates,
                               atol=0.01)  # the positive rate of each attribute


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


@pytest.mark.parametrize(
    "payload",
    [
        {"a/b.mp4": _Evil()},
        {"a/b.mp4": np.zeros((1, 5), np.int64), "c/d.mp4": len},
        {"a/b.mp4": np.zeros((1, 5), np.int64), "set": {1, 2}, "obj": pickle.PickleBuffer},
    ],
    ids=["os-system", "builtin", "class-ref"],
)
def test_pickle_refuses_non_numpy(tmp_path, payload):
    path = tmp_path / "evil.pickle"
    path.write_bytes(pickle.dumps(payload, protocol=4))
    with pytest.raises(UnsafePickleError, match="refusing to load global"):
        load_privacy_pickle(path)


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_pickle_of_plain_arrays_loads_in_every_protocol(tmp_path, protocol):
    """Protocol 5 (Python 3.14's default) stores contiguous arrays through numpy's _frombuffer."""
    labels = {"wave/v1.mp4": np.array([[1, 0, 1, 0, 1]], np.int64), "hug/v2.mp4": np.ones((1, 5), np.int64)[:, ::1]}
    path = tmp_path / "l.pickle"
    path.write_bytes(pickle.dumps(labels, protocol=protocol))
    back = load_privacy_pickle(path)
    assert sorted(back) == ["hug/v2", "wave/v1"] and back["wave/v1"].tolist() == [1, 0, 1, 0, 1]


class _ObjectFromBuffer:
    def __reduce__(self):
        return (np._core.numeric._frombuffer, (b"\x00" * 8, np.dtype("O"), (1,), "C"))


def test_pickle_frombuffer_cannot_make_object_arrays(tmp_path):
    """_frombuffer is allowed, but np.frombuffer refuses object dtypes, so it cannot smuggle objects in."""
    path = tmp_path / "crafted.pickle"
    path.write_bytes(pickle.dumps({"a/b.mp4": _ObjectFromBuffer()}, protocol=5))
    with pytest.raises((ValueError, UnsafePickleError), match="(?i)object"):
        load_privacy_pickle(path)


class _Calls:
    """Pickles as ``func(*args)``: what a crafted label pickle can ask numpy's allowed globals to do."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def _nested(depth: int) -> list:
    value = [0, 1, 0, 1, 0]
    for _ in range(depth):
        value = [value, value]  # one object twice: the pickle stays tiny, the unfolded array doubles
    return value


@pytest.mark.parametrize("value,match", [
    (_Calls(np.ndarray, (200_000_000,), np.dtype("f8")), "shape"),  # 1.6 GB asked for by ~100 bytes
    (_Calls(np.ndarray, (5,), np.dtype("O")), "object"),  # an object array, filled with None by numpy
    (_Calls(np._core.multiarray._reconstruct, np.ndarray, (10**9,), b"b"), "shape"),
    (_Calls(np._core.multiarray._reconstruct, np.ndarray, (1,), "(100000000,)O"), "dtype"),  # a shape in the dtype
    (_nested(30), "not 5 values"),  # np.asarray would unfold 2**30 copies of the list
], ids=["ndarray-huge", "ndarray-object", "reconstruct-huge", "reconstruct-dtype-shape", "shared-nested-lists"])
def test_pickle_size_bombs_are_refused_before_they_allocate(tmp_path, value, match):
    """Nothing in a label pickle runs code, but numpy's constructors and np.asarray allocate what a tiny file
    asks for (the review measured 1.7 GB resident from 104 bytes): shapes, dtypes and the label's structure are
    checked before anything is allocated."""
    path = tmp_path / "bomb.pickle"
    path.write_bytes(pickle.dumps({"a/b.mp4": value}, protocol=4))
    assert path.stat().st_size < 1000
    with pytest.raises((LabelError, UnsafePickleError), match=match):
        load_privacy_pickle(path)


def test_a_label_file_larger_than_any_label_file_is_not_read(tmp_path, monkeypatch):
    from stpcore.data import labels

    path = tmp_path / "l.pickle"
    path.write_bytes(pickle.dumps({"a/b.mp4": np.zeros((1, 5), np.int64)}, protocol=4))
    monkeypatch.setattr(labels, "MAX_LABEL_FILE_BYTES", path.stat().st_size - 1)
    with pytest.raises(LabelError, match="larger than any label file"):
        load_privacy_pickle(path)


def test_keys_with_dots_survive_the_csv_round_trip(tmp_path):
    """A name with a dot ("Mr.Bean_wave_0") lost everything after it when read back from a CSV, which stores
    keys without an extension; only a video extension is dropped now."""
    from stpcore.data.labels import video_key

    assert video_key("wave/Mr.Bean_wave_0") == video_key("wave/Mr.Bean_wave_0.avi") == "wave/Mr.Bean_wave_0"
    assert video_key("data/wave/Mr.Bean_wave_0.MP4") == "wave/Mr.Bean_wave_0"
    labels = {"wave/Mr.Bean_wave_0": np.array([1, 0, 1, 0, 1])}
    save_privacy_pickle(labels, tmp_path / "l.pickle")
    from_pickle = load_privacy_pickle(tmp_path / "l.pickle")
    write_labels_csv(from_pickle, tmp_path / "l.csv")
    assert list(read_labels_csv(tmp_path / "l.csv")) == list(from_pickle) == ["wave/Mr.Bean_wave_0"]


@pytest.mark.parametrize("content, match", [(b"", "empty or truncated"),
                                            (pickle.dumps({"a/b.mp4": np.zeros((1, 5), np.int64)})[:-9],
                                             "not a readable label pickle")],
                         ids=["empty", "truncated"])
def test_an_unreadable_pickle_is_a_label_error_naming_the_file(tmp_path, content, match):
    path = tmp_path / "labels.pickle"
    path.write_bytes(content)
    with pytest.raises(LabelError, match=match) as exc:
        load_privacy_pickle(path)
    assert str(path) in str(exc.value)


def test_a_csv_that_is_not_utf8_is_a_label_error_naming_the_file(tmp_path):
    path = tmp_path / "labels.csv"
    path.write_bytes(b"video,skin_color,face,gender,nudity,relationship\n\xffa/b,1,0,1,0,1\n")
    with pytest.raises(LabelError, match="labels.csv: not UTF-8 text"):
        read_labels_csv(path)


def test_csv_round_trip(tmp_path):
    labels = {"wave/v1": np.array([1, 0, 1, 0, 1]), "hug/v2": np.array([0, 1, 1, 1, 0])}
    write_labels_csv(labels, tmp_path / "l.csv")
    text = (tmp_path / "l.csv").read_text()
    assert text.splitlines()[0] == "video,skin_color,face,gender,nudity,relationship"
    back = read_labels_csv(tmp_path / "l.csv")
    assert back.keys() == labels.keys()
    for k in labels:
        np.testing.assert_array_equal(back[k], labels[k])
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("a/v1,1,0,1,0,2\n", r"l.csv:2: relationship = '2'"),
        ("a/v1,1,0,1,0\n", r"l.csv:2: expected 6 columns"),
        ("a/v1.avi,1,0,1,0,1\na/v1.mp4,1,1,1,1,1\n", r"l.csv:3: duplicate video 'a/v1' \(first on line 2\)"),
        ("../x,1,0,1,0,1\n", r"l.csv:2.*escapes the dataset root"),
        ("a/../../x,1,0,1,0,1\n", r"escapes the dataset root"),
        ("/etc/passwd,1,0,1,0,1\n", r"absolute path"),
        ("a\\v1,1,0,1,0,1\n", r"backslash"),
        ("v1,1,0,1,0,1\n", r"not of the form"),
    ],
    ids=["value", "columns", "duplicate", "dotdot", "nested-dotdot", "absolute", "backslash", "no-class"],
)
def test_csv_validation_errors(tmp_path, body, message):
    path = tmp_path / "l.csv"
    path.write_text("video,skin_color,face,gender,nudity,relationship\n" + body)
    with pytest.raises(LabelError, match=message):
        read_labels_csv(path)


def test_csv_import_normalises(tmp_path):
    path = tmp_path / "hand.csv"
    path.write_text("\ufeffVideo, skin_color,face,gender,nudity,relationship\nb/v2.avi, 1 ,0,0,0,1\n\na/v1,0,0,0,0,0\n")
    labels = read_labels_csv(path)
    write_labels_csv(labels, tmp_path / "out.csv")
    assert (tmp_path / "out.csv").read_text().splitlines()[1:] == ["a/v1,0,0,0,0,0", "b/v2,1,0,0,0,1"]


def test_header_error_and_match_report(tmp_path):
    path = tmp_path / "l.csv"
    path.write_text("video,face\n")
    with pytest.raises(LabelError, match="header"):
        read_labels_csv(path)
    m = match_labels(["a/v1", "a/v2"], {"a/v1": np.zeros(5), "b/v9": np.zeros(5)})
    assert (m.matched, m.videos_without_label, m.labels_without_video) == (1, ["a/v2"], ["b/v9"])
    assert validate_key("a/v1.mp4") == "a/v1"
