"""Checkpoints are data: a .pt whose pickle would run code is refused at every entry point that reads one
(``load_trained``, ``stpcore anonymize / eval / sweep --checkpoint``, ``stpcore train --resume``), and the code
never runs. The privacy label loader has its own attacks in tests/data/test_labels_splits.py.

Each attack file is a legitimate checkpoint plus one object whose unpickling touches a marker file, so with
``weights_only`` off the load would succeed (and the marker appear); each entry point is also shown to load the
legitimate file, so the tests cannot pass by refusing everything. TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1 is set
throughout: it turns torch.load's default to weights_only=False, so a call that stopped passing
weights_only=True explicitly would fail here too.
"""

from __future__ import annotations

import os
import pickle
import shlex

import pytest
import torch

from stpcore.cli import main
from stpcore.inference import load_trained
from stpcore.models import STPrivacy, STPrivacyConfig, save_anonymizer
from stpcore.testing import RandomClipLoader
from stpcore.training import TrainConfig, Trainer

FORMATS = ["torch.save", "bare-pickle"]  # the zip format torch writes, and the legacy one (a plain pickle stream)


class _TouchesFile:
    """Unpickling this runs ``touch <marker>``, as a hostile checkpoint would run anything."""

    def __init__(self, marker) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(str(self.marker))}",)


class _ReachedTheData(Exception):
    """Raised where a command goes on to its data, i.e. after the checkpoint loaded."""


def _poisoned(legit, out, fmt: str, marker):
    """``legit``'s content plus the payload, written as ``fmt``. With weights_only=False both formats run the
    payload: torch.save's file loads completely, the bare pickle runs it before torch finds no magic number."""
    # The payload first, so that it is the first thing unpickled (and the global a refusal names).
    state = {"provenance": _TouchesFile(marker), **torch.load(legit, map_location="cpu", weights_only=True)}
    if fmt == "torch.save":
        torch.save(state, out)
    else:
        with open(out, "wb") as f:
            pickle.dump(state, f, protocol=2)
    return out


@pytest.fixture(autouse=True)
def _default_to_unsafe_loads(monkeypatch):
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")


@pytest.fixture
def marker(tmp_path):
    path = tmp_path / "payload-ran"
    # The payload itself works: plain pickle runs it (so an absent marker below means it was refused).
    pickle.loads(pickle.dumps(_TouchesFile(path)))
    assert path.is_file()
    path.unlink()
    return path


@pytest.fixture
def anonymizer_file(tmp_path):
    torch.manual_seed(0)
    model = STPrivacy(STPrivacyConfig.from_name("tiny"))
    return save_anonymizer(model, tmp_path / "stprivacy.pt", classes=["a", "b", "c"])


def _exit_code(argv: list[str]) -> int | str:
    try:
        return main(argv)
    except _ReachedTheData:
        return "the checkpoint loaded"


def _check_refused_on_the_command_line(code: int | str, err: str, path, marker) -> None:
    assert not marker.exists(), "the checkpoint's code ran"
    assert code == 2, f"{code}: {err}"
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in err, err
    assert str(path) in errors[0] and "refused" in errors[0] and "could run code" in errors[0], errors[0]
    assert "system" in errors[0], errors[0]  # the global it refused (posix.system on Linux)


@pytest.mark.parametrize("fmt", FORMATS)
def test_load_trained_refuses_a_checkpoint_that_runs_code(tmp_path, anonymizer_file, marker, fmt):
    assert load_trained(anonymizer_file, precision="fp32").cfg == STPrivacyConfig.from_name("tiny")
    evil = _poisoned(anonymizer_file, tmp_path / "evil.pt", fmt, marker)
    with pytest.raises(ValueError) as exc:
        load_trained(evil, precision="fp32")
    assert not marker.exists(), "the checkpoint's code ran"
    message = str(exc.value)
    assert message.startswith(f"{evil}: refused: ") and "could run code" in message, message
    assert "system" in message, message  # names what it refused: posix.system on Linux


def _anonymize(tmp_path, checkpoint):
    return ["anonymize", str(tmp_path / "in.mp4"), "-o", str(tmp_path / "out"), "--checkpoint", str(checkpoint),
            "--precision", "fp32"]


def _eval(tmp_path, checkpoint):
    return ["eval", "--data-root", str(tmp_path / "data"), "--out-dir", str(tmp_path / "eval"), "--checkpoint",
            str(checkpoint), "--methods", "stprivacy", "--no-progress"]


