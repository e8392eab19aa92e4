"""Phase-2 privacy terms beyond the paper's single ViT adversary, each off by default (issue 16):

- an appearance-statistics adversary (:class:`StatsAdversary`): a small network on differentiable colour
  statistics of the kept pixels (:func:`kept_colour_statistics`), trained beside the ViT adversary; STPrivacy
  is penalised when it can read the attributes (``TrainConfig.stats_adversary_weight``);
- a penalty on the spread of those statistics over the batch (:func:`colour_spread`), which asks every clip's
  kept pixels to share one colour distribution, whatever its attributes (``TrainConfig.colour_spread_weight``);
- the worst case over several privacy recognizers (:func:`worst_privacy_term`), for an ensemble of adversaries
  (``TrainConfig.privacy_adversaries``), restarted one at a time (``privacy_restart_every``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from stpcore.media import IMAGENET_MEAN, IMAGENET_STD
from stpcore.tubelets import grid_shape, keep_to_pixels

COLOUR_BINS = 8
STATS_FEATURES = 3 * (2 + COLOUR_BINS)  # per channel: mean, standard deviation, soft histogram


def kept_colour_statistics(video: torch.Tensor, keep: torch.Tensor, tubelet: tuple[int, int, int],
                           bins: int = COLOUR_BINS) -> torch.Tensor:
    """Colour statistics of each clip's kept pixels, differentiable in ``video``.

    Args:
        video: (B, 3, T, H, W) normalised clips (ImageNet mean and std), as the recognizers read them.
        keep: (B, N) 0/1 keep mask over the clip's tubelets.
        tubelet: the tubelet size (t, h, w) that ``keep`` refers to.
        bins: histogram bins per channel over [0, 1].

    Returns:
        (B, 3 * (2 + bins)) float32: per RGB channel the mean and standard deviation over the kept pixels, then
        a soft histogram (each pixel spread over the bins by a Gaussian of one bin's width, normalised to sum to
        1 per channel). Pixels are brought back to [0, 1] and clamped there, as a written video holds them.
    """
    x = video.float()
    B = x.shape[0]
    w = keep_to_pixels(keep.to(x.dtype), grid_shape(x.shape, tubelet), tubelet)  # (B, 1, T, H, W)
    m = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1, 1)
    s = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1, 1)
    rgb = (x * s + m).clamp(0, 1)
    dims = (2, 3, 4)
    count = w.sum(dim=dims).clamp_min(1.0)  # (B, 1)
    mu = (rgb * w).sum(dim=dims) / count  # (B, 3)
    var = ((rgb - mu[..., None, None, None]).square() * w).sum(dim=dims) / count
    sd = (var + 1e-6).sqrt()
    centres = (torch.arange(bins, device=x.device, dtype=x.dtype) + 0.5) / bins
    flat, weight = rgb.reshape(B, 3, -1), w.reshape(B, 1, -1)  # (B, 3, P), (B, 1, P)
    hist = []
    for c in range(bins):  # one bin at a time: no (B, 3, P, bins) intermediate
        hist.append(((-0.5 * ((flat - centres[c]) * bins).square()).exp() * weight).sum(-1))  # (B, 3)
    hist = torch.stack(hist, dim=-1)  # (B, 3, bins)
    hist = hist / hist.sum(-1, keepdim=True).clamp_min(1e-6)
    return torch.cat([mu, sd, hist.flatten(1)], dim=1)


def colour_spread(stats: torch.Tensor) -> torch.Tensor:
    """Mean over the statistics of their variance over the batch, each scaled by its batch mean's size: 0 when
    every clip's kept pixels have the same colour statistics. ``stats``: (B, F) from kept_colour_statistics."""
    if stats.shape[0] < 2:
        return stats.sum() * 0.0
    scale = stats.detach().abs().mean(dim=0).clamp_min(1e-2)
    return (stats.var(dim=0, unbiased=False) / scale.square()).mean()


class StatsAdversary(nn.Module):
    """A privacy recognizer on :func:`kept_colour_statistics`: standardised (batch statistics), then an MLP.

    Called like the ViT recognizers: ``adversary(video, keep)`` gives (B, num_outputs) logits.
    """

    def __init__(self, tubelet: Sequence[int], num_outputs: int = 5, hidden: int = 64) -> None:
        super().__init__()
        self.tubelet = tuple(int(v) for v in tubelet)
        self.norm = nn.BatchNorm1d(STATS_FEATURES, affine=False)
        self.mlp = nn.Sequential(nn.Linear(STATS_FEATURES, hidden), nn.GELU(), nn.Linear(hidden, num_outputs))

    def forward(self, video: torch.Tensor, keep: torch.Tensor, *, mode: str = "policy",
                update_stats: bool = True) -> torch.Tensor:
        """``mode`` is accepted for the recognizers' call signature and ignored. ``update_stats=False`` (the frozen
        adversary in STPrivacy's step): in training, batch statistics without updating the running ones."""
        stats = kept_colour_statistics(video, keep, self.tubelet)
        if self.training and stats.shape[0] < 2:  # one clip has no batch statistics: use the running ones
            stats = nn.functional.batch_norm(stats, self.norm.running_mean, self.norm.running_var, training=False)
        elif self.training and not update_stats:
            stats = nn.functional.batch_norm(stats, None, None, training=True)
        else:
            stats = self.norm(stats)
        return self.mlp(stats)


def worst_privacy_term(terms: Sequence[torch.Tensor]) -> torch.Tensor:
    """The privacy term STPrivacy maximises against an ensemble: the smallest over the adversaries (the lowest BCE:
    the one that reads the attributes best; or the lowest entropy: the most certain one, right or wrong)."""
    return terms[0] if len(terms) == 1 else torch.stack(list(terms)).min()
