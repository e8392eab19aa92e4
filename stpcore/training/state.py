"""A training run's checkpoint: its format, the RNG states, saving, loading, and the resume check.

A checkpoint (``last.pt``; format "stpcore-train-v1") holds the three models, their optimizers and
schedulers, the global RNG states, every rank's Gumbel-noise generator, the position in the run and the
config. It is written atomically by rank 0 and read with ``weights_only`` (nothing in it is executed).
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import random
import shutil
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.distributed as dist

from stpcore.media import atomic_path
from stpcore.models.checkpoints import TRAIN_FORMAT, load_weights_only, reconstruction_trained, save_atomically
from stpcore.runtime import unwrap

if TYPE_CHECKING:
    from stpcore.training.trainer import Trainer

# Settings that may change between a run and its resume without changing what it computes.
RESUME_FREE = frozenset({"out_dir", "data_root", "labels", "workers", "decoder", "progress", "log_every",
                         "checkpoint_every", "compile", "deterministic"})


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
        # A machine with fewer GPUs than the one that saved it restores the devices it has (set_rng_state_all
        # would index past them).
        for device, device_state in enumerate(state["cuda"][: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(device_state, device)


def restore_generator(generator: torch.Generator, saved: torch.Tensor, path) -> None:
    """Put ``saved`` (a generator's get_state()) into ``generator``. A state of another device type (a run saved on
    a GPU resumed on a CPU, or the reverse: their states differ in size and kind) cannot be set; the generator is
    then seeded from the saved state instead, so the resumed run is still reproducible, with a warning that its
    noise is not the one the saved run would have drawn."""
    try:
        generator.set_state(saved)
        return
    except RuntimeError:
        pass
    seed = int.from_bytes(hashlib.sha256(saved.cpu().numpy().tobytes()).digest()[:8], "little") >> 1
    generator.manual_seed(seed)
    warnings.warn(f"{path}: its Gumbel-noise generator state is of another device type than this run's "
                  f"({generator.device.type}): the noise continues from a seed derived from it, so the resumed run "
                  f"is reproducible but does not draw the noise an uninterrupted run on the saved device would",
                  RuntimeWarning, stacklevel=3)


def _to_tuples(obj):
    """torch.load(weights_only=True) returns python's random state with lists; random.setstate wants tuples."""
    if isinstance(obj, list):
        return tuple(_to_tuples(x) for x in obj)
    return obj


def _jsonable(value: Any) -> Any:
    """A config value as it reads back from a checkpoint (tuples come back as lists)."""
    return [_jsonable(v) for v in value] if isinstance(value, (list, tuple)) else value


def state_dict(trainer: Trainer, data_counts: dict[str, int] | None = None) -> dict:
    """The checkpoint's contents (rank 0's view; ``data_counts``: the data report summed over the ranks, which
    save_checkpoint gathers from all of them; else this rank's)."""
    if data_counts is None and hasattr(trainer.loader, "report"):
        data_counts = trainer._data_counts(across_ranks=False)
    return {
        "format": TRAIN_FORMAT,
        "config": dataclasses.asdict(trainer.cfg),
        "model_config": dataclasses.asdict(trainer.model_cfg),
        "classes": list(trainer.loader.classes),
        "train_videos": train_videos(trainer.loader),
        "models": {k: unwrap(m).state_dict() for k, m in trainer.models.items()},
        "optimizers": {k: o.state_dict() for k, o in trainer.opt.items()},
        "schedulers": {k: s.state_dict() for k, s in trainer.sched.items()},
        "rng": rng_state(),
        "noise_rng": trainer.noise_gen.get_state(),
        "replay": [{k: v.cpu() for k, v in entry.items()} for entry in trainer.replay],
        # What metrics.jsonl held when this was written: a resume cuts the lines a killed run logged after it.
        "metrics_bytes": _size(trainer.out_dir / "metrics.jsonl"),
        # The data report so far (summed over the ranks) and what of it was logged: a resume continues both.
        "data_counts": data_counts,
        "data_reported": dict(trainer._reported),
        "position": {"phase": trainer.phase, "epoch": trainer.epoch, "step_in_epoch": trainer.step_in_epoch,
                     "global_step": trainer.global_step, "steps_per_epoch": trainer.steps_per_epoch,
                     "world_size": trainer.dist.world_size},
    }


