"""Phase 3 of STPrivacy: evaluate a frozen anonymizer (and the baselines) with fresh recognizers.

The paper's protocol: freeze STPrivacy, transform every video, train NEW action and privacy recognizers on
the transformed train split (80 epochs), test them on the transformed test split, and score them with
:mod:`stpcore.evaluation.metrics`. A method is a transform of :mod:`stpcore.evaluation.methods`.

Protocols. *Known actions*: phases 1-2 and 3 on the same dataset (``stpcore train`` then :func:`evaluate`
with the same ``data_root``). *Unseen actions*: phases 1-2 on dataset A, phase 3 on dataset B, i.e. the same
call with B's root (and labels): the recognizers are new and sized from B's classes, STPrivacy's own action
head is never used. Either way the checkpoint's clip geometry (frames, size) must match the data config;
``check_geometry`` raises a ValueError otherwise.

Files in ``cfg.out_dir``: ``eval_metrics.jsonl`` (one line per recognizer epoch and one per test),
``results.md`` / ``results.csv`` (``write_results``) and ``sweep.csv`` / ``sweep.png`` (``write_sweep``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import time
import warnings
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from stpcore import losses
from stpcore.data.labels import PRIVACY_ATTRIBUTES
from stpcore.evaluation.attackers import FrameCNN, StatsAttacker, appearance_features, budget_for
from stpcore.evaluation.config import EvalConfig, check_geometry
from stpcore.evaluation.methods import METHODS, MethodTransform, STPrivacyTransform, make_transform
from stpcore.evaluation.metrics import Metrics, privacy_metrics, video_metrics
from stpcore.evaluation.report import PAPER_RESULTS, write_results, write_sweep
from stpcore.evaluation.results import MethodResult, SweepPoint
from stpcore.media import atomic_path
from stpcore.models import BackboneConfig, RecognizerConfig, STPrivacy, VideoRecognizer, load_anonymizer
from stpcore.progress import progress
from stpcore.runtime import autocast, clip_loader, make_optimizer
from stpcore.runtime import steps_per_epoch as runtime_steps_per_epoch


def _device(cfg: EvalConfig, device: str | torch.device | None) -> torch.device:
    if device is not None:
        return torch.device(device)
    if cfg.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if torch.device(cfg.device).type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {cfg.device!r}: CUDA is not available here (torch {torch.__version__}); use "
                         f"--device cpu or auto")
    return torch.device(cfg.device)


def _geometry(cfg: EvalConfig, backbone: BackboneConfig | None) -> tuple[int, int]:
    if backbone is not None:
        return check_geometry(backbone, cfg)
    base = RecognizerConfig.from_name(cfg.preset or "vit_small")
    return cfg.num_frames or base.num_frames, cfg.image_size or base.image_size


def recognizer_config(cfg: EvalConfig, num_outputs: int, backbone: BackboneConfig | None = None) -> RecognizerConfig:
    """The fresh recognizers' config at the evaluation's clip geometry: cfg.preset when set, else the
    backbone of ``backbone`` (the STPrivacy checkpoint's config), else "vit_small"."""
    num_frames, image_size = _geometry(cfg, backbone)
    if cfg.preset is None and backbone is not None:
        shape = {f.name: getattr(backbone, f.name) for f in dataclasses.fields(BackboneConfig)}
        return RecognizerConfig(**shape, num_outputs=num_outputs)
    return RecognizerConfig.from_name(cfg.preset or "vit_small", num_outputs=num_outputs, num_frames=num_frames,
                                      image_size=image_size)


def default_loader(cfg: EvalConfig, train: bool, backbone: BackboneConfig | None = None):
    """The dataset loader of cfg at the evaluation's clip geometry (train: random clips, drop_last; test:
    5 clips x 3 crops per video)."""
    num_frames, image_size = _geometry(cfg, backbone)
    return clip_loader(
        cfg.data_root, train=train, num_frames=num_frames, crop=image_size, short_side=cfg.short_side,
        kind=cfg.kind, split=cfg.split, labels=cfg.labels,
        batch_size=cfg.batch_size if train else cfg.test_batch_size, workers=cfg.workers, decoder=cfg.decoder,
        device="cuda" if torch.cuda.is_available() and cfg.device != "cpu" else "cpu", stride=cfg.stride,
        seed=cfg.seed,
    )


def _log(out_dir: Path, record: dict) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / "eval_metrics.jsonl", "a") as f:
        f.write(json.dumps(_nan_to_none(record)) + "\n")


