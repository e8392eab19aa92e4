"""Post-hoc: project the directions along which linear probes read the privacy attributes out of the
reconstruction head's input, then score the model as the demo does (an INLP-style nullspace projection, Ravfogel
et al., ACL 2020, applied to a trained STPrivacy; issue 11).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/decoder_nullspace.py RUN --rounds K --workdir W \
        [--json-lines OUT.jsonl]
    .venv/bin/python benchmarks/decoder_nullspace.py --gather OUT.json --json-lines OUT.jsonl \
        --base-json-lines W_RESULTS.jsonl

RUN names a run trained by ``benchmarks/privacy_methods.py`` in the same work folder (``W/RUN/train/stprivacy.pt``,
e.g. ``base_s0``), whose ``W/raw.json`` gives raw video's scores. The model runs in inference mode (top-k at its own
keep ratio) over two passes of the training loader (two random crops per video; each pass drops the last partial
batch, so 128 of the 140 videos); the input of the reconstruction
head, LayerNorm(final kept token), is collected for every kept token, labelled with its video's attributes (videos
without privacy labels are left out). Then K rounds over the 5 attributes: a logistic regression (scikit-learn, L2,
C = 1) is fitted on the projected features, its unit weight direction w is removed (P <- P (I - w w^T)), so 5K
directions of the D go. The reconstruction head's weight becomes W P (its bias stays), and phase 3 runs as in
privacy_methods.py (the demo's evaluation settings, attackers vit, frame_cnn and stats). One JSON line per run: the
probes' training accuracy before each removal, and the scores. Nothing is retrained: the keep decisions are the
trained model's.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

ATTACKERS = "vit,frame_cnn,stats"


def nullspace(features, labels, rounds: int):
    """(N, D) float64 features, (N, A) 0/1 labels -> (D, D) projection and the probe accuracies per round."""
    import numpy as np
    from sklearn.linear_model import LogisticRegression

    dim = features.shape[1]
    projection = np.eye(dim)
    accuracies = []
    for _ in range(rounds):
        row = []
        for a in range(labels.shape[1]):
            if len(np.unique(labels[:, a])) < 2:
                row.append(None)
                continue
            projected = features @ projection
            probe = LogisticRegression(max_iter=2000).fit(projected, labels[:, a])
            row.append(float(probe.score(projected, labels[:, a])))
            w = probe.coef_[0] / np.linalg.norm(probe.coef_[0])
            projection = projection @ (np.eye(dim) - np.outer(w, w))
        accuracies.append(row)
    return projection, accuracies


def gather(lines_path: Path, base_lines_path: Path, out: Path) -> dict:
    """{"runs": {name: line}}: every nullspace line (the last of a name), and beside each the privacy_methods.py line
    of the run it started from, under the run's name (``base_s0``)."""
    def last_by(path: Path, key) -> dict:
        found = {}
        for text in path.read_text().splitlines():
            if text.strip():
                line = json.loads(text)
                found[key(line)] = line
        return found

    runs = last_by(lines_path, lambda line: line["name"])
    trained = last_by(base_lines_path, lambda line: f"{line['name']}_s{line['seed']}")
    for run in sorted({line["run"] for line in runs.values()}):
        base = trained[run]
        runs[run] = {k: base[k] for k in ("top1", "cmap", "raw_top1", "top1_vs_raw", "drops", "worst_drop",
                                          "best_attacker")} | {"ap": {a: r["ap"] for a, r in base["attackers"].items()}}
    data = {"attackers": ATTACKERS.split(","), "runs": dict(sorted(runs.items()))}
    out.write_text(json.dumps(data, indent=1, default=float) + "\n")
    return data


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", nargs="?")
    parser.add_argument("--rounds", type=int)
    parser.add_argument("--workdir", type=Path)
    parser.add_argument("--json-lines", type=Path)
    parser.add_argument("--gather", type=Path, metavar="OUT.json")
    parser.add_argument("--base-json-lines", type=Path, help="privacy_methods.py's lines (with --gather)")
    args = parser.parse_args()
    if args.gather:
        if args.json_lines is None or args.base_json_lines is None:
            parser.error("--gather needs --json-lines and --base-json-lines")
        gather(args.json_lines, args.base_json_lines, args.gather)
        return
    if args.run is None or args.rounds is None or args.workdir is None:
        parser.error("a run needs RUN, --rounds and --workdir")

    import torch

    from stpcore.demo import DemoConfig, _loaders, eval_config
    from stpcore.evaluation.methods import STPrivacyTransform
    from stpcore.evaluation.protocol import evaluate_method, load_checkpoint
    from stpcore.evaluation.results import MethodResult, worst_case
    from stpcore.models import STPrivacyConfig

    start = time.perf_counter()
    demo = DemoConfig()
    data = args.workdir / "data"
    model_cfg = STPrivacyConfig.from_name(demo.preset)
    train_all, test = _loaders(demo, data, model_cfg.num_frames, model_cfg.image_size)
    ecfg = eval_config(demo, data, args.workdir / args.run / f"eval_nullspace{args.rounds}", attackers=ATTACKERS,
                       progress=False)
    model = load_checkpoint(args.workdir / args.run / "train" / "stprivacy.pt", ecfg).eval()

    features, labels, labelled = [], [], []
    decode = model._decode

    def collect(tokens):
        features.append(model.norm_recon(tokens).reshape(-1, tokens.shape[-1]).double())
        return decode(tokens)

    model._decode = collect
    with torch.no_grad():
        for epoch in range(2):
            train_all.set_epoch(epoch)
            for batch in train_all:
                model(batch.clips)
                kept = features[-1].shape[0] // len(batch.clips)
                labels.append(batch.privacy.repeat_interleave(kept, dim=0))
                labelled.append(batch.has_privacy.repeat_interleave(kept, dim=0))
    del model._decode
    keep = torch.cat(labelled)  # videos without privacy labels (privacy 0 there) train no probe
    projection, accuracies = nullspace(torch.cat(features)[keep].numpy(), torch.cat(labels)[keep].numpy(),
                                       args.rounds)
    with torch.no_grad():
        weight = model.head_recon.weight.double() @ torch.from_numpy(projection)
        model.head_recon.weight.copy_(weight.to(model.head_recon.weight.dtype))

    result = evaluate_method(STPrivacyTransform(model), ecfg, train_all, test, backbone=model.cfg)
    raw = MethodResult(**json.loads((args.workdir / "raw.json").read_text())["result"])
    w = worst_case(raw, result)
    line = {"name": f"{args.run} nullspace{args.rounds}", "run": args.run, "rounds": args.rounds,
            "probe_accuracy": accuracies, "top1": result.top1, "cmap": result.cmap, "raw_top1": raw.top1,
            "top1_vs_raw": result.top1 - raw.top1, "drops": w["drops"], "worst_drop": w["worst_drop"],
            "best_attacker": w["best_attacker"],
            "ap": {name: r["ap"] for name, r in result.attackers.items()},
            "seconds": round(time.perf_counter() - start, 1)}
    print(json.dumps(line, default=float))
    if args.json_lines:
        with open(args.json_lines, "a") as f:
            f.write(json.dumps(line, default=float) + "\n")


if __name__ == "__main__":
    main()