def train_videos(loader) -> str | None:
    """SHA-256 of the ids of the videos the loader trains on (after the validation part is held out); None for a
    loader that lists none. A resume must train on the same videos: a changed validation part would move held-out
    videos into training."""
    records = getattr(loader, "records", None)
    if not records:
        return None
    return hashlib.sha256("\n".join(sorted(r.video_id for r in records)).encode()).hexdigest()


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def cut_metrics(path: Path, size: int | None) -> None:
    """Shorten metrics.jsonl to ``size`` bytes (what it held when the resumed checkpoint was written), so the steps a
    killed run logged after its checkpoint, which the resumed run trains and logs again, appear once. A file no
    longer than that (another out_dir, or one written before checkpoints recorded it: ``None``) is left alone."""
    if size is None or _size(path) <= size:
        return
    with open(path, "r+b") as f:
        f.truncate(size)


def candidate_due(epoch: int, cfg: dict) -> bool:
    """Whether phase-2 epoch ``epoch`` (1-based) ends with a model-selection candidate, by a run's config (a
    TrainConfig as a dict: the saved one of a checkpoint, or the current): every ``candidate_every``-th epoch and
    the last, except while the recognizer warm-up has left the reconstruction head untrained (such a model is no
    anonymizer, so it is not offered to the selection)."""
    every, epochs = cfg.get("candidate_every", 0), cfg["phase2_epochs"]
    if every <= 0 or not (epoch % every == 0 or epoch == epochs):
        return False
    return reconstruction_trained("phase2", epoch, 0, epochs, cfg.get("recognizer_warmup_epochs", 0),
                                  cfg.get("decoder_init", "random"))


def carry_over(trainer: Trainer, saved_dir: Path) -> None:
    """A run resumed into another out_dir than its checkpoint's: copy the saved run's metrics.jsonl (as far as the
    checkpoint holds it) and its model-selection candidates, so the new folder holds the whole run, as a resume in
    place does. What is not there (the checkpoint alone was moved) is warned about, and the run goes on."""
    out, size = trainer.out_dir, trainer.metrics_bytes
    out.mkdir(parents=True, exist_ok=True)
    log = saved_dir / "metrics.jsonl"
    if size is None and log.is_file():  # a checkpoint from before sizes were recorded: the whole log
        size = _size(log)
    if size and _size(log) >= size:
        with open(log, "rb") as f, atomic_path(out / "metrics.jsonl") as tmp:
            tmp.write_bytes(f.read(size))
    elif size:
        warnings.warn(f"{log} is missing or shorter than when the checkpoint was written: {out / 'metrics.jsonl'} "
                      f"holds the steps of this resumed run only", RuntimeWarning, stacklevel=3)
    for stale in (out / "candidates").glob("phase2-epoch*.pt"):  # of no run this folder holds
        stale.unlink()
    if trainer.phase not in ("phase2", "done"):
        return
    # The candidates the saved run exported before its checkpoint, by its own settings (a resume may change
    # candidate_every: the later ones follow the new value, as in a resume in place).
    saved_cfg = {**dataclasses.asdict(trainer.cfg), **(trainer.saved_config or {})}
    last = trainer.epoch if trainer.phase == "phase2" else saved_cfg["phase2_epochs"]
    missing = []
    for epoch in (e for e in range(1, last + 1) if candidate_due(e, saved_cfg)):
        name = f"phase2-epoch{epoch:03d}.pt"
        if not (saved_dir / "candidates" / name).is_file():
            missing.append(epoch)
            continue
        with atomic_path(out / "candidates" / name) as tmp:
            shutil.copyfile(saved_dir / "candidates" / name, tmp)
    if missing:
        warnings.warn(f"{saved_dir / 'candidates'} lacks the candidates of phase-2 epochs {missing}: this run's model "
                      f"selection will not see them", RuntimeWarning, stacklevel=3)