def _nan_to_none(obj: Any) -> Any:
    """NaN is not JSON; undefined metrics become null."""
    if isinstance(obj, float) and math.isnan(obj):
        return None
    if isinstance(obj, dict):
        return {k: _nan_to_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_nan_to_none(v) for v in obj]
    return obj


def _progress(cfg: EvalConfig, total: int, desc: str):
    return progress(total, desc) if cfg.progress else None


def _check_clips(clips: torch.Tensor, rec_cfg: RecognizerConfig) -> None:
    expected = (rec_cfg.num_frames, rec_cfg.image_size, rec_cfg.image_size)
    if clips.dim() != 5 or tuple(clips.shape[2:]) != expected:
        raise ValueError(f"the loader's clips are {tuple(clips.shape)}, but the evaluation expects (B, 3, "
                         f"{expected[0]}, {expected[1]}, {expected[2]}) (from the checkpoint or the config's "
                         f"num_frames / image_size); fix the data config")


def _train_epoch(cfg, transform, models, opts, scheds, cnn_epochs, loader, rec_cfg, device, epoch, method,
                 stats_sink: list | None) -> dict:
    """One epoch on the transformed clips (one transform per batch) of "action", "vit" and, in its first
    ``cnn_epochs`` epochs, "frame_cnn"; the clips' appearance features go to ``stats_sink`` (the stats attacker)
    when it is a list (on the device; one host copy per epoch)."""
    mode = transform.keep_mode or "policy"
    active = {k: m for k, m in models.items() if k != "frame_cnn" or epoch < cnn_epochs}
    for m in active.values():
        m.train()
    loader.set_epoch(epoch)
    bar = _progress(cfg, len(loader), f"{method} epoch {epoch + 1}/{cfg.epochs}")
    start = time.perf_counter()
    # Running sums stay on the device; one host copy per epoch.
    sums = torch.zeros(3, device=device)  # ce * clips, vit bce * clips, correct
    clips_seen = 0
    epoch_features: list[torch.Tensor] = []
    epoch_labels: list[tuple[torch.Tensor, torch.Tensor]] = []
    for step, batch in enumerate(loader):
        clips = batch.clips.to(device, non_blocking=True)
        if step == 0:
            _check_clips(clips, rec_cfg)
        actions = batch.actions.to(device, non_blocking=True)
        privacy = batch.privacy.to(device, non_blocking=True)
        has = batch.has_privacy.to(device, non_blocking=True)
        losses_ = {}
        with autocast(device, cfg.amp):
            video, keep = transform(clips, batch.video_ids, views=batch.views)  # one transform, every update
            action_logits = models["action"](video, keep, mode=mode)
            losses_["action"] = losses.action_loss(action_logits, actions)
            for name, model in active.items():
                if name != "action":
                    losses_[name] = losses.masked_privacy_loss(model(video, keep, mode=mode), privacy, has)
        if stats_sink is not None:
            epoch_features.append(appearance_features(video))
        for name, loss in losses_.items():
            opts[name].zero_grad(set_to_none=True)
            loss.backward()
            if cfg.clip_grad > 0:
                nn.utils.clip_grad_norm_(models[name].parameters(), cfg.clip_grad)
            opts[name].step()
            scheds[name].step()
        n = clips.shape[0]
        correct = (action_logits.detach().argmax(-1) == actions).sum()
        bce = losses_.get("vit", torch.zeros((), device=device)).detach()
        sums += torch.stack([losses_["action"].detach() * n, bce * n, correct.float()])
        if stats_sink is not None:
            epoch_labels.append((batch.privacy, batch.has_privacy))
        clips_seen += n
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    if clips_seen == 0:  # every video skipped: the recognizers would be scored untrained, at chance, as if trained
        report = getattr(loader, "report", None)
        counts = dict(report().counts) if report is not None else {}
        raise ValueError(f"{method} epoch {epoch + 1}: no training clip could be read; every video was skipped "
                         f"({counts or 'no data report'}), so the recognizers would be scored untrained. Check the "
                         f"data with `stpcore data check`; for --decoder dali on a CPU, transcode to VP9 (`stpcore "
                         f"data transcode`) or use --decoder pyav")
    if stats_sink is not None and epoch_features:
        stats_sink.append((torch.cat(epoch_features).cpu(), torch.cat([p for p, _ in epoch_labels]),
                           torch.cat([h for _, h in epoch_labels])))
    ce_sum, bce_sum, correct = sums.tolist()
    clips_seen = max(clips_seen, 1)
    return {"method": method, "epoch": epoch, "lr": opts["action"].param_groups[0]["lr"],
            "ce_action": ce_sum / clips_seen, "bce_privacy": bce_sum / clips_seen,
            "acc_action": correct / clips_seen, "seconds": round(time.perf_counter() - start, 3)}


