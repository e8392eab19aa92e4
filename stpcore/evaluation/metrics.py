"""Phase-3 metrics: the views of a test video averaged, action top-1, privacy AP / cMAP and F1.

- action top-1 (%) with the predictions averaged over the 5 clips x 3 crops of each test video [G: the
  softmax probabilities are averaged, not the logits];
- privacy cMAP (%): class-wise average precision (scikit-learn) of the per-video averaged sigmoid outputs [G: the
  sigmoid probabilities are averaged],
  averaged over the 5 attributes; [G] an attribute whose test labels are all one class has no defined AP and
  is left out of the mean (named in ``Metrics.skipped_attributes``);
- privacy F1: class-wise F1 at threshold 0.5 (scikit-learn) averaged over the same attributes as cMAP [G: one whose
  test labels are all one class is left out here too: with no positive video its F1 is 0 whatever the predictions,
  which would read as privacy].
Only test videos with privacy labels count for the privacy metrics. Scores that are not finite (a recognizer
that diverged in training) give undefined (NaN) metrics, not an error: the other recognizers' results stand.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from stpcore.data.labels import PRIVACY_ATTRIBUTES


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
        f1: mean F1 at threshold 0.5 over the attributes cMAP averages, in [0, 1] (NaN when none).
        ap: per-attribute AP in [0, 1] (NaN where undefined).
        f1_per_attribute: per-attribute F1 in [0, 1] (NaN where the attribute is skipped).
        skipped_attributes: attributes left out of cMAP and F1 (test labels all one class).
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
    action_probs, video_index = action_probs.detach().float().cpu(), video_index.cpu()
    _, action_mean = average_views(action_probs, video_index)  # (V, C)
    labels = _per_video_labels(actions.cpu(), video_index, "actions")  # (V,)
    top1 = 100.0 * (action_mean.argmax(-1) == labels).double().mean().item()
    if not torch.isfinite(action_mean).all():  # argmax would pick a class from NaN scores
        top1 = math.nan

    privacy_part = privacy_metrics(privacy_probs, privacy, has_privacy, video_index, attributes)
    return Metrics(top1, *privacy_part[:5], len(labels), privacy_part[5])


def privacy_metrics(
    privacy_probs: torch.Tensor,
    privacy: torch.Tensor,
    has_privacy: torch.Tensor,
    video_index: torch.Tensor,
    attributes: Sequence[str] = PRIVACY_ATTRIBUTES,
) -> tuple[float, float, dict[str, float], dict[str, float], list[str], int]:
    """The privacy half of :func:`video_metrics` (same arguments): (cmap %, mean F1, AP per attribute, F1 per
    attribute, skipped attributes, videos with privacy labels)."""
    from sklearn.metrics import average_precision_score, f1_score

    privacy_probs, video_index = privacy_probs.detach().float().cpu(), video_index.cpu()
    _, privacy_mean = average_views(privacy_probs, video_index)  # (V, A)
    truth = _per_video_labels(privacy.float().cpu(), video_index, "privacy")  # (V, A)
    has = _per_video_labels(has_privacy.cpu(), video_index, "has_privacy")  # (V,)
    scores, truth = privacy_mean[has].numpy(), truth[has].numpy().astype(np.int64)
    ap: dict[str, float] = {}
    f1: dict[str, float] = {}
    skipped: list[str] = []
    finite = bool(np.isfinite(scores).all())
    for a, name in enumerate(attributes):
        if len(truth) == 0:
            ap[name], f1[name] = math.nan, math.nan
            skipped.append(name)
            continue
        y = truth[:, a]
        if y.min() == y.max():
            # All positive or all negative: AP is undefined (or trivially 1), and F1 with no positive video is 0
            # whatever the predictions; both are left out, so cMAP and F1 average the same attributes.
            ap[name], f1[name] = math.nan, math.nan
            skipped.append(name)
        elif not finite:  # scikit-learn raises on NaN; a diverged recognizer's scores mean nothing
            ap[name], f1[name] = math.nan, math.nan
        else:
            ap[name] = float(average_precision_score(y, scores[:, a]))
            f1[name] = float(f1_score(y, scores[:, a] > 0.5, zero_division=0))
    defined = [v for v in ap.values() if not math.isnan(v)]
    cmap = 100.0 * float(np.mean(defined)) if defined and finite else math.nan
    defined_f1 = [v for v in f1.values() if not math.isnan(v)]
    mean_f1 = float(np.mean(defined_f1)) if defined_f1 and finite else math.nan
    return cmap, mean_f1, ap, f1, skipped, int(has.sum())
