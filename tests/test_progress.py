"""Progress output: a plain line per task when the stream is not a terminal (logs), a tqdm bar on a terminal."""

from __future__ import annotations

import io

from stpcore.progress import LineProgress, progress
from stpcore.testing import RandomClipLoader
from stpcore.training import TrainConfig, Trainer


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_line_progress_prints_once_per_task_and_every_n():
    out = io.StringIO()
    bar = progress(10, "phase1 epoch 1/2", file=out, every=4)
    assert isinstance(bar, LineProgress)
    for _ in range(10):
        bar.update(1)
        bar.set_postfix(loss="0.500")
    bar.close()
    bar.close()  # a second close prints nothing more
    lines = out.getvalue().splitlines()
    assert [line.split(" in ")[0] for line in lines] == ["phase1 epoch 1/2: 4/10", "phase1 epoch 1/2: 8/10",
                                                         "phase1 epoch 1/2: 10/10"]
    assert lines[-1].endswith("loss=0.500") and "\r" not in out.getvalue()


def test_a_terminal_gets_a_redrawn_bar():
    tty = _Tty()
    bar = progress(3, "synth", file=tty)
    assert not isinstance(bar, LineProgress)  # tqdm
    for _ in range(3):
        bar.update(1)
    bar.close()
    assert "\r" in tty.getvalue()


def test_training_log_has_one_line_per_epoch_off_a_terminal(tmp_path, capsys):
    cfg = TrainConfig(data_root="unused", out_dir=str(tmp_path), preset="tiny", batch_size=2, phase1_epochs=2,
                      phase2_epochs=1, progress=True, checkpoint_every=0, warmup_epochs=0.5)
    Trainer(cfg, RandomClipLoader(3, 2, 8, 32)).fit()
    err = capsys.readouterr().err
    assert "\r" not in err
    epochs = [line for line in err.splitlines() if " epoch " in line and ": 3/3 in " in line]
    assert [line.split(":")[0] for line in epochs] == ["phase1 epoch 1/2", "phase1 epoch 2/2", "phase2 epoch 1/1"]