@torch.no_grad()
def _test(cfg, transform, models, stats, loader, rec_cfg, device, method) -> tuple[Metrics, dict, float, list[str]]:
    """Metrics of the action recognizer (with vit's privacy scores, or the first attacker's), every attacker's
    privacy scores, the kept fraction, and the recognizers whose outputs were not all finite."""
    mode = transform.keep_mode or "policy"
    for m in models.values():
        m.eval()
    attackers = [k for k in models if k != "action"] + (["stats"] if stats is not None else [])
    outs: dict[str, list] = {k: [] for k in ("action", "actions", "labels", "has", "video", "features", *attackers)}
    kept, tokens = torch.zeros((), device=device), 0  # kept tokens (on the device), all tokens
    bar = _progress(cfg, len(loader), f"{method} test")
    for step, batch in enumerate(loader):
        clips = batch.clips.to(device, non_blocking=True)
        if step == 0:
            _check_clips(clips, rec_cfg)
        with autocast(device, cfg.amp):
            video, keep = transform(clips, batch.video_ids, views=batch.views)
            outs["action"].append(models["action"](video, keep, mode=mode).float().softmax(-1))
            for name, model in models.items():
                if name != "action":
                    outs[name].append(model(video, keep, mode=mode).float().sigmoid())
        if stats is not None:
            outs["features"].append(appearance_features(video).cpu())
        if keep is not None:
            kept += keep.float().sum()
            tokens += keep.numel()
        outs["actions"].append(batch.actions)
        outs["labels"].append(batch.privacy)
        outs["has"].append(batch.has_privacy)
        outs["video"].append(batch.video_index)
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    if not outs["action"]:
        raise ValueError(f"{method}: the test loader yielded no batch")
    cat = {k: torch.cat([t.cpu() for t in v]) for k, v in outs.items() if v}
    if stats is not None:
        cat["stats"] = torch.from_numpy(stats.predict_proba(cat["features"].numpy()))
    scores = {}
    for name in attackers:
        cmap, f1, ap, f1_per, skipped, _ = privacy_metrics(cat[name], cat["labels"], cat["has"], cat["video"])
        scores[name] = {"cmap": cmap, "f1": f1, "ap": ap, "f1_per_attribute": f1_per, "skipped_attributes": skipped}
    headline = "vit" if "vit" in attackers else attackers[0]
    metrics = video_metrics(cat["action"], cat["actions"], cat[headline], cat["labels"], cat["has"], cat["video"])
    diverged = [k for k in ("action", *attackers) if not torch.isfinite(cat[k]).all()]
    return metrics, scores, (kept.item() / tokens if tokens else 1.0), diverged