def _sweep(tmp_path, checkpoint):
    return ["sweep", "--data-root", str(tmp_path / "data"), "--out-dir", str(tmp_path / "sweep"), "--checkpoint",
            str(checkpoint), "--no-progress"]


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("command", [_anonymize, _eval, _sweep], ids=["anonymize", "eval", "sweep"])
def test_checkpoint_flag_refuses_a_checkpoint_that_runs_code(tmp_path, anonymizer_file, marker, monkeypatch,
                                                             capsys, command, fmt):
    from stpcore import anonymize
    from stpcore.evaluation import protocol

    def reached(*args, **kwargs):
        raise _ReachedTheData

    # The legitimate file loads, and the command goes on to its data (stopped there: there is none).
    monkeypatch.setattr(anonymize, "anonymize_files", reached)
    monkeypatch.setattr(protocol, "default_loader", reached)
    with pytest.raises(_ReachedTheData):
        main(command(tmp_path, anonymizer_file))
    capsys.readouterr()

    evil = _poisoned(anonymizer_file, tmp_path / "evil.pt", fmt, marker)
    code = _exit_code(command(tmp_path, evil))
    _check_refused_on_the_command_line(code, capsys.readouterr().err, evil, marker)


def _train(tmp_path, resume):
    return ["train", "--data-root", "unused", "--out-dir", str(tmp_path / "run"), "--preset", "tiny",
            "--batch-size", "2", "--phase1-epochs", "1", "--phase2-epochs", "0", "--no-progress", "--resume",
            str(resume)]


@pytest.mark.parametrize("fmt", FORMATS)
def test_train_resume_refuses_a_checkpoint_that_runs_code(tmp_path, marker, monkeypatch, capsys, fmt):
    monkeypatch.setattr(Trainer, "_default_loader", lambda self: RandomClipLoader(2, 2, 8, 32))
    cfg = TrainConfig(data_root="unused", out_dir=str(tmp_path / "run"), preset="tiny", batch_size=2,
                      phase1_epochs=1, phase2_epochs=0, progress=False)
    trainer = Trainer(cfg)
    trainer.phase = "done"  # a finished run: resuming it only exports the model
    legit = trainer.save_checkpoint("finished.pt")

    assert main(_train(tmp_path, legit)) == 0, capsys.readouterr().err
    assert (tmp_path / "run" / "stprivacy.pt").is_file()
    capsys.readouterr()

    evil = _poisoned(legit, tmp_path / "evil.pt", fmt, marker)
    code = _exit_code(_train(tmp_path, evil))
    _check_refused_on_the_command_line(code, capsys.readouterr().err, evil, marker)


@pytest.mark.parametrize("content", [b"video,skin_color\na/b,1\n", bytes(range(256)) * 4,
                                     pickle.dumps({"a": 1}, protocol=4)], ids=["csv", "binary", "plain-pickle"])
def test_a_file_that_is_no_checkpoint_is_not_called_dangerous(tmp_path, content):
    """Only a refused global earns "refused ... could run code"; a CSV, random bytes or a plain pickle is simply
    not a torch checkpoint, and the message says so."""
    from stpcore.models.checkpoints import load_weights_only

    path = tmp_path / "not-a-checkpoint.pt"
    path.write_bytes(content)
    with pytest.raises(ValueError) as exc:
        load_weights_only(path)
    message = str(exc.value)
    assert message.startswith(f"{path}: not a torch checkpoint") and "could run code" not in message, message


def test_a_video_path_that_reads_as_a_url_is_opened_as_the_file(tmp_path, monkeypatch):
    """A dataset folder named like an FFmpeg URL ("tcp:127.0.0.1:9"), read with the dataset root given relative
    ("."): the relative path went to FFmpeg, which connected to that address instead of reading the file (a
    dataset could make stpcore connect anywhere). Paths are made absolute before FFmpeg sees them."""
    pytest.importorskip("av")
    import numpy as np

    from stpcore.data.decode_pyav import decode_frames, probe
    from stpcore.data.splits import index_videos
    from stpcore.data.synth import write_video
    from stpcore.media import read_frames

    folder = tmp_path / "tcp:127.0.0.1:9"  # port 9 (discard): a refused connection, at once, were it dialled
    folder.mkdir()
    write_video(folder / "v.avi", np.full((4, 32, 32, 3), 90, np.uint8), fps=25, codec="mpeg4")
    monkeypatch.chdir(tmp_path)
    relative = "tcp:127.0.0.1:9/v.avi"
    assert probe(relative).num_frames == 4
    assert decode_frames(relative, [0, 3])[0].shape == (2, 32, 32, 3)
    assert len(list(read_frames(relative))) == 4
    assert index_videos(".")["tcp:127.0.0.1:9/v"].is_absolute()  # what the loaders and the check open
