"""Phase-2 privacy options of issue 16: the statistics adversary, the colour-spread penalty, adversary ensembles."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from stpcore.media import IMAGENET_MEAN, IMAGENET_STD
from stpcore.testing import RandomClipLoader, StopAfter
from stpcore.training import TrainConfig, Trainer, TrainingInterrupted
from stpcore.training.adversaries import (
    COLOUR_BINS,
    StatsAdversary,
    colour_spread,
    kept_colour_statistics,
    worst_privacy_term,
)
from stpcore.training.phase2 import restart_target

TUBELET = (2, 8, 8)


def _normalise(rgb: torch.Tensor) -> torch.Tensor:
    """(B, 3, T, H, W) RGB in [0, 1] -> the recognizers' normalised input."""
    m = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1, 1)
    s = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1, 1)
    return (rgb - m) / s


def test_kept_colour_statistics_against_numpy_on_the_kept_pixels_only():
    g = torch.Generator().manual_seed(0)
    rgb = torch.rand(2, 3, 4, 16, 16, generator=g)
    keep = torch.zeros(2, 2 * 2 * 2)  # grid (2, 2, 2) of (2, 8, 8) tubelets
    keep[0, [0, 3, 5]] = 1
    keep[1, [1, 2, 6, 7]] = 1
    stats = kept_colour_statistics(_normalise(rgb), keep, TUBELET)
    assert stats.shape == (2, 3 * (2 + COLOUR_BINS))
    x = rgb.numpy()
    for b in range(2):
        mask = np.zeros((4, 16, 16), bool)
        for n in np.flatnonzero(keep[b].numpy()):
            t, h, w = n // 4, (n // 2) % 2, n % 2
            mask[2 * t:2 * t + 2, 8 * h:8 * h + 8, 8 * w:8 * w + 8] = True
        pixels = x[b][:, mask]  # (3, P)
        np.testing.assert_allclose(stats[b, :3].numpy(), pixels.mean(1), rtol=1e-4)
        np.testing.assert_allclose(stats[b, 3:6].numpy(), pixels.std(1), rtol=1e-3)
        centres = (np.arange(COLOUR_BINS) + 0.5) / COLOUR_BINS
        soft = np.exp(-0.5 * ((pixels[..., None] - centres) * COLOUR_BINS) ** 2).sum(1)  # (3, bins)
        np.testing.assert_allclose(stats[b, 6:].numpy(), (soft / soft.sum(1, keepdims=True)).ravel(), rtol=1e-4)
    # Pixels in dropped tubelets change nothing; kept ones carry a gradient.
    video = _normalise(rgb).requires_grad_(True)
    changed = video.detach().clone()
    changed[0, :, 2:4, 0:8, 0:8] += 5.0  # tubelet 4 of clip 0: dropped
    assert torch.allclose(kept_colour_statistics(changed, keep, TUBELET)[0], stats[0], atol=1e-6)
    kept_colour_statistics(video, keep, TUBELET).sum().backward()
    assert video.grad[0, :, 0:2, 0:8, 0:8].abs().sum() > 0 and video.grad[0, :, 2:4, 0:8, 0:8].abs().sum() == 0


def test_colour_spread_is_zero_only_when_the_clips_share_their_statistics():
    same = torch.rand(1, 30).expand(4, -1)
    assert colour_spread(same).item() == pytest.approx(0.0, abs=1e-9)
    differ = same.clone()
    differ[0, :3] += 0.3
    assert colour_spread(differ).item() > 1e-3
    assert colour_spread(torch.rand(1, 30)).item() == 0.0  # one clip: nothing to compare


def test_stats_adversary_learns_a_colour_attribute():
    """Dark vs light actors on a mid-grey background, a quarter of the frame: the adversary must read it."""
    torch.manual_seed(0)
    adversary = StatsAdversary(TUBELET, num_outputs=1)
    opt = torch.optim.Adam(adversary.parameters(), lr=1e-2)

    def batch(n=16):
        label = torch.randint(0, 2, (n,))
        rgb = torch.full((n, 3, 4, 16, 16), 0.5) + 0.05 * torch.randn(n, 3, 4, 16, 16)
        tone = torch.where(label.bool(), 0.2, 0.85).view(n, 1, 1, 1, 1)
        rgb[:, :, :, :8, :8] = tone + 0.05 * torch.randn(n, 3, 4, 8, 8)
        return _normalise(rgb.clamp(0, 1)), torch.ones(n, 8), label.float()[:, None]

    for _ in range(60):
        video, keep, label = batch()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(adversary(video, keep), label)
        opt.zero_grad()
        loss.backward()
        opt.step()
    adversary.eval()
    video, keep, label = batch(64)
    accuracy = ((adversary(video, keep) > 0).float() == label).float().mean().item()
    assert accuracy > 0.95
    adversary.train()
    assert adversary(video[:1], keep[:1]).shape == (1, 1)  # one clip in training mode: the running statistics