def save_checkpoint(trainer: Trainer, name: str = "last.pt") -> Path:
    """Write a checkpoint atomically (rank 0 writes; every rank must call it); returns its path."""
    path = trainer.out_dir / name
    noise_states = [trainer.noise_gen.get_state()]
    if trainer.dist.world_size > 1:  # each rank draws its own Gumbel noise: keep every rank's generator
        noise_states = [None] * trainer.dist.world_size
        dist.all_gather_object(noise_states, trainer.noise_gen.get_state().cpu())
    positions = [trainer.videos_in_epoch]  # each rank's own shard: where its loader had read to
    if trainer.dist.world_size > 1:
        positions = [None] * trainer.dist.world_size
        dist.all_gather_object(positions, trainer.videos_in_epoch)
    replay_states = None
    if trainer.dist.world_size > 1 and trainer.cfg.privacy_replay:  # each rank replays its own past batches
        # To rank 0 only, which writes them (an all-gather sent every rank's buffer to every rank: world x buffer
        # on each, 39 MB a batch for vit_small at batch 32).
        replay_states = [None] * trainer.dist.world_size if trainer.dist.main else None
        dist.gather_object([{k: v.cpu() for k, v in e.items()} for e in trainer.replay], replay_states, dst=0)
    counts = trainer._data_counts() if hasattr(trainer.loader, "report") else None  # every rank: a collective
    if trainer.dist.main:
        state = state_dict(trainer, counts)
        state["noise_rng_per_rank"] = noise_states
        state["position"]["videos_in_epoch_per_rank"] = positions
        if replay_states is not None:
            state["replay_per_rank"] = replay_states
        if trainer._write_error is None:  # after a failed write (a lost metrics line), no checkpoint that skips it
            trainer._on_main(str(path), save_atomically, state, path)
    # Every rank waits for the file (as a barrier would), and all raise if rank 0 could not write it, or anything
    # since the last check.
    trainer._check_writes()
    return path



def load_checkpoint(trainer: Trainer, path: str | os.PathLike) -> None:
    """Restore a checkpoint written by :func:`save_checkpoint` into ``trainer`` (weights_only)."""
    state = load_weights_only(path)
    if state.get("format") != TRAIN_FORMAT:
        raise ValueError(f"{path}: not an stpcore training checkpoint (format {state.get('format')!r})")
    check_resumable(trainer, path, state)
    for k, m in trainer.models.items():
        unwrap(m).load_state_dict(state["models"][k])
    # The rates come from this run's settings: the saved optimizer and scheduler states carry the saved run's
    # (a resume with a lower --base-lr, as the divergence message advises, kept the old schedule).
    rates = {k: [(g["initial_lr"], g["weight_decay"]) for g in o.param_groups] for k, o in trainer.opt.items()}
    for k, o in trainer.opt.items():
        o.load_state_dict(state["optimizers"][k])
    for k, s in trainer.sched.items():
        s.load_state_dict(state["schedulers"][k])
        groups = trainer.opt[k].param_groups
        for g, (lr, decay) in zip(groups, rates[k], strict=True):
            g["initial_lr"], g["weight_decay"] = lr, decay
        s.base_lrs = [lr for lr, _ in rates[k]]
        for g, base, factor in zip(groups, s.base_lrs, s.lr_lambdas, strict=True):
            g["lr"] = base * factor(s.last_epoch)  # as LambdaLR computes it: unchanged settings give the same bits
        s._last_lr = [g["lr"] for g in groups]
    rng = dict(state["rng"])
    rng["python"] = _to_tuples(rng["python"])
    set_rng_state(rng)
    per_rank_replay = state.get("replay_per_rank")  # several processes: every rank's own buffer
    saved = per_rank_replay[trainer.dist.rank] if per_rank_replay else state.get("replay", [])
    saved = saved[: trainer.cfg.privacy_replay]  # a resume with a smaller (or no) buffer cuts it
    trainer.replay = [{k: v.to(trainer.device) for k, v in entry.items()} for entry in saved]
    per_rank = state.get("noise_rng_per_rank") or [state["noise_rng"]]
    restore_generator(trainer.noise_gen, per_rank[trainer.dist.rank], path)
    trainer.metrics_bytes = state.get("metrics_bytes")
    trainer.saved_config = state.get("config")
    report = getattr(trainer.loader, "report", None)
    if state.get("data_counts") is not None and report is not None:  # both loaders report what they skipped
        # The data report goes on from the saved run's: this loader's counts are offset by what the saved one had
        # counted, less what this one counts again at its start (the split entries without a file).
        saved, start = state["data_counts"], dict(report().counts)
        trainer._count_offset = {k: saved.get(k, 0) - start.get(k, 0) for k in set(saved) | set(start)}
        trainer._reported = dict(state["data_reported"])
    pos = state["position"]
    trainer.phase, trainer.epoch = pos["phase"], pos["epoch"]
    trainer.step_in_epoch, trainer.global_step = pos["step_in_epoch"], pos["global_step"]
    # Checkpoints written before this was saved resume whole batches in (exact unless a video was unreadable).
    read = pos.get("videos_in_epoch_per_rank")
    trainer.videos_in_epoch = read[trainer.dist.rank] if read else None


