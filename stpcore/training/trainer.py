"""The STPrivacy trainer: phase 1 (init) and phase 2 (adversarial), resumable, single- or multi-process.

Phase 1: STPrivacy minimises sparsity + CE(action) from its own head.
Phase 2: alternating steps [G on order: STPrivacy first, then both recognizers on the same batch]:
  - STPrivacy minimises sparsity + w_a CE(action recognizer) - w_p BCE(privacy recognizer), the
    recognizers reading the transformed video through the keep mask (policy attention, masked mean
    pool) with their parameters frozen for this step;
  - the action recognizer minimises CE and the privacy recognizer BCE on the detached transformed video
    and keep mask.
  Options, all off by default (the paper's phase 2): the privacy term as the recognizer's entropy
  (``privacy_objective``), a ridge-regression start of the reconstruction head (``decoder_init``), a
  recognizer warm-up, privacy-recognizer restarts, and a sparsity weight.

Every [G] choice is a :class:`TrainConfig` field. Checkpoints hold models, optimizers, schedulers, RNG
states, the position in the run and the config; they are written atomically every
``checkpoint_every`` steps, at each epoch end, on SIGTERM/SIGINT and when a loss or a gradient turns
NaN/Inf (before the bad update). ``resume`` continues exactly where a checkpoint was taken (mid-epoch too:
the stpcore loaders start where the interrupted run had read to in each rank's video order, unreadable videos
included, without decoding the finished ones again; with ``deterministic=True`` on CPU the losses equal an
uninterrupted run); it refuses a checkpoint of another
schedule (steps per epoch, processes).
Multi-process with torchrun: DistributedDataParallel (NCCL on GPU, gloo on CPU), the data sharded by
the loader, only rank 0 writing files. The ranks agree every step (tiny all-reduces) on a NaN, a
signal and the end of the epoch, so one rank never stops alone while the others wait for it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import shutil
import signal
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from stpcore import losses
from stpcore.models import STPrivacy, VideoRecognizer
from stpcore.models.checkpoints import reconstruction_trained, save_anonymizer
from stpcore.ops import sample_gumbel
from stpcore.progress import progress
from stpcore.runtime import autocast, clip_loader, init_distributed, make_optimizer, steps_per_epoch, unwrap
from stpcore.training import state
from stpcore.training.adversaries import StatsAdversary, colour_spread, kept_colour_statistics, worst_privacy_term
from stpcore.training.config import TrainConfig
from stpcore.training.distributed import PassStopped, any_rank, raise_write_failure, sharding_report, wrap_models
from stpcore.training.nullspace import check_rounds, project_privacy_out
from stpcore.training.phase2 import fit_decoder, fresh_privacy_recognizer, restart_due, restart_target
from stpcore.tubelets import check_finite

PHASES = ("phase1", "phase2")


class TrainingDiverged(RuntimeError):
    """A loss became NaN or Inf; a checkpoint of the state before the bad step was written."""


class TrainingInterrupted(RuntimeError):
    """SIGTERM or SIGINT arrived; a checkpoint was written at the step boundary."""


def use_deterministic_algorithms(device: torch.device) -> None:
    """TrainConfig.deterministic: torch's deterministic algorithms. On CUDA, cuBLAS needs a fixed workspace for them
    (CUBLAS_WORKSPACE_CONFIG, set here unless given; it must be set before the process's first cuBLAS call, which
    the trainer makes after this), else every matrix product raises; and an operation without a deterministic CUDA
    kernel warns instead of stopping the run (on the CPU, where the exact-resume checks run, it raises)."""
    if device.type == "cuda":
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
    else:
        torch.use_deterministic_algorithms(True)


class Trainer:
    """Runs phases 1 and 2 of STPrivacy training on a data source.

    Args:
        cfg: the run's configuration.
        loader: an object with ``__iter__`` yielding batches with ``clips`` (B, 3, T, H, W), ``actions``
            (B,), ``privacy`` (B, 5), ``has_privacy`` (B,), ``__len__`` (batches per epoch),
            ``set_epoch(epoch)`` and ``classes`` (action class names). Default: built from ``cfg``.
        device: "cpu", "cuda" or None (CUDA when available; under torchrun the local rank's GPU).
    """

    def __init__(self, cfg: TrainConfig, loader=None, device: str | torch.device | None = None) -> None:
        self.cfg = cfg
        self.dist = init_distributed()
        if device is None:
            device = f"cuda:{self.dist.local_rank}" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        if cfg.deterministic:
            use_deterministic_algorithms(self.device)
        torch.manual_seed(cfg.seed)  # same initial weights on every rank
        random.seed(cfg.seed)
        np.random.seed(cfg.seed)
        if loader is None and cfg.phase2_epochs > 0 and not cfg.labels:
            raise ValueError("phase 2 needs privacy labels (the adversary trains on them): give --labels "
                             "(the VP .pickle or a .csv), or --phase2-epochs 0 for phase 1 alone")
        self.loader = loader if loader is not None else self._default_loader()
        self.num_classes = len(self.loader.classes)
        self.model_cfg = cfg.model_config(self.num_classes)
        check_rounds(self.cfg.privacy_nullspace, self.model_cfg.embed_dim)  # before training, not after it
        self.anonymizer = STPrivacy(self.model_cfg).to(self.device)
        self.action_rec = VideoRecognizer(cfg.recognizer_config(self.num_classes)).to(self.device)
        self.privacy_rec = VideoRecognizer(cfg.recognizer_config(5)).to(self.device)
        # Extra ensemble members (privacy_adversaries) and the statistics adversary are built after the paper's
        # three models, so a run without them initialises exactly as before.
        self.privacy_names = ["privacy"] + [f"privacy_{i}" for i in range(1, cfg.privacy_adversaries)]
        self.extra_privacy = {name: VideoRecognizer(cfg.recognizer_config(5)).to(self.device)
                              for name in self.privacy_names[1:]}
        self.stats_adv = (StatsAdversary(self.model_cfg.tubelet).to(self.device)
                          if cfg.stats_adversary_weight > 0 else None)
        if cfg.init_2d:
            from stpcore.models import load_inflated_2d_vit

            for m in (self.anonymizer, self.action_rec, self.privacy_rec, *self.extra_privacy.values()):
                load_inflated_2d_vit(m, cfg.init_2d)
        self.steps_per_epoch = steps_per_epoch(self.loader, cfg.batch_size)
        world_batch = cfg.batch_size * self.dist.world_size
        self.lr = cfg.base_lr * world_batch / 512
        warm = int(cfg.warmup_epochs * self.steps_per_epoch)
        p1 = cfg.phase1_epochs * self.steps_per_epoch
        p2 = cfg.phase2_epochs * self.steps_per_epoch
        p2_game = (cfg.phase2_epochs - cfg.recognizer_warmup_epochs) * self.steps_per_epoch  # STPrivacy's updates
        rec_lr = self.lr * cfg.recognizer_lr_scale
        schedules = {"phase1": (self.anonymizer, self.lr, p1), "phase2": (self.anonymizer, self.lr, p2_game),
                     "action": (self.action_rec, rec_lr, p2), "privacy": (self.privacy_rec, rec_lr, p2)}
        schedules.update({name: (m, rec_lr, p2) for name, m in self.extra_privacy.items()})
        if self.stats_adv is not None:
            schedules["stats"] = (self.stats_adv, rec_lr, p2)
        self.opt, self.sched = {}, {}
        for name, (model, lr, total) in schedules.items():
            self.opt[name], self.sched[name] = make_optimizer(model, lr, total, min(warm, total), cfg.weight_decay,
                                                              cfg.min_lr_ratio)
        self.phase, self.epoch, self.step_in_epoch, self.global_step = "phase1", 0, 0, 0
        # How far into this epoch's video order the loader has read (Batch.order_end, unreadable videos included):
        # where a mid-epoch resume starts the loader. None when the loader does not say (then: whole batches).
        self.videos_in_epoch: int | None = 0
        self.metrics_bytes: int | None = None  # metrics.jsonl's size in the checkpoint resumed from
        self.saved_config: dict | None = None  # the config in the checkpoint resumed from
        self._reported: dict[str, int] = {}  # the loader's report counts as last logged (they add up over the run)
        # Added to the loader's counts after a resume (state.load_checkpoint), so the data report's totals continue.
        self._count_offset: dict[str, int] = {}
        # Gumbel noise comes from the trainer's own generator (one stream per rank), not the global RNG that
        # data loaders also draw from, so a resumed run draws exactly the noise an uninterrupted one would.
        self.noise_gen = torch.Generator(device=self.device).manual_seed(cfg.seed * 1009 + self.dist.rank + 1)
        self.replay: list[dict[str, torch.Tensor]] = []  # privacy_replay: past batches for the adversaries
        self._stop_signal: int | None = None
        self._write_error: tuple[str, OSError] | None = None  # rank 0's first failed file write (_on_main)
        self.out_dir = Path(cfg.out_dir)
        self._wrap_models()

    # -- set-up ------------------------------------------------------------------------------------

    def _default_loader(self):
        cfg = self.cfg
        model_cfg = cfg.model_config(1)
        return clip_loader(
            cfg.data_root, train=True, num_frames=model_cfg.num_frames, crop=model_cfg.image_size,
            short_side=cfg.short_side, kind=cfg.kind, split=cfg.split, labels=cfg.labels,
            batch_size=cfg.batch_size, workers=cfg.workers, decoder=cfg.decoder,
            device="cuda" if torch.cuda.is_available() else "cpu", stride=cfg.stride,
            shard_id=self.dist.rank, num_shards=self.dist.world_size, seed=cfg.seed,
            **({"validation": cfg.validation, "part": "fit"} if cfg.validation else {}),
        )

    def _wrap_models(self) -> None:
        # Each phase leaves some heads unused (phase 1: reconstruction; phase 2: the own action head); the
        # forward skips them (reconstruct= / classify=), and DDP's find_unused_parameters skips their grads.
        models = {"anonymizer": self.anonymizer, "action": self.action_rec, "privacy": self.privacy_rec,
                  **self.extra_privacy}
        if self.stats_adv is not None:
            models["stats"] = self.stats_adv
        for m in models.values():
            m.validate = False  # the batch is checked once per step (_clips); no host sync inside the models
        self.models = wrap_models(models, self.dist, self.device, compile=self.cfg.compile)

    def _autocast(self):
        return autocast(self.device, self.cfg.amp)

    # -- checkpoints (stpcore.training.state) -------------------------------------------------------

    def state_dict(self) -> dict:
        return state.state_dict(self)

    def save_checkpoint(self, name: str = "last.pt") -> Path:
        """Write a checkpoint atomically (rank 0 writes; every rank must call it); returns its path."""
        return state.save_checkpoint(self, name)

    def load_checkpoint(self, path: str | os.PathLike) -> None:
        """Restore a checkpoint written by :meth:`save_checkpoint` (weights_only: nothing is executed)."""
        state.load_checkpoint(self, path)

    # -- steps -------------------------------------------------------------------------------------

    def _any_rank(self, *flags: bool) -> list[bool]:
        return any_rank(self.dist, self.device, *flags)

    def _on_main(self, what: str, write, *args) -> None:
        """Run ``write(*args)``, a file write, on rank 0 only. An OSError there (a full disk) is kept and raised on
        every rank at the next agreement (each step, each checkpoint: :meth:`_check_writes`), not on rank 0 alone,
        whose peers would wait for it in their next collective. ``what`` names the file for the message."""
        if not self.dist.main:
            return
        try:
            write(*args)
        except OSError as error:
            self._write_error = self._write_error or (what, error)

    def _check_writes(self, failed: bool | None = None) -> None:
        """MainWriteFailed on every rank when rank 0 could not write a file since the last check (``failed``: that
        flag already agreed over the ranks, or None to agree on it here)."""
        if failed is None:
            failed = self._any_rank(self._write_error is not None)[0]
        if failed:
            what, error = self._write_error or (None, None)
            raise_write_failure(self.dist, error, what)

    def _diverged(self, what: str, when: str) -> TrainingDiverged:
        path = self.save_checkpoint(f"diverged-step{self.global_step}.pt")
        return TrainingDiverged(
            f"{what} became NaN/Inf at {self.phase} epoch {self.epoch} step {self.step_in_epoch} (global step "
            f"{self.global_step}); the state {when} is saved in {path}. Lower base_lr, raise warmup_epochs, or "
            f"check the data."
        )

    def _check_finite(self, values: dict[str, torch.Tensor], when: str = "before this step") -> None:
        """TrainingDiverged (and the state saved) when a value is NaN/Inf on any rank; ``when`` says which of this
        step's updates the saved state already holds."""
        bad = [k for k, v in values.items() if not torch.isfinite(v).all()]
        if self._any_rank(bool(bad))[0]:
            raise self._diverged(", ".join(bad) or "a loss on another rank", when)

    def _update(self, name: str, loss: torch.Tensor, model: nn.Module, schedule: bool = True) -> float:
        opt = self.opt[name]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        # The norm of the (already all-reduced) gradients, so every rank sees the same value. A finite loss
        # can still give NaN/Inf gradients; stepping on them would poison the weights, so stop before it.
        clip = self.cfg.clip_grad if self.cfg.clip_grad > 0 else math.inf
        grad_norm = float(nn.utils.clip_grad_norm_(model.parameters(), clip))
        if not math.isfinite(grad_norm):
            opt.zero_grad(set_to_none=True)
            # In phase 2 the updates before this one (STPrivacy's, then the recognizers' in turn) are in the state.
            later = name not in ("phase1", "phase2")  # a recognizer's: STPrivacy's update of this step is applied
            raise self._diverged(f"the gradient of the {name} update", f"before the {name} update (this step's "
                                 f"updates before it are applied)" if later else "before this update")
        opt.step()
        if schedule:
            self.sched[name].step()
        return grad_norm

    def _gumbel_noise(self, batch_size: int) -> list[torch.Tensor]:
        shape = (batch_size, self.model_cfg.num_tokens, 2)
        return [sample_gumbel(shape, generator=self.noise_gen, device=self.device)
                for _ in range(self.model_cfg.num_stages)]

    def _clips(self, batch) -> torch.Tensor:
        """The batch's clips on the device, checked for NaN/Inf once (the models' own checks are off)."""
        clips = batch.clips.to(self.device)
        shown = ", ".join(batch.video_ids[:3]) + (", ..." if len(batch.video_ids) > 3 else "")
        check_finite(clips, name=f"video (a batch of {shown})")
        return clips

    def phase1_step(self, batch) -> dict[str, float]:
        anonymizer = self.models["anonymizer"]
        clips, actions = self._clips(batch), batch.actions.to(self.device)
        with self._autocast():
            # Phase 1 needs no reconstruction: skipping it saves work and leaves DDP no unused outputs.
            out = anonymizer(clips, self._gumbel_noise(clips.shape[0]), reconstruct=False)
            sparsity = losses.sparsity_loss(out.decisions, self.model_cfg.keep_ratio, self.model_cfg.num_slots)
            ce = losses.action_loss(out.action_logits, actions)
            loss = self.cfg.sparsity_weight * sparsity + ce
        self._check_finite({"loss": loss})
        self._update("phase1", loss, anonymizer)
        acc = (out.action_logits.argmax(-1) == actions).float().mean()
        return {"loss": loss.item(), "sparsity": sparsity.item(), "ce_action": ce.item(), "acc_action": acc.item(),
                "kept": out.keep.detach().float().mean().item()}

    def phase2_step(self, batch) -> dict[str, float]:
        cfg = self.cfg
        anonymizer, action_rec, privacy_rec = (self.models[k] for k in ("anonymizer", "action", "privacy"))
        clips, actions = self._clips(batch), batch.actions.to(self.device)
        privacy, has_privacy = batch.privacy.to(self.device), batch.has_privacy.to(self.device)
        # 1) STPrivacy: keep the action, defeat the privacy recognizer. The recognizers are frozen here and
        # called unwrapped (no DDP gradient sync for a step that does not update them).
        # During the recognizer warm-up STPrivacy only transforms (no graph, no update).
        game = self.epoch >= cfg.recognizer_warmup_epochs
        adversaries = [n for n in (*self.privacy_names, "stats") if n in self.models]  # privacy recognizers
        frozen = {name: unwrap(self.models[name]) for name in ("action", *adversaries)}
        for m in frozen.values():
            m.requires_grad_(False)
        extra: dict[str, torch.Tensor] = {}
        with self._autocast(), torch.set_grad_enabled(game):
            # Phase 2 does not use STPrivacy's own action head.
            out = anonymizer(clips, self._gumbel_noise(clips.shape[0]), classify=False)
            sparsity = losses.sparsity_loss(out.decisions, self.model_cfg.keep_ratio, self.model_cfg.num_slots)
            ce = losses.action_loss(frozen["action"](out.video, out.keep, mode="policy"), actions)
            terms, bce = [], None  # bce: the first adversary's (the paper's single one), for the metrics
            seen = self._adversary_view(out.video)  # what the privacy adversaries read (adversary_noise)
            for name in self.privacy_names:
                privacy_logits = frozen[name](seen, out.keep, mode="policy")
                bce_i = losses.masked_privacy_loss(privacy_logits, privacy, has_privacy)
                bce = bce_i if bce is None else bce
                terms.append(self._privacy_term(privacy_logits, bce_i, has_privacy))
            term = worst_privacy_term(terms)
            if len(terms) > 1:
                extra.update({f"privacy_term_{name}": t for name, t in zip(self.privacy_names, terms, strict=True)})
            loss = losses.anonymizer_loss(cfg.sparsity_weight * sparsity, ce, term, action_weight=cfg.action_weight,
                                          privacy_weight=cfg.privacy_weight)
            if self.stats_adv is not None:
                stats_logits = frozen["stats"](seen, out.keep, update_stats=False)  # frozen: no running-stat update
                extra["stats_term"] = self._privacy_term(
                    stats_logits, losses.masked_privacy_loss(stats_logits, privacy, has_privacy), has_privacy)
                loss = loss - cfg.stats_adversary_weight * extra["stats_term"]
            if cfg.colour_spread_weight > 0:
                extra["colour_spread"] = colour_spread(kept_colour_statistics(out.video, out.keep,
                                                                              self.model_cfg.tubelet))
                loss = loss + cfg.colour_spread_weight * extra["colour_spread"]
        self._check_finite({"anonymizer loss": loss})
        if game:
            self._update("phase2", loss, anonymizer)
        for m in frozen.values():
            m.requires_grad_(True)
        # 2) The recognizers, on the detached transformed video and mask.
        video, keep = out.video.detach(), out.keep.detach()

        past = self._replayed()  # privacy_replay: one earlier batch joins each adversary update
        self._remember(video, keep, privacy, has_privacy)

        def adversary_losses() -> tuple[dict[str, torch.Tensor], torch.Tensor]:
            # The replayed batch joins the current one in a single forward per adversary: one BatchNorm update, and
            # one forward per backward, which DDP's buffer broadcast needs.
            clips_in, keep_in = video, keep
            if past is not None:
                clips_in, keep_in = torch.cat([video, past["video"]]), torch.cat([keep, past["keep"]])
            n = video.shape[0]
            with self._autocast():
                seen = self._adversary_view(clips_in)
                logits = {name: self.models[name](seen, keep_in, mode="policy") for name in adversaries}
                result = {k: losses.masked_privacy_loss(v[:n], privacy, has_privacy) for k, v in logits.items()}
                if past is not None:
                    result = {k: 0.5 * (result[k] + losses.masked_privacy_loss(v[n:], past["privacy"],
                                                                                past["has_privacy"]))
                              for k, v in logits.items()}
            return result, logits["privacy"][:n]

        with self._autocast():
            action_logits = action_rec(video, keep, mode="policy")
            rec_ce = losses.action_loss(action_logits, actions)
        rec_losses, privacy_logits = adversary_losses()  # the metrics report these, the first update's
        step_losses = rec_losses
        self._check_finite({"action recognizer loss": rec_ce,
                            **{f"{name} recognizer loss": v for name, v in rec_losses.items()}},
                           "after this step's STPrivacy update, before the recognizers'")
        self._update("action", rec_ce, action_rec)
        for step in range(cfg.privacy_steps):  # privacy_steps updates of each adversary on this batch
            if step:
                step_losses = adversary_losses()[0]
                self._check_finite({f"{name} recognizer loss": v for name, v in step_losses.items()},
                                   f"after this step's STPrivacy, action and {step} privacy update(s)")
            for name, value in step_losses.items():  # the lr schedules advance once per training step
                self._update(name, value, self.models[name], schedule=step == cfg.privacy_steps - 1)
        acc = (action_logits.argmax(-1) == actions).float().mean()
        priv_acc = ((privacy_logits > 0).float() == privacy).float()[has_privacy].mean() if has_privacy.any() \
            else torch.tensor(float("nan"))
        metrics = {"loss": loss.item(), "sparsity": sparsity.item(), "ce_action": ce.item(), "bce_privacy": bce.item(),
                   "privacy_term": term.item(),
                   "rec_ce_action": rec_ce.item(), "rec_bce_privacy": rec_losses["privacy"].item(),
                   "acc_action": acc.item(), "acc_privacy": priv_acc.item(), "kept": keep.float().mean().item()}
        metrics.update({k: v.item() for k, v in extra.items()})
        metrics.update({f"rec_bce_{name}": v.item() for name, v in rec_losses.items() if name != "privacy"})
        return metrics

    def _remember(self, video, keep, privacy, has_privacy) -> None:
        """privacy_replay: keep this batch (fp16 video) in the buffer, replacing a random old one when full."""
        size = self.cfg.privacy_replay
        if not size:
            return
        entry = {"video": video.to(torch.float16), "keep": keep.to(torch.float16), "privacy": privacy.clone(),
                 "has_privacy": has_privacy.clone()}
        if len(self.replay) < size:
            self.replay.append(entry)
        else:
            slot = int(torch.randint(size, (1,), generator=self.noise_gen, device=self.noise_gen.device))
            self.replay[slot] = entry

    def _replayed(self) -> dict[str, torch.Tensor] | None:
        """A batch drawn from the privacy_replay buffer (float32 again), or None when it is off or empty."""
        if not self.cfg.privacy_replay or not self.replay:
            return None
        slot = int(torch.randint(len(self.replay), (1,), generator=self.noise_gen, device=self.noise_gen.device))
        entry = self.replay[slot]
        return {"video": entry["video"].float(), "keep": entry["keep"].float(), "privacy": entry["privacy"],
                "has_privacy": entry["has_privacy"]}

    def _adversary_view(self, video: torch.Tensor) -> torch.Tensor:
        """The video as the privacy adversaries read it: with adversary_noise, plus Gaussian noise of that standard
        deviation (from the trainer's own generator, so a resumed run draws the same)."""
        if not self.cfg.adversary_noise:
            return video
        noise = torch.randn(video.shape, generator=self.noise_gen, device=video.device, dtype=torch.float32)
        return video + self.cfg.adversary_noise * noise.to(video.dtype)

    def _privacy_term(self, logits: torch.Tensor, bce: torch.Tensor, has_privacy: torch.Tensor) -> torch.Tensor:
        """What STPrivacy maximises against one adversary: its BCE, or its entropy (privacy_objective)."""
        return bce if self.cfg.privacy_objective == "bce" else losses.masked_privacy_entropy(logits, has_privacy)

    # -- the loop ----------------------------------------------------------------------------------

    def _install_signal_handlers(self):
        previous = {}

        def handler(signum, frame):
            self._stop_signal = signum

        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                previous[sig] = signal.signal(sig, handler)
            except ValueError:  # not the main thread
                pass
        return previous

    def _batches(self, skip: int) -> Iterator:
        """This epoch's batches from batch ``skip`` on (a mid-epoch resume). A loader with ``start_at`` starts where
        the saved run had read to (``videos_in_epoch``: exact even after unreadable videos), or, for a checkpoint
        that does not say, ``skip`` whole batches in; the finished batches are not decoded again. Any other loader
        is read from the start and its first ``skip`` batches are dropped."""
        self.loader.set_epoch(self._data_epoch())
        if skip and hasattr(self.loader, "start_at"):
            if self.videos_in_epoch is not None:
                self.loader.start_at(video=self.videos_in_epoch)
            else:
                self.loader.start_at(skip)
            skip = 0
        for i, batch in enumerate(self.loader):
            if i < skip:  # resume mid-epoch: these batches were already trained on
                continue
            yield batch

    def _log(self, record: dict) -> None:
        """One JSON line in out_dir/metrics.jsonl (rank 0), and TensorBoard scalars when it is installed."""
        if not self.dist.main:
            return
        self._on_main(str(self.out_dir / "metrics.jsonl"), self._append_metrics, record)
        self._on_main(str(self.out_dir / "tensorboard"), self._add_scalars, record)

    def _add_scalars(self, record: dict) -> None:
        writer = self._tensorboard()
        if writer is not None and "step" in record:
            for key, value in record.items():
                if isinstance(value, float) and key not in ("seconds",):
                    writer.add_scalar(f"{record['phase']}/{key}", value, record["step"])

    def _append_metrics(self, record: dict) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        with open(self.out_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")

    def _tensorboard(self):
        """A SummaryWriter on out_dir/tensorboard, or None when the tensorboard package is absent."""
        if not hasattr(self, "_tb_writer"):
            self._tb_writer = None
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # optional: pip install tensorboard
                return None
            # A resumed run's events from the steps after its checkpoint (logged before it was stopped) are purged,
            # or TensorBoard shows those steps twice.
            self._tb_writer = SummaryWriter(log_dir=str(self.out_dir / "tensorboard"),
                                            purge_step=getattr(self, "_tb_purge_step", None))
        return self._tb_writer

    def fit(self, resume: str | os.PathLike | None = None, overwrite: bool = False) -> dict[str, list[dict]]:
        """Run (or continue) phases 1 and 2; returns the per-step metrics of this call by phase.

        Args:
            resume: a checkpoint (``last.pt``) to continue.
            overwrite: a fresh run (or a ``resume`` of a checkpoint saved in another folder) into an out_dir that
                holds an earlier run's checkpoint is a ValueError unless this is set; then that run's checkpoints,
                metrics, TensorBoard events, candidates and selection are removed first.
        """
        if resume is not None:
            self.load_checkpoint(resume)  # first: a checkpoint that cannot be resumed changes no file
            moved = Path(resume).resolve().parent != self.out_dir.resolve()
            if moved:  # refuse to mix with another run's files here
                self._claim_out_dir(overwrite, resuming=Path(resume))
            if moved:  # the saved run's log and candidates come along, as far as the checkpoint holds
                self._on_main(f"the carried-over files in {self.out_dir}", state.carry_over, self,
                              Path(resume).resolve().parent)
            self._on_main(str(self.out_dir / "metrics.jsonl"), state.cut_metrics, self.out_dir / "metrics.jsonl",
                          self.metrics_bytes)
        else:
            self._claim_out_dir(overwrite)
        self._tb_purge_step = self.global_step + 1 if resume is not None else None
        self._on_main(str(self.out_dir / "config.json"), self._write_config)
        history: dict[str, list[dict]] = {p: [] for p in PHASES}
        self.history = history  # also reachable when fit() ends by an exception
        if self.phase == "done":  # a finished run: nothing to train, make sure the exported model exists
            if not (self.out_dir / "stprivacy.pt").is_file():
                self._on_main(str(self.out_dir / "stprivacy.pt"), self.export_anonymizer, self.out_dir / "stprivacy.pt")
            self._check_writes()
            return history
        if resume is None and self.cfg.candidate_every and (self.out_dir / "candidates").is_dir():
            # A fresh run: candidates of an earlier run in this folder must not be selected with this one's.
            self._on_main(f"{self.out_dir / 'candidates'} (removing an earlier run's)", self._remove_candidates)
        self._check_writes()
        previous = self._install_signal_handlers()
        try:
            for phase in PHASES[PHASES.index(self.phase):]:
                if phase != self.phase:
                    self.phase, self.epoch, self.step_in_epoch, self.videos_in_epoch = phase, 0, 0, 0
                epochs = self.cfg.phase1_epochs if phase == "phase1" else self.cfg.phase2_epochs
                step_fn = self.phase1_step if phase == "phase1" else self.phase2_step
                if phase == "phase2" and self.epoch == 0 and self.step_in_epoch == 0 \
                        and self.cfg.decoder_init == "lstsq":
                    self._between_steps(self._fit_decoder)
                for m in self.models.values():
                    m.train()
                while self.epoch < epochs:
                    self._run_epoch(phase, epochs, step_fn, history)
                    self.epoch += 1
                    self.step_in_epoch, self.videos_in_epoch = 0, 0
                    # The candidate before the checkpoint: a run killed between the two redoes the export on
                    # resume (an atomic rewrite) instead of losing it.
                    if phase == "phase2" and self._candidate_due():
                        candidate = self.out_dir / "candidates" / f"phase2-epoch{self.epoch:03d}.pt"
                        self._on_main(str(candidate), self.export_anonymizer, candidate)
                    self.save_checkpoint()  # checks the writes on every rank
            if self.cfg.privacy_nullspace:  # once, before "done" (a run killed during it redoes it on resume)
                self._between_steps(self._project_privacy_out)
            self.phase = "done"
            self.save_checkpoint()
            if getattr(self, "_tb_writer", None) is not None:
                self._on_main(str(self.out_dir / "tensorboard"), self._tb_writer.flush)
            self._on_main(str(self.out_dir / "stprivacy.pt"), self.export_anonymizer, self.out_dir / "stprivacy.pt")
            self._check_writes()
        finally:
            for sig, h in previous.items():
                signal.signal(sig, h)
        return history

    def _data_counts(self, across_ranks: bool = True) -> dict[str, int]:
        """The loaders' skipped/altered counts over the whole run (a resumed run's continue the saved ones): under
        torchrun the sum of every rank's (each reads its own shard; what they all count at construction, once);
        a collective then, which every rank must call (``across_ranks=False``: this rank's alone)."""
        report = getattr(self.loader, "report", None)
        counts = dict(report().counts) if report is not None else {}
        if across_ranks and self.dist.world_size > 1 and report is not None:
            shared = dict(getattr(report(), "shared", {}))
            every: list = [None] * self.dist.world_size
            dist.all_gather_object(every, counts)
            counts = dict(shared)
            for rank_counts in every:
                for k, v in rank_counts.items():
                    counts[k] = counts.get(k, 0) + v - shared.get(k, 0)
        for k, v in self._count_offset.items():
            counts[k] = counts.get(k, 0) + v
        return {k: v for k, v in counts.items() if v}

    def _write_config(self) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        (self.out_dir / "config.json").write_text(json.dumps(dataclasses.asdict(self.cfg), indent=2))

    def _remove_candidates(self) -> None:
        for stale in (self.out_dir / "candidates").glob("phase2-epoch*.pt"):
            stale.unlink()

    def _claim_out_dir(self, overwrite: bool, resuming: Path | None = None) -> None:
        """A fresh run's out_dir (or that of a run ``resuming`` a checkpoint saved in another folder): refuse (or,
        with ``overwrite``, clear) an earlier run's checkpoints, and start metrics.jsonl anew, so two runs never
        share a folder's files. Every rank refuses when any rank sees one."""
        earlier = [p for p in (self.out_dir / "last.pt", self.out_dir / "stprivacy.pt") if p.is_file()]
        if self._any_rank(bool(earlier) and not overwrite)[0]:
            found = ", ".join(p.name for p in earlier) or "a checkpoint"
            what = f"this resume of {resuming}" if resuming is not None else "it"
            raise ValueError(
                f"{self.out_dir} holds an earlier run ({found}); continue it with --resume "
                f"{self.out_dir / 'last.pt'}, train into another --out-dir, or pass --overwrite to replace it with "
                f"{what}")
        self._on_main(f"{self.out_dir} (removing an earlier run's files)", self._clear_out_dir, earlier, overwrite)

    def _clear_out_dir(self, earlier: list[Path], overwrite: bool) -> None:
        for stale in (*earlier, self.out_dir / "metrics.jsonl", self.out_dir / "selection.json"):
            stale.unlink(missing_ok=True)
        shutil.rmtree(self.out_dir / "tensorboard", ignore_errors=True)  # TensorBoard would merge the two runs
        if overwrite:  # the replaced run's candidates and their scores would be taken for this run's
            for folder in ("candidates", "selection"):
                shutil.rmtree(self.out_dir / folder, ignore_errors=True)

    def _candidate_due(self) -> bool:
        """Whether the phase-2 epoch just finished is a model-selection candidate (TrainConfig.candidate_every)."""
        return state.candidate_due(self.epoch, dataclasses.asdict(self.cfg))

    def _between_steps(self, data_pass) -> None:
        """Run a data pass outside the training steps (the decoder fit, the nullspace passes). A signal during its
        reading stops it (no weight has changed then), checkpoints the state from before it and stops the run,
        whose resume does the pass again; one during its final computation is taken at the next step boundary, or,
        after the nullspace projection, lets the run finish (it saves and exports at once)."""
        try:
            data_pass()
        except PassStopped as e:
            path = self.save_checkpoint()
            raise TrainingInterrupted(
                f"signal {self._stop_signal or 'on another rank'} during {e}: checkpoint written to {path} (from "
                f"before it; the resume does it again); continue with the same command and --resume {path}") from None

    def _signalled(self) -> bool:
        """Whether SIGTERM or SIGINT reached this rank (the data passes' ``stop``)."""
        return self._stop_signal is not None

    def _data_epoch(self) -> int:
        """The loader's epoch (its order and random crops) for this phase's epoch: counted over the whole run, so phase
        2 reads new orders and crops rather than phase 1's again."""
        return self.epoch + (self.cfg.phase1_epochs if self.phase == "phase2" else 0)

    def _fit_decoder(self) -> None:
        """decoder_init="lstsq": the reconstruction head as the ridge decoder of the kept tokens (phase2.py), on the
        data of phase 2's first epoch."""
        self.loader.set_epoch(self._data_epoch())
        seen = fit_decoder(self.anonymizer, self.loader, self.device, self.cfg.amp, self.dist, stop=self._signalled)
        if seen and self.dist.main:
            self._log({"phase": "phase2", "epoch": self.epoch, "event": "decoder fitted (lstsq)", "clips": seen})

    def _project_privacy_out(self) -> None:
        """privacy_nullspace: project the privacy probes' directions out of the reconstruction head (nullspace.py).
        The passes over the data use the epochs after phase 2's, so their crops are none of training's."""
        start = time.perf_counter()
        first = self.cfg.phase1_epochs + self.cfg.phase2_epochs
        record = project_privacy_out(self.anonymizer, self.loader, self.device, self.cfg.amp, self.dist,
                                     self.cfg.privacy_nullspace, first_epoch=first, stop=self._signalled)
        self._log({"phase": "phase2", "epoch": self.epoch, "event": "privacy nullspace projected",
                   "rounds": self.cfg.privacy_nullspace, **record, "seconds": round(time.perf_counter() - start, 2)})

    def _maybe_restart_privacy(self) -> None:
        """privacy_restart_every: a fresh privacy recognizer at the start of every such epoch (phase2.py)."""
        if not restart_due(self.cfg, self.phase, self.epoch, self.step_in_epoch):
            return
        name = restart_target(self.cfg, self.epoch)  # one ensemble member at a time, in turn
        unwrap(self.models[name]).load_state_dict(fresh_privacy_recognizer(self.cfg, self.epoch))  # in place
        self.opt[name].state.clear()
        if self.dist.main:
            self._log({"phase": "phase2", "epoch": self.epoch, "event": "privacy recognizer restarted",
                       "recognizer": name})

    def _run_epoch(self, phase: str, epochs: int, step_fn, history) -> None:
        self._maybe_restart_privacy()
        from_start = self.step_in_epoch == 0  # not a resume in the middle of this epoch
        bar = None
        if self.cfg.progress and self.dist.main:
            bar = progress(self.steps_per_epoch, f"{phase} epoch {self.epoch + 1}/{epochs}", initial=self.step_in_epoch)
        start = time.perf_counter()
        seen: list[int] = []  # video indices this rank trained on (when the loader provides them)
        labelled, ran = 0, 0  # phase-2 clips with privacy labels; steps run by this call
        batches = self._batches(self.step_in_epoch)
        while True:
            batch = next(batches, None)
            # Ranks may hold different numbers of batches (a loader that skips unreadable videos): the epoch
            # ends for all when one rank runs out, or their collectives would wait for each other forever.
            if self._any_rank(batch is None)[0]:
                break
            seen += batch.video_index.tolist()
            if phase == "phase2":
                labelled += int(batch.has_privacy.sum())
            lr = self.opt[phase].param_groups[0]["lr"]  # the rate this step uses (the schedulers step after it)
            metrics = step_fn(batch)
            ran += 1
            self.step_in_epoch += 1
            self.videos_in_epoch = getattr(batch, "order_end", None)
            self.global_step += 1
            record = {"phase": phase, "epoch": self.epoch, "step": self.global_step, "lr": lr, **metrics}
            history[phase].append(record)
            if self.global_step % max(1, self.cfg.log_every) == 0 or self.step_in_epoch == self.steps_per_epoch:
                record["seconds"] = round(time.perf_counter() - start, 3)
                self._log(record)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{metrics['loss']:.3f}", kept=f"{metrics['kept']:.2f}")
            if self.cfg.checkpoint_every and self.global_step % self.cfg.checkpoint_every == 0:
                self.save_checkpoint()
            # A signal may reach the ranks at different steps; a file rank 0 could not write stops them all.
            stop, failed = self._any_rank(self._stop_signal is not None, self._write_error is not None)
            self._check_writes(failed)
            if stop:
                path = self.save_checkpoint()
                raise TrainingInterrupted(f"signal {self._stop_signal or 'on another rank'}: checkpoint written to "
                                          f"{path}; continue with the same command and --resume {path}")
        if bar is not None:
            bar.close()
        counts = self._data_counts()
        if from_start and not self._any_rank(ran > 0)[0]:
            # Every video was skipped (e.g. H.264 with --decoder dali on a CPU): training on would end "successfully"
            # and export an untrained model.
            raise ValueError(f"{phase} epoch {self.epoch}: no batch could be read; every video was skipped "
                             f"({counts or 'no data report'}). Check the data with `stpcore data check`; for "
                             f"--decoder dali on a CPU, transcode to VP9 (`stpcore data transcode`) or use --decoder "
                             f"pyav")
        if phase == "phase2" and self._any_rank(ran > 0 and labelled == 0)[0] and self.dist.main:
            warnings.warn(f"phase 2 epoch {self.epoch}: a rank trained on no clip with privacy labels, so the "
                          f"privacy adversary learned nothing there; check that the label keys (<class>/<video>) "
                          f"match the videos", RuntimeWarning, stacklevel=2)
            self._log({"phase": phase, "epoch": self.epoch, "event": "no privacy labels seen"})
        if self.dist.world_size > 1 and seen:
            self._log_sharding(phase, seen, partial=not from_start)
        if counts and self.dist.main:  # the loader's counts add up over the run: log this epoch's part, and the sum
            epoch_counts = {k: v - self._reported.get(k, 0) for k, v in counts.items() if v != self._reported.get(k, 0)}
            self._reported = counts
            if epoch_counts:
                self._log({"phase": phase, "epoch": self.epoch, "data_report": epoch_counts,
                           "data_report_total": counts})

    def _log_sharding(self, phase: str, seen: list[int], partial: bool = False) -> None:
        """Rank 0 logs which videos each rank trained on this epoch: the shards must not overlap. ``partial``: the
        epoch was resumed midway, so the record covers its resumed part only."""
        self._log({"phase": phase, "epoch": self.epoch, **sharding_report(self.dist, seen),
                   **({"partial": True} if partial else {})})

    def export_anonymizer(self, path: str | os.PathLike) -> Path:
        """Write the STPrivacy weights and config alone: what ``stpcore anonymize --checkpoint`` reads."""
        trained = reconstruction_trained(self.phase, self.epoch, self.step_in_epoch, self.cfg.phase2_epochs,
                                         self.cfg.recognizer_warmup_epochs, self.cfg.decoder_init)
        return save_anonymizer(unwrap(self.models["anonymizer"]), path, classes=list(self.loader.classes),
                               reconstruction_trained=trained)
