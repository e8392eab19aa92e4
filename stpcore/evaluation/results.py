"""What phase 3 returns: one :class:`MethodResult` per method, one :class:`SweepPoint` per operating point."""

from __future__ import annotations

import math
from dataclasses import dataclass, field


@dataclass
class MethodResult:
    """One method's phase-3 outcome.

    Attributes:
        method: the transform's name.
        top1: action top-1 (%), views averaged per video.
        cmap: privacy cMAP (%) over the attributes with a defined AP.
        f1: privacy F1 at 0.5, mean over attributes, in [0, 1].
        ap, f1_per_attribute: per-attribute AP and F1 in [0, 1] (NaN where the attribute is skipped).
        skipped_attributes: attributes left out of cMAP because their test labels are all one class.
        num_test_videos, num_privacy_videos: test videos, and those with privacy labels.
        kept_fraction: mean fraction of tubelets kept on the test clips (1.0 for the baselines).
        seconds: wall time of training and testing.
        epochs: recognizer epochs.
        note: anything the reader must know (e.g. skipped attributes, videos without a box).
        attackers: every privacy attacker's scores, {name: {"cmap", "f1", "ap", "f1_per_attribute",
            "skipped_attributes"}} (see ``stpcore.evaluation.attackers``); cmap, f1 and ap above are vit's when it
            ran, else the first attacker's.
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
    attackers: dict[str, dict] = field(default_factory=dict)


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


def worst_case(raw: MethodResult, result: MethodResult) -> dict:
    """The worst-case privacy outcome of ``result`` against the raw video, over the attackers both ran.

    An attacker's drop is its cMAP on raw video minus its cMAP on the transformed video (points). The worst case
    is the attack an adversary would pick: the best attacker is the one with the highest cMAP on the transformed
    video, and the worst-case drop is the best cMAP any attacker reaches on raw video minus the best cMAP any
    reaches on the transformed one (over the attackers defined on both). It is at least the smallest of the
    per-attacker drops, which it replaced (2026-12-07): that one was pinned by the weakest attacker, whose cMAP is
    low on raw video too, so a transform that leaves the strongest attacker far less could score as less private
    than one that leaves it more. Per attribute, the highest AP any attacker reached on the transformed video.

    Returns:
        {"drops": {attacker: drop}, "worst_drop": float, "best_attacker": str, "max_ap": {attribute: AP}};
        drops NaN where an attacker's cMAP is undefined; worst_drop NaN and best_attacker "" when no attacker is
        defined on both, or when one scored on raw video has no score on the output.
    """
    names = [n for n in result.attackers if n in raw.attackers]
    drops = {n: raw.attackers[n]["cmap"] - result.attackers[n]["cmap"] for n in names}
    defined = [n for n in names if not math.isnan(drops[n])]
    # An attacker that reads raw video but has no score on the output (it diverged) may be the strongest: without
    # it there is no worst case to give (NaN: never eligible in the selection), not the weaker attackers' one.
    unscored = [n for n in names
                if not math.isnan(raw.attackers[n]["cmap"]) and math.isnan(result.attackers[n]["cmap"])]
    best = max(defined, key=lambda n: result.attackers[n]["cmap"]) if defined and not unscored else ""
    worst_drop = max(raw.attackers[n]["cmap"] for n in defined) - result.attackers[best]["cmap"] if best else math.nan
    attrs = list(next(iter(result.attackers.values()))["ap"]) if result.attackers else []
    max_ap = {}
    for a in attrs:
        values = [r["ap"][a] for r in result.attackers.values() if not math.isnan(r["ap"][a])]
        max_ap[a] = max(values) if values else math.nan
    return {"drops": drops, "worst_drop": worst_drop, "best_attacker": best, "max_ap": max_ap}

