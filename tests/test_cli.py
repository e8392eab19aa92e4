"""The command line: config files checked by type, help texts from the docstrings, clear errors instead of
tracebacks, argument ranges, SIGTERM during `stpcore anonymize`."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch

from stpcore import media
from stpcore.cli import build_parser, main
from stpcore.config import dataclass_from_args, field_help
from stpcore.demo import DemoConfig
from stpcore.evaluation import EvalConfig
from stpcore.training import TrainConfig


def _train_args(tmp_path, fields):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"data_root": "d", "out_dir": "o"} | fields))
    return build_parser().parse_args(["train", "--config", str(path)])


@pytest.mark.parametrize("fields, message", [
    ({"compile": "false"}, "'compile': expected true or false, got 'false'"),
    ({"batch_size": "8"}, "'batch_size': expected a whole number, got '8'"),
    ({"batch_size": 8.5}, "'batch_size': expected a whole number"),
    ({"base_lr": True}, "'base_lr': expected a number"),
    ({"preset": 3}, "'preset': expected a string"),
])
def test_config_file_values_are_checked_by_type(tmp_path, fields, message):
    with pytest.raises(ValueError, match=message):
        dataclass_from_args(TrainConfig, _train_args(tmp_path, fields))


def test_config_file_json_numbers_and_lists_become_the_fields_types(tmp_path):
    cfg = dataclass_from_args(TrainConfig, _train_args(tmp_path, {"base_lr": 1, "stride": None, "compile": False}))
    assert cfg.base_lr == 1.0 and isinstance(cfg.base_lr, float) and cfg.stride is None and cfg.compile is False
    path = tmp_path / "d.json"
    path.write_text(json.dumps({"sweep_ratios": [1, 0.5]}))
    demo = dataclass_from_args(DemoConfig, build_parser().parse_args(["demo", "--config", str(path)]))
    assert demo.sweep_ratios == (1.0, 0.5)
    # A list field is a flag too (comma-separated), and the flag wins over the file.
    args = build_parser().parse_args(["demo", "--config", str(path), "--sweep-ratios", "0.6,0.4"])
    assert dataclass_from_args(DemoConfig, args).sweep_ratios == (0.6, 0.4)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["demo", "--sweep-ratios", "0.6,x"])


@pytest.mark.parametrize("cls", [TrainConfig, EvalConfig, DemoConfig])
def test_every_flag_has_a_description(cls):
    docs = field_help(cls)
    flags = [f.name for f in dataclasses.fields(cls)]
    assert [name for name in flags if not docs.get(name)] == []
    assert "clips per step" in docs.get("batch_size", "")


def test_help_shows_descriptions():
    text = build_parser()._subparsers._group_actions[0].choices["train"].format_help()
    assert "clips per step and process [G: 32]. (default: 32)" in " ".join(text.split())
    assert "(required)" in text


def test_missing_checkpoint_is_an_error_line_not_a_traceback(tmp_path, capsys):
    assert main(["anonymize", "x.mp4", "-o", str(tmp_path / "o"), "--checkpoint", str(tmp_path / "no.pt")]) == 2
    err = capsys.readouterr().err
    assert "error:" in err and "no such checkpoint file" in err and "Traceback" not in err


def test_checkpoint_that_is_not_one(tmp_path, capsys):
    (tmp_path / "notes.pt").write_text("hello")
    assert main(["anonymize", "x.mp4", "-o", str(tmp_path / "o"), "--checkpoint", str(tmp_path / "notes.pt")]) == 2
    assert "not a readable torch checkpoint" in capsys.readouterr().err


def test_output_folder_is_checked_before_the_model_loads(tmp_path, capsys):
    (tmp_path / "o").write_text("")
    assert main(["anonymize", "x.mp4", "-o", str(tmp_path / "o"), "--checkpoint", str(tmp_path / "no.pt")]) == 2
    assert "is an existing file" in capsys.readouterr().err


@pytest.mark.parametrize("flag", [["--keep-ratio", "5"], ["--keep-ratio", "0"], ["--adaptive", "1"],
                                  ["--batch-size", "0"], ["--stride", "-1"], ["--threads", "x"]])
def test_out_of_range_arguments_are_rejected_up_front(tmp_path, flag, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["anonymize", "x.mp4", "-o", str(tmp_path), "--checkpoint", "c.pt", *flag])
    assert exc.value.code == 2 and flag[0] in capsys.readouterr().err


def test_sigterm_stops_cleanly_with_a_summary(tmp_path, monkeypatch, capsys):
    pytest.importorskip("av")  # PyAV writes and reads the videos
    from stpcore import inference
    from stpcore.models import STPrivacy, STPrivacyConfig

    torch.manual_seed(0)
    real = inference.ClipAnonymizer(STPrivacy(STPrivacyConfig.from_name("tiny")), precision="fp32")
    calls = []

    class TermOnSecondFile:
        model, cfg, description = real.model, real.model.cfg, "test"

        def __call__(self, clips, **kwargs):
            calls.append(clips.shape[0])
            if len(calls) == 2:
                os.kill(os.getpid(), signal.SIGTERM)
            return real(clips, **kwargs)

    monkeypatch.setattr(inference, "load_trained", lambda *a, **k: TermOnSecondFile())
    frames = (np.random.default_rng(0).random((6, 40, 40, 3)) * 255).astype(np.uint8)
    srcs = [str(media.write_video(tmp_path / f"{n}.mp4", frames, fps=8)) for n in ("a", "b", "c")]
    out = tmp_path / "out"
    before = signal.getsignal(signal.SIGTERM)
    assert main(["anonymize", *srcs, "-o", str(out), "--checkpoint", "unused.pt"]) == 130
    assert signal.getsignal(signal.SIGTERM) is before  # the handler is put back
    captured = capsys.readouterr()
    assert "anonymized 1 file(s)" in captured.out and "--skip-existing" in captured.err
    assert sorted(p.name for p in out.iterdir()) == ["a.anonymized.mp4", "a.keep.npz"]  # no partial or temp file


def test_anonymize_compile_flag_reaches_the_anonymizer(tmp_path, monkeypatch):
    pytest.importorskip("av")  # PyAV writes and reads the videos
    from stpcore import inference
    from stpcore.models import STPrivacy, STPrivacyConfig

    seen = {}

    def fake_load(path, **kwargs):
        seen.update(kwargs)
        return inference.ClipAnonymizer(STPrivacy(STPrivacyConfig.from_name("tiny")), **kwargs)

    monkeypatch.setattr(inference, "load_trained", fake_load)
    frames = (np.random.default_rng(0).random((8, 40, 40, 3)) * 255).astype(np.uint8)
    src = media.write_video(tmp_path / "a.mp4", frames, fps=8)
    assert main(["anonymize", str(src), "-o", str(tmp_path / "out"), "--checkpoint", "unused.pt", "--compile",
                 "--precision", "fp32"]) == 0
    assert seen["compile"] is True and (tmp_path / "out" / "a.anonymized.mp4").is_file()


def test_commands_load_only_what_they_use():
    """`stpcore info` and the parser of `stpcore anonymize` load no training, evaluation or demo code (the
    config dataclasses are imported only for the command whose flags they make)."""
    code = ("import sys; from stpcore.cli import build_parser, main; main(['info']); "
            "build_parser('anonymize').parse_args(['anonymize', 'x.mp4', '-o', 'out', '--checkpoint', 'c.pt']); "
            "print(sorted(m for m in sys.modules if m.startswith(('stpcore.training', 'stpcore.evaluation', "
            "'stpcore.demo'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "[]", out[-2000:]
    code = ("import sys; from stpcore.cli import build_parser; build_parser('train'); "
            "print('stpcore.training.config' in sys.modules, 'stpcore.training.trainer' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["True", "False"]  # the flags need the config, not the trainer


def test_an_unknown_device_is_rejected_up_front(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["anonymize", "x.mp4", "-o", str(tmp_path), "--checkpoint", "c.pt", "--device", "gpu"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "--device" in err and "expected cpu, cuda or cuda:N, got 'gpu'" in err


def test_a_config_file_that_is_not_json_names_itself(tmp_path, capsys):
    config = tmp_path / "train.json"
    config.write_text('{"batch_size": 4,\n}')
    assert main(["train", "--config", str(config), "--data-root", str(tmp_path), "--out-dir", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert f"error: {config}: not valid JSON" in err and "Traceback" not in err, err


def test_live_stream_options_with_files_are_refused_not_ignored(tmp_path, capsys):
    """--input-format, --name, --segment-seconds and --stream-timeout are a live stream's; with files they did
    nothing, silently."""
    base = ["anonymize", "x.mp4", "-o", str(tmp_path / "out"), "--checkpoint", "c.pt"]
    assert main([*base, "--input-format", "mpegts"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --input-format is for a live stream") and not (tmp_path / "out").exists()
    assert main([*base, "--name", "x", "--segment-seconds", "3", "--stream-timeout", "5"]) == 2
    assert capsys.readouterr().err.startswith("error: --name, --segment-seconds, --stream-timeout are for a live "
                                              "stream")
    assert main([*base, "--no-drop"]) == 2
    assert capsys.readouterr().err.startswith("error: --drop/--no-drop is for a live stream")


def test_a_short_side_past_8k_is_a_setting_error_before_any_input(tmp_path, capsys):
    """--short-side 100000 failed each input on its own ("can't allocate 1279996800000 bytes")."""
    with pytest.raises(SystemExit) as exc:
        main(["anonymize", "x.mp4", "-o", str(tmp_path / "out"), "--checkpoint", "c.pt", "--short-side", "100000"])
    assert exc.value.code == 2 and "expected at most 4320 pixels" in capsys.readouterr().err


@pytest.mark.parametrize("baseline", ["raw", "stprivacy", "blacken", "pixelate"])
def test_a_demo_baseline_it_cannot_run_is_refused_before_any_work(tmp_path, capsys, baseline):
    """raw or stprivacy (already in the table: named twice), blacken (no person boxes) or an unknown name failed
    only at phase 3, after the training."""
    assert main(["demo", "--out", str(tmp_path / "demo"), "--baseline", baseline]) == 2
    assert "baseline must be one of" in capsys.readouterr().err and not (tmp_path / "demo").exists()


def test_a_console_that_goes_away_ends_the_output_not_the_job(tmp_path):
    """``stpcore anonymize *.mp4 -o out | head -1``: the reader is gone before the first line. Every input is still
    anonymized and recorded, and the command ends as it would have (before: the first "ok:" line raised
    BrokenPipeError, an OSError, and the CLI stopped with "error: [Errno 32] Broken pipe" after the first file)."""
    pytest.importorskip("av")  # PyAV writes and reads the videos
    from stpcore.models import STPrivacy, STPrivacyConfig, save_anonymizer

    torch.manual_seed(0)
    save_anonymizer(STPrivacy(STPrivacyConfig.from_name("tiny")).eval(), tmp_path / "m.pt", classes=["a", "b"])
    frames = (np.random.default_rng(0).random((9, 40, 40, 3)) * 255).astype(np.uint8)
    srcs = [str(media.write_video(tmp_path / f"{n}.mp4", frames, fps=8)) for n in ("a", "b", "c")]
    out = tmp_path / "out"
    read_out, write_out = os.pipe()
    read_err, write_err = os.pipe()
    os.close(read_out)  # both readers gone before the command writes anything
    os.close(read_err)
    env = {**os.environ, "STPCORE_DEBUG": "0", "OMP_NUM_THREADS": "1"}
    try:
        run = subprocess.run([sys.executable, "-m", "stpcore", "anonymize", *srcs, "-o", str(out), "--checkpoint",
                              str(tmp_path / "m.pt"), "--precision", "fp32", "--device", "cpu"],
                             stdout=write_out, stderr=write_err, env=env, timeout=300)
    finally:
        os.close(write_out)
        os.close(write_err)
    assert run.returncode == 0
    assert sorted(p.name for p in out.glob("*.anonymized.mp4")) == [f"{n}.anonymized.mp4" for n in "abc"]
    assert len(list(out.glob("*.keep.npz"))) == 3


def test_the_console_guard_is_removed_after_the_command(capsys):
    """main() wraps sys.stdout / sys.stderr only while a command runs (in-process callers, tests, get theirs back)
    and the output still reaches them."""
    before = sys.stdout, sys.stderr
    assert main(["info"]) == 0
    assert (sys.stdout, sys.stderr) == before
    assert "stpcore" in capsys.readouterr().out


def test_the_console_guard_sends_a_closed_pipe_to_devnull():
    """The guard itself, on a real pipe whose reader is closed: writes, lines and flushes go on without an error, and
    so does closing the stream (the interpreter's last flush at exit), which would raise BrokenPipeError without it."""
    from stpcore.cli import _Console

    read, write = os.pipe()
    os.close(read)
    stream = os.fdopen(write, "w")
    console = _Console(stream)
    assert console.write("x" * 200_000) == 200_000  # more than a pipe's buffer: the write itself meets the close
    console.writelines(["a\n", "b\n"])
    console.flush()
    print("after", file=console, flush=True)
    console.write("left in the buffer\n")
    stream.close()  # its last flush (the interpreter's at exit) reaches os.devnull; without the guard it raises
