"""The demo's phase 3 with every attacker: how much privacy does STPrivacy take from each, and from the best?

    .venv/bin/python benchmarks/demo_attackers.py DEMO_OUT [--attackers vit,frame_cnn,stats] [--json OUT.json]

DEMO_OUT is a finished ``make demo`` folder (its data/ and train/stprivacy.pt). Runs the demo's phase 3 (its
EvalConfig, loaders and methods: raw video, STPrivacy, the baseline) with the given attackers into
DEMO_OUT/eval_attackers, and writes the results (``MethodResult`` fields, every attacker's scores) and, per
method, the worst case over the attackers (``stpcore.evaluation.results.worst_case``) as JSON.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path


def main() -> None:
    from stpcore.demo import DemoConfig, _loaders, eval_config
    from stpcore.evaluation import evaluate
    from stpcore.evaluation.results import worst_case
    from stpcore.models import STPrivacyConfig

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("demo", type=Path, help="a finished make demo folder")
    parser.add_argument("--attackers", default="vit,frame_cnn,stats")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    cfg = DemoConfig()
    model_cfg = STPrivacyConfig.from_name(cfg.preset)
    data = args.demo / "data"
    train, test = _loaders(cfg, data, model_cfg.num_frames, model_cfg.image_size)
    eval_cfg = eval_config(cfg, data, args.demo / "eval_attackers", attackers=args.attackers, progress=False)
    start = time.perf_counter()
    results = evaluate(eval_cfg, checkpoint=args.demo / "train" / "stprivacy.pt",
                       methods=("raw", "stprivacy", cfg.baseline), train_loader=train, test_loader=test)
    raw = results[0]
    report = {"attackers": args.attackers, "seconds": round(time.perf_counter() - start, 1),
              "results": [dataclasses.asdict(r) for r in results],
              "worst_case": {r.method: worst_case(raw, r) for r in results[1:]}}
    for r in results:
        print(r.method, {n: round(a["cmap"], 2) for n, a in r.attackers.items()})
    for method, w in report["worst_case"].items():
        print(method, "worst-case drop", round(w["worst_drop"], 2), w["best_attacker"], w["drops"])
    if args.json:
        args.json.write_text(json.dumps(report, indent=1, default=float) + "\n")


if __name__ == "__main__":
    main()