def evaluate_method(
    method_transform: MethodTransform,
    cfg: EvalConfig,
    train_loader=None,
    test_loader=None,
    *,
    backbone: BackboneConfig | None = None,
    device: str | torch.device | None = None,
) -> MethodResult:
    """Train fresh action and privacy recognizers on the transformed train split and test them.

    Both recognizers are trained in the same pass (one transform per batch, two updates) for cfg.epochs with
    AdamW, lr = base_lr * batch_size / 512, warm-up + cosine (``runtime.make_optimizer``). Each epoch appends a
    line to ``cfg.out_dir/eval_metrics.jsonl``; so does the test.

    Args:
        method_transform: the method (see :func:`make_transform`).
        cfg: the evaluation config.
        train_loader: yields :class:`stpcore.data.Batch` batches; has ``__len__``, ``set_epoch`` and
            ``classes``. Default: cfg's train split.
        test_loader: the same; ``video_index`` groups the views of a video. Default: cfg's test split (5 clips
            x 3 crops per video).
        backbone: the recognizers' backbone when cfg.preset is None (default: the transform's STPrivacy
            config, else "vit_small"); evaluate() passes the checkpoint's so the baselines match.
        device: overrides cfg.device.

    Returns:
        :class:`MethodResult`.
    """
    start = time.perf_counter()
    dev = _device(cfg, device)
    transform = method_transform.to(dev)
    model_cfg = transform.model_config
    backbone = backbone if backbone is not None else model_cfg
    train_loader = train_loader if train_loader is not None else default_loader(cfg, True, backbone)
    test_loader = test_loader if test_loader is not None else default_loader(cfg, False, backbone)
    num_classes = len(train_loader.classes)
    action_cfg = recognizer_config(cfg, num_classes, backbone)
    if model_cfg is not None and (action_cfg.tubelet, action_cfg.grid) != (model_cfg.tubelet, model_cfg.grid):
        raise ValueError(f"{transform.name}: the recognizers' tubelet grid {action_cfg.grid} (tubelet "
                         f"{action_cfg.tubelet}, preset {cfg.preset!r}) differs from STPrivacy's {model_cfg.grid} "
                         f"(tubelet {model_cfg.tubelet}); its keep mask cannot be read. Use preset=None")
    attackers = cfg.attacker_names
    budget = budget_for(cfg.preset, action_cfg.image_size)
    torch.manual_seed(cfg.seed)  # every method starts from the same recognizer (and attacker) weights
    models: dict[str, nn.Module] = {"action": VideoRecognizer(action_cfg).to(dev)}
    if "vit" in attackers:
        models["vit"] = VideoRecognizer(dataclasses.replace(action_cfg, num_outputs=len(PRIVACY_ATTRIBUTES))).to(dev)
    from_scratch = not cfg.init_2d and action_cfg.embed_dim >= 384  # a ViT-S or larger, from random weights
    if from_scratch:
        warnings.warn(f"phase 3 trains the {action_cfg.embed_dim}-wide ViT recognizers from random weights; the "
                      f"paper's ViT-S starts from ImageNet weights (pass --init-2d with a 2D ViT checkpoint): without "
                      f"them the results are not comparable with the paper's table", RuntimeWarning, stacklevel=2)
    if cfg.init_2d:
        from stpcore.models import load_inflated_2d_vit

        for m in models.values():
            load_inflated_2d_vit(m, cfg.init_2d)
    if "frame_cnn" in attackers:
        models["frame_cnn"] = FrameCNN(budget.cnn_widths, len(PRIVACY_ATTRIBUTES)).to(dev)
    steps_per_epoch = runtime_steps_per_epoch(train_loader, cfg.batch_size)
    lr = cfg.base_lr * cfg.batch_size / 512
    opts, scheds = {}, {}
    cnn_epochs = min(cfg.epochs, budget.cnn_max_epochs)
    for name, model in models.items():
        epochs = cnn_epochs if name == "frame_cnn" else cfg.epochs
        total, warm = epochs * steps_per_epoch, int(min(cfg.warmup_epochs, epochs) * steps_per_epoch)
        opts[name], scheds[name] = make_optimizer(model, budget.cnn_lr if name == "frame_cnn" else lr, total,
                                                  min(warm, total), cfg.weight_decay, cfg.min_lr_ratio)
    stats_sink: list | None = [] if "stats" in attackers else None
    out_dir = Path(cfg.out_dir)
    for epoch in range(cfg.epochs):
        record = _train_epoch(cfg, transform, models, opts, scheds, cnn_epochs, train_loader, action_cfg, dev, epoch,
                              transform.name, stats_sink)
        _log(out_dir, record)
    stats = None
    if stats_sink is not None:
        feats, labels, has = (torch.cat(parts).numpy() for parts in zip(*stats_sink, strict=True))
        stats = StatsAttacker(budget.stats_c, cfg.seed).fit(feats, labels, has.astype(bool))
    metrics, scores, kept_fraction, diverged = _test(cfg, transform, models, stats, test_loader, action_cfg, dev,
                                                     transform.name)
    notes = ["recognizers from random weights (no init_2d; the paper's start from ImageNet)"] if from_scratch else []
    if diverged:  # the result is still saved: the other recognizers' scores stand, and a resume reuses them
        names = ", ".join(diverged)
        notes.append(f"outputs not finite (diverged in training; its scores are undefined, NaN): {names}")
        warnings.warn(f"{transform.name}: {names} gave non-finite outputs on the test split (diverged in training); "
                      f"its scores are NaN. A lower --base-lr, a --clip-grad above 0 or --amp none may help",
                      RuntimeWarning, stacklevel=2)
    if metrics.skipped_attributes and metrics.num_privacy_videos:
        notes.append(f"cMAP over {5 - len(metrics.skipped_attributes)} of 5 attributes (skipped, test labels all "
                     f"one class: {', '.join(metrics.skipped_attributes)})")
    if metrics.num_privacy_videos == 0:
        notes.append("no test video has privacy labels: cMAP and F1 undefined")
    missing = getattr(transform, "missing", None)
    if missing:
        notes.append(f"{len(missing)} video(s) had no person box and were left unchanged")
    result = MethodResult(
        method=transform.name, top1=metrics.top1, cmap=metrics.cmap, f1=metrics.f1, ap=metrics.ap,
        f1_per_attribute=metrics.f1_per_attribute, skipped_attributes=metrics.skipped_attributes,
        num_test_videos=metrics.num_videos, num_privacy_videos=metrics.num_privacy_videos,
        kept_fraction=kept_fraction, seconds=round(time.perf_counter() - start, 3), epochs=cfg.epochs,
        note="; ".join(notes), attackers=scores,
    )
    _log(out_dir, {"method": result.method, "test": dataclasses.asdict(result)})
    return result


