"""Does model selection on validation data raise the worst case? The demo trained with several seeds, its final
phase-2 model against the candidate the selection rule picks, both scored on the test split by every attacker.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/selection_seeds.py SEED [--workdir out/selection_seeds]
        [--validation 0.2] [--every 15] [--select-epochs 30] [--json-lines OUT.jsonl]

Per seed: the demo's data (DemoConfig, written once into the work folder), its training settings
(``stpcore.demo.train_config``, seed changed) on the training videos minus a validation part (``--validation``,
per class), a candidate every ``--every`` phase-2 epochs; then ``stpcore.evaluation.selection.select_candidate``
(quick recognizers, attackers vit and stats, target 15 points); then the demo's phase 3 on the test split with
every attacker for raw video, the final model and (when it differs) the chosen one. One JSON line per seed.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("seed", type=int)
    parser.add_argument("--workdir", type=Path, default=Path("out/selection_seeds"))
    parser.add_argument("--validation", type=float, default=0.2)
    parser.add_argument("--every", type=int, default=15)
    parser.add_argument("--select-epochs", type=int, default=30)
    parser.add_argument("--json-lines", type=Path)
    args = parser.parse_args()

    from stpcore.data.synth import make_synthetic_dataset
    from stpcore.demo import DemoConfig, _loaders, eval_config, train_config
    from stpcore.evaluation import evaluate
    from stpcore.evaluation.results import worst_case
    from stpcore.evaluation.selection import SELECTION_ATTACKERS, select_candidate
    from stpcore.models import STPrivacyConfig
    from stpcore.runtime import clip_loader
    from stpcore.training import Trainer

    demo = DemoConfig()
    model_cfg = STPrivacyConfig.from_name(demo.preset)
    data = args.workdir / "data"
    if not (data / "vp_labels.csv").is_file():
        make_synthetic_dataset(data, videos=demo.videos, seed=demo.seed, width=demo.width, height=demo.height,
                               frames=demo.frames, overwrite=True)  # an interrupted one
    run = args.workdir / f"seed{args.seed}"
    common = dict(labels=data / "vp_labels.csv", num_frames=model_cfg.num_frames, crop=model_cfg.image_size,
                  stride=demo.stride, decoder="pyav", cache=True, seed=args.seed, validation=args.validation)
    fit = clip_loader(data, train=True, part="fit", batch_size=demo.batch_size, **common)
    val = clip_loader(data, train=True, part="validation", batch_size=8, **common)
    start = time.perf_counter()
    tcfg = train_config(demo, data, run / "train", seed=args.seed, validation=args.validation,
                        candidate_every=args.every, progress=False)
    if not (run / "train" / "stprivacy.pt").is_file():
        last = run / "train" / "last.pt"  # an interrupted run continues
        Trainer(tcfg, fit).fit(resume=last if last.is_file() else None)
    train_s = time.perf_counter() - start
    candidates = sorted((run / "train" / "candidates").glob("phase2-epoch*.pt"))
    quick = eval_config(demo, data, run / "selection", epochs=args.select_epochs, attackers=SELECTION_ATTACKERS,
                        progress=False, seed=args.seed)
    start = time.perf_counter()
    record = select_candidate(candidates, quick, args.validation, target=15.0, out=run / "selection.json",
                              train_loader=fit, val_loader=val)
    select_s = time.perf_counter() - start
    train_all, test = _loaders(demo, data, model_cfg.num_frames, model_cfg.image_size)
    final, chosen = candidates[-1], Path(record["chosen"]["path"])
    scored = {}
    start = time.perf_counter()
    for label, path in (("final", final), ("selected", chosen)):
        if label == "selected" and chosen == final:
            scored["selected"] = scored["final"]
            continue
        cfg = eval_config(demo, data, run / f"eval_{label}", attackers="vit,frame_cnn,stats", progress=False)
        raw, ours = evaluate(cfg, checkpoint=path, methods=("raw", "stprivacy"), train_loader=train_all,
                             test_loader=test)
        w = worst_case(raw, ours)
        scored[label] = {"path": str(path), "top1": ours.top1, "raw_top1": raw.top1, "drops": w["drops"],
                         "worst_drop": w["worst_drop"], "best_attacker": w["best_attacker"]}
    line = {"seed": args.seed, "validation": args.validation, "every": args.every,
            "select_epochs": args.select_epochs, "selection": record, **scored,
            "seconds": {"train": round(train_s, 1), "select": round(select_s, 1),
                        "evaluate": round(time.perf_counter() - start, 1)}}
    print(json.dumps({k: scored[k] for k in scored}, default=float))
    if args.json_lines:
        with open(args.json_lines, "a") as f:
            f.write(json.dumps(line, default=float) + "\n")


if __name__ == "__main__":
    main()
