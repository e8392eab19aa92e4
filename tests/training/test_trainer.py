"""Training: schedule, optimizer groups, phases 1-2, exact resume, NaN guard, signals, exported model."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch

from stpcore.models import STPrivacy, STPrivacyConfig, load_anonymizer
from stpcore.runtime import lr_factor, param_groups
from stpcore.testing import RandomClipLoader, StopAfter
from stpcore.training import TrainConfig, Trainer, TrainingDiverged, TrainingInterrupted


def _cfg(tmp_path, **kw):
    base = dict(data_root="unused", out_dir=str(tmp_path / "run"), preset="tiny", batch_size=4, phase1_epochs=2,
                phase2_epochs=1, progress=False, checkpoint_every=0, base_lr=0.2, warmup_epochs=0.5,
                deterministic=True)
    base.update(kw)
    return TrainConfig(**base)


def _loader():
    return RandomClipLoader(num_batches=3, batch_size=4, num_frames=8, size=32)


def test_a_checkpoint_that_cannot_be_written_stops_the_command_with_a_clear_error(tmp_path, monkeypatch, capsys):
    """A real failure, not a stand-in: last.pt is a folder, so renaming the written checkpoint into place fails."""
    from stpcore.cli import main

    monkeypatch.setattr(Trainer, "_default_loader", lambda self: RandomClipLoader(2, 2, 8, 32))
    (tmp_path / "run" / "last.pt").mkdir(parents=True)
    code = main(["train", "--data-root", "unused", "--out-dir", str(tmp_path / "run"), "--preset", "tiny",
                 "--batch-size", "2", "--phase1-epochs", "1", "--phase2-epochs", "0", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 1 and "error: could not write" in err and str(tmp_path / "run" / "last.pt") in err, err
    assert "Traceback" not in err and not list((tmp_path / "run").glob(".last.*"))  # no temporary file left
    assert not (tmp_path / "run" / "stprivacy.pt").exists()  # the run did not go on to export


def test_an_export_to_a_full_disk_is_a_write_failure_not_a_crash(tmp_path, monkeypatch):
    """torch.save to a path turns a full disk into a RuntimeError ("unexpected pos"); through a file object it is the
    OSError the run reports. The export goes to /dev/full here, through the real torch.save."""
    import contextlib

    from stpcore.models import checkpoints
    from stpcore.training import MainWriteFailed

    atomic_path = checkpoints.atomic_path

    @contextlib.contextmanager
    def full(path):  # the export only (checkpoints are written through the same helper)
        if Path(path).name != "stprivacy.pt":
            with atomic_path(path) as tmp:
                yield tmp
        else:
            yield Path("/dev/full")

    monkeypatch.setattr(checkpoints, "atomic_path", full)
    trainer = Trainer(_cfg(tmp_path, phase1_epochs=1, phase2_epochs=0), RandomClipLoader(2, 4, 8, 32))
    with pytest.raises(MainWriteFailed, match=r"could not write .*stprivacy.pt \(\[Errno 28\] No space left"):
        trainer.fit()
    assert (tmp_path / "run" / "last.pt").is_file()  # the checkpoint before the export is intact


def test_no_checkpoint_follows_a_metrics_line_that_could_not_be_written(tmp_path):
    """The checkpoint due at the step whose log line failed would hold that step, and a resume would never log it."""
    from stpcore.training import MainWriteFailed

    trainer = Trainer(_cfg(tmp_path, phase1_epochs=1, phase2_epochs=0, log_every=1, checkpoint_every=1),
                      RandomClipLoader(3, 4, 8, 32))
    append = trainer._append_metrics

    def full_at_step_2(record):
        if record.get("step") == 2:
            raise OSError(28, "No space left on device")
        append(record)

    trainer._append_metrics = full_at_step_2
    with pytest.raises(MainWriteFailed, match="metrics.jsonl"):
        trainer.fit()
    state = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    assert state["position"]["global_step"] == 1, state["position"]


def test_lr_schedule_warmup_then_cosine():
    assert lr_factor(0, 100, 10, 0.0) == pytest.approx(0.1)
    assert lr_factor(9, 100, 10, 0.0) == pytest.approx(1.0)
    assert lr_factor(10, 100, 10, 0.0) == pytest.approx(1.0)
    assert lr_factor(55, 100, 10, 0.0) == pytest.approx(0.5)
    assert lr_factor(100, 100, 10, 0.01) == pytest.approx(0.01)


def test_no_weight_decay_on_norms_biases_and_pos_embed():
    model = STPrivacy(STPrivacyConfig.from_name("tiny"))
    decay, no_decay = param_groups(model, 0.05)
    names = {id(p): n for n, p in model.named_parameters()}
    assert all(names[id(p)].endswith("weight") and p.ndim > 1 for p in decay["params"])
    no_decay_names = {names[id(p)] for p in no_decay["params"]}
    assert "pos_embed" in no_decay_names and "blocks.0.norm1.weight" in no_decay_names
    assert "blocks.0.attn.qkv.bias" in no_decay_names and no_decay["weight_decay"] == 0.0


def test_phases_run_log_and_export(tmp_path):
    trainer = Trainer(_cfg(tmp_path), _loader())
    history = trainer.fit()
    assert len(history["phase1"]) == 6 and len(history["phase2"]) == 3
    for rec in history["phase2"]:
        assert all(math.isfinite(rec[k]) for k in ("loss", "sparsity", "ce_action", "bce_privacy", "rec_ce_action"))
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert {r["phase"] for r in lines} == {"phase1", "phase2"}
    model = load_anonymizer(tmp_path / "run" / "stprivacy.pt")
    clip = torch.randn(1, 3, 8, 32, 32)
    with torch.no_grad():
        expected = trainer.anonymizer.eval()(clip).video
        assert torch.equal(model(clip).video, expected)


def test_a_model_without_phase2_updates_warns_when_loaded(tmp_path):
    """Phase 1 alone (--phase2-epochs 0, or phase 2 all recognizer warm-up) leaves the reconstruction head untrained:
    its deployed model outputs no anonymized video, which loading it says (it was silent); a trained one does not."""
    import warnings

    for name, kw, warned in [("p1", dict(phase1_epochs=1, phase2_epochs=0), True),
                             ("warm", dict(phase1_epochs=1, phase2_epochs=1, recognizer_warmup_epochs=1), True),
                             ("both", dict(phase1_epochs=1, phase2_epochs=1), False),
                             ("fitted", dict(phase1_epochs=1, phase2_epochs=1, recognizer_warmup_epochs=1,
                                             decoder_init="lstsq"), False)]:  # the warm-up, but a fitted head
        Trainer(_cfg(tmp_path / name, **kw), _loader()).fit()
        for file in ("stprivacy.pt", "last.pt"):
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                load_anonymizer(tmp_path / name / "run" / file)
            said = [w for w in caught if "no phase-2 training" in str(w.message)]
            assert bool(said) == warned, (name, file, [str(w.message) for w in caught])


def test_phase1_loss_falls(tmp_path):
    cfg = _cfg(tmp_path, phase1_epochs=6, phase2_epochs=0, base_lr=0.5)
    history = Trainer(cfg, RandomClipLoader(num_batches=4, batch_size=8, num_frames=8, size=32)).fit()
    ce = [r["ce_action"] for r in history["phase1"]]
    assert sum(ce[-4:]) / 4 < 0.7 * sum(ce[:4]) / 4, ce


@pytest.mark.parametrize("stop_after", [2, 7], ids=["mid-phase1-epoch", "mid-phase2"])
def test_resume_reproduces_uninterrupted_run(tmp_path, stop_after):
    full = Trainer(_cfg(tmp_path / "a"), _loader()).fit()
    losses = [r["loss"] for p in ("phase1", "phase2") for r in full[p]]

    wrapped = StopAfter(_loader(), stop_after)
    first = Trainer(_cfg(tmp_path / "b"), wrapped)
    wrapped.trainer = first
    with pytest.raises(TrainingInterrupted, match="--resume"):
        first.fit()
    done = [r["loss"] for p in ("phase1", "phase2") for r in first.history[p]]
    second = Trainer(_cfg(tmp_path / "b"), _loader()).fit(resume=tmp_path / "b" / "run" / "last.pt")
    rest = [r["loss"] for p in ("phase1", "phase2") for r in second[p]]
    assert done + rest == losses


def test_a_killed_runs_resume_logs_each_step_once(tmp_path):
    """A run killed (no signal handler, no last checkpoint) after logging steps its last checkpoint does not hold:
    the resumed run trains those steps again, and metrics.jsonl has each once, as an uninterrupted run's has."""

    class Killed(RandomClipLoader):
        def __iter__(self):
            for i, batch in enumerate(super().__iter__()):
                if self.epoch == 1 and i == 2:
                    raise RuntimeError("killed")  # after step 5 was logged; the checkpoint holds step 4
                yield batch

    def steps(run):
        lines = [json.loads(x) for x in (tmp_path / run / "run" / "metrics.jsonl").read_text().splitlines()]
        return [(r["step"], r["loss"]) for r in lines if "loss" in r]

    Trainer(_cfg(tmp_path / "a", checkpoint_every=2, log_every=1), _loader()).fit()
    with pytest.raises(RuntimeError, match="killed"):
        Trainer(_cfg(tmp_path / "b", checkpoint_every=2, log_every=1), Killed(3, 4, 8, 32)).fit()
    assert [s for s, _ in steps("b")] == [1, 2, 3, 4, 5]
    Trainer(_cfg(tmp_path / "b", checkpoint_every=2, log_every=1), _loader()).fit(
        resume=tmp_path / "b" / "run" / "last.pt")
    assert steps("b") == steps("a") and [s for s, _ in steps("a")] == list(range(1, 10))


