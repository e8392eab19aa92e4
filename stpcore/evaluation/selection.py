"""Model selection on validation data: which phase-2 candidate to deploy (``stpcore train --select``).

Minimax training is unstable, so phase 2 saves candidate checkpoints every K epochs (``TrainConfig.candidate_every``)
and a stated rule picks one from scores measured on a validation part of the training videos (never the test
split; ``TrainConfig.validation``, ``stpcore.data.splits.validation_partition``):

- For each candidate (and for raw video, once), fresh recognizers are trained on the transformed videos of the
  rest of the training split (the part STPrivacy was trained on) and tested on the transformed validation
  videos: the action recognizer and quick attackers (``SELECTION_ATTACKERS``), for ``epochs`` epochs.
- Each candidate's worst-case drop is the best cMAP any of those attackers reaches on raw video minus the best
  any reaches on the candidate's output (:func:`stpcore.evaluation.results.worst_case`).
- The rule (:func:`choose`): among the candidates whose worst-case drop reaches ``target``, the best action
  top-1; if none does, the best trade-off, worst-case drop minus the action top-1 lost against raw video
  (points for points). Ties go to the later candidate.

Everything is recorded in ``selection.json``: every candidate's scores, the raw scores, the rule and the choice.

Cost: (K + 1) evaluations (raw video and K candidates), each training the action recognizer, a ViT attacker and
the statistics attacker for ``epochs`` epochs on the fit part, with the recognizers at the checkpoint's backbone:
with many candidates and a large backbone it approaches the cost of training; fewer candidates (a larger
``candidate_every``) or fewer epochs keep it small.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Sequence
from pathlib import Path

from stpcore.evaluation.config import EvalConfig
from stpcore.evaluation.results import MethodResult, worst_case

SELECTION_ATTACKERS = "vit,stats"


def trade_off(worst_drop: float, top1: float, raw_top1: float) -> float:
    """Privacy points gained (the worst-case drop) minus action points lost against raw video (0 if none)."""
    return worst_drop - max(0.0, raw_top1 - top1)


def choose(scores: Sequence[dict], raw_top1: float, target: float) -> tuple[int, str]:
    """The index of the candidate the rule picks, and why.

    Args:
        scores: one dict per candidate, in order, with "top1" and "worst_drop" (NaN: undefined, never eligible).
        raw_top1: raw video's action top-1 on the validation part.
        target: the worst-case drop a candidate must reach.
    """
    if not scores:
        raise ValueError("no candidate to choose from (set candidate_every > 0 for phase 2)")
    eligible = [i for i, s in enumerate(scores) if not math.isnan(s["worst_drop"]) and s["worst_drop"] >= target]
    if eligible:
        best = max(eligible, key=lambda i: (scores[i]["top1"], i))
        return best, (f"best action top-1 among the {len(eligible)} candidate(s) whose worst-case drop reaches "
                      f"{target:g} points")
    defined = [i for i, s in enumerate(scores) if not math.isnan(s["worst_drop"])]
    if not defined:
        raise ValueError("no candidate has a defined worst-case drop (no privacy labels in the validation part?)")
    best = max(defined, key=lambda i: (trade_off(scores[i]["worst_drop"], scores[i]["top1"], raw_top1), i))
    return best, (f"no candidate reaches a worst-case drop of {target:g} points: the best trade-off (worst-case "
                  f"drop minus action top-1 lost against raw video)")


def select_candidate(candidates: Sequence[str | os.PathLike], cfg: EvalConfig, validation: float, *,
                     target: float = 15.0, out: str | os.PathLike | None = None, train_loader=None,
                     val_loader=None, resume: bool = False) -> dict:
    """Score every candidate on the validation part and choose one (module docstring).

    Args:
        candidates: STPrivacy checkpoints, in training order.
        cfg: the quick evaluation's settings (data, clip geometry, epochs); its ``attackers`` are used as given.
        validation: the validation fraction the training used (the same videos are held out again).
        target: the worst-case drop (points) the rule asks for.
        out: where selection.json goes (None: nowhere).
        train_loader, val_loader: override the loaders (default: the training split without, and with only, the
            validation part; the latter sampled like a test split).
        resume: each scored model (raw video, every candidate) is saved in ``cfg.out_dir/<name>/result.json`` with
            what it was computed from; with ``resume`` the matching ones are read back instead of trained again, so
            an interrupted selection goes on from the first unscored candidate (not with loaders passed in).

    Returns:
        the record written to selection.json: "raw", "candidates" (path, top1, cmap per attacker, drops,
        worst_drop, best_attacker, trade_off), "chosen" (index and path), "rule".
    """
    from stpcore.evaluation.methods import STPrivacyTransform, make_transform
    from stpcore.evaluation.protocol import (
        evaluate_method,
        load_checkpoint,
        method_record_key,
        run_context,
        run_or_resume,
    )
    from stpcore.runtime import clip_loader

    if resume and (train_loader is not None or val_loader is not None):
        raise ValueError("select_candidate(resume=True) reuses scores only for loaders built from cfg; drop "
                         "train_loader / val_loader, or resume=False")
    if not candidates:
        raise ValueError("no candidate checkpoints to select from: train with candidate_every > 0")
    geometry = load_checkpoint(candidates[0], cfg).cfg
    common = dict(num_frames=geometry.num_frames, crop=geometry.image_size, short_side=cfg.short_side, kind=cfg.kind,
                  split=cfg.split, labels=cfg.labels, workers=cfg.workers, decoder=cfg.decoder, stride=cfg.stride,
                  seed=cfg.seed, validation=validation)
    if train_loader is None:
        train_loader = clip_loader(cfg.data_root, train=True, part="fit", batch_size=cfg.batch_size, **common)
    if val_loader is None:
        val_loader = clip_loader(cfg.data_root, train=True, part="validation", batch_size=cfg.test_batch_size,
                                 **common)
    out_dir = Path(cfg.out_dir)

    def run(method: str, model, name: str) -> MethodResult:
        key = {**method_record_key(cfg, method, model, None, None, None), "validation": validation,
               "backbone": dataclasses.asdict(geometry),
               **run_context(cfg, None, train=train_loader, validation=val_loader)}
        transform = STPrivacyTransform(model) if model is not None else make_transform(method)
        return run_or_resume(out_dir / name / "result.json", key, resume, lambda: evaluate_method(
            transform, dataclasses.replace(cfg, out_dir=str(out_dir / name)), train_loader, val_loader,
            backbone=geometry))[0]

    raw = run("raw", None, "raw")
    rows = []
    for path in candidates:  # one model at a time (on a GPU, K candidates would otherwise all stay there)
        result = run("stprivacy", load_checkpoint(path, cfg), Path(path).stem)
        w = worst_case(raw, result)
        rows.append({"path": str(path), "top1": result.top1,
                     "cmap": {n: a["cmap"] for n, a in result.attackers.items()}, "drops": w["drops"],
                     "worst_drop": w["worst_drop"], "best_attacker": w["best_attacker"],
                     "trade_off": trade_off(w["worst_drop"], result.top1, raw.top1)})
    index, rule = choose(rows, raw.top1, target)
    record = {"validation": validation, "target": target, "attackers": cfg.attackers, "epochs": cfg.epochs,
              "raw": {"top1": raw.top1, "cmap": {n: a["cmap"] for n, a in raw.attackers.items()}},
              "candidates": rows, "chosen": {"index": index, "path": rows[index]["path"]}, "rule": rule}
    if out is not None:
        from stpcore.evaluation.protocol import _nan_to_none
        from stpcore.media import atomic_path

        with atomic_path(Path(out)) as tmp:
            tmp.write_text(json.dumps(_nan_to_none(record), indent=1, default=float) + "\n")
    return record