def test_worst_privacy_term_and_restart_order(tmp_path):
    assert worst_privacy_term([torch.tensor(0.6), torch.tensor(0.2), torch.tensor(0.4)]).item() == pytest.approx(0.2)
    cfg = TrainConfig(data_root="x", out_dir=str(tmp_path), privacy_adversaries=3, privacy_restart_every=2,
                      recognizer_warmup_epochs=1)
    assert [restart_target(cfg, e) for e in (3, 5, 7, 9)] == ["privacy", "privacy_1", "privacy_2", "privacy"]
    with pytest.raises(ValueError, match="privacy_adversaries"):
        TrainConfig(data_root="x", out_dir=str(tmp_path), privacy_adversaries=0)
    with pytest.raises(ValueError, match="stats_adversary_weight"):
        TrainConfig(data_root="x", out_dir=str(tmp_path), stats_adversary_weight=-1.0)


def _cfg(tmp_path, **kw):
    base = dict(data_root="unused", out_dir=str(tmp_path / "run"), preset="tiny", batch_size=4, phase1_epochs=1,
                phase2_epochs=3, progress=False, checkpoint_every=0, base_lr=0.2, warmup_epochs=0.5,
                deterministic=True)
    return TrainConfig(**(base | kw))


def _loader():
    return RandomClipLoader(num_batches=3, batch_size=4, num_frames=8, size=32)


OPTIONS = dict(privacy_adversaries=2, privacy_restart_every=1, stats_adversary_weight=2.0, colour_spread_weight=3.0,
               privacy_steps=2, adversary_noise=0.3, privacy_replay=2)