def load_checkpoint(path: str | os.PathLike, cfg: EvalConfig) -> STPrivacy:
    """The frozen STPrivacy model of a checkpoint (stprivacy.pt or last.pt), its geometry checked against cfg."""
    model = load_anonymizer(path)
    check_geometry(model.cfg, cfg, source=f"checkpoint {os.fspath(path)}")
    return model.eval().requires_grad_(False)


def evaluate(
    cfg: EvalConfig,
    checkpoint: str | os.PathLike | None = None,
    methods: Sequence[str] = ("raw", "stprivacy", "downsample4"),
    keep_ratio: float | None = None,
    boxes: Mapping[str, Sequence[float]] | None = None,
    *,
    threshold: float | None = None,
    train_loader=None,
    test_loader=None,
    device: str | torch.device | None = None,
    resume: bool = False,
) -> list[MethodResult]:
    """Phase 3 for several methods on one dataset; writes results.md / results.csv to cfg.out_dir.

    Each finished method is also saved as ``cfg.out_dir/methods/<method>.json`` (atomically), with what it was
    computed from (:func:`method_record_key`: the settings, the checkpoint's weights, the keep ratio or threshold,
    the boxes). With ``resume``, a method whose file there matches is read back instead of trained again, so an
    interrupted evaluation (hours per method at the paper's 80 epochs) goes on from the first unfinished method.

    Args:
        cfg: the evaluation config.
        checkpoint: STPrivacy checkpoint (needed for "stprivacy"; its geometry sets the clip size).
        methods: names from METHODS, each once, evaluated in order ("blacken" needs ``boxes``).
        keep_ratio: STPrivacy's inference alpha (None: the checkpoint's).
        boxes: video_id -> (x0, y0, x1, y1) relative person boxes for "blacken".
        threshold: evaluate STPrivacy in adaptive mode with this threshold instead of a keep ratio.
        train_loader, test_loader: override the dataset loaders (built once from cfg otherwise and shared by
            all methods).
        device: overrides cfg.device.
        resume: reuse the matching finished methods in cfg.out_dir (not with loaders passed in: what they hold
            cannot be checked).

    Returns:
        one :class:`MethodResult` per evaluated method.
    """
    if resume and (train_loader is not None or test_loader is not None):
        raise ValueError("evaluate(resume=True) reuses results only for loaders built from cfg (the data is part of "
                         "what a result is checked against); drop train_loader / test_loader, or resume=False")
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; choose from {list(METHODS)}")
    if not methods:
        raise ValueError(f"no method to evaluate; name at least one of {list(METHODS)}")
    twice = sorted({m for m in methods if list(methods).count(m) > 1})
    if twice:
        raise ValueError(f"method(s) {twice} named more than once; name each once")
    if "blacken" in methods and boxes is None:
        raise ValueError("method 'blacken' needs person boxes: boxes={video_id: (x0, y0, x1, y1)} in relative "
                         "coordinates (stpcore eval --boxes FILE.json)")
    if (keep_ratio is not None or threshold is not None) and "stprivacy" not in methods:
        raise ValueError(f"{'keep_ratio' if keep_ratio is not None else 'threshold'} sets STPrivacy's inference, "
                         f"and 'stprivacy' is not among the methods {list(methods)}: add it, or drop the setting")
    _device(cfg, device)  # a device that is not there, and an out_dir that cannot be a folder, fail before any training
    Path(cfg.out_dir).mkdir(parents=True, exist_ok=True)
    if "stprivacy" in methods and checkpoint is None:
        raise ValueError("method 'stprivacy' needs checkpoint= (stprivacy.pt or last.pt from `stpcore train`)")
    anonymizer = load_checkpoint(checkpoint, cfg) if checkpoint is not None else None
    model_cfg = anonymizer.cfg if anonymizer is not None else None
    # Baselines are run at the checkpoint's geometry too, so every row of the table sees the same clips.
    train_loader = train_loader if train_loader is not None else default_loader(cfg, True, model_cfg)
    test_loader = test_loader if test_loader is not None else default_loader(cfg, False, model_cfg)
    # Every method's transform is built (and its settings checked) before the first recognizer trains, so a bad
    # keep ratio, threshold or box fails at once rather than after the methods before it.
    transforms = {name: make_transform(name, anonymizer=anonymizer, keep_ratio=keep_ratio, threshold=threshold,
                                       boxes=boxes)
                  for name in methods}
    results = []
    for name in methods:
        transform = transforms[name]
        key = method_record_key(cfg, name, anonymizer, keep_ratio, threshold, boxes)
        # Every method's recognizers take the checkpoint's backbone (vit_small without one), on this device type
        # (amp "auto" is bf16 on CUDA only), on these videos.
        key.update(backbone=dataclasses.asdict(model_cfg) if model_cfg is not None else None,
                   **run_context(cfg, device, train=train_loader, test=test_loader))
        record_path = Path(cfg.out_dir) / "methods" / f"{name}.json"
        # backbone: the baselines' recognizers equal the ones STPrivacy's output is evaluated with.
        result, resumed = run_or_resume(record_path, key, resume, lambda t=transform: evaluate_method(
            t, cfg, train_loader, test_loader, backbone=model_cfg, device=device))
        if resumed:
            _log(Path(cfg.out_dir), {"method": name, "resumed": str(record_path)})
        results.append(result)
        write_results(results, cfg.out_dir, dataset=_dataset_of(train_loader))
    return results


