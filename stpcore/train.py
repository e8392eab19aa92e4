"""STPrivacy training: phase 1 (init) and phase 2 (adversarial), resumable, single- or multi-process.

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
the stpcore loaders start at the next batch without decoding the finished ones again; with
``deterministic=True`` on CPU the losses equal an uninterrupted run); it refuses a checkpoint of another
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
import signal
import time
import warnings
from collections.abc import Iterable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from stpcore import losses
from stpcore.media import atomic_path
from stpcore.models import RecognizerConfig, STPrivacy, STPrivacyConfig, VideoRecognizer
from stpcore.models.checkpoints import load_weights_only
from stpcore.ops import sample_gumbel
from stpcore.progress import progress

PHASES = ("phase1", "phase2")


@dataclass(frozen=True)
class TrainConfig:
    """Everything a training run needs (the single source of truth; a JSON config file may supply it).

    Args:
        data_root: dataset root in the HMDB51 or UCF101 layout.
        labels: privacy label file (.pickle or .csv); needed for phase 2.
        out_dir: where checkpoints, metrics.jsonl and the final model go.
        kind, split: dataset layout ("auto", "hmdb51", "ucf101") and official split.
        preset: model preset of STPrivacy and both recognizers ("vit_small" is the paper's).
        num_frames, image_size: override the preset's clip size (None: the preset's).
        batch_size: clips per step and process.
        workers: data loader workers.
        decoder: "auto", "pyav" or "dali".
        stride: frame stride (None: the dataset's default, 2 for HMDB51, 4 for UCF101).
        short_side: resize target of the clips' short side before cropping (None: 8/7 of the crop).
        phase1_epochs, phase2_epochs: the paper's 80 and 40.
        base_lr: lr = base_lr * batch_size * world_size / 512 (the paper's 1e-3).
        weight_decay: AdamW weight decay (0.05), none on norms, biases and positional embeddings.
        warmup_epochs: linear warm-up, then cosine decay to min_lr_ratio * lr, per phase [G: 5 epochs].
        min_lr_ratio: floor of the cosine schedule [G: 0.01].
        clip_grad: max gradient norm (0 disables) [G: 1.0].
        action_weight, privacy_weight: phase-2 weights of CE(action) and BCE(privacy) (the paper's 0.5).
        decoder_init: how phase 2 starts the reconstruction head (LayerNorm -> Linear to tubelet pixels),
            which phase 1 never trains: "random" (its initialisation) or "lstsq" (fitted once, when phase 2
            begins, as the ridge-regression decoder from the frozen phase-1 model's kept final tokens to the
            input tubelets' pixels over one pass of the training data). The fit touches only that Linear
            layer and adds no loss: from then on only the adversarial objective shapes the output, as the
            paper says, but the game starts from a video that looks like the input instead of a random
            projection of features, which fresh recognizers read far better [G: "random"].
        privacy_objective: STPrivacy's privacy term in phase 2: "bce" (the paper: maximise the privacy
            recognizer's BCE) or "entropy" (maximise the binary entropy of its predictions, as in Wu et al.,
            TPAMI 2020: the optimum is an uncertain recognizer, not a confidently wrong one) [P: "bce"].
        sparsity_weight: weight of the sparsity loss in phases 1 and 2 [G: 1.0, the paper writes no weight].
            A larger weight holds the training-time keep fraction near alpha^m against the adversarial
            terms, so that it matches the per-slot top-k of inference.
        recognizer_lr_scale: recognizers' lr relative to STPrivacy's [G: 1.0].
        recognizer_warmup_epochs: the first phase-2 epochs train only the two recognizers, on the outputs of
            the (frozen) phase-1 STPrivacy, so that the adversarial game starts against informed recognizers
            rather than random ones [G: 0, the paper starts the game at once]. Part of phase2_epochs.
        privacy_restart_every: re-initialise the privacy recognizer (weights and optimizer state) every this
            many phase-2 epochs after the warm-up, so STPrivacy must hide the attributes from fresh
            recognizers (as phase 3 trains) rather than from the one it co-adapted with ("model restarting",
            Wu et al., TPAMI 2020) [G: 0, off].
        amp: "auto" (bf16 autocast on CUDA, none on CPU), "bf16" or "none".
        compile: torch.compile the models.
        checkpoint_every: steps between checkpoints (0: epoch ends only).
        log_every: steps between metrics lines.
        seed: seeds model init, Gumbel noise and data order.
        deterministic: torch.use_deterministic_algorithms (for exact resume checks).
        init_2d: path of an ImageNet 2D ViT checkpoint (DeiT/timm layout) to inflate into all three models.
        progress: show progress bars (tqdm) on rank 0.
        model_overrides: STPrivacyConfig fields changed from the preset (config file only, e.g.
            {"tau": 0.5}); those the recognizers share (the backbone's) apply to them too.
    """

    data_root: str
    out_dir: str
    labels: str | None = None
    kind: str = "auto"
    split: int = 1
    preset: str = "vit_small"
    num_frames: int | None = None
    image_size: int | None = None
    batch_size: int = 32
    workers: int = 2
    decoder: str = "auto"
    stride: int | None = None
    short_side: int | None = None
    phase1_epochs: int = 80
    phase2_epochs: int = 40
    base_lr: float = 1e-3
    weight_decay: float = 0.05
    warmup_epochs: float = 5.0
    min_lr_ratio: float = 0.01
    clip_grad: float = 1.0
    action_weight: float = 0.5
    privacy_weight: float = 0.5
    sparsity_weight: float = 1.0
    decoder_init: str = "random"
    privacy_objective: str = "bce"
    recognizer_lr_scale: float = 1.0
    recognizer_warmup_epochs: int = 0
    privacy_restart_every: int = 0
    amp: str = "auto"
    compile: bool = False
    checkpoint_every: int = 500
    log_every: int = 10
    seed: int = 0
    deterministic: bool = False
    init_2d: str | None = None
    progress: bool = True
    model_overrides: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.phase1_epochs < 0 or self.phase2_epochs < 0:
            raise ValueError("phase1_epochs and phase2_epochs must be >= 0")
        if not 0 <= self.recognizer_warmup_epochs <= self.phase2_epochs:
            raise ValueError(f"recognizer_warmup_epochs must be in [0, phase2_epochs={self.phase2_epochs}], got "
                             f"{self.recognizer_warmup_epochs}")
        if self.privacy_objective not in ("bce", "entropy"):
            raise ValueError(f"privacy_objective must be 'bce' or 'entropy', got {self.privacy_objective!r}")
        if self.decoder_init not in ("random", "lstsq"):
            raise ValueError(f"decoder_init must be 'random' or 'lstsq', got {self.decoder_init!r}")
        if self.privacy_restart_every < 0:
            raise ValueError(f"privacy_restart_every must be >= 0 (0: off), got {self.privacy_restart_every}")
        if self.amp not in ("auto", "bf16", "none"):
            raise ValueError(f"amp must be 'auto', 'bf16' or 'none', got {self.amp!r}")
        if not self.base_lr > 0:
            raise ValueError(f"base_lr must be > 0, got {self.base_lr}")
        negative = {name: getattr(self, name) for name in (
            "weight_decay", "warmup_epochs", "min_lr_ratio", "clip_grad", "action_weight", "privacy_weight",
            "sparsity_weight", "recognizer_lr_scale", "checkpoint_every", "log_every", "workers")
            if getattr(self, name) < 0}
        if negative:
            raise ValueError(f"these settings must be >= 0 (a negative weight would flip its loss): {negative}")

    def model_config(self, num_classes: int) -> STPrivacyConfig:
        extra = {k: v for k, v in (("num_frames", self.num_frames), ("image_size", self.image_size)) if v is not None}
        return STPrivacyConfig.from_name(self.preset, num_classes=num_classes, **extra, **self.model_overrides)

    def recognizer_config(self, num_outputs: int) -> RecognizerConfig:
        extra = {k: v for k, v in (("num_frames", self.num_frames), ("image_size", self.image_size)) if v is not None}
        backbone = {k: v for k, v in self.model_overrides.items() if k in {f.name for f in
                                                                          dataclasses.fields(RecognizerConfig)}}
        return RecognizerConfig.from_name(self.preset, num_outputs=num_outputs, **extra, **backbone)


class TrainingDiverged(RuntimeError):
    """A loss became NaN or Inf; a checkpoint of the state before the bad step was written."""


class TrainingInterrupted(RuntimeError):
    """SIGTERM or SIGINT arrived; a checkpoint was written at the step boundary."""


# -- distributed helpers ----------------------------------------------------------------------------


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed() -> DistInfo:
    """Join the torchrun process group when WORLD_SIZE > 1 (NCCL on GPU, gloo on CPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if torch.cuda.is_available():
            torch.cuda.set_device(local)
        dist.init_process_group(backend=backend)
    return DistInfo(rank, world, local)


def shutdown_distributed() -> None:
    """Leave the process group in order (a barrier, then destroy it), rather than while the process exits,
    where gloo can abort on a peer that already closed its sockets."""
    if dist.is_available() and dist.is_initialized():
        try:
            dist.barrier()
        finally:
            dist.destroy_process_group()


def _jsonable(value: Any) -> Any:
    """A config value as it reads back from a checkpoint (tuples come back as lists)."""
    return [_jsonable(v) for v in value] if isinstance(value, (list, tuple)) else value


def _unwrap(model: nn.Module) -> nn.Module:
    model = getattr(model, "_orig_mod", model)  # torch.compile
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


# -- optimisation -----------------------------------------------------------------------------------


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: weight decay on matrices, none on norms, biases and positional embeddings."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 or name.endswith("pos_embed") else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def lr_factor(step: int, total: int, warmup: int, min_ratio: float) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine from 1 to ``min_ratio`` at ``total`` steps."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def make_optimizer(model: nn.Module, lr: float, cfg: TrainConfig, total_steps: int, warmup_steps: int):
    opt = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=lr, betas=(0.9, 0.999))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: lr_factor(s, total_steps, warmup_steps, cfg.min_lr_ratio)
    )
    return opt, sched


# -- RNG state --------------------------------------------------------------------------------------


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    np_state = np.random.get_state()
    state["numpy"] = (np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:])
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _to_tuples(obj):
    """torch.load(weights_only=True) returns python's random state with lists; random.setstate wants tuples."""
    if isinstance(obj, list):
        return tuple(_to_tuples(x) for x in obj)
    return obj


# -- the trainer ------------------------------------------------------------------------------------


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
            torch.use_deterministic_algorithms(True)
        torch.manual_seed(cfg.seed)  # same initial weights on every rank
        random.seed(cfg.seed)
        np.random.seed(cfg.seed)
        if loader is None and cfg.phase2_epochs > 0 and not cfg.labels:
            raise ValueError("phase 2 needs privacy labels (the adversary trains on them): give --labels "
                             "(the VP .pickle or a .csv), or --phase2-epochs 0 for phase 1 alone")
        self.loader = loader if loader is not None else self._default_loader()
        self.num_classes = len(self.loader.classes)
        self.model_cfg = cfg.model_config(self.num_classes)
        self.anonymizer = STPrivacy(self.model_cfg).to(self.device)
        self.action_rec = VideoRecognizer(cfg.recognizer_config(self.num_classes)).to(self.device)
        self.privacy_rec = VideoRecognizer(cfg.recognizer_config(5)).to(self.device)
        if cfg.init_2d:
            from stpcore.models import load_inflated_2d_vit

            for m in (self.anonymizer, self.action_rec, self.privacy_rec):
                load_inflated_2d_vit(m, cfg.init_2d)
        self.steps_per_epoch = max(1, len(self.loader))
        world_batch = cfg.batch_size * self.dist.world_size
        self.lr = cfg.base_lr * world_batch / 512
        warm = int(cfg.warmup_epochs * self.steps_per_epoch)
        p1 = cfg.phase1_epochs * self.steps_per_epoch
        p2 = cfg.phase2_epochs * self.steps_per_epoch
        p2_game = (cfg.phase2_epochs - cfg.recognizer_warmup_epochs) * self.steps_per_epoch  # STPrivacy's updates
        self.opt, self.sched = {}, {}
        self.opt["phase1"], self.sched["phase1"] = make_optimizer(self.anonymizer, self.lr, cfg, p1, min(warm, p1))
        self.opt["phase2"], self.sched["phase2"] = make_optimizer(self.anonymizer, self.lr, cfg, p2_game,
                                                                  min(warm, p2_game))
        rec_lr = self.lr * cfg.recognizer_lr_scale
        self.opt["action"], self.sched["action"] = make_optimizer(self.action_rec, rec_lr, cfg, p2, min(warm, p2))
        self.opt["privacy"], self.sched["privacy"] = make_optimizer(self.privacy_rec, rec_lr, cfg, p2, min(warm, p2))
        self.phase, self.epoch, self.step_in_epoch, self.global_step = "phase1", 0, 0, 0
        # Gumbel noise comes from the trainer's own generator (one stream per rank), not the global RNG that
        # data loaders also draw from, so a resumed run draws exactly the noise an uninterrupted one would.
        self.noise_gen = torch.Generator(device=self.device).manual_seed(cfg.seed * 1009 + self.dist.rank + 1)
        self._stop_signal: int | None = None
        self.out_dir = Path(cfg.out_dir)
        self._wrap_models()

    # -- set-up ------------------------------------------------------------------------------------

    def _default_loader(self):
        from stpcore.data import DataConfig, get_loader

        cfg = self.cfg
        model_cfg = cfg.model_config(1)
        data = DataConfig(
            root=cfg.data_root, kind=cfg.kind, split=cfg.split, train=True, labels=cfg.labels,
            batch_size=cfg.batch_size, workers=cfg.workers, decoder=cfg.decoder,
            device="cuda" if torch.cuda.is_available() else "cpu", stride=cfg.stride,
            num_frames=model_cfg.num_frames, crop=model_cfg.image_size,
            short_side=cfg.short_side or round(model_cfg.image_size * 8 / 7),
            shard_id=self.dist.rank, num_shards=self.dist.world_size, seed=cfg.seed, drop_last=True,
        )
        return get_loader(data)

    def _wrap_models(self) -> None:
        self.models = {"anonymizer": self.anonymizer, "action": self.action_rec, "privacy": self.privacy_rec}
        if self.dist.world_size > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            # Each phase leaves some heads unused (phase 1: reconstruction; phase 2: the own action head); the
            # forward skips them (reconstruct= / classify=), and find_unused_parameters lets DDP skip their grads.
            self.models = {
                k: nn.parallel.DistributedDataParallel(m, device_ids=ids, find_unused_parameters=k == "anonymizer")
                for k, m in self.models.items()
            }
        if self.cfg.compile:
            self.models = {k: torch.compile(m) for k, m in self.models.items()}

    def _autocast(self):
        use = self.cfg.amp == "bf16" or (self.cfg.amp == "auto" and self.device.type == "cuda")
        return torch.autocast(self.device.type, dtype=torch.bfloat16) if use else nullcontext()

    # -- checkpoints -------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        return {
            "format": "stpcore-train-v1",
            "config": dataclasses.asdict(self.cfg),
            "model_config": dataclasses.asdict(self.model_cfg),
            "classes": list(self.loader.classes),
            "models": {k: _unwrap(m).state_dict() for k, m in self.models.items()},
            "optimizers": {k: o.state_dict() for k, o in self.opt.items()},
            "schedulers": {k: s.state_dict() for k, s in self.sched.items()},
            "rng": rng_state(),
            "noise_rng": self.noise_gen.get_state(),
            "position": {"phase": self.phase, "epoch": self.epoch, "step_in_epoch": self.step_in_epoch,
                         "global_step": self.global_step, "steps_per_epoch": self.steps_per_epoch,
                         "world_size": self.dist.world_size},
        }

    def save_checkpoint(self, name: str = "last.pt") -> Path | None:
        """Write a checkpoint atomically (rank 0 writes; every rank must call it); returns its path."""
        path = self.out_dir / name
        noise_states = [self.noise_gen.get_state()]
        if self.dist.world_size > 1:  # each rank draws its own Gumbel noise: keep every rank's generator
            noise_states = [None] * self.dist.world_size
            dist.all_gather_object(noise_states, self.noise_gen.get_state().cpu())
        if self.dist.main:
            state = self.state_dict()
            state["noise_rng_per_rank"] = noise_states
            with atomic_path(path) as tmp:
                torch.save(state, tmp)
        if self.dist.world_size > 1:
            dist.barrier()
        return path

    def load_checkpoint(self, path: str | os.PathLike) -> None:
        """Restore a checkpoint written by :meth:`save_checkpoint` (weights_only: nothing is executed)."""
        state = load_weights_only(path)
        if state.get("format") != "stpcore-train-v1":
            raise ValueError(f"{path}: not an stpcore training checkpoint (format {state.get('format')!r})")
        self._check_resumable(path, state)
        for k, m in self.models.items():
            _unwrap(m).load_state_dict(state["models"][k])
        for k, o in self.opt.items():
            o.load_state_dict(state["optimizers"][k])
        for k, s in self.sched.items():
            s.load_state_dict(state["schedulers"][k])
        rng = dict(state["rng"])
        rng["python"] = _to_tuples(rng["python"])
        set_rng_state(rng)
        per_rank = state.get("noise_rng_per_rank") or [state["noise_rng"]]
        self.noise_gen.set_state(per_rank[self.dist.rank])
        pos = state["position"]
        self.phase, self.epoch = pos["phase"], pos["epoch"]
        self.step_in_epoch, self.global_step = pos["step_in_epoch"], pos["global_step"]

    # Settings that may change between a run and its resume without changing what it computes.
    _RESUME_FREE = frozenset({"out_dir", "data_root", "labels", "workers", "decoder", "progress", "log_every",
                              "checkpoint_every", "compile", "deterministic"})

    def _check_resumable(self, path, state: dict) -> None:
        """A resume continues the saved run exactly only with the same schedule: refuse a different number of
        steps per epoch or processes (the position and the lr schedules would no longer line up), and warn
        about any other changed setting."""
        pos = state["position"]
        saved = (pos.get("steps_per_epoch", self.steps_per_epoch), pos.get("world_size", self.dist.world_size))
        if saved != (self.steps_per_epoch, self.dist.world_size):
            raise ValueError(
                f"{path}: saved with {saved[0]} steps per epoch on {saved[1]} process(es), this run has "
                f"{self.steps_per_epoch} on {self.dist.world_size}: resume with the same data, batch_size and "
                f"number of processes, or start a new run")
        now = {k: _jsonable(getattr(self.cfg, k)) for k in dataclasses.asdict(self.cfg) if k not in self._RESUME_FREE}
        changed = {k: (_jsonable(v), now[k]) for k, v in state.get("config", {}).items()
                   if k in now and _jsonable(v) != now[k]}
        if changed and self.dist.main:
            warnings.warn(f"{path}: resuming with changed settings {changed} (saved, now); the run is no longer the "
                          f"one that was saved", RuntimeWarning, stacklevel=3)

    # -- steps -------------------------------------------------------------------------------------

    def _any_rank(self, *flags: bool) -> list[bool]:
        """Each flag OR-ed over all ranks (one small all-reduce), so that every rank takes the same branch:
        a rank that saves a checkpoint and raises alone would leave the others waiting in a collective."""
        if self.dist.world_size == 1:
            return [bool(f) for f in flags]
        t = torch.tensor([int(bool(f)) for f in flags], dtype=torch.int32, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return [bool(v) for v in t.tolist()]

    def _diverged(self, what: str, when: str) -> TrainingDiverged:
        path = self.save_checkpoint(f"diverged-step{self.global_step}.pt")
        return TrainingDiverged(
            f"{what} became NaN/Inf at {self.phase} epoch {self.epoch} step {self.step_in_epoch} (global step "
            f"{self.global_step}); the state {when} is saved in {path}. Lower base_lr, raise warmup_epochs, or "
            f"check the data."
        )

    def _check_finite(self, values: dict[str, torch.Tensor]) -> None:
        bad = [k for k, v in values.items() if not torch.isfinite(v).all()]
        if self._any_rank(bool(bad))[0]:
            raise self._diverged(", ".join(bad) or "a loss on another rank", "before this step")

    def _update(self, name: str, loss: torch.Tensor, model: nn.Module) -> float:
        opt = self.opt[name]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        # The norm of the (already all-reduced) gradients, so every rank sees the same value. A finite loss
        # can still give NaN/Inf gradients; stepping on them would poison the weights, so stop before it.
        clip = self.cfg.clip_grad if self.cfg.clip_grad > 0 else math.inf
        grad_norm = float(nn.utils.clip_grad_norm_(model.parameters(), clip))
        if not math.isfinite(grad_norm):
            opt.zero_grad(set_to_none=True)
            raise self._diverged(f"the gradient of the {name} update", "before this update")
        opt.step()
        self.sched[name].step()
        return grad_norm

    def _gumbel_noise(self, batch_size: int) -> list[torch.Tensor]:
        shape = (batch_size, self.model_cfg.num_tokens, 2)
        return [sample_gumbel(shape, generator=self.noise_gen, device=self.device)
                for _ in range(self.model_cfg.num_stages)]

    def phase1_step(self, batch) -> dict[str, float]:
        anonymizer = self.models["anonymizer"]
        clips, actions = batch.clips.to(self.device), batch.actions.to(self.device)
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
        clips, actions = batch.clips.to(self.device), batch.actions.to(self.device)
        privacy, has_privacy = batch.privacy.to(self.device), batch.has_privacy.to(self.device)
        # 1) STPrivacy: keep the action, defeat the privacy recognizer. The recognizers are frozen here and
        # called unwrapped (no DDP gradient sync for a step that does not update them).
        # During the recognizer warm-up STPrivacy only transforms (no graph, no update).
        game = self.epoch >= cfg.recognizer_warmup_epochs
        frozen = [_unwrap(action_rec), _unwrap(privacy_rec)]
        for m in frozen:
            m.requires_grad_(False)
        with self._autocast(), torch.set_grad_enabled(game):
            # Phase 2 does not use STPrivacy's own action head.
            out = anonymizer(clips, self._gumbel_noise(clips.shape[0]), classify=False)
            sparsity = losses.sparsity_loss(out.decisions, self.model_cfg.keep_ratio, self.model_cfg.num_slots)
            ce = losses.action_loss(frozen[0](out.video, out.keep, mode="policy"), actions)
            privacy_logits = frozen[1](out.video, out.keep, mode="policy")
            bce = losses.masked_privacy_loss(privacy_logits, privacy, has_privacy)
            term = bce if cfg.privacy_objective == "bce" else losses.masked_privacy_entropy(privacy_logits, has_privacy)
            loss = losses.anonymizer_loss(cfg.sparsity_weight * sparsity, ce, term, action_weight=cfg.action_weight,
                                          privacy_weight=cfg.privacy_weight)
        self._check_finite({"anonymizer loss": loss})
        if game:
            self._update("phase2", loss, anonymizer)
        for m in frozen:
            m.requires_grad_(True)
        # 2) The recognizers, on the detached transformed video and mask.
        video, keep = out.video.detach(), out.keep.detach()
        with self._autocast():
            action_logits = action_rec(video, keep, mode="policy")
            rec_ce = losses.action_loss(action_logits, actions)
            privacy_logits = privacy_rec(video, keep, mode="policy")
            rec_bce = losses.masked_privacy_loss(privacy_logits, privacy, has_privacy)
        self._check_finite({"action recognizer loss": rec_ce, "privacy recognizer loss": rec_bce})
        self._update("action", rec_ce, action_rec)
        self._update("privacy", rec_bce, privacy_rec)
        acc = (action_logits.argmax(-1) == actions).float().mean()
        priv_acc = ((privacy_logits > 0).float() == privacy).float()[has_privacy].mean() if has_privacy.any() \
            else torch.tensor(float("nan"))
        return {"loss": loss.item(), "sparsity": sparsity.item(), "ce_action": ce.item(), "bce_privacy": bce.item(),
                "privacy_term": term.item(),
                "rec_ce_action": rec_ce.item(), "rec_bce_privacy": rec_bce.item(), "acc_action": acc.item(),
                "acc_privacy": priv_acc.item(), "kept": keep.float().mean().item()}

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
        """This epoch's batches from batch ``skip`` on (a mid-epoch resume): the loader starts there when it
        can (``start_at``: the finished batches are not decoded again); any other loader is read from the
        start and its first ``skip`` batches are dropped."""
        self.loader.set_epoch(self.epoch)
        if skip and hasattr(self.loader, "start_at"):
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
        self.out_dir.mkdir(parents=True, exist_ok=True)
        with open(self.out_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        writer = self._tensorboard()
        if writer is not None and "step" in record:
            for key, value in record.items():
                if isinstance(value, float) and key not in ("seconds",):
                    writer.add_scalar(f"{record['phase']}/{key}", value, record["step"])

    def _tensorboard(self):
        """A SummaryWriter on out_dir/tensorboard, or None when the tensorboard package is absent."""
        if not hasattr(self, "_tb_writer"):
            self._tb_writer = None
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # optional: pip install tensorboard
                return None
            self._tb_writer = SummaryWriter(log_dir=str(self.out_dir / "tensorboard"))
        return self._tb_writer

    def fit(self, resume: str | os.PathLike | None = None) -> dict[str, list[dict]]:
        """Run (or continue) phases 1 and 2; returns the per-step metrics of this call by phase."""
        if resume is not None:
            self.load_checkpoint(resume)
        if self.dist.main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            (self.out_dir / "config.json").write_text(json.dumps(dataclasses.asdict(self.cfg), indent=2))
        history: dict[str, list[dict]] = {p: [] for p in PHASES}
        self.history = history  # also reachable when fit() ends by an exception
        if self.phase == "done":  # a finished run: nothing to train, make sure the exported model exists
            if self.dist.main and not (self.out_dir / "stprivacy.pt").is_file():
                self.export_anonymizer(self.out_dir / "stprivacy.pt")
            return history
        previous = self._install_signal_handlers()
        try:
            for phase in PHASES[PHASES.index(self.phase):]:
                if phase != self.phase:
                    self.phase, self.epoch, self.step_in_epoch = phase, 0, 0
                epochs = self.cfg.phase1_epochs if phase == "phase1" else self.cfg.phase2_epochs
                step_fn = self.phase1_step if phase == "phase1" else self.phase2_step
                if phase == "phase2" and self.epoch == 0 and self.step_in_epoch == 0 \
                        and self.cfg.decoder_init == "lstsq":
                    self._fit_decoder()
                for m in self.models.values():
                    m.train()
                while self.epoch < epochs:
                    self._run_epoch(phase, epochs, step_fn, history)
                    self.epoch += 1
                    self.step_in_epoch = 0
                    self.save_checkpoint()
            self.phase = "done"
            self.save_checkpoint()
            if getattr(self, "_tb_writer", None) is not None:
                self._tb_writer.flush()
            if self.dist.main:
                self.export_anonymizer(self.out_dir / "stprivacy.pt")
        finally:
            for sig, h in previous.items():
                signal.signal(sig, h)
        return history

    def _fit_decoder(self, ridge: float = 1e-3) -> None:
        """decoder_init="lstsq": set head_recon to the ridge-regression map from LayerNorm(final kept tokens)
        of the eval-mode (top-k) model to the input tubelets' pixels, over one pass of the training data.
        Normal equations in float64, summed over ranks, so every rank gets the same decoder."""
        from stpcore.tubelets import to_tubelets

        model = self.anonymizer
        dim, pixels = self.model_cfg.embed_dim, self.model_cfg.tubelet_dim
        xtx = torch.zeros(dim + 1, dim + 1, dtype=torch.float64, device=self.device)
        xty = torch.zeros(dim + 1, pixels, dtype=torch.float64, device=self.device)
        captured: list[torch.Tensor] = []
        seen = 0
        hook = model.norm_recon.register_forward_hook(lambda mod, args, out: captured.append(out))
        model.eval()
        try:
            self.loader.set_epoch(self.epoch)
            with torch.no_grad(), self._autocast():
                for batch in self.loader:
                    clips = batch.clips.to(self.device)
                    seen += clips.shape[0]
                    captured.clear()
                    out = model(clips)
                    feats = captured[0].double()  # (B, K, D), the kept tokens after the final LayerNorm
                    target = to_tubelets(clips, self.model_cfg.tubelet).double()  # (B, N, P)
                    target = target.gather(1, out.kept_positions[..., None].expand(-1, -1, pixels))
                    x = torch.cat([feats, torch.ones_like(feats[..., :1])], dim=-1).reshape(-1, dim + 1)
                    xtx += x.T @ x
                    xty += x.T @ target.reshape(-1, pixels)
        finally:
            hook.remove()
            model.train()
        if self.dist.world_size > 1:
            dist.all_reduce(xtx)
            dist.all_reduce(xty)
            total = torch.tensor([seen], dtype=torch.int64, device=self.device)
            dist.all_reduce(total)
            seen = int(total.item())  # the same on every rank, so all fit (or all keep) the head together
        if seen == 0:
            warnings.warn("decoder_init='lstsq': the training loader yielded no batches (fewer clips than one "
                          "batch with drop_last?); the reconstruction head keeps its random initialisation",
                          RuntimeWarning, stacklevel=2)
            return
        reg = ridge * xtx.diagonal().mean() * torch.eye(dim + 1, dtype=torch.float64, device=self.device)
        solution = torch.linalg.solve(xtx + reg, xty)  # (D + 1, P)
        with torch.no_grad():
            model.head_recon.weight.copy_(solution[:-1].T)
            model.head_recon.bias.copy_(solution[-1])
        if self.dist.main:
            self._log({"phase": "phase2", "epoch": self.epoch, "event": "decoder fitted (lstsq)", "clips": seen})

    def _maybe_restart_privacy(self) -> None:
        """At the start of every privacy_restart_every-th phase-2 epoch after the warm-up: a fresh privacy
        recognizer. Seeded by (seed, epoch), so a resumed run restarts to the same weights."""
        cfg, every, first = self.cfg, self.cfg.privacy_restart_every, self.cfg.recognizer_warmup_epochs
        if not (self.phase == "phase2" and every and self.step_in_epoch == 0 and self.epoch > first
                and (self.epoch - first) % every == 0):
            return
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed * 7919 + self.epoch)
            fresh = VideoRecognizer(cfg.recognizer_config(5))
        if cfg.init_2d:
            from stpcore.models import load_inflated_2d_vit

            load_inflated_2d_vit(fresh, cfg.init_2d)
        self.privacy_rec.load_state_dict(fresh.state_dict())  # in place: DDP / compile wrappers stay valid
        self.opt["privacy"].state.clear()
        if self.dist.main:
            self._log({"phase": "phase2", "epoch": self.epoch, "event": "privacy recognizer restarted"})

    def _run_epoch(self, phase: str, epochs: int, step_fn, history) -> None:
        self._maybe_restart_privacy()
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
            if getattr(batch, "video_index", None) is not None:
                seen += batch.video_index.tolist()
            if phase == "phase2":
                labelled += int(batch.has_privacy.sum())
            lr = self.opt[phase].param_groups[0]["lr"]  # the rate this step uses (the schedulers step after it)
            metrics = step_fn(batch)
            ran += 1
            self.step_in_epoch += 1
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
            if self._any_rank(self._stop_signal is not None)[0]:  # a signal may reach the ranks at different steps
                path = self.save_checkpoint()
                raise TrainingInterrupted(f"signal {self._stop_signal or 'on another rank'}: checkpoint written to "
                                          f"{path}; continue with --resume {path}")
        if bar is not None:
            bar.close()
        if phase == "phase2" and self._any_rank(ran > 0 and labelled == 0)[0] and self.dist.main:
            warnings.warn(f"phase 2 epoch {self.epoch}: a rank trained on no clip with privacy labels, so the "
                          f"privacy adversary learned nothing there; check that the label keys (<class>/<video>) "
                          f"match the videos", RuntimeWarning, stacklevel=2)
            self._log({"phase": phase, "epoch": self.epoch, "event": "no privacy labels seen"})
        if self.dist.world_size > 1 and seen:
            self._log_sharding(phase, seen)
        report = getattr(self.loader, "report", None)
        if report is not None and self.dist.main:
            counts = dict(report().counts)
            if counts:
                self._log({"phase": phase, "epoch": self.epoch, "data_report": counts})

    def _log_sharding(self, phase: str, seen: list[int]) -> None:
        """Rank 0 logs which videos each rank trained on this epoch: the shards must not overlap."""
        gathered: list[list[int] | None] = [None] * self.dist.world_size
        dist.all_gather_object(gathered, sorted(set(seen)))
        sets = [set(g or ()) for g in gathered]
        overlap = sum(len(a & b) for i, a in enumerate(sets) for b in sets[i + 1:])
        self._log({"phase": phase, "epoch": self.epoch, "videos_per_rank": [len(x) for x in sets],
                   "videos_total": len(set().union(*sets)), "videos_in_two_ranks": overlap})

    def export_anonymizer(self, path: str | os.PathLike) -> Path:
        """Write the STPrivacy weights and config alone: what ``stpcore anonymize --checkpoint`` reads."""
        return save_anonymizer(_unwrap(self.models["anonymizer"]), path, classes=list(self.loader.classes))


def save_anonymizer(model: STPrivacy, path: str | os.PathLike, classes: Iterable[str] = ()) -> Path:
    """Save an STPrivacy model's weights and config (read back with :func:`load_anonymizer`)."""
    state = {"format": "stpcore-stprivacy-v1", "model_config": dataclasses.asdict(model.cfg),
             "state_dict": model.state_dict(), "classes": list(classes)}
    with atomic_path(path) as tmp:
        torch.save(state, tmp)
    return Path(path)


def load_anonymizer(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> STPrivacy:
    """An STPrivacy model from :func:`save_anonymizer`'s file or a training checkpoint (weights_only)."""
    state = load_weights_only(path, map_location)
    fmt = state.get("format") if isinstance(state, dict) else None
    if fmt == "stpcore-stprivacy-v1":
        weights = state["state_dict"]
    elif fmt == "stpcore-train-v1":
        weights = state["models"]["anonymizer"]
    else:
        raise ValueError(f"{path}: not an stpcore STPrivacy checkpoint (format {fmt!r}); expected a file written "
                         f"by `stpcore train` (stprivacy.pt or last.pt)")
    model_cfg = dict(state["model_config"])
    model_cfg["tubelet"] = tuple(model_cfg["tubelet"])
    model_cfg["prune_locations"] = tuple(model_cfg["prune_locations"])
    model = STPrivacy(STPrivacyConfig(**model_cfg))
    model.load_state_dict(weights)
    return model.eval()