def test_a_resume_into_another_out_dir_brings_the_saved_runs_log_and_candidates(tmp_path):
    """A checkpoint resumed into another folder: its metrics.jsonl (as far as the checkpoint holds it) and its
    model-selection candidates come along, so the new folder holds the whole run, as an uninterrupted run's does;
    a folder that holds another run is refused unless --overwrite."""
    kw = dict(phase2_epochs=3, candidate_every=1, log_every=1)

    def lines(folder):
        return [json.loads(x) for x in (folder / "metrics.jsonl").read_text().splitlines()]

    Trainer(_cfg(tmp_path / "a", **kw), _loader()).fit()
    wrapped = StopAfter(_loader(), 11)  # phase 2, epoch 2 (of 3), after its first candidate was exported
    first = Trainer(_cfg(tmp_path / "b", **kw), wrapped)
    wrapped.trainer = first
    with pytest.raises(TrainingInterrupted):
        first.fit()
    assert [p.name for p in (tmp_path / "b/run/candidates").iterdir()] == ["phase2-epoch001.pt"]
    moved = _cfg(tmp_path / "c", **kw)
    Trainer(moved, _loader()).fit(resume=tmp_path / "b" / "run" / "last.pt")

    full, resumed = lines(tmp_path / "a/run"), lines(tmp_path / "c/run")
    assert [(r.get("step"), r.get("loss")) for r in resumed] == [(r.get("step"), r.get("loss")) for r in full]
    assert sorted(p.name for p in (tmp_path / "c/run/candidates").iterdir()) == [
        f"phase2-epoch00{e}.pt" for e in (1, 2, 3)]
    carried, saved = (load_anonymizer(tmp_path / f"{r}/run/candidates/phase2-epoch001.pt").state_dict() for r in "ab")
    assert all(torch.equal(carried[k], saved[k]) for k in saved)
    with pytest.raises(ValueError, match="holds an earlier run .*--overwrite"):  # c now holds a run of its own
        Trainer(moved, _loader()).fit(resume=tmp_path / "b" / "run" / "last.pt")


@pytest.mark.parametrize("saved_every,now_every", [(1, 2), (2, 1)])
def test_a_moved_resume_with_another_candidate_every_carries_the_saved_runs_candidates(tmp_path, saved_every,
                                                                                      now_every):
    """The candidates carried into the new folder are those the saved run exported by its own candidate_every (a
    changed value applies to the epochs after the checkpoint, as in a resume in place): none is dropped, and
    none is reported missing that the saved run never made."""
    wrapped = StopAfter(_loader(), 11)  # phase 2, epoch 2 (of 3)
    first = Trainer(_cfg(tmp_path / "b", phase2_epochs=3, candidate_every=saved_every), wrapped)
    wrapped.trainer = first
    with pytest.raises(TrainingInterrupted):
        first.fit()
    made = sorted(p.name for p in (tmp_path / "b/run/candidates").glob("*.pt"))
    assert made == (["phase2-epoch001.pt"] if saved_every == 1 else [])
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*lacks the candidates")
        Trainer(_cfg(tmp_path / "c", phase2_epochs=3, candidate_every=now_every), _loader()).fit(
            resume=tmp_path / "b" / "run" / "last.pt")
    later = [e for e in (2, 3) if e % now_every == 0 or e == 3]
    assert sorted(p.name for p in (tmp_path / "c/run/candidates").glob("*.pt")) == sorted(
        made + [f"phase2-epoch00{e}.pt" for e in later])