# A saved result's record (methods/<name>.json, selection/<name>/result.json): what it was computed from, and it.
RESULT_FORMAT = "stpcore-eval-result-v3"  # v3: crops round half up; blacken boxes on the frame
# EvalConfig fields that do not change a method's result: where it is written, how fast it is read, how it is shown
# (the device type the recognizers run on is part of the key: evaluate() adds it).
_RESUME_FREE = frozenset({"out_dir", "workers", "progress", "device"})


def method_record_key(cfg: EvalConfig, method: str, anonymizer: STPrivacy | None, keep_ratio: float | None,
                      threshold: float | None, boxes: Mapping[str, Sequence[float]] | None) -> dict:
    """What a method's result was computed from: the record format and stpcore's version, the evaluation settings but
    those in ``_RESUME_FREE``, the method, the labels and init_2d files' SHA-256, and what it reads (:func:`evaluate`
    adds the recognizers' backbone and :func:`run_context`: the device type, the decoders, the videos of each
    split): for "stprivacy", the
    checkpoint's weights (SHA-256, ``stpcore.deploy.weights_fingerprint``) and the keep ratio or threshold; for
    "blacken", the boxes."""
    from stpcore import __version__

    settings = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in _RESUME_FREE}
    # The format and stpcore's version: a result made by other code (another attacker budget, a fixed metric) is
    # computed again, not reused.
    key: dict[str, Any] = {"format": RESULT_FORMAT, "stpcore": __version__, "method": method, "settings": settings}
    for name in ("labels", "init_2d"):  # the files' contents: a file may be replaced in place
        if getattr(cfg, name) is not None:
            try:
                key[name] = hashlib.sha256(Path(getattr(cfg, name)).read_bytes()).hexdigest()
            except OSError:
                key[name] = None
    if method == "stprivacy":
        from stpcore.deploy import weights_fingerprint

        key.update(weights=weights_fingerprint(anonymizer), keep_ratio=keep_ratio, threshold=threshold)
    if method == "blacken" and boxes is not None:
        text = json.dumps({k: [float(v) for v in b] for k, b in sorted(boxes.items())})
        key["boxes"] = hashlib.sha256(text.encode()).hexdigest()
    return key