def check_resumable(trainer: Trainer, path, state: dict) -> None:
    """A resume continues the saved run exactly only with the same schedule: refuse a different number of
    steps per epoch or processes (the position and the lr schedules would no longer line up) and other action
    classes (the data may move: data_root and labels may change), and warn about any other changed setting."""
    pos = state["position"]
    saved = (pos.get("steps_per_epoch", trainer.steps_per_epoch), pos.get("world_size", trainer.dist.world_size))
    if saved != (trainer.steps_per_epoch, trainer.dist.world_size):
        raise ValueError(
            f"{path}: saved with {saved[0]} steps per epoch on {saved[1]} process(es), this run has "
            f"{trainer.steps_per_epoch} on {trainer.dist.world_size}: resume with the same data, batch_size and "
            f"number of processes, or start a new run")
    saved_classes, classes = state.get("classes"), list(trainer.loader.classes)
    if saved_classes is not None and list(saved_classes) != classes:
        # data_root and labels may move between machines; the classes the action head was trained on may not.
        differ = sorted(set(saved_classes) ^ set(classes))
        raise ValueError(
            f"{path}: saved with {len(saved_classes)} action classes, this run's data has {len(classes)}"
            + (f" (in one and not the other: {differ[:6]}{' ...' if len(differ) > 6 else ''})" if differ
               else " (the same names in another order)")
            + ": the action head's outputs would mean other classes; resume with the data it was trained on, or "
              "start a new run")
    cfg = trainer.cfg
    saved_videos, videos = state.get("train_videos"), train_videos(trainer.loader)
    if saved_videos is not None and videos is not None and saved_videos != videos:
        what = (f"the videos it trains on differ from the saved run's (its validation part, {cfg.validation:g} of the "
                f"training videos, is drawn otherwise, or the dataset changed)")
        if cfg.validation > 0:  # a later --select would score candidates on videos they were trained on
            raise ValueError(f"{path}: {what}; resuming would train on videos held out for model selection: start a "
                             f"new run, or resume with the stpcore version and data that saved it")
        if trainer.dist.main:
            warnings.warn(f"{path}: {what}; the run is no longer the one that was saved", RuntimeWarning,
                          stacklevel=4)
    now = {k: _jsonable(getattr(cfg, k)) for k in dataclasses.asdict(cfg) if k not in RESUME_FREE}
    changed = {k: (_jsonable(v), now[k]) for k, v in state.get("config", {}).items()
               if k in now and _jsonable(v) != now[k]}
    _check_same_models(trainer, path, state, changed)
    if pos["phase"] == "done":
        lengths = {k: v for k, v in changed.items() if k in ("phase1_epochs", "phase2_epochs")}
        if lengths:
            raise ValueError(
                f"{path}: this run has finished, and a finished run cannot be extended ({lengths}, saved and now: "
                f"its lr schedules have ended); start a new run (another --out-dir), with --init-2d or the "
                f"settings you want")
        made_with = state.get("config", {}).get("privacy_nullspace", 0)  # runs saved before the option: none
        if made_with != cfg.privacy_nullspace:
            raise ValueError(
                f"{path}: this run has finished, and its final model was made with privacy_nullspace={made_with} "
                f"(now {cfg.privacy_nullspace}): the projection is applied once, when phase 2 ends; start a new run "
                f"(another --out-dir) with the setting you want")
    if changed and trainer.dist.main:
        warnings.warn(f"{path}: resuming with changed settings {changed} (saved, now); the run is no longer the "
                      f"one that was saved", RuntimeWarning, stacklevel=4)


def _check_same_models(trainer: Trainer, path, state: dict, changed: dict) -> None:
    """ValueError when the checkpoint's models are not the ones this run builds (another preset, clip size,
    model override, number of adversaries, or the statistics adversary on or off): such a resume cannot load."""
    saved, built = state.get("models", {}), trainer.models
    problems = [f"model {k!r} is {'not in the checkpoint' if k not in saved else 'not built by this run'}"
                for k in sorted(set(built) ^ set(saved))]
    for name in sorted(set(built) & set(saved)):
        want = {k: tuple(v.shape) for k, v in unwrap(built[name]).state_dict().items()}
        have = {k: tuple(v.shape) for k, v in saved[name].items()}
        diff = sorted(set(want) ^ set(have)) + sorted(k for k in set(want) & set(have) if want[k] != have[k])
        if diff:
            first = diff[0]
            problems.append(f"{name}: {len(diff)} parameter(s) differ, e.g. {first} (checkpoint "
                            f"{have.get(first, 'absent')}, this run {want.get(first, 'absent')})")
    if problems:
        settings = f"; changed settings (saved, now): {changed}" if changed else ""
        raise ValueError(f"{path}: its models differ from this run's: {'; '.join(problems)}{settings}. Resume with "
                         f"the settings it was saved with, or start a new run")
