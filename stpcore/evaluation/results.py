"""What phase 3 returns: one :class:`MethodResult` per method, one :class:`SweepPoint` per operating point."""

from __future__ import annotations

import math
from dataclasses import dataclass


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