def test_the_options_enter_the_loss_train_every_adversary_and_resume_exactly(tmp_path):
    plain = Trainer(_cfg(tmp_path / "plain"), _loader())
    assert set(plain.models) == {"anonymizer", "action", "privacy"}  # the paper's three, as before
    full = Trainer(_cfg(tmp_path / "a", **OPTIONS), _loader())
    assert set(full.models) == {"anonymizer", "action", "privacy", "privacy_1", "stats"}
    # The paper's three models start as in a run without the options.
    for name in ("anonymizer", "action", "privacy"):
        a, b = plain.models[name].state_dict(), full.models[name].state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a)
    before = {k: {n: v.clone() for n, v in full.models[k].state_dict().items()} for k in ("privacy_1", "stats")}
    history = full.fit()
    for rec in history["phase2"]:
        # loss = sparsity + CE - 0.5 * worst BCE - 2 * stats term + 3 * spread (the bce objective, 2 adversaries)
        assert rec["stats_term"] > 0 and rec["colour_spread"] >= 0
        members = [rec["privacy_term_privacy"], rec["privacy_term_privacy_1"]]  # each adversary's term, logged
        assert rec["privacy_term"] == pytest.approx(min(members)) and rec["privacy_term_privacy"] == rec["bce_privacy"]
        expected = rec["sparsity"] + 0.5 * rec["ce_action"] - 0.5 * rec["privacy_term"] - 2.0 * rec["stats_term"] \
            + 3.0 * rec["colour_spread"]
        assert rec["loss"] == pytest.approx(expected, rel=1e-4, abs=1e-5)
        assert "rec_bce_privacy_1" in rec and "rec_bce_stats" in rec
    for name, state in before.items():  # each adversary was updated
        assert any(not torch.equal(v, full.models[name].state_dict()[n]) for n, v in state.items()), name
    # privacy_steps=2: two updates of each adversary per step; their lr schedules still advance once per step.
    steps = len(history["phase2"])
    assert full.sched["privacy_1"].last_epoch == full.sched["action"].last_epoch == steps
    assert full.opt["stats"].state and all(s["step"] == 2 * steps for s in full.opt["stats"].state.values())
    assert full.opt["action"].state and all(s["step"] == steps for s in full.opt["action"].state.values())
    events = [json.loads(x) for x in (tmp_path / "a" / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [(e["epoch"], e["recognizer"]) for e in events if e.get("event") == "privacy recognizer restarted"] \
        == [(1, "privacy"), (2, "privacy_1")]
    losses = [r["loss"] for p in ("phase1", "phase2") for r in history[p]]

    wrapped = StopAfter(_loader(), 7)  # stops in phase-2 epoch 1, after a restart
    first = Trainer(_cfg(tmp_path / "b", **OPTIONS), wrapped)
    wrapped.trainer = first
    with pytest.raises(TrainingInterrupted):
        first.fit()
    done = [r["loss"] for p in ("phase1", "phase2") for r in first.history[p]]
    second = Trainer(_cfg(tmp_path / "b", **OPTIONS), _loader())
    rest = second.fit(resume=tmp_path / "b" / "run" / "last.pt")
    assert done + [r["loss"] for p in ("phase1", "phase2") for r in rest[p]] == losses
    for name in ("privacy_1", "stats"):
        a, b = second.models[name].state_dict(), full.models[name].state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a), name
    # privacy_replay=2: the buffer holds two past batches, in fp16, and came back with the checkpoint
    assert len(full.replay) == len(second.replay) == 2 and full.replay[0]["video"].dtype == torch.float16
    assert all(torch.equal(a["video"], b["video"]) for a, b in zip(full.replay, second.replay, strict=True))


def test_the_options_are_train_flags():
    from stpcore.cli import build_parser
    from stpcore.config import dataclass_from_args

    args = build_parser().parse_args(["train", "--data-root", "d", "--out-dir", "o", "--privacy-adversaries", "3",
                                      "--stats-adversary-weight", "2", "--colour-spread-weight", "1.5"])
    cfg = dataclass_from_args(TrainConfig, args)
    assert (cfg.privacy_adversaries, cfg.stats_adversary_weight, cfg.colour_spread_weight) == (3, 2.0, 1.5)


def test_adversary_noise_changes_what_the_adversaries_read_and_nothing_else(tmp_path):
    from stpcore.training import Trainer as T

    trainer = T(_cfg(tmp_path / "a", adversary_noise=0.5), _loader())
    video = torch.zeros(2, 3, 8, 32, 32)
    seen = trainer._adversary_view(video)
    assert 0.4 < seen.std().item() < 0.6 and torch.equal(video, torch.zeros_like(video))
    plain = T(_cfg(tmp_path / "b"), _loader())
    assert plain._adversary_view(video) is video  # off: the same tensor, no noise drawn
    with pytest.raises(ValueError, match="privacy_steps"):
        _cfg(tmp_path, privacy_steps=0)
    with pytest.raises(ValueError, match="adversary_noise"):
        _cfg(tmp_path, adversary_noise=-0.1)


def test_the_frozen_statistics_adversary_keeps_its_running_statistics(tmp_path):
    """STPrivacy's step reads the statistics adversary with batch statistics and leaves its running ones alone; its
    own update moves them once per update."""
    trainer = Trainer(_cfg(tmp_path, phase1_epochs=0, phase2_epochs=1, stats_adversary_weight=1.0), _loader())
    norm = trainer.stats_adv.norm
    batch = next(iter(trainer.loader))
    before = norm.num_batches_tracked.item()
    trainer.phase2_step(batch)
    assert norm.num_batches_tracked.item() == before + 1  # the adversary's own update only


def test_a_resume_without_replay_drops_the_saved_buffer(tmp_path):
    first = Trainer(_cfg(tmp_path / "a", phase1_epochs=0, phase2_epochs=1, privacy_replay=4), _loader())
    first.fit()
    assert len(first.replay) == 3
    second = Trainer(_cfg(tmp_path / "a", phase1_epochs=0, phase2_epochs=1, privacy_replay=2), _loader())
    second.load_checkpoint(tmp_path / "a" / "run" / "last.pt")
    assert len(second.replay) == 2
    third = Trainer(_cfg(tmp_path / "a", phase1_epochs=0, phase2_epochs=1), _loader())
    third.load_checkpoint(tmp_path / "a" / "run" / "last.pt")
    assert third.replay == [] and third._replayed() is None


def test_nan_settings_are_refused(tmp_path):
    for name in ("adversary_noise", "stats_adversary_weight", "colour_spread_weight"):
        with pytest.raises(ValueError, match=name):
            _cfg(tmp_path, **{name: float("nan")})