@pytest.mark.parametrize("validation", [0.0, 0.2], ids=["no-validation-warns", "validation-refuses"])
def test_a_resume_on_other_training_videos_is_said_or_refused(tmp_path, validation):
    """The checkpoint records which videos trained (after the validation part is held out). Resumed on others (a
    validation part drawn by another rule, a changed dataset), a run with a validation part would train on videos
    the selection holds out: refused; without one, warned."""
    from types import SimpleNamespace

    def listing(ids):
        loader = _loader()
        loader.records = [SimpleNamespace(video_id=v) for v in ids]
        return loader

    first = Trainer(_cfg(tmp_path, checkpoint_every=1, validation=validation), listing(["a/1", "a/2", "b/1"]))
    first.fit()
    resume = lambda ids: Trainer(_cfg(tmp_path, validation=validation), listing(ids)).load_checkpoint(  # noqa: E731
        tmp_path / "run" / "last.pt")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        resume(["b/1", "a/2", "a/1"])  # the same videos, listed in another order: nothing to say
    if validation:
        with pytest.raises(ValueError, match="videos it trains on differ .* held out for model selection"):
            resume(["a/1", "a/3", "b/1"])
    else:
        with pytest.warns(RuntimeWarning, match="videos it trains on differ"):
            resume(["a/1", "a/3", "b/1"])


def test_recognizer_warmup_freezes_stprivacy_then_plays(tmp_path):
    trainer = Trainer(_cfg(tmp_path, phase1_epochs=1, phase2_epochs=2, recognizer_warmup_epochs=1), _loader())
    weights = {}  # STPrivacy's weights at the start of each epoch

    class Snap(RandomClipLoader):
        def __iter__(self):
            weights.setdefault((trainer.phase, trainer.epoch), {k: v.clone() for k, v in
                                                                 trainer.anonymizer.state_dict().items()})
            yield from super().__iter__()

    trainer.loader = Snap(3, 4, 8, 32)
    trainer.fit()
    final = trainer.anonymizer.state_dict()
    warm, game = weights[("phase2", 0)], weights[("phase2", 1)]
    assert all(torch.equal(warm[k], game[k]) for k in warm), "STPrivacy changed during the recognizer warm-up"
    assert any(not torch.equal(game[k], final[k]) for k in game), "STPrivacy did not train after the warm-up"
    assert trainer.sched["phase2"].last_epoch == 3  # its schedule spans only the game's steps