def run_context(cfg: EvalConfig, device: str | torch.device | None, **loaders) -> dict:
    """The rest of a result's key (:func:`method_record_key`): the device type (amp "auto" is bf16 on CUDA only),
    the decoder that read each named loader's clips ("auto" resolved: DALI's and PyAV's clips differ slightly) and
    the videos each reads (:func:`videos_of`)."""
    return {"device": _device(cfg, device).type, "data": videos_of(**loaders),
            "decoders": {part: getattr(loader, "decoder_name", None) for part, loader in loaders.items()}}


def videos_of(**loaders) -> dict[str, list]:
    """The videos each named loader reads, for a result's key: each record's id, and its file's size and
    modification time (a video replaced in place is another video)."""

    def stamp(record) -> list:
        try:
            st = Path(record.path).stat()
            return [record.video_id, st.st_size, st.st_mtime_ns]
        except (OSError, TypeError, AttributeError):
            return [record.video_id]

    return {part: [stamp(r) for r in getattr(loader, "records", [])] for part, loader in loaders.items()}


def run_or_resume(path: Path, key: dict, resume: bool, compute) -> tuple[MethodResult, bool]:
    """``compute()``'s result, saved at ``path`` (atomically) with ``key``; with ``resume``, the one saved there with
    this key instead, when there is one. Returns (result, whether it was read back)."""
    key = json.loads(json.dumps(key, default=str))  # as it reads back (tuples as lists, paths as strings)
    done = _read_method_record(path, key) if resume else None
    if done is not None:
        return done, True
    result = compute()
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps({"key": key, "result": dataclasses.asdict(result)}))
    return result, False


