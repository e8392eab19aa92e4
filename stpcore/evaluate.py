"""Phase 3 of STPrivacy: evaluate a frozen anonymizer (and the baselines) with fresh recognizers.

The paper's protocol: freeze STPrivacy, transform every video, train NEW action and privacy recognizers on
the transformed train split (80 epochs), test them on the transformed test split:

- action top-1 (%) with the predictions averaged over the 5 clips x 3 crops of each test video [G: the
  softmax probabilities are averaged, not the logits];
- privacy cMAP (%): class-wise average precision (scikit-learn) of the per-video averaged sigmoid outputs,
  averaged over the 5 attributes; [G] an attribute whose test labels are all one class has no defined AP and
  is left out of the mean (named in :attr:`MethodResult.skipped_attributes`);
- privacy F1: class-wise F1 at threshold 0.5 (scikit-learn, zero_division=0) averaged over the 5 attributes.
Only test videos with privacy labels count for the privacy metrics.

A *method* is a named transform ``clips (B, 3, T, H, W) normalised -> (video, keep or None)``:
``raw``, ``downsample2``/``downsample4``, ``blur_weak``/``blur_strong``, ``blacken`` (needs person boxes) and
``stprivacy`` (a trained model at a keep ratio, or adaptive with a threshold). The recognizers read only the
kept tubelets: ``mode="gather"`` for equal counts (keep ratio), ``mode="policy"`` for variable counts
(adaptive); the baselines keep every tubelet.

Protocols. *Known actions*: phases 1-2 and 3 on the same dataset (``stpcore train`` then :func:`evaluate`
with the same ``data_root``). *Unseen actions*: phases 1-2 on dataset A, phase 3 on dataset B, i.e. the same
call with B's root (and labels): the recognizers are new and sized from B's classes, STPrivacy's own action
head is never used. Either way the checkpoint's clip geometry (frames, size) must match the data config;
:func:`check_geometry` raises a ValueError otherwise.

Files in ``cfg.out_dir``: ``eval_metrics.jsonl`` (one line per recognizer epoch and one per test),
``results.md`` / ``results.csv`` (:func:`write_results`) and ``sweep.csv`` / ``sweep.png`` (:func:`write_sweep`).
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import os
import time
import warnings
from collections.abc import Iterable, Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from stpcore import losses
from stpcore.data.labels import PRIVACY_ATTRIBUTES
from stpcore.media import atomic_path
from stpcore.models import (
    BackboneConfig,
    RecognizerConfig,
    STPrivacy,
    STPrivacyConfig,
    VideoRecognizer,
    load_anonymizer,
)
from stpcore.progress import progress
from stpcore.runtime import make_optimizer

METHODS = ("raw", "downsample2", "downsample4", "blur_weak", "blur_strong", "blacken", "stprivacy")

# Gaussian sigmas in pixels at a 112-pixel clip [G]; scaled with the clip size (sigma * H / 112).
BLUR_SIGMAS = {"blur_weak": 2.0, "blur_strong": 6.0}
REFERENCE_SIZE = 112

# The paper's Table 1 (top-1 % up, F1 down, cMAP % down); for orientation only: different data and runs.
PAPER_RESULTS: dict[str, list[tuple[str, float, float, float]]] = {
    "hmdb51": [
        ("raw video", 51.44, 0.673, 75.58),
        ("SPAct (prior best)", 48.56, 0.642, 73.78),
        ("STPrivacy", 50.73, 0.613, 72.48),
    ],
    "ucf101": [
        ("raw video", 84.20, 0.684, 76.62),
        ("SPAct (prior best)", 78.40, 0.651, 75.29),
        ("STPrivacy", 82.55, 0.634, 73.79),
    ],
}
_DATASET_NAMES = {"hmdb51": "VP-HMDB51", "ucf101": "VP-UCF101"}


# -- configuration ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class EvalConfig:
    """Everything a phase-3 evaluation needs (the single source of truth; a JSON file may supply it).

    Args:
        data_root: dataset root in the HMDB51 or UCF101 layout (another dataset than training's for the
            unseen-actions protocol).
        labels: privacy label file (.pickle or .csv); without it the privacy metrics are NaN.
        kind, split: dataset layout ("auto", "hmdb51", "ucf101") and official split.
        preset: the recognizers' backbone preset; None: the STPrivacy checkpoint's backbone (same tubelet
            grid, needed to read its keep mask), or "vit_small" without a checkpoint.
        num_frames, image_size: clip size overrides (None: the checkpoint's, else the preset's); must equal
            the checkpoint's when one is used.
        epochs: recognizer training epochs (the paper's 80).
        batch_size: train clips per step.
        test_batch_size: test videos per batch (each brings 5 x 3 = 15 clips).
        workers: data loader workers.
        decoder: "auto", "pyav" or "dali".
        stride: frame stride (None: the dataset's default).
        short_side: resize target of the short side before cropping (None: 8/7 of the crop).
        base_lr: lr = base_lr * batch_size / 512 (the paper's 1e-3).
        weight_decay: AdamW weight decay (0.05), none on norms, biases and positional embeddings.
        warmup_epochs: linear warm-up, then cosine to min_lr_ratio * lr [G: 5 epochs].
        min_lr_ratio: floor of the cosine schedule [G: 0.01].
        clip_grad: max gradient norm (0 disables) [G: 1.0].
        amp: "auto" (bf16 autocast on CUDA, none on CPU), "bf16" or "none".
        init_2d: an ImageNet 2D ViT checkpoint inflated into both recognizers (None: random init).
        out_dir: where eval_metrics.jsonl, results.* and sweep.* go.
        seed: recognizer initialisation and data order; the same for every method, so methods differ only
            in their transform.
        device: "auto" (CUDA when available), "cpu" or "cuda".
        progress: show progress bars (tqdm).
    """

    data_root: str
    labels: str | None = None
    kind: str = "auto"
    split: int = 1
    preset: str | None = None
    num_frames: int | None = None
    image_size: int | None = None
    epochs: int = 80
    batch_size: int = 32
    test_batch_size: int = 4
    workers: int = 2
    decoder: str = "auto"
    stride: int | None = None
    short_side: int | None = None
    base_lr: float = 1e-3
    weight_decay: float = 0.05
    warmup_epochs: float = 5.0
    min_lr_ratio: float = 0.01
    clip_grad: float = 1.0
    amp: str = "auto"
    init_2d: str | None = None
    out_dir: str = "runs/eval"
    seed: int = 0
    device: str = "auto"
    progress: bool = True

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {self.epochs}")
        if self.batch_size < 1 or self.test_batch_size < 1:
            raise ValueError(f"batch_size and test_batch_size must be >= 1, got {self.batch_size}, "
                             f"{self.test_batch_size}")
        if not self.base_lr > 0:
            raise ValueError(f"base_lr must be > 0, got {self.base_lr}")
        if self.amp not in ("auto", "bf16", "none"):
            raise ValueError(f"amp must be 'auto', 'bf16' or 'none', got {self.amp!r}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device must be 'auto', 'cpu' or 'cuda', got {self.device!r}")


def check_geometry(model_cfg: BackboneConfig, cfg: EvalConfig, source: str = "the checkpoint") -> tuple[int, int]:
    """(num_frames, image_size) of the evaluation clips; ValueError when cfg asks for another size than the
    STPrivacy model was trained on (its positional embeddings and token grid fix the clip size)."""
    wanted = {"num_frames": cfg.num_frames, "image_size": cfg.image_size}
    bad = [f"{k}={v} (model: {getattr(model_cfg, k)})" for k, v in wanted.items()
           if v is not None and v != getattr(model_cfg, k)]
    if bad:
        raise ValueError(
            f"clip geometry mismatch: {source} was trained on {model_cfg.num_frames} x {model_cfg.image_size} x "
            f"{model_cfg.image_size} clips but the data config asks for {', '.join(bad)}; drop the num_frames / "
            f"image_size overrides or use a checkpoint trained at that size"
        )
    return model_cfg.num_frames, model_cfg.image_size


# -- metrics ----------------------------------------------------------------------------------------


def average_views(values: torch.Tensor, video_index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean of each video's views.

    Args:
        values: (M, K) float, one row per clip (view).
        video_index: (M,) int64, the video each clip belongs to.

    Returns:
        videos: (V,) int64 sorted distinct video indices.
        means: (V, K) float, the mean of each video's rows.
    """
    videos, inverse = torch.unique(video_index, return_inverse=True)
    sums = values.new_zeros(len(videos), values.shape[1]).index_add_(0, inverse, values)  # (V, K)
    counts = torch.bincount(inverse, minlength=len(videos)).to(values.dtype)  # (V,)
    return videos, sums / counts[:, None]


def _per_video_labels(labels: torch.Tensor, video_index: torch.Tensor, what: str) -> torch.Tensor:
    """(M, ...) per-clip labels -> (V, ...) per video (sorted like average_views); views must agree."""
    videos, inverse = torch.unique(video_index, return_inverse=True)
    out = labels.new_zeros((len(videos), *labels.shape[1:]))
    out[inverse] = labels
    if not torch.equal(out[inverse], labels):
        raise ValueError(f"{what}: views of one video carry different labels; is video_index right?")
    return out


@dataclass
class Metrics:
    """Per-video test metrics (see :func:`video_metrics`).

    Attributes:
        top1: action top-1 accuracy in %.
        cmap: mean AP over the attributes with a defined AP, in % (NaN when none has one).
        f1: mean F1 over all attributes at threshold 0.5, in [0, 1] (NaN without privacy labels).
        ap: per-attribute AP in [0, 1] (NaN where undefined).
        f1_per_attribute: per-attribute F1 in [0, 1].
        skipped_attributes: attributes left out of cMAP (test labels all one class).
        num_videos: test videos.
        num_privacy_videos: test videos with privacy labels.
    """

    top1: float
    cmap: float
    f1: float
    ap: dict[str, float]
    f1_per_attribute: dict[str, float]
    skipped_attributes: list[str]
    num_videos: int
    num_privacy_videos: int


def video_metrics(
    action_probs: torch.Tensor,
    actions: torch.Tensor,
    privacy_probs: torch.Tensor,
    privacy: torch.Tensor,
    has_privacy: torch.Tensor,
    video_index: torch.Tensor,
    attributes: Sequence[str] = PRIVACY_ATTRIBUTES,
) -> Metrics:
    """Action top-1, privacy cMAP and F1 from per-clip predictions, averaged over each video's views.

    Args:
        action_probs: (M, C) float softmax probabilities, one row per clip.
        actions: (M,) int64 action labels.
        privacy_probs: (M, A) float sigmoid outputs.
        privacy: (M, A) 0/1 float privacy labels.
        has_privacy: (M,) bool, whether the clip's video has privacy labels.
        video_index: (M,) int64 video of each clip.
        attributes: the A attribute names.

    Returns:
        :class:`Metrics`.
    """
    from sklearn.metrics import average_precision_score, f1_score

    action_probs, privacy_probs = action_probs.detach().float().cpu(), privacy_probs.detach().float().cpu()
    video_index = video_index.cpu()
    _, action_mean = average_views(action_probs, video_index)  # (V, C)
    labels = _per_video_labels(actions.cpu(), video_index, "actions")  # (V,)
    top1 = 100.0 * (action_mean.argmax(-1) == labels).double().mean().item()

    _, privacy_mean = average_views(privacy_probs, video_index)  # (V, A)
    truth = _per_video_labels(privacy.float().cpu(), video_index, "privacy")  # (V, A)
    has = _per_video_labels(has_privacy.cpu(), video_index, "has_privacy")  # (V,)
    scores, truth = privacy_mean[has].numpy(), truth[has].numpy().astype(np.int64)
    ap: dict[str, float] = {}
    f1: dict[str, float] = {}
    skipped: list[str] = []
    for a, name in enumerate(attributes):
        if len(truth) == 0:
            ap[name], f1[name] = math.nan, math.nan
            skipped.append(name)
            continue
        y = truth[:, a]
        f1[name] = float(f1_score(y, scores[:, a] > 0.5, zero_division=0))
        if y.min() == y.max():  # all positive or all negative: AP is undefined (or trivially 1)
            ap[name] = math.nan
            skipped.append(name)
        else:
            ap[name] = float(average_precision_score(y, scores[:, a]))
    defined = [v for v in ap.values() if not math.isnan(v)]
    cmap = 100.0 * float(np.mean(defined)) if defined else math.nan
    mean_f1 = float(np.mean(list(f1.values()))) if len(truth) else math.nan
    return Metrics(top1, cmap, mean_f1, ap, f1, skipped, len(labels), int(has.sum()))


# -- the methods ------------------------------------------------------------------------------------


class MethodTransform:
    """A named phase-3 transform: ``clips (B, 3, T, H, W) float normalised -> (video, keep)``.

    ``video`` is (B, 3, T, H, W) in the clips' dtype; ``keep`` is (B, N) 0/1 over the tubelet tokens or
    None (every tubelet kept). ``keep_mode`` tells the recognizers how to read the mask ("gather" for
    equal counts, "policy" for variable ones; None when keep is always None).
    """

    name: str = "raw"
    keep_mode: str | None = None
    model_config: STPrivacyConfig | None = None

    def __call__(self, clips: torch.Tensor, video_ids: Sequence[str] | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor | None]:
        return clips, None

    def to(self, device: str | torch.device) -> MethodTransform:
        return self

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"


class Raw(MethodTransform):
    """The raw video (identity): the utility/privacy ceiling."""


class Downsample(MethodTransform):
    """Spatial down-sampling by ``factor``: area (box) averaging to H/factor x W/factor, then nearest
    up-sampling back to H x W, so the recognizer sees exactly the low-resolution pixels as blocks (nearest
    adds no interpolated detail; the clip mean is preserved exactly when factor divides H and W).

    Args:
        factor: the down-sampling factor (2 or 4 for the named methods).
    """

    def __init__(self, factor: int) -> None:
        if factor < 1:
            raise ValueError(f"factor must be >= 1, got {factor}")
        self.factor = factor
        self.name = f"downsample{factor}"

    def __call__(self, clips, video_ids=None):
        B, C, T, H, W = clips.shape
        frames = clips.reshape(B, C * T, H, W)  # (B, 3T, H, W): every frame and channel is a 2D image
        # Area averaging and nearest copying are linear and per-channel, so doing them on normalised values
        # equals doing them on pixels and normalising after.
        small = F.interpolate(frames, size=(max(1, H // self.factor), max(1, W // self.factor)), mode="area")
        back = F.interpolate(small, size=(H, W), mode="nearest")
        return back.reshape(B, C, T, H, W), None


def _gaussian_kernel(sigma: float, radius: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    x = torch.arange(-radius, radius + 1, dtype=torch.float64)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    return (k / k.sum()).to(dtype=dtype, device=device)  # (2r+1,), sums to 1


class GaussianBlur(MethodTransform):
    """Per-frame Gaussian blur, separable, reflect-padded, radius ceil(3 sigma).

    Args:
        sigma: standard deviation in pixels at a 112-pixel clip; scaled by H / 112 for other sizes.
        name: the method's name.
    """

    def __init__(self, sigma: float, name: str = "blur") -> None:
        if not sigma > 0:
            raise ValueError(f"sigma must be > 0, got {sigma}")
        self.sigma, self.name = sigma, name

    def __call__(self, clips, video_ids=None):
        B, C, T, H, W = clips.shape
        sigma = self.sigma * H / REFERENCE_SIZE
        radius = min(math.ceil(3 * sigma), H - 1, W - 1)  # reflect padding needs radius < size
        k = _gaussian_kernel(sigma, radius, clips.dtype, clips.device)
        x = clips.reshape(B * C * T, 1, H, W)  # (B*3*T, 1, H, W): one image per frame and channel
        # Linear with unit gain per channel, so blurring normalised values equals blurring pixels.
        x = F.conv2d(F.pad(x, (0, 0, radius, radius), mode="reflect"), k.view(1, 1, -1, 1))  # along H
        x = F.conv2d(F.pad(x, (radius, radius, 0, 0), mode="reflect"), k.view(1, 1, 1, -1))  # along W
        return x.reshape(B, C, T, H, W), None


class Blacken(MethodTransform):
    """Zero the pixels inside each video's person box, in every frame.

    Zero is the normalised value STPrivacy gives its dropped tubelets (the dataset mean colour), so the two
    methods differ in what they remove, not in the fill. The box is relative to the clip as the recognizer
    sees it (after resize and crop): Batch carries no crop offsets, so full-frame boxes are approximate on
    the cropped views (the crop covers 7/8 of the short side). Videos without a box stay unchanged and are
    counted in ``missing``.

    Args:
        boxes: video_id ("<class>/<stem>") -> (x0, y0, x1, y1) relative coordinates in [0, 1].
    """

    name = "blacken"

    def __init__(self, boxes: Mapping[str, Sequence[float]]) -> None:
        for vid, box in boxes.items():
            if len(box) != 4 or not (0 <= box[0] <= box[2] <= 1 and 0 <= box[1] <= box[3] <= 1):
                raise ValueError(f"boxes[{vid!r}] must be (x0, y0, x1, y1) with 0 <= x0 <= x1 <= 1 and "
                                 f"0 <= y0 <= y1 <= 1, got {tuple(box)}")
        self.boxes = {k: tuple(float(v) for v in b) for k, b in boxes.items()}
        self.missing: set[str] = set()

    def __call__(self, clips, video_ids=None):
        if video_ids is None or len(video_ids) != clips.shape[0]:
            raise ValueError("blacken needs the batch's video_ids (one per clip) to find each video's box")
        H, W = clips.shape[-2:]
        inside = torch.zeros(clips.shape[0], 1, 1, H, W, dtype=torch.bool)  # built on the host: tiny
        for i, vid in enumerate(video_ids):
            box = self.boxes.get(vid)
            if box is None:
                self.missing.add(vid)
                continue
            x0, y0, x1, y1 = box
            # Cover every pixel the box touches.
            inside[i, :, :, math.floor(y0 * H):math.ceil(y1 * H), math.floor(x0 * W):math.ceil(x1 * W)] = True
        return clips.masked_fill(inside.to(clips.device, non_blocking=True), 0.0), None


class STPrivacyTransform(MethodTransform):
    """A trained STPrivacy model, frozen, in eval mode: video = out.video (dropped tubelets exactly zero),
    keep = out.keep.

    Args:
        model: the STPrivacy model (put in eval mode, gradients off).
        keep_ratio: per-stage alpha at inference (None: the model's configured one); equal counts, read
            with mode="gather".
        threshold: adaptive mode: keep tokens whose keep probability exceeds it; variable counts, read with
            mode="policy". Excludes keep_ratio.
    """

    def __init__(self, model: STPrivacy, keep_ratio: float | None = None, threshold: float | None = None) -> None:
        if keep_ratio is not None and threshold is not None:
            raise ValueError("pass keep_ratio or threshold, not both")
        self.model = model.eval().requires_grad_(False)
        self.model_config = model.cfg
        self.keep_ratio, self.threshold = keep_ratio, threshold
        if threshold is not None:
            self.name, self.keep_mode = f"stprivacy@t={threshold:g}", "policy"
        else:
            ratio = model.cfg.keep_ratio if keep_ratio is None else keep_ratio
            self.name, self.keep_mode = f"stprivacy@{ratio:g}", "gather"

    def to(self, device):
        self.model.to(device)
        return self

    def __call__(self, clips, video_ids=None):
        with torch.no_grad():  # frozen: no graph through the anonymizer
            out = self.model(clips, keep_ratio=self.keep_ratio, adaptive_threshold=self.threshold)
        return out.video, out.keep


def make_transform(
    name: str,
    *,
    anonymizer: STPrivacy | None = None,
    keep_ratio: float | None = None,
    threshold: float | None = None,
    boxes: Mapping[str, Sequence[float]] | None = None,
) -> MethodTransform:
    """The transform of a named method (see :data:`METHODS`).

    Args:
        name: one of METHODS.
        anonymizer: the STPrivacy model ("stprivacy" only).
        keep_ratio, threshold: STPrivacy's inference setting ("stprivacy" only; at most one).
        boxes: video_id -> (x0, y0, x1, y1) relative person boxes ("blacken" only).
    """
    if name == "raw":
        return Raw()
    if name in ("downsample2", "downsample4"):
        return Downsample(int(name[-1]))
    if name in BLUR_SIGMAS:
        return GaussianBlur(BLUR_SIGMAS[name], name)
    if name == "blacken":
        if boxes is None:
            raise ValueError("blacken needs person boxes (a mapping video_id -> (x0, y0, x1, y1))")
        return Blacken(boxes)
    if name == "stprivacy":
        if anonymizer is None:
            raise ValueError("stprivacy needs a trained model: pass a checkpoint (stprivacy.pt or last.pt)")
        return STPrivacyTransform(anonymizer, keep_ratio=keep_ratio, threshold=threshold)
    raise ValueError(f"unknown method {name!r}; choose from {list(METHODS)}")


# -- training and testing the recognizers -----------------------------------------------------------


@dataclass
class MethodResult:
    """One method's phase-3 outcome.

    Attributes:
        method: the transform's name.
        top1: action top-1 (%), views averaged per video.
        cmap: privacy cMAP (%) over the attributes with a defined AP.
        f1: privacy F1 at 0.5, mean over attributes, in [0, 1].
        ap, f1_per_attribute: per-attribute AP and F1 in [0, 1] (AP NaN where undefined).
        skipped_attributes: attributes left out of cMAP because their test labels are all one class.
        num_test_videos, num_privacy_videos: test videos, and those with privacy labels.
        kept_fraction: mean fraction of tubelets kept on the test clips (1.0 for the baselines).
        seconds: wall time of training and testing.
        epochs: recognizer epochs.
        note: anything the reader must know (e.g. skipped attributes, videos without a box).
    """

    method: str
    top1: float
    cmap: float
    f1: float
    ap: dict[str, float]
    f1_per_attribute: dict[str, float]
    skipped_attributes: list[str]
    num_test_videos: int
    num_privacy_videos: int
    kept_fraction: float
    seconds: float
    epochs: int
    note: str = ""


def _device(cfg: EvalConfig, device: str | torch.device | None) -> torch.device:
    if device is not None:
        return torch.device(device)
    if cfg.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(cfg.device)


def _autocast(cfg: EvalConfig, device: torch.device):
    use = cfg.amp == "bf16" or (cfg.amp == "auto" and device.type == "cuda")
    return torch.autocast(device.type, dtype=torch.bfloat16) if use else nullcontext()


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
    from stpcore.data import DataConfig, get_loader

    num_frames, image_size = _geometry(cfg, backbone)
    data = DataConfig(
        root=cfg.data_root, kind=cfg.kind, split=cfg.split, train=train, labels=cfg.labels,
        batch_size=cfg.batch_size if train else cfg.test_batch_size, workers=cfg.workers, decoder=cfg.decoder,
        device="cuda" if torch.cuda.is_available() and cfg.device != "cpu" else "cpu", stride=cfg.stride,
        num_frames=num_frames, crop=image_size, short_side=cfg.short_side or round(image_size * 8 / 7),
        seed=cfg.seed, drop_last=train,
    )
    return get_loader(data)


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


def _train_epoch(cfg, transform, recs, opts, scheds, loader, rec_cfg, device, epoch, method) -> dict:
    action_rec, privacy_rec = recs
    mode = transform.keep_mode or "policy"
    for m in recs:
        m.train()
    loader.set_epoch(epoch)
    bar = _progress(cfg, len(loader), f"{method} epoch {epoch + 1}/{cfg.epochs}")
    start = time.perf_counter()
    # Running sums stay on the device; one host copy per epoch.
    sums = torch.zeros(3, device=device)  # ce * clips, bce * clips, correct
    clips_seen = 0
    for step, batch in enumerate(loader):
        clips = batch.clips.to(device, non_blocking=True)
        if step == 0:
            _check_clips(clips, rec_cfg)
        actions = batch.actions.to(device, non_blocking=True)
        privacy = batch.privacy.to(device, non_blocking=True)
        has = batch.has_privacy.to(device, non_blocking=True)
        with _autocast(cfg, device):
            video, keep = transform(clips, getattr(batch, "video_ids", None))  # one transform, two updates
            action_logits = action_rec(video, keep, mode=mode)
            ce = losses.action_loss(action_logits, actions)
            bce = losses.masked_privacy_loss(privacy_rec(video, keep, mode=mode), privacy, has)
        for name, loss, model in (("action", ce, action_rec), ("privacy", bce, privacy_rec)):
            opts[name].zero_grad(set_to_none=True)
            loss.backward()
            if cfg.clip_grad > 0:
                nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_grad)
            opts[name].step()
            scheds[name].step()
        n = clips.shape[0]
        correct = (action_logits.detach().argmax(-1) == actions).sum()
        sums += torch.stack([ce.detach() * n, bce.detach() * n, correct.float()])
        clips_seen += n
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    ce_sum, bce_sum, correct = sums.tolist()
    clips_seen = max(clips_seen, 1)
    return {"method": method, "epoch": epoch, "lr": opts["action"].param_groups[0]["lr"],
            "ce_action": ce_sum / clips_seen, "bce_privacy": bce_sum / clips_seen,
            "acc_action": correct / clips_seen, "seconds": round(time.perf_counter() - start, 3)}


@torch.no_grad()
def _test(cfg, transform, recs, loader, rec_cfg, device, method) -> tuple[Metrics, float]:
    action_rec, privacy_rec = recs
    mode = transform.keep_mode or "policy"
    for m in recs:
        m.eval()
    outs: dict[str, list[torch.Tensor]] = {k: [] for k in ("action", "privacy", "actions", "labels", "has", "video")}
    kept, tokens = torch.zeros((), device=device), 0  # kept tokens (on the device), all tokens
    offset = 0
    bar = _progress(cfg, len(loader), f"{method} test")
    for step, batch in enumerate(loader):
        clips = batch.clips.to(device, non_blocking=True)
        if step == 0:
            _check_clips(clips, rec_cfg)
        with _autocast(cfg, device):
            video, keep = transform(clips, getattr(batch, "video_ids", None))
            outs["action"].append(action_rec(video, keep, mode=mode).float().softmax(-1))
            outs["privacy"].append(privacy_rec(video, keep, mode=mode).float().sigmoid())
        if keep is not None:
            kept += keep.float().sum()
            tokens += keep.numel()
        video_index = getattr(batch, "video_index", None)
        if video_index is None:  # a loader without view grouping: every clip is its own video
            video_index = torch.arange(offset, offset + clips.shape[0])
        offset += clips.shape[0]
        outs["actions"].append(batch.actions)
        outs["labels"].append(batch.privacy)
        outs["has"].append(batch.has_privacy)
        outs["video"].append(video_index)
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    if not outs["action"]:
        raise ValueError(f"{method}: the test loader yielded no batch")
    cat = {k: torch.cat([t.cpu() for t in v]) for k, v in outs.items()}
    metrics = video_metrics(cat["action"], cat["actions"], cat["privacy"], cat["labels"], cat["has"], cat["video"])
    return metrics, (kept.item() / tokens if tokens else 1.0)


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
    AdamW, lr = base_lr * batch_size / 512, warm-up + cosine (``train.make_optimizer``). Each epoch appends a
    line to ``cfg.out_dir/eval_metrics.jsonl``; so does the test.

    Args:
        method_transform: the method (see :func:`make_transform`).
        cfg: the evaluation config.
        train_loader: yields batches with clips (B, 3, T, H, W) float, actions (B,) int64, privacy (B, 5),
            has_privacy (B,) bool, optional video_ids; has ``__len__``, ``set_epoch`` and ``classes``.
            Default: cfg's train split.
        test_loader: the same plus video_index (B,) int64 grouping the views of a video (without it every
            clip counts as a video). Default: cfg's test split (5 clips x 3 crops per video).
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
    torch.manual_seed(cfg.seed)  # every method starts from the same recognizer weights
    recs = (VideoRecognizer(action_cfg).to(dev),
            VideoRecognizer(dataclasses.replace(action_cfg, num_outputs=len(PRIVACY_ATTRIBUTES))).to(dev))
    if cfg.init_2d:
        from stpcore.models import load_inflated_2d_vit

        for m in recs:
            load_inflated_2d_vit(m, cfg.init_2d)
    steps_per_epoch = max(1, len(train_loader))
    total, warm = cfg.epochs * steps_per_epoch, int(cfg.warmup_epochs * steps_per_epoch)
    lr = cfg.base_lr * cfg.batch_size / 512
    opts, scheds = {}, {}
    for name, model in zip(("action", "privacy"), recs, strict=True):
        opts[name], scheds[name] = make_optimizer(model, lr, total, min(warm, total), cfg.weight_decay,
                                                  cfg.min_lr_ratio)
    out_dir = Path(cfg.out_dir)
    for epoch in range(cfg.epochs):
        record = _train_epoch(cfg, transform, recs, opts, scheds, train_loader, action_cfg, dev, epoch,
                              transform.name)
        _log(out_dir, record)
    metrics, kept_fraction = _test(cfg, transform, recs, test_loader, action_cfg, dev, transform.name)
    notes = []
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
        note="; ".join(notes),
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
) -> list[MethodResult]:
    """Phase 3 for several methods on one dataset; writes results.md / results.csv to cfg.out_dir.

    Args:
        cfg: the evaluation config.
        checkpoint: STPrivacy checkpoint (needed for "stprivacy"; its geometry sets the clip size).
        methods: names from METHODS, evaluated in order. "blacken" without boxes is skipped with a warning.
        keep_ratio: STPrivacy's inference alpha (None: the checkpoint's).
        boxes: video_id -> (x0, y0, x1, y1) relative person boxes for "blacken".
        threshold: evaluate STPrivacy in adaptive mode with this threshold instead of a keep ratio.
        train_loader, test_loader: override the dataset loaders (built once from cfg otherwise and shared by
            all methods).
        device: overrides cfg.device.

    Returns:
        one :class:`MethodResult` per evaluated method.
    """
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; choose from {list(METHODS)}")
    if "stprivacy" in methods and checkpoint is None:
        raise ValueError("method 'stprivacy' needs checkpoint= (stprivacy.pt or last.pt from `stpcore train`)")
    anonymizer = load_checkpoint(checkpoint, cfg) if checkpoint is not None else None
    model_cfg = anonymizer.cfg if anonymizer is not None else None
    # Baselines are run at the checkpoint's geometry too, so every row of the table sees the same clips.
    train_loader = train_loader if train_loader is not None else default_loader(cfg, True, model_cfg)
    test_loader = test_loader if test_loader is not None else default_loader(cfg, False, model_cfg)
    results = []
    for name in methods:
        if name == "blacken" and boxes is None:
            warnings.warn("method 'blacken' skipped: no person boxes supplied (pass boxes={video_id: (x0, y0, x1, "
                          "y1)} in relative coordinates)", UserWarning, stacklevel=2)
            _log(Path(cfg.out_dir), {"method": name, "skipped": "no person boxes supplied"})
            continue
        transform = make_transform(name, anonymizer=anonymizer, keep_ratio=keep_ratio, threshold=threshold,
                                   boxes=boxes)
        # backbone: the baselines' recognizers equal the ones STPrivacy's output is evaluated with.
        results.append(evaluate_method(transform, cfg, train_loader, test_loader, backbone=model_cfg,
                                       device=device))
        write_results(results, cfg.out_dir, dataset=_dataset_of(train_loader))
    return results


def _dataset_of(loader) -> str | None:
    kind = getattr(loader, "kind", None)
    return kind if kind in PAPER_RESULTS else None


# -- tables -----------------------------------------------------------------------------------------


def paper_table(dataset: str = "hmdb51") -> list[dict[str, Any]]:
    """The paper's Table 1 rows for "hmdb51" (VP-HMDB51) or "ucf101" (VP-UCF101): dicts with method,
    top1 (%), f1 (0-1), cmap (%). For orientation only: different data, splits and runs."""
    if dataset not in PAPER_RESULTS:
        raise ValueError(f"dataset must be one of {sorted(PAPER_RESULTS)}, got {dataset!r}")
    return [{"method": m, "top1": t, "f1": f, "cmap": c} for m, t, f, c in PAPER_RESULTS[dataset]]


def _fmt(value: float, kind: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if kind == "f1":
        return f"{value:.3f}".replace("0.", ".", 1) if value < 1 else f"{value:.3f}"
    return f"{value:.2f}"


def results_table(results: Sequence[MethodResult], dataset: str | None = None) -> tuple[str, str]:
    """Our results shaped like the paper's Table 1, plus the paper's numbers as a separate block.

    Args:
        results: the methods' results.
        dataset: "hmdb51" or "ucf101" to show that column of the paper; None shows both.

    Returns:
        (markdown, csv) text. The CSV has a ``source`` column: "ours" rows, then "paper" rows.
    """
    datasets = [dataset] if dataset is not None else list(PAPER_RESULTS)
    lines = ["## Phase 3: fresh recognizers on transformed videos", "",
             "| method | top-1 (%) ↑ | F1 ↓ | cMAP (%) ↓ | kept | test videos | with privacy labels |",
             "|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r.method} | {_fmt(r.top1, 'pct')} | {_fmt(r.f1, 'f1')} | {_fmt(r.cmap, 'pct')} | "
                     f"{r.kept_fraction:.3f} | {r.num_test_videos} | {r.num_privacy_videos} |")
    notes = [f"- {r.method}: {r.note}" for r in results if r.note]
    if notes:
        lines += ["", "Notes:", *notes]
    epochs = sorted({r.epochs for r in results})
    lines += ["", f"Recognizers trained for {', '.join(map(str, epochs)) or '?'} epoch(s); top-1 averages the "
              f"softmax over each test video's views; cMAP and F1 (threshold 0.5) over videos with privacy labels.",
              "", "## Paper (Table 1), for orientation; different data", "",
              "| method | " + " | ".join(f"{_DATASET_NAMES[d]} top-1 / F1 / cMAP" for d in datasets) + " |",
              "|---|" + "---|" * len(datasets)]
    for i, (method, *_rest) in enumerate(PAPER_RESULTS["hmdb51"]):
        cells = []
        for d in datasets:
            _, t, f, c = PAPER_RESULTS[d][i]
            cells.append(f"{t:.2f} / {_fmt(f, 'f1')} / {c:.2f}")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    markdown = "\n".join(lines) + "\n"

    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["source", "dataset", "method", "top1", "f1", "cmap", "kept_fraction", "test_videos",
                     "privacy_videos", "seconds", "note"])
    for r in results:
        writer.writerow(["ours", dataset or "", r.method, _csv_num(r.top1), _csv_num(r.f1), _csv_num(r.cmap),
                         _csv_num(r.kept_fraction), r.num_test_videos, r.num_privacy_videos, r.seconds, r.note])
    for d in datasets:
        for row in paper_table(d):
            writer.writerow(["paper", d, row["method"], row["top1"], row["f1"], row["cmap"], "", "", "", "",
                             "for orientation; different data"])
    return markdown, buf.getvalue()


def _csv_num(value: float) -> str:
    return "" if value is None or math.isnan(value) else f"{value:.6g}"


def _write_text(path: Path, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return path


def write_results(results: Sequence[MethodResult], out_dir: str | os.PathLike,
                  dataset: str | None = None) -> tuple[Path, Path]:
    """Write results.md and results.csv (atomically) into out_dir; returns their paths."""
    markdown, table = results_table(results, dataset)
    out = Path(out_dir)
    return _write_text(out / "results.md", markdown), _write_text(out / "results.csv", table)


# -- the trade-off sweep ----------------------------------------------------------------------------


@dataclass
class SweepPoint:
    """One operating point of the utility/privacy trade-off.

    Attributes:
        setting: "keep_ratio", "threshold" (adaptive mode) or "raw" (reference).
        value: the keep ratio or threshold (NaN for raw).
        kept_fraction: measured mean fraction of tubelets kept on the test clips.
        top1, cmap, f1: as in :class:`MethodResult`.
    """

    setting: str
    value: float
    kept_fraction: float
    top1: float
    cmap: float
    f1: float

    @property
    def label(self) -> str:
        if self.setting == "keep_ratio":
            return f"α={self.value:g}"
        if self.setting == "threshold":
            return f"t={self.value:g}"
        return "raw"

    @classmethod
    def from_result(cls, result: MethodResult, setting: str = "raw", value: float = math.nan) -> SweepPoint:
        return cls(setting, value, result.kept_fraction, result.top1, result.cmap, result.f1)


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
    (no retraining of STPrivacy). sweep.csv and sweep.png are rewritten in cfg.out_dir after every point.

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
    train_loader = train_loader if train_loader is not None else default_loader(cfg, True, anonymizer.cfg)
    test_loader = test_loader if test_loader is not None else default_loader(cfg, False, anonymizer.cfg)
    settings = [("keep_ratio", float(r)) for r in keep_ratios] + [("threshold", float(t)) for t in thresholds]
    points: list[SweepPoint] = []
    for setting, value in settings:
        transform = (STPrivacyTransform(anonymizer, keep_ratio=value) if setting == "keep_ratio"
                     else STPrivacyTransform(anonymizer, threshold=value))
        result = evaluate_method(transform, cfg, train_loader, test_loader, device=device)
        points.append(SweepPoint.from_result(result, setting, value))
        write_sweep(points, cfg.out_dir, raw=raw)
    return points


def write_sweep(points: Sequence[SweepPoint], out_dir: str | os.PathLike,
                raw: MethodResult | SweepPoint | None = None) -> tuple[Path, Path]:
    """Write sweep.csv and sweep.png (action top-1 against privacy cMAP, points labelled) atomically.

    Args:
        points: the sweep's points.
        out_dir: destination folder.
        raw: a raw-video point drawn (and listed) for reference.

    Returns:
        (csv path, png path).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if isinstance(raw, MethodResult):
        raw = SweepPoint.from_result(raw)
    rows = list(points) + ([raw] if raw is not None else [])
    out = Path(out_dir)
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["setting", "value", "kept_fraction", "top1", "cmap", "f1"])
    for p in rows:
        writer.writerow([p.setting, _csv_num(p.value), _csv_num(p.kept_fraction), _csv_num(p.top1),
                         _csv_num(p.cmap), _csv_num(p.f1)])
    csv_path = _write_text(out / "sweep.csv", buf.getvalue())

    # The object-oriented Agg API: no pyplot, so no global figure state and no display backend.
    fig = Figure(figsize=(6, 4.5), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    styles = {"keep_ratio": ("o-", "C0", "keep ratio (gather)"), "threshold": ("s", "C1", "adaptive threshold"),
              "raw": ("*", "C3", "raw video")}
    for setting, (marker, color, legend) in styles.items():
        group = [p for p in rows if p.setting == setting and not (math.isnan(p.cmap) or math.isnan(p.top1))]
        if setting == "keep_ratio":
            group.sort(key=lambda p: p.value)
        if not group:
            continue
        ax.plot([p.cmap for p in group], [p.top1 for p in group], marker, color=color, label=legend,
                markersize=10 if setting == "raw" else 6)
        for p in group:
            ax.annotate(f"{p.label} (kept {p.kept_fraction:.2f})", (p.cmap, p.top1), textcoords="offset points",
                        xytext=(5, 4), fontsize=8)
    undefined = [p.label for p in rows if math.isnan(p.cmap) or math.isnan(p.top1)]
    title = "STPrivacy trade-off: action top-1 vs privacy cMAP"
    if undefined:
        title += f"\n(not drawn, undefined metric: {', '.join(undefined)})"
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("privacy cMAP (%) ↓  (left: more private)")
    ax.set_ylabel("action top-1 (%) ↑")
    ax.grid(True, alpha=0.3)
    if ax.lines:
        ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    png_path = out / "sweep.png"
    with atomic_path(png_path) as tmp:
        fig.savefig(tmp, format="png")
    return csv_path, png_path


__all__ = [
    "BLUR_SIGMAS",
    "METHODS",
    "PAPER_RESULTS",
    "Blacken",
    "Downsample",
    "EvalConfig",
    "GaussianBlur",
    "MethodResult",
    "MethodTransform",
    "Metrics",
    "Raw",
    "STPrivacyTransform",
    "SweepPoint",
    "average_views",
    "check_geometry",
    "default_loader",
    "evaluate",
    "evaluate_method",
    "load_checkpoint",
    "make_transform",
    "paper_table",
    "recognizer_config",
    "results_table",
    "sweep",
    "video_metrics",
    "write_results",
    "write_sweep",
]