@pytest.mark.parametrize("stop_after", [10], ids=["after-a-restart"])
def test_privacy_restarts_are_seeded_and_resume_exactly(tmp_path, stop_after):
    kw = dict(phase1_epochs=1, phase2_epochs=4, recognizer_warmup_epochs=1, privacy_restart_every=1)
    full = Trainer(_cfg(tmp_path / "a", **kw), _loader())
    history = full.fit()
    losses = [r["loss"] for p in ("phase1", "phase2") for r in history[p]]
    events = [json.loads(x) for x in (tmp_path / "a" / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [e["epoch"] for e in events if e.get("event") == "privacy recognizer restarted"] == [2, 3]

    wrapped = StopAfter(_loader(), stop_after)
    first = Trainer(_cfg(tmp_path / "b", **kw), wrapped)
    wrapped.trainer = first
    with pytest.raises(TrainingInterrupted):
        first.fit()
    done = [r["loss"] for p in ("phase1", "phase2") for r in first.history[p]]
    second = Trainer(_cfg(tmp_path / "b", **kw), _loader())
    resumed = second.fit(resume=tmp_path / "b" / "run" / "last.pt")
    rest = [r["loss"] for p in ("phase1", "phase2") for r in resumed[p]]
    assert done + rest == losses
    state = second.privacy_rec.state_dict()
    assert all(torch.equal(v, full.privacy_rec.state_dict()[k]) for k, v in state.items())


def _reconstruction_mse(model, loader) -> float:
    from stpcore.tubelets import to_tubelets

    model.eval()
    errors = []
    with torch.no_grad():
        for batch in loader:
            out = model(batch.clips)
            pixels = model.cfg.tubelet_dim
            decoded = to_tubelets(out.video, model.cfg.tubelet).gather(1, out.kept_positions[..., None].expand(
                -1, -1, pixels))
            target = to_tubelets(batch.clips, model.cfg.tubelet).gather(1, out.kept_positions[..., None].expand(
                -1, -1, pixels))
            errors.append(((decoded - target) ** 2).mean())
    return float(torch.stack(errors).mean())


def test_decoder_init_lstsq_fits_the_reconstruction_head_only(tmp_path):
    loader = RandomClipLoader(num_batches=3, batch_size=4, num_frames=8, size=32)
    results = {}
    for init in ("random", "lstsq"):
        trainer = Trainer(_cfg(tmp_path / init, phase1_epochs=1, phase2_epochs=0, decoder_init=init), loader)
        trainer.fit()
        results[init] = trainer.anonymizer
    random_model, fitted = results["random"], results["lstsq"]
    for name, value in fitted.state_dict().items():
        same = torch.equal(value, random_model.state_dict()[name])
        assert same != name.startswith("head_recon."), name  # only the reconstruction head differs
    # The ridge decoder reconstructs the kept tubelets of its training clips better than the random one.
    assert _reconstruction_mse(fitted, loader) < 0.9 * _reconstruction_mse(random_model, loader)
    events = [json.loads(x) for x in (tmp_path / "lstsq" / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [e["clips"] for e in events if e.get("event") == "decoder fitted (lstsq)"] == [12]


@pytest.mark.parametrize("stop_after", [6, 7], ids=["end-of-phase1", "mid-phase2"])
def test_resume_with_lstsq_decoder(tmp_path, stop_after):
    full = Trainer(_cfg(tmp_path / "a", decoder_init="lstsq"), _loader())
    history = full.fit()
    losses = [r["loss"] for p in ("phase1", "phase2") for r in history[p]]
    wrapped = StopAfter(_loader(), stop_after)
    first = Trainer(_cfg(tmp_path / "b", decoder_init="lstsq"), wrapped)
    wrapped.trainer = first
    with pytest.raises(TrainingInterrupted):
        first.fit()
    done = [r["loss"] for p in ("phase1", "phase2") for r in first.history[p]]
    second = Trainer(_cfg(tmp_path / "b", decoder_init="lstsq"), _loader())
    resumed = second.fit(resume=tmp_path / "b" / "run" / "last.pt")
    assert done + [r["loss"] for p in ("phase1", "phase2") for r in resumed[p]] == losses
    assert torch.equal(second.anonymizer.head_recon.weight, full.anonymizer.head_recon.weight)


def test_a_signal_during_the_lstsq_fit_stops_before_phase2_steps(tmp_path):
    """SIGTERM while the decoder fit reads its second batch (phase 1: 6 batches): the fit stops there and the run
    checkpoints and stops before any phase-2 step (it fitted on, then trained a step first); the resume fits and
    trains as an uninterrupted run."""
    full = Trainer(_cfg(tmp_path / "a", decoder_init="lstsq"), _loader())
    history = full.fit()
    losses = [r["loss"] for p in ("phase1", "phase2") for r in history[p]]
    wrapped = StopAfter(_loader(), 8)
    first = Trainer(_cfg(tmp_path / "b", decoder_init="lstsq"), wrapped)
    wrapped.trainer = first
    with pytest.raises(TrainingInterrupted, match="during the lstsq decoder fit: checkpoint written"):
        first.fit()
    assert wrapped.seen == 8 and first.history["phase2"] == []
    second = Trainer(_cfg(tmp_path / "b", decoder_init="lstsq"), _loader())
    resumed = second.fit(resume=tmp_path / "b" / "run" / "last.pt")
    assert [r["loss"] for p in ("phase1", "phase2") for r in first.history[p] + resumed[p]] == losses
    assert torch.equal(second.anonymizer.head_recon.weight, full.anonymizer.head_recon.weight)


def test_tensorboard_events_are_not_merged_across_runs_or_repeated_on_resume(tmp_path, monkeypatch):
    """A fresh run (--overwrite) starts its events anew (TensorBoard merged the replaced run's under the same tags
    and steps), and a resume purges the steps logged after its checkpoint (they showed twice). TensorBoard is not
    installed here: a stand-in SummaryWriter records what it is given."""
    import sys
    import types

    made = []

    class Writer:
        def __init__(self, log_dir, purge_step=None):
            made.append(purge_step)
            os.makedirs(log_dir, exist_ok=True)
            with open(os.path.join(log_dir, f"events.{len(made)}"), "w"):
                pass

        def add_scalar(self, *args):
            pass

        def flush(self):
            pass

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", types.SimpleNamespace(SummaryWriter=Writer))
    wrapped = StopAfter(_loader(), 4)
    first = Trainer(_cfg(tmp_path), wrapped)
    wrapped.trainer = first
    with pytest.raises(TrainingInterrupted):
        first.fit()
    Trainer(_cfg(tmp_path), _loader()).fit(resume=tmp_path / "run" / "last.pt")
    assert made == [None, 5]  # the checkpoint holds 4 steps: events from step 5 on are purged
    Trainer(_cfg(tmp_path), _loader()).fit(overwrite=True)
    assert sorted(p.name for p in (tmp_path / "run" / "tensorboard").iterdir()) == ["events.3"]


class _AllVideosFail(RandomClipLoader):
    """A loader that promises batches but yields none (every video skipped as undecodable)."""

    def __iter__(self):
        return iter(())


def test_decoder_init_lstsq_without_batches_warns_and_keeps_the_head(tmp_path):
    trainer = Trainer(_cfg(tmp_path, phase1_epochs=0, phase2_epochs=0, decoder_init="lstsq"),
                      _AllVideosFail(num_batches=2, batch_size=4, num_frames=8, size=32))
    before = trainer.anonymizer.head_recon.weight.clone()
    with pytest.warns(RuntimeWarning, match="no batches"):
        trainer.fit()
    assert torch.equal(trainer.anonymizer.head_recon.weight, before)


def test_sparsity_weight_scales_the_sparsity_term(tmp_path):
    history = Trainer(_cfg(tmp_path, phase1_epochs=1, sparsity_weight=7.0), _loader()).fit()
    for rec in history["phase1"]:
        assert rec["loss"] == pytest.approx(7.0 * rec["sparsity"] + rec["ce_action"], rel=1e-5)
    for rec in history["phase2"]:
        expected = 7.0 * rec["sparsity"] + 0.5 * rec["ce_action"] - 0.5 * rec["bce_privacy"]
        assert rec["loss"] == pytest.approx(expected, rel=1e-5, abs=1e-6)


def test_warmup_and_restart_validation(tmp_path):
    with pytest.raises(ValueError, match="recognizer_warmup_epochs"):
        _cfg(tmp_path, phase2_epochs=2, recognizer_warmup_epochs=3)
    with pytest.raises(ValueError, match="privacy_restart_every"):
        _cfg(tmp_path, privacy_restart_every=-1)
    with pytest.raises(ValueError, match="decoder_init"):
        _cfg(tmp_path, decoder_init="pca")
    with pytest.raises(ValueError, match="privacy_objective"):
        _cfg(tmp_path, privacy_objective="kl")
    with pytest.raises(ValueError, match="must be >= 0"):
        _cfg(tmp_path, min_lr_ratio=-0.5)
    with pytest.raises(ValueError, match=r"min_lr_ratio .* must be in \[0, 1\]"):  # the lr would rise as it "decays"
        _cfg(tmp_path, min_lr_ratio=2.0)


def test_privacy_objective_entropy_enters_the_anonymizer_loss(tmp_path):
    history = Trainer(_cfg(tmp_path, phase1_epochs=0, privacy_objective="entropy"), _loader()).fit()
    for rec in history["phase2"]:
        term = (rec["sparsity"] + 0.5 * rec["ce_action"] - rec["loss"]) / 0.5
        assert 0 < term <= math.log(2) + 1e-6  # an entropy, not the BCE (which can exceed ln 2)
        assert term == pytest.approx(rec["privacy_term"], rel=1e-4)


def test_nan_guard_stops_with_checkpoint(tmp_path):
    """A finite input that overflows inside the model (the input check lets it through) makes the loss
    NaN/Inf: the run stops with TrainingDiverged and a checkpoint of the weights before that step."""
    class OverflowLoader(RandomClipLoader):
        def __iter__(self):
            for i, b in enumerate(super().__iter__()):
                if i == 1:
                    b.clips *= 1e30
                    self.before = {k: v.clone() for k, v in trainer.anonymizer.state_dict().items()}
                yield b

    loader = OverflowLoader(3, 4, 8, 32)
    trainer = Trainer(_cfg(tmp_path), loader)
    with pytest.raises(TrainingDiverged, match="loss became NaN/Inf at phase1 epoch 0 step 1"):
        trainer.fit()
    saved = list((tmp_path / "run").glob("diverged-step*.pt"))
    assert len(saved) == 1
    weights = torch.load(saved[0], weights_only=True)["models"]["anonymizer"]
    assert all(torch.equal(weights[k], loader.before[k]) for k in loader.before)


class _BadPixelLoader(RandomClipLoader):
    """RandomClipLoader whose second batch carries ``value`` (NaN or Inf) at ``where`` in its clips."""

    def __init__(self, where: tuple[int, ...], value: float, *args) -> None:
        super().__init__(*args)
        self.where, self.value = where, value

    def __iter__(self):
        for i, b in enumerate(super().__iter__()):
            if i == 1:
                b.clips[self.where] = self.value
            yield b


@pytest.mark.parametrize("phase", ["phase1", "phase2"])
def test_a_batch_with_nan_clips_is_refused_at_the_boundary_naming_its_videos(tmp_path, phase):
    """The models' own value checks are off in training (no host sync inside them); the trainer checks each
    batch once and names the batch's videos."""
    cfg = _cfg(tmp_path, **({"phase2_epochs": 0} if phase == "phase1" else {"phase1_epochs": 0}))
    trainer = Trainer(cfg, _BadPixelLoader((2, 0, 0, 0, 0), float("nan"), 3, 4, 8, 32))
    assert not any(m.validate for m in (trainer.anonymizer, trainer.action_rec, trainer.privacy_rec))
    with pytest.raises(ValueError, match=r"video \(a batch of .+/v4, .+/v5, .+/v6, \.\.\.\) contains NaN or Inf"):
        trainer.fit()


def test_a_nan_batch_is_refused_by_the_decoder_fit_too(tmp_path):
    """decoder_init='lstsq' reads a pass of the data through the anonymizer (whose own check is off): a NaN clip
    stops the fit with the model's message instead of poisoning the least-squares solve."""
    trainer = Trainer(_cfg(tmp_path, phase1_epochs=0, decoder_init="lstsq"),
                      _BadPixelLoader((0, 1, 2, 3, 4), float("inf"), 3, 4, 8, 32))
    with pytest.raises(ValueError, match="video contains NaN or Inf values"):
        trainer.fit()


def test_config_file_and_flag_overrides(tmp_path):
    from stpcore.cli import build_parser
    from stpcore.config import dataclass_from_args

    path = tmp_path / "c.json"
    path.write_text(json.dumps({"data_root": "d", "out_dir": "o", "batch_size": 8, "preset": "tiny"}))
    args = build_parser().parse_args(["train", "--config", str(path), "--batch-size", "2", "--no-progress"])
    cfg = dataclass_from_args(TrainConfig, args)
    assert (cfg.batch_size, cfg.preset, cfg.seed, cfg.progress) == (2, "tiny", 0, False)
    path.write_text(json.dumps({"data_root": "d", "out_dir": "o", "bogus": 1}))
    with pytest.raises(ValueError, match="bogus"):
        dataclass_from_args(TrainConfig, build_parser().parse_args(["train", "--config", str(path)]))
    with pytest.raises(ValueError, match="--data-root"):
        dataclass_from_args(TrainConfig, build_parser().parse_args(["train", "--out-dir", "o"]))


def test_load_anonymizer_rejects_other_files(tmp_path):
    torch.save({"weights": torch.zeros(1)}, tmp_path / "x.pt")
    with pytest.raises(ValueError, match="not an stpcore"):
        load_anonymizer(tmp_path / "x.pt")


def test_tensorboard_scalars_when_installed(tmp_path, monkeypatch):
    import sys
    import types

    calls = []

    class FakeWriter:
        def __init__(self, log_dir, purge_step=None):
            calls.append(("dir", log_dir))

        def add_scalar(self, tag, value, step):
            calls.append((tag, value, step))

        def flush(self):
            calls.append(("flush",))

    fake = types.ModuleType("torch.utils.tensorboard")
    fake.SummaryWriter = FakeWriter
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", fake)
    Trainer(_cfg(tmp_path, phase1_epochs=1, phase2_epochs=1, log_every=1), _loader()).fit()
    assert calls[0] == ("dir", str(tmp_path / "run" / "tensorboard"))
    tags = {c[0] for c in calls[1:] if len(c) == 3}
    assert {"phase1/loss", "phase1/sparsity", "phase2/bce_privacy"} <= tags
    assert calls[-1] == ("flush",)


def test_phase2_without_labels_is_refused():
    with pytest.raises(ValueError, match="phase 2 needs privacy labels"):
        Trainer(TrainConfig(data_root="unused", out_dir="unused", preset="tiny", phase2_epochs=1))


@pytest.mark.parametrize("field", ["privacy_weight", "action_weight", "clip_grad", "checkpoint_every"])
def test_negative_settings_are_refused(tmp_path, field):
    with pytest.raises(ValueError, match=field):
        _cfg(tmp_path, **{field: -1})


def test_epoch_without_privacy_labels_warns(tmp_path):
    class Unlabelled(RandomClipLoader):
        def __iter__(self):
            for b in super().__iter__():
                b.has_privacy[:] = False
                yield b

    with pytest.warns(RuntimeWarning, match="no clip with privacy labels"):
        Trainer(_cfg(tmp_path, phase1_epochs=0), Unlabelled(2, 4, 8, 32)).fit()


def test_non_finite_gradient_stops_before_the_step(tmp_path):
    trainer = Trainer(_cfg(tmp_path, phase2_epochs=0), _loader())
    before = {k: v.clone() for k, v in trainer.anonymizer.state_dict().items()}
    loss = trainer.anonymizer.pos_embed.sum() * float("inf")  # finite parameters, infinite gradient
    with pytest.raises(TrainingDiverged, match="gradient of the phase1 update"):
        trainer._update("phase1", loss, trainer.anonymizer)
    after = trainer.anonymizer.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # the bad step was not taken
    assert list((tmp_path / "run").glob("diverged-step*.pt"))


def test_a_recognizer_that_diverges_in_phase2_says_which_updates_the_saved_state_holds(tmp_path, monkeypatch):
    """The recognizers update after STPrivacy in a phase-2 step: the saved state holds that update, and the message
    said "before this step"."""
    from stpcore import losses as losses_module

    trainer = Trainer(_cfg(tmp_path, phase1_epochs=0), _loader())
    real = losses_module.action_loss
    calls = []

    def nan_for_the_recognizer(logits, actions):  # the first call is STPrivacy's own term, the second the recognizer's
        calls.append(1)
        value = real(logits, actions)
        return value * float("nan") if len(calls) == 2 else value

    monkeypatch.setattr(losses_module, "action_loss", nan_for_the_recognizer)
    with pytest.raises(TrainingDiverged, match="after this step's STPrivacy update, before the recognizers'"):
        trainer.fit()


def test_resume_refuses_another_schedule_and_warns_on_changed_settings(tmp_path):
    Trainer(_cfg(tmp_path, phase2_epochs=0), _loader()).fit()
    last = tmp_path / "run" / "last.pt"
    other = Trainer(_cfg(tmp_path, phase2_epochs=0), RandomClipLoader(num_batches=5, batch_size=4, num_frames=8,
                                                                       size=32))
    with pytest.raises(ValueError, match="3 steps per epoch on 1 process"):
        other.load_checkpoint(last)
    changed = Trainer(_cfg(tmp_path, phase2_epochs=0, base_lr=0.3), _loader())
    with pytest.warns(RuntimeWarning, match="base_lr"):
        changed.load_checkpoint(last)


def test_a_resume_runs_at_its_own_learning_rate_and_weight_decay(tmp_path):
    """Resumed with a 100x lower --base-lr (what the divergence message advises) and no weight decay, the
    optimizers run this run's schedule at the saved step, as a fresh run of these settings would there: the saved
    optimizer state carried the saved run's rates (the resumed lr stayed 100x too high)."""
    import warnings

    wrapped = StopAfter(_loader(), 4)
    first = Trainer(_cfg(tmp_path, phase2_epochs=0, phase1_epochs=4, base_lr=0.2, weight_decay=0.05), wrapped)
    wrapped.trainer = first
    with pytest.raises(TrainingInterrupted):
        first.fit()
    lower = _cfg(tmp_path, phase2_epochs=0, phase1_epochs=4, base_lr=0.002, weight_decay=0.0)
    resumed, fresh = Trainer(lower, _loader()), Trainer(lower, _loader())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # "resuming with changed settings"
        resumed.load_checkpoint(tmp_path / "run" / "last.pt")
    for name, opt in resumed.opt.items():
        sched = fresh.sched[name]
        for _ in range(resumed.sched[name].last_epoch):
            sched.optimizer.step()
            sched.step()
        assert [g["lr"] for g in opt.param_groups] == [g["lr"] for g in fresh.opt[name].param_groups], name
        assert [g["weight_decay"] for g in opt.param_groups] == [0.0] * len(opt.param_groups), name
        assert resumed.sched[name].get_last_lr() == fresh.sched[name].get_last_lr(), name
    assert resumed.sched["phase1"].last_epoch == 4 and resumed.opt["phase1"].param_groups[0]["lr"] > 0


def test_resume_refuses_data_with_other_action_classes(tmp_path):
    """data_root and labels may change on resume (the data moved), the action classes may not: the head's outputs
    would silently mean other classes."""
    Trainer(_cfg(tmp_path, phase2_epochs=0), _loader()).fit()
    last = tmp_path / "run" / "last.pt"
    renamed = _loader()
    renamed.classes = ["class0", "class1", "other"]
    with pytest.raises(ValueError, match=r"3 action classes, this run's data has 3 \(in one and not the other: "
                                         r"\['class2', 'other'\]\)"):
        Trainer(_cfg(tmp_path, phase2_epochs=0), renamed).load_checkpoint(last)
    reordered = _loader()
    reordered.classes = ["class1", "class0", "class2"]
    with pytest.raises(ValueError, match="the same names in another order"):
        Trainer(_cfg(tmp_path, phase2_epochs=0), reordered).load_checkpoint(last)
    Trainer(_cfg(tmp_path, phase2_epochs=0), _loader()).load_checkpoint(last)  # the same classes: fine


def test_phase2_step_equals_the_two_pass_alternating_update(tmp_path):
    """phase2_step equals the plain alternating scheme written out here: STPrivacy's update through frozen
    recognizers, then each recognizer on the detached video (the recognizers' losses must not reach
    STPrivacy, and STPrivacy's loss must not reach the recognizers)."""
    import copy

    from stpcore import losses

    trainer = Trainer(_cfg(tmp_path, phase1_epochs=0, privacy_objective="entropy"), _loader())
    batch = next(iter(_loader()))
    twin = copy.deepcopy(trainer)  # same weights, optimizer states and Gumbel generator
    trainer.phase2_step(batch)

    cfg, (anon, action, privacy) = twin.cfg, (twin.models[k] for k in ("anonymizer", "action", "privacy"))
    for m in (action, privacy):
        m.requires_grad_(False)
    out = anon(batch.clips, twin._gumbel_noise(batch.clips.shape[0]), classify=False)
    sparsity = losses.sparsity_loss(out.decisions, twin.model_cfg.keep_ratio, twin.model_cfg.num_slots)
    ce = losses.action_loss(action(out.video, out.keep, mode="policy"), batch.actions)
    term = losses.masked_privacy_entropy(privacy(out.video, out.keep, mode="policy"), batch.has_privacy)
    loss = losses.anonymizer_loss(sparsity, ce, term, action_weight=cfg.action_weight,
                                  privacy_weight=cfg.privacy_weight)
    twin.opt["phase2"].zero_grad()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(anon.parameters(), cfg.clip_grad)
    twin.opt["phase2"].step()
    for m in (action, privacy):
        m.requires_grad_(True)
    video, keep = out.video.detach(), out.keep.detach()
    for name, model, rec_loss in (
        ("action", action, lambda logits: losses.action_loss(logits, batch.actions)),
        ("privacy", privacy, lambda logits: losses.masked_privacy_loss(logits, batch.privacy, batch.has_privacy)),
    ):
        twin.opt[name].zero_grad()
        rec_loss(model(video, keep, mode="policy")).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_grad)
        twin.opt[name].step()
    for key in ("anonymizer", "action", "privacy"):
        ours, theirs = trainer.models[key].state_dict(), twin.models[key].state_dict()
        assert all(torch.equal(ours[n], theirs[n]) for n in ours), key


def test_real_sigterm_writes_a_checkpoint_and_restores_the_handlers(tmp_path):
    import os
    import signal

    class Kill(RandomClipLoader):
        def __iter__(self):
            for i, b in enumerate(super().__iter__()):
                yield b
                if i == 0 and self.epoch == 0:
                    os.kill(os.getpid(), signal.SIGTERM)  # arrives while the first step's metrics are logged

    before = signal.getsignal(signal.SIGTERM)
    trainer = Trainer(_cfg(tmp_path), Kill(3, 4, 8, 32))
    with pytest.raises(TrainingInterrupted, match="signal 15"):
        trainer.fit()
    assert signal.getsignal(signal.SIGTERM) is before
    state = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    assert state["position"]["global_step"] == trainer.global_step >= 1


@pytest.mark.parametrize("clip", [0.0, 1e-3])
def test_gradient_clipping_bounds_the_norm_the_optimizer_sees(tmp_path, clip):
    trainer = Trainer(_cfg(tmp_path, phase2_epochs=0, clip_grad=clip), _loader())
    model, opt = trainer.anonymizer, trainer.opt["phase1"]
    seen = []

    def record_norm(optimizer, args, kwargs):  # what the optimizer is about to apply
        seen.append(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters()
                                                          if p.grad is not None])).item())

    opt.register_step_pre_hook(record_norm)
    batch = next(iter(_loader()))
    out = model(batch.clips, trainer._gumbel_noise(4), reconstruct=False)
    returned = trainer._update("phase1", torch.nn.functional.cross_entropy(out.action_logits, batch.actions), model)
    assert returned > 1e-2  # the norm before clipping
    assert seen[0] == pytest.approx(returned, rel=1e-5) if clip == 0 else seen[0] <= clip * (1 + 1e-5)