def _read_method_record(path: Path, key: dict) -> MethodResult | None:
    """The result saved at ``path`` when its key is ``key``; None when absent, damaged or made otherwise."""
    try:
        saved = json.loads(path.read_text())
        if saved["key"] != key:
            return None
        return MethodResult(**saved["result"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _dataset_of(loader) -> str | None:
    kind = getattr(loader, "kind", None)
    return kind if kind in PAPER_RESULTS else None


def sweep(
    cfg: EvalConfig,
    checkpoint: str | os.PathLike,
    keep_ratios: Iterable[float] = (1.0, 0.85, 0.7, 0.55, 0.4),
    thresholds: Iterable[float] = (0.5,),
    *,
    raw: MethodResult | SweepPoint | None = None,
    train_loader=None,
    test_loader=None,
    device: str | torch.device | None = None,
) -> list[SweepPoint]:
    """The same trained STPrivacy at several keep ratios and adaptive thresholds, fresh recognizers per point
    (no retraining of STPrivacy); the privacy attacker is vit alone, whatever cfg.attackers says. sweep.csv and
    sweep.png are rewritten in cfg.out_dir after every point.

    Args:
        cfg: the evaluation config.
        checkpoint: the STPrivacy checkpoint.
        keep_ratios: per-stage alphas in (0, 1] (gather mode).
        thresholds: adaptive thresholds in (0, 1) (policy mode).
        raw: a raw-video result drawn for reference (not re-evaluated).
        train_loader, test_loader: override the dataset loaders (built once from cfg otherwise).
        device: overrides cfg.device.

    Returns:
        one :class:`SweepPoint` per keep ratio, then per threshold.
    """
    anonymizer = load_checkpoint(checkpoint, cfg)
    cfg = dataclasses.replace(cfg, attackers="vit")  # the sweep's points are compared on one attacker
    train_loader = train_loader if train_loader is not None else default_loader(cfg, True, anonymizer.cfg)
    test_loader = test_loader if test_loader is not None else default_loader(cfg, False, anonymizer.cfg)
    settings = [("keep_ratio", float(r)) for r in keep_ratios] + [("threshold", float(t)) for t in thresholds]
    if not settings:
        raise ValueError("no point to sweep: give at least one keep ratio or threshold")
    _device(cfg, device)
    Path(cfg.out_dir).mkdir(parents=True, exist_ok=True)
    # Every point's transform is built (and checked) before the first one trains.
    transforms = [STPrivacyTransform(anonymizer, keep_ratio=value) if setting == "keep_ratio"
                  else STPrivacyTransform(anonymizer, threshold=value) for setting, value in settings]
    points: list[SweepPoint] = []
    for (setting, value), transform in zip(settings, transforms, strict=True):
        result = evaluate_method(transform, cfg, train_loader, test_loader, device=device)
        points.append(SweepPoint.from_result(result, setting, value))
        write_sweep(points, cfg.out_dir, raw=raw)
    return points
