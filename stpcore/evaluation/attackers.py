"""Phase 3's privacy attackers: an anonymizer is judged by the best attacker, not by the one it trained against.

Each attacker is trained on the transformed training videos and scored on the transformed test split with the
same metrics (views averaged per video, AP per attribute, cMAP, F1):

- ``vit``: the paper's ViT privacy recognizer (:class:`stpcore.models.VideoRecognizer`), the family of the
  phase-2 adversary; trained in the protocol's loop beside the action recognizer.
- ``frame_cnn``: a frame-level 2D CNN (:class:`FrameCNN`): each frame through a small conv stack, pooled over
  space, then averaged over time, then a linear head; the shape of the ResNet frame attackers of recent
  privacy-preserving action recognition work, at a size a CPU trains in seconds. Trained in the same loop
  (its own AdamW and schedule).
- ``stats``: appearance statistics of the visible (kept) pixels: per-channel moments, colour histograms and
  gradient (texture) statistics (:func:`appearance_features`), with one logistic regression per attribute
  (scikit-learn). Its features are collected from the clips of every training epoch.

Budgets (``ATTACKER_BUDGETS``, per preset of the recognizers): the CNN's widths, learning rate and epochs (the
evaluation's epochs, capped), and the logistic regression's regularisation. They are fixed, so attackers are
comparable across methods and runs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from stpcore.media import IMAGENET_MEAN, IMAGENET_STD

ATTACKERS = ("vit", "frame_cnn", "stats")
HIST_BINS = 8


@dataclass(frozen=True)
class AttackerBudget:
    """What one attacker may spend (fixed per recognizer preset, so attackers compare across runs).

    Attributes:
        cnn_widths: the frame CNN's channels per stride-2 conv.
        cnn_lr: its AdamW learning rate (warm-up and cosine like the recognizers').
        cnn_max_epochs: its epochs: the evaluation's, at most this many.
        stats_c: the inverse L2 regularisation of the logistic regressions.
    """

    cnn_widths: tuple[int, ...]
    cnn_lr: float
    cnn_max_epochs: int
    stats_c: float = 1.0


ATTACKER_BUDGETS: dict[str, AttackerBudget] = {
    "tiny": AttackerBudget(cnn_widths=(16, 32, 64), cnn_lr=2e-3, cnn_max_epochs=100),
    "vit_small": AttackerBudget(cnn_widths=(32, 64, 128, 256), cnn_lr=1e-3, cnn_max_epochs=80),
    "vit_base": AttackerBudget(cnn_widths=(32, 64, 128, 256), cnn_lr=1e-3, cnn_max_epochs=80),
}


def budget_for(preset: str | None, image_size: int) -> AttackerBudget:
    """The budget of ``preset``; without one (a checkpoint's own backbone), by clip size: the tiny budget for
    clips of at most 64 pixels, else vit_small's."""
    if preset in ATTACKER_BUDGETS:
        return ATTACKER_BUDGETS[preset]
    return ATTACKER_BUDGETS["tiny" if image_size <= 64 else "vit_small"]


def check_attackers(names: Sequence[str]) -> tuple[str, ...]:
    """The attackers, validated: a ValueError naming the choices for an unknown or repeated name, or none."""
    names = tuple(names)
    unknown = [n for n in names if n not in ATTACKERS]
    if unknown:
        raise ValueError(f"unknown attacker(s) {unknown}; choose from {list(ATTACKERS)} (comma separated)")
    if not names:
        raise ValueError(f"no attacker given; choose one or more of {list(ATTACKERS)}")
    if len(set(names)) != len(names):
        raise ValueError(f"attackers repeated: {list(names)}")
    return names


class FrameCNN(nn.Module):
    """Per-frame 2D CNN privacy attacker: (B, 3, T, H, W) -> (B, num_outputs) logits.

    Each frame: [Conv2d 3x3 stride 2 -> BatchNorm -> ReLU] per width; global average pool over space; the mean
    over the T frames; Linear to the outputs.

    Args:
        widths: channels of the conv stages.
        num_outputs: privacy attributes (5).
    """

    def __init__(self, widths: Sequence[int] = (16, 32, 64), num_outputs: int = 5) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = 3
        for w in widths:
            layers += [nn.Conv2d(channels, w, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(w),
                       nn.ReLU(inplace=True)]
            channels = w
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(channels, num_outputs)

    def forward(self, video: torch.Tensor, keep: torch.Tensor | None = None, *, mode: str = "policy") -> torch.Tensor:
        """``keep`` and ``mode`` are accepted for the recognizers' call signature and ignored: the CNN sees the
        pixels, in which dropped tubelets are already blank (the normalised mean colour)."""
        B, C, T, H, W = video.shape
        frames = video.transpose(1, 2).reshape(B * T, C, H, W)  # (B T, 3, H, W)
        pooled = self.features(frames).mean(dim=(2, 3))  # (B T, c)
        return self.head(pooled.view(B, T, -1).mean(dim=1))  # (B, outputs)


def appearance_features(video: torch.Tensor, visible: torch.Tensor | None = None,
                        mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD) -> torch.Tensor:
    """Appearance statistics of the visible pixels of each clip.

    Args:
        video: (B, 3, T, H, W) normalised clips (as the recognizers see them).
        visible: (B, 1, T, H, W) or (B, T, H, W) 0/1 mask of the pixels to describe (the kept tubelets); None:
            every pixel whose colour is not the blank of a dropped tubelet (exactly 0 in all channels).
        mean, std: the normalisation, to bring pixels back to [0, 1] RGB.

    Returns:
        (B, 40) float32: per channel the mean, standard deviation and skewness (9), an 8-bin histogram over
        [0, 1] (24, each channel's bins summing to 1), the mean absolute horizontal and vertical differences
        between visible neighbours (6), and the visible fraction (1). A clip with nothing visible gives zeros
        (and a visible fraction of 0).
    """
    x = video.detach().float()
    if visible is None:
        visible = (x != 0).any(dim=1, keepdim=True)
    w = visible.float().reshape(x.shape[0], 1, *x.shape[2:])  # (B, 1, T, H, W)
    m = torch.tensor(mean, device=x.device).view(1, 3, 1, 1, 1)
    s = torch.tensor(std, device=x.device).view(1, 3, 1, 1, 1)
    rgb = (x * s + m).clamp(0, 1)
    dims = (2, 3, 4)
    count = w.sum(dim=dims).clamp_min(1.0)  # (B, 1)
    mu = (rgb * w).sum(dim=dims) / count  # (B, 3)
    centred = (rgb - mu[..., None, None, None]) * w
    var = centred.square().sum(dim=dims) / count
    sd = var.sqrt()
    skew = centred.pow(3).sum(dim=dims) / count / sd.clamp_min(1e-6).pow(3)
    B = x.shape[0]
    offsets = (torch.arange(B, device=x.device) * HIST_BINS).view(B, 1, 1, 1)
    weights = w[:, 0].flatten()
    hist = torch.stack([  # one channel at a time: no (B, 3, T, H, W) index or weight copies
        torch.bincount((((rgb[:, c] * HIST_BINS).long().clamp_(0, HIST_BINS - 1)) + offsets).flatten(),
                       weights=weights, minlength=B * HIST_BINS).view(B, HIST_BINS)
        for c in range(3)], dim=1)  # (B, 3, bins)
    hist = hist / count[:, :, None]
    texture = []
    for axis in (4, 3):  # horizontal, vertical neighbours
        a, b = rgb.narrow(axis, 1, rgb.shape[axis] - 1), rgb.narrow(axis, 0, rgb.shape[axis] - 1)
        both = w.narrow(axis, 1, w.shape[axis] - 1) * w.narrow(axis, 0, w.shape[axis] - 1)
        texture.append(((a - b).abs() * both).sum(dim=dims) / both.sum(dim=dims).clamp_min(1.0))
    fraction = w.mean(dim=dims)  # (B, 1)
    return torch.cat([mu, sd, skew, hist.flatten(1), *texture, fraction], dim=1)


class StatsAttacker:
    """One logistic regression per attribute on :func:`appearance_features` (standardised).

    An attribute whose training labels are all one class predicts that class (there is nothing to learn); with no
    labelled clip at all every attribute predicts 0.5 (and the metrics are NaN without test labels anyway).

    Args:
        c: inverse L2 regularisation of scikit-learn's LogisticRegression.
        seed: its random state.
    """

    def __init__(self, c: float = 1.0, seed: int = 0) -> None:
        self.c, self.seed = c, seed
        self.models: list = []

    def fit(self, features: np.ndarray, labels: np.ndarray, has: np.ndarray) -> StatsAttacker:
        """features (n, F), labels (n, A) 0/1, has (n,) bool: rows without privacy labels are left out."""
        from sklearn.linear_model import LogisticRegression
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler

        x, y = features[has], labels[has].astype(np.int64)
        if len(x) == 0:  # no privacy labels (phase 3 without --labels): nothing to learn, and nothing to score
            self.models = [0.5] * labels.shape[1]
            return self
        self.models = []
        for a in range(y.shape[1]):
            if y[:, a].min() == y[:, a].max():
                self.models.append(float(y[0, a]))
                continue
            model = make_pipeline(StandardScaler(), LogisticRegression(C=self.c, max_iter=2000,
                                                                       random_state=self.seed))
            self.models.append(model.fit(x, y[:, a]))
        return self

    def predict_proba(self, features: np.ndarray) -> np.ndarray:
        """(n, F) -> (n, A) probabilities of each attribute being identifiable."""
        cols = [np.full(len(features), m) if isinstance(m, float) else m.predict_proba(features)[:, 1]
                for m in self.models]
        return np.stack(cols, axis=1).astype(np.float32)