def test_bf16_autocast_training_on_cpu(tmp_path):
    trainer = Trainer(_cfg(tmp_path, amp="bf16", phase1_epochs=1), _loader())
    dtypes = set()
    hook = trainer.anonymizer.blocks[0].mlp.fc1.register_forward_hook(lambda m, a, out: dtypes.add(out.dtype))
    history = trainer.fit()
    hook.remove()
    assert dtypes == {torch.bfloat16}
    assert all(math.isfinite(r["loss"]) for phase in history.values() for r in phase)


def test_an_epoch_in_which_every_video_is_skipped_stops_the_run(tmp_path):
    """A loader that promises batches but skips every video (H.264 with --decoder dali on a CPU) trained nothing
    and still exported its random weights as the trained model."""
    trainer = Trainer(_cfg(tmp_path), _AllVideosFail(num_batches=2, batch_size=4, num_frames=8, size=32))
    with pytest.raises(ValueError, match="phase1 epoch 0: no batch could be read; every video was skipped"):
        trainer.fit()
    assert not (tmp_path / "run" / "stprivacy.pt").exists()


def test_the_data_report_is_logged_per_epoch_beside_the_running_total(tmp_path):
    """A loader's report counts over the whole run; it was logged as if each epoch's."""
    from types import SimpleNamespace

    class Skips(RandomClipLoader):  # two videos skipped in every epoch
        def __init__(self, *args):
            super().__init__(*args)
            self.total = 0

        def __iter__(self):
            self.total += 2
            yield from super().__iter__()

        def report(self):
            return SimpleNamespace(counts={"unreadable": self.total})

    Trainer(_cfg(tmp_path, phase1_epochs=2, phase2_epochs=1), Skips(3, 4, 8, 32)).fit()
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    reports = [(r["data_report"], r["data_report_total"]) for r in lines if "data_report" in r]
    assert reports == [({"unreadable": 2}, {"unreadable": 2}), ({"unreadable": 2}, {"unreadable": 4}),
                       ({"unreadable": 2}, {"unreadable": 6})]


