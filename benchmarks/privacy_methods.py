"""Privacy methods of phase 2 over training seeds (issue 16): the demo trained with TrainConfig overrides and one
seed, scored as the demo scores STPrivacy (phase 3 on the test split) by every attacker, worst case included.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/privacy_methods.py NAME SEED '{"privacy_adversaries": 3}' \
        [--workdir out/privacy_methods] [--json-lines OUT.jsonl]
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/privacy_methods.py raw 0 --raw    # raw video, once per workdir
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/privacy_methods.py NAME SEED --keep-ratio 1    # a run at alpha 1
    .venv/bin/python benchmarks/privacy_methods.py - 0 --gather OUT.json --json-lines RUNS.jsonl --workdir W

The data is the demo's (DemoConfig, written once into the work folder); training uses the demo's settings
(``stpcore.demo.train_config``) with the seed changed (model initialisation, Gumbel noise and data order) and the
JSON overrides. The demo's settings include ``privacy_nullspace=8`` since it became the demo's default: the runs
committed before (privacy-methods*.json) are what ``'{"privacy_nullspace": 0}'`` gives now. Phase 3 uses the demo's
evaluation settings and seed for every run, with the attackers vit, frame_cnn and stats. The raw video's scores
(``--raw``) are written to WORKDIR/raw.json; each method run reads them to compute the drops. One JSON line per run.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

ATTACKERS = "vit,frame_cnn,stats"


def _scores(result) -> dict:
    return {"top1": result.top1, "cmap": result.cmap, "kept": result.kept_fraction,
            "attackers": {name: {"cmap": r["cmap"], "ap": r["ap"]} for name, r in result.attackers.items()}}


def gather(lines_path: Path, raw_path: Path, out: Path, target: float = 15.0, action_margin: float = 10.0) -> dict:
    """One JSON of every run in ``lines_path`` (the last line per (name, seed)), by method, with per-method summaries:
    the worst-case drop's mean and standard deviation over seeds, the seeds at or above ``target``, and the seeds
    whose top-1 is within ``action_margin`` points of raw video."""
    import statistics

    runs: dict[tuple[str, int], dict] = {}
    for line in lines_path.read_text().splitlines():
        if line.strip():
            run = json.loads(line)
            runs[(run["name"], run["seed"])] = run
    methods: dict[str, dict] = {}
    for (name, _), run in sorted(runs.items()):
        entry = methods.setdefault(name, {"train_overrides": run["train_overrides"], "runs": []})
        entry["runs"].append({k: run[k] for k in ("seed", "top1", "cmap", "kept", "raw_top1", "top1_vs_raw", "drops",
                                                 "worst_drop", "best_attacker", "seconds")}
                             | {"ap": {a: r["ap"] for a, r in run["attackers"].items()}})
    for entry in methods.values():
        worst = [r["worst_drop"] for r in entry["runs"]]
        entry["seeds"] = len(worst)
        entry["worst_drop_mean"] = statistics.mean(worst)
        entry["worst_drop_std"] = statistics.stdev(worst) if len(worst) > 1 else 0.0
        entry["seeds_at_target"] = sum(w >= target for w in worst)
        entry["seeds_action_kept"] = sum(r["top1_vs_raw"] >= -action_margin for r in entry["runs"])
        entry["top1_vs_raw_mean"] = statistics.mean(r["top1_vs_raw"] for r in entry["runs"])
    raw = json.loads(raw_path.read_text())["scores"]
    data = {"target": target, "action_margin": action_margin, "raw": raw, "methods": methods}
    out.write_text(json.dumps(data, indent=1, default=float) + "\n")
    return data


def tables(data: dict) -> str:
    """The two markdown tables of BENCHMARKS.md (per method, per run) from a gathered file."""
    out = ["| data | mean worst drop | std | seeds at 15 | seeds within 10 | mean top-1 vs raw |",
           "|---|---:|---:|---:|---:|---:|"]
    for name, m in data["methods"].items():
        out.append(f"| `{name}` | {m['worst_drop_mean']:.2f} | {m['worst_drop_std']:.2f} | {m['seeds_at_target']} | "
                   f"{m['seeds_action_kept']} | {m['top1_vs_raw_mean']:.1f} |")
    out += ["", "| data | top-1 % | top-1 vs raw | vit drop | frame_cnn drop | stats drop | worst drop | skin AP |",
            "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, m in data["methods"].items():
        for r in m["runs"]:
            d = r["drops"]
            out.append(f"| `{name} seed {r['seed']}` | {r['top1']:.2f} | {r['top1_vs_raw']:.2f} | {d['vit']:.2f} | "
                       f"{d['frame_cnn']:.2f} | {d['stats']:.2f} | {r['worst_drop']:.2f} | "
                       f"{100 * r['ap']['vit']['skin_color']:.1f} |")
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("name")
    parser.add_argument("seed", type=int)
    parser.add_argument("train_overrides", nargs="?", default="{}", help="JSON object of TrainConfig fields")
    parser.add_argument("--workdir", type=Path, default=Path("out/privacy_methods"))
    parser.add_argument("--raw", action="store_true", help="score raw video (needs one trained run's checkpoint "
                        "for the clip geometry: the run NAME SEED is trained first)")
    parser.add_argument("--json-lines", type=Path)
    parser.add_argument("--keep-ratio", type=float, help="score the trained run NAME SEED at this inference alpha "
                        "instead of its own (the line's name becomes NAME@ALPHA; the checkpoint is reused)")
    parser.add_argument("--gather", type=Path, metavar="OUT.json",
                        help="instead of a run: gather --json-lines and WORKDIR/raw.json into one file (NAME and SEED "
                             "are ignored)")
    args = parser.parse_args()
    if args.gather:
        print(tables(gather(args.json_lines, args.workdir / "raw.json", args.gather)))
        return

    from stpcore.data.synth import make_synthetic_dataset
    from stpcore.demo import DemoConfig, _loaders, eval_config, train_config
    from stpcore.evaluation import evaluate
    from stpcore.evaluation.results import MethodResult, worst_case
    from stpcore.models import STPrivacyConfig
    from stpcore.training import Trainer

    demo = DemoConfig()
    model_cfg = STPrivacyConfig.from_name(demo.preset)
    data = args.workdir / "data"
    if not (data / "vp_labels.csv").is_file():
        make_synthetic_dataset(data, videos=demo.videos, seed=demo.seed, width=demo.width, height=demo.height,
                               frames=demo.frames, overwrite=True)  # an interrupted one
    overrides = json.loads(args.train_overrides)
    run = args.workdir / f"{args.name}_s{args.seed}"
    train_all, test = _loaders(demo, data, model_cfg.num_frames, model_cfg.image_size)
    fit, _ = _loaders(dataclasses.replace(demo, seed=args.seed), data, model_cfg.num_frames, model_cfg.image_size)
    start = time.perf_counter()
    checkpoint = run / "train" / "stprivacy.pt"
    if not checkpoint.is_file():
        tcfg = train_config(demo, data, run / "train", seed=args.seed, progress=False, **overrides)
        last = run / "train" / "last.pt"  # an interrupted run continues
        Trainer(tcfg, fit).fit(resume=last if last.is_file() else None)
    train_s = time.perf_counter() - start
    start = time.perf_counter()
    suffix = "" if args.keep_ratio is None else f"@{args.keep_ratio:g}"
    ecfg = eval_config(demo, data, run / f"eval{suffix}", attackers=ATTACKERS, progress=False)
    raw_path = args.workdir / "raw.json"
    if args.raw:
        (raw,) = evaluate(ecfg, checkpoint=checkpoint, methods=("raw",), train_loader=train_all, test_loader=test)
        raw_path.write_text(json.dumps({"scores": _scores(raw), "result": raw.__dict__}, default=float, indent=1))
        print(json.dumps(_scores(raw), default=float))
        return
    (ours,) = evaluate(ecfg, checkpoint=checkpoint, methods=("stprivacy",), keep_ratio=args.keep_ratio,
                       train_loader=train_all, test_loader=test)
    while not raw_path.is_file():  # the --raw run may still be going in another process
        time.sleep(10)
    raw = MethodResult(**json.loads(raw_path.read_text())["result"])
    w = worst_case(raw, ours)
    line = {"name": args.name + suffix, "seed": args.seed, "train_overrides": overrides, **_scores(ours),
            "raw_top1": raw.top1, "top1_vs_raw": ours.top1 - raw.top1, "drops": w["drops"],
            "worst_drop": w["worst_drop"], "best_attacker": w["best_attacker"],
            "seconds": {"train": round(train_s, 1), "evaluate": round(time.perf_counter() - start, 1)}}
    print(json.dumps(line, default=float))
    if args.json_lines:
        with open(args.json_lines, "a") as f:
            f.write(json.dumps(line, default=float) + "\n")


if __name__ == "__main__":
    main()
