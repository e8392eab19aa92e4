"""Phase-2 variants of the demo, each scored as the demo scores STPrivacy (phase 3, fresh recognizers).

    .venv/bin/python benchmarks/demo_variants.py NAME '{"decoder_init": "lstsq", "privacy_weight": 4.0}' \
        [--demo '{"stride": 3}'] [--workdir out/demo_variants] [--keep-ratios 1.0,raw]

Uses the demo's data, model preset, loaders and evaluation settings (``stpcore.demo.DemoConfig``, changed
by --demo); the JSON argument overrides fields of ``stpcore.training.TrainConfig``. The synthetic dataset is
written once per size into the work folder and reused. Trains phases 1-2 into WORKDIR/NAME/train (reused
when it exists), evaluates STPrivacy at the trained keep ratio (plus the extra keep ratios, and "raw"
for raw video), and appends one JSON line to WORKDIR/results.jsonl. BENCHMARKS.md lists the runs
behind the demo's defaults; they ran single-threaded (OMP_NUM_THREADS=1), two at a time.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("name")
    parser.add_argument("train_overrides", nargs="?", default="{}", help="JSON object of TrainConfig fields")
    parser.add_argument("--demo", default="{}", help="JSON object of DemoConfig fields")
    parser.add_argument("--workdir", default="out/demo_variants")
    parser.add_argument("--keep-ratios", default="", help="extra evaluations: keep ratios and/or 'raw'")
    args = parser.parse_args()

    from stpcore.data.synth import make_synthetic_dataset
    from stpcore.demo import DemoConfig, _loaders, eval_config, train_config
    from stpcore.evaluation import evaluate
    from stpcore.models import STPrivacyConfig
    from stpcore.training import Trainer

    cfg = DemoConfig(**json.loads(args.demo))
    overrides = json.loads(args.train_overrides)
    work = Path(args.workdir)
    data = work / f"data_{cfg.videos}_{cfg.width}x{cfg.height}x{cfg.frames}_seed{cfg.seed}"
    if not (data / "vp_labels.csv").is_file():
        make_synthetic_dataset(data, videos=cfg.videos, seed=cfg.seed, width=cfg.width, height=cfg.height,
                               frames=cfg.frames, workers=2, overwrite=True)  # an interrupted one
    model_cfg = STPrivacyConfig.from_name(cfg.preset)
    train_loader, test_loader = _loaders(cfg, data, model_cfg.num_frames, model_cfg.image_size)
    out = work / args.name
    start = time.perf_counter()
    checkpoint = out / "train" / "stprivacy.pt"
    if not checkpoint.is_file():
        last = out / "train" / "last.pt"  # an interrupted run continues
        Trainer(train_config(cfg, data, out / "train", **({"progress": False} | overrides)), train_loader).fit(
            resume=last if last.is_file() else None)
    trained = time.perf_counter()
    eval_cfg = eval_config(cfg, data, out / "eval", progress=False)
    runs: list[tuple[str, dict]] = [("stprivacy", {"methods": ("stprivacy",)})]
    for extra in filter(None, args.keep_ratios.split(",")):
        runs.append((extra, {"methods": ("raw",)} if extra == "raw"
                     else {"methods": ("stprivacy",), "keep_ratio": float(extra)}))
    line = {"name": args.name, "train_overrides": overrides, "demo": dataclasses.asdict(cfg) | {"out": None}}
    for tag, kwargs in runs:
        result = evaluate(eval_cfg, checkpoint=checkpoint, train_loader=train_loader, test_loader=test_loader,
                          **kwargs)[0]
        line[tag] = {"top1": round(result.top1, 2), "cmap": round(result.cmap, 2),
                     "kept": round(result.kept_fraction, 3), "ap": {k: round(v, 3) for k, v in result.ap.items()}}
    line["seconds"] = {"train": round(trained - start), "eval": round(time.perf_counter() - trained)}
    print(json.dumps(line))
    with open(work / "results.jsonl", "a") as f:
        f.write(json.dumps(line) + "\n")


if __name__ == "__main__":
    main()