def test_a_loader_without_batches_is_refused_before_training(tmp_path):
    """batch_size above the videos a process sees (drop_last): no step would run and an untrained model
    would be exported as the result."""
    with pytest.raises(ValueError, match="yields no batch: batch_size 4"):
        Trainer(_cfg(tmp_path), RandomClipLoader(num_batches=0, batch_size=4, num_frames=8, size=32))
    assert not (tmp_path / "run" / "stprivacy.pt").exists()


def test_a_short_side_below_the_crop_is_refused():
    """A working scale smaller than the crop gave non-square clips (100 x 112) that failed much later."""
    from stpcore.data.loader import DataConfig
    from stpcore.data.preprocess import crop_normalize
    from stpcore.data.sampling import eval_clips

    with pytest.raises(ValueError, match=r"short_side \(100\) must be >= crop \(112\)"):
        DataConfig(root="x", short_side=100, crop=112)
    assert DataConfig(root="x", short_side=112, crop=112).short_side == 112
    with pytest.raises(ValueError, match="smaller than the 112x112 crop"):
        crop_normalize(torch.zeros(16, 3, 100, 133), eval_clips(16, 16, 1)[0], crop=112)


@pytest.mark.parametrize("config", [TrainConfig, "eval", "data"])
def test_stride_below_one_is_refused(config):
    from stpcore.data.loader import DataConfig
    from stpcore.evaluation import EvalConfig

    make = {TrainConfig: lambda: TrainConfig(data_root="x", out_dir="y", stride=0),
            "eval": lambda: EvalConfig(data_root="x", stride=0),
            "data": lambda: DataConfig(root="x", stride=0)}[config]
    with pytest.raises(ValueError, match="stride must be >= 1"):
        make()


def test_a_fresh_run_refuses_a_folder_with_an_earlier_run(tmp_path):
    """Without --resume, an earlier run's checkpoints are never replaced silently; --overwrite replaces them and
    starts metrics.jsonl anew (two runs never mix in one file)."""
    Trainer(_cfg(tmp_path, phase2_epochs=0), _loader()).fit()
    run = tmp_path / "run"
    before = {p: p.read_bytes() for p in (run / "last.pt", run / "stprivacy.pt", run / "metrics.jsonl")}
    with pytest.raises(ValueError, match="holds an earlier run .*--resume .*last.pt.*--overwrite"):
        Trainer(_cfg(tmp_path, phase2_epochs=0, seed=5), _loader()).fit()
    assert {p: p.read_bytes() for p in before} == before
    Trainer(_cfg(tmp_path, phase2_epochs=0, seed=5), _loader()).fit(overwrite=True)
    lines = (run / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == len(before[run / "metrics.jsonl"].decode().splitlines())  # this run's lines only
    assert (run / "stprivacy.pt").read_bytes() != before[run / "stprivacy.pt"]


@pytest.mark.parametrize("change", [{"privacy_adversaries": 2}, {"stats_adversary_weight": 0.5},
                                    {"model_overrides": {"depth": 5}}])
def test_resume_with_other_models_is_a_clear_error(tmp_path, change):
    Trainer(_cfg(tmp_path, phase1_epochs=1, phase2_epochs=0), _loader()).fit()
    other = Trainer(_cfg(tmp_path, phase1_epochs=1, phase2_epochs=0, **change), _loader())
    with pytest.raises(ValueError, match="its models differ from this run's: .*Resume with the settings"):
        other.fit(resume=tmp_path / "run" / "last.pt")


def test_a_finished_run_is_not_silently_extended(tmp_path):
    Trainer(_cfg(tmp_path, phase2_epochs=0), _loader()).fit()
    longer = Trainer(_cfg(tmp_path, phase2_epochs=2), _loader())
    with pytest.raises(ValueError, match="has finished, and a finished run cannot be extended"):
        longer.fit(resume=tmp_path / "run" / "last.pt")


_GROUP_SIGNAL_RUN = """
import sys
from stpcore.training import TrainConfig, Trainer, TrainingInterrupted
data, out = sys.argv[1], sys.argv[2]
cfg = TrainConfig(data_root=data, labels=data + "/vp_labels.csv", out_dir=out, preset="tiny", batch_size=2,
                  phase1_epochs=50, phase2_epochs=0, progress=False, checkpoint_every=0, workers=2,
                  decoder="pyav", log_every=1)
try:
    Trainer(cfg, device="cpu").fit()
except TrainingInterrupted as exc:
    print("INTERRUPTED", exc, flush=True)
    raise SystemExit(130)
"""


@pytest.mark.skipif(sys.platform != "linux", reason="process groups")
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_to_the_process_group_still_writes_the_checkpoint(tmp_path, signum):
    """torchrun, SLURM, systemd and Ctrl-C signal the whole process group, the PyAV loader's worker processes
    included: a worker killed by it made the loader raise before the trainer's handler could write its checkpoint
    (everything since the last periodic save was lost). The workers ignore the signal; the trainer stops at the
    step boundary with a checkpoint."""
    pytest.importorskip("av")
    from stpcore.data.synth import make_synthetic_dataset

    data, out = tmp_path / "data", tmp_path / "run"
    make_synthetic_dataset(data, videos=14, seed=0, width=64, height=48, frames=24)
    proc = subprocess.Popen([sys.executable, "-c", _GROUP_SIGNAL_RUN, str(data), str(out)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    deadline = time.time() + 120
    metrics = out / "metrics.jsonl"
    while not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 2):
        assert proc.poll() is None and time.time() < deadline, proc.communicate()[0][-3000:]
        time.sleep(0.2)
    os.killpg(proc.pid, signum)
    output = proc.communicate(timeout=120)[0]
    assert proc.returncode == 130 and "INTERRUPTED signal" in output, output[-3000:]
    state = torch.load(out / "last.pt", weights_only=True)
    assert state["position"]["global_step"] >= 1


def test_a_gpu_checkpoint_resumes_on_a_cpu(tmp_path):
    """A checkpoint saved on a GPU holds a CUDA noise-generator state (16 bytes: seed and offset), which a CPU
    generator cannot take (a size error before). The resumed run seeds its generator from it instead: it warns, and
    two resumes from the same checkpoint train alike."""
    wrapped = StopAfter(_loader(), 2)
    first = Trainer(_cfg(tmp_path / "a"), wrapped)
    wrapped.trainer = first
    with pytest.raises(TrainingInterrupted):
        first.fit()
    path = tmp_path / "a" / "run" / "last.pt"
    saved = torch.load(path, weights_only=True)
    cuda_like = torch.arange(16, dtype=torch.uint8)
    saved["noise_rng"], saved["noise_rng_per_rank"] = cuda_like, [cuda_like]
    torch.save(saved, path)
    losses = []
    for run in ("b", "c"):
        (tmp_path / run / "run").mkdir(parents=True)
        with pytest.warns(RuntimeWarning, match="another device type"):
            history = Trainer(_cfg(tmp_path / run), _loader()).fit(resume=path)
        losses.append([r["loss"] for p in ("phase1", "phase2") for r in history[p]])
    assert losses[0] == losses[1] and len(losses[0]) == 7


def test_cuda_rng_states_of_more_gpus_than_this_machine_has_restore_the_ones_it_has(monkeypatch):
    from stpcore.training.state import rng_state, set_rng_state

    state = rng_state()
    state["cuda"] = [torch.full((16,), i, dtype=torch.uint8) for i in range(4)]  # saved with 4 GPUs
    restored = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)  # this machine has 2
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda s, device: restored.append((int(s[0]), device)))
    set_rng_state(state)
    assert restored == [(0, 0), (1, 1)]


def test_overwrite_removes_the_replaced_runs_candidates_and_selection(tmp_path):
    """--overwrite replaces a run: its phase-2 candidates, their selection scores and selection.json (which named a
    model "deployed as stprivacy.pt" that is no longer there) go with it."""
    Trainer(_cfg(tmp_path, phase1_epochs=1, phase2_epochs=1), _loader()).fit()
    run = tmp_path / "run"
    (run / "candidates").mkdir()
    (run / "candidates" / "phase2-epoch001.pt").write_bytes(b"old")
    (run / "selection" / "raw").mkdir(parents=True)
    (run / "selection.json").write_text("{}")
    Trainer(_cfg(tmp_path, phase1_epochs=1, phase2_epochs=1), _loader()).fit(overwrite=True)
    assert not (run / "candidates").exists() and not (run / "selection").exists()
    assert not (run / "selection.json").exists() and (run / "stprivacy.pt").is_file()


def test_deterministic_mode_on_cuda_sets_the_cublas_workspace_and_warns_only(monkeypatch):
    """On CUDA, use_deterministic_algorithms(True) alone makes every cuBLAS matrix product raise (no fixed
    workspace) and stops the run at any op without a deterministic kernel; the CPU keeps the strict mode."""
    from stpcore.training.trainer import use_deterministic_algorithms

    calls = []
    monkeypatch.setattr(torch, "use_deterministic_algorithms", lambda mode, warn_only=False: calls.append(
        (mode, warn_only)))
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    use_deterministic_algorithms(torch.device("cpu"))
    assert calls == [(True, False)] and "CUBLAS_WORKSPACE_CONFIG" not in os.environ
    use_deterministic_algorithms(torch.device("cuda", 0))
    assert calls[-1] == (True, True) and os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":16:8")  # the user's own setting is kept
    use_deterministic_algorithms(torch.device("cuda", 0))
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":16:8"


class _EpochLog(RandomClipLoader):
    """Records every set_epoch call (the epoch decides the loader's order and random crops)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.epochs: list[int] = []

    def set_epoch(self, epoch: int) -> None:
        self.epochs.append(epoch)
        super().set_epoch(epoch)


def test_phase2_reads_new_orders_and_crops_not_phase1s_again(tmp_path):
    """The loader's epoch counts over the whole run: phase 2's epochs (and the decoder fit before them) follow phase
    1's, and the nullspace passes follow phase 2's. Phase 2 restarted at epoch 0, so each of its epochs replayed
    the order and crops of the phase-1 epoch of the same number."""
    loader = _EpochLog(num_batches=3, batch_size=4, num_frames=8, size=32)
    Trainer(_cfg(tmp_path, phase1_epochs=2, phase2_epochs=2, decoder_init="lstsq", privacy_nullspace=1),
            loader).fit()
    assert loader.epochs == [0, 1, 2, 2, 3, 4, 5]  # phase 1; the fit; phase 2; the two nullspace passes
