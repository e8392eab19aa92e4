"""``make demo`` / ``stpcore demo``: the whole method on the built-in default, on a CPU, in minutes.

1. writes the synthetic privacy dataset (HMDB51 layout; actions carried by motion, the 5 privacy
   attributes by appearance, drawn independently of the action);
2. trains STPrivacy, phase 1 (init) and phase 2 (adversarial), with a small preset. Phase 2 departs
   from the paper in four choices, all TrainConfig fields, each chosen from measured runs
   (BENCHMARKS.md): the reconstruction head starts as the ridge decoder of the phase-1 tokens
   (decoder_init="lstsq"), the privacy term is the recognizer's entropy, not its BCE, and the weights
   are 1.0 (action) and 4.0 (privacy); when phase 2 ends, the directions along which linear probes read the
   privacy attributes are projected out of the reconstruction head (privacy_nullspace=8, no retraining).
   ``--privacy-objective bce --decoder-init random --action-weight 0.5 --privacy-weight 0.5
   --privacy-nullspace 0`` runs the paper's setting;
3. evaluates as the paper does (phase 3: fresh recognizers on the transformed videos): raw video,
   STPrivacy and one baseline, and prints them beside the paper's numbers (for orientation only); the
   privacy attackers are the paper's ViT and the appearance-statistics attacker (``stats``), and the
   worst case over them is printed beside the ViT's figure;
4. with ``--sweep``, sweeps the trained model over keep ratios and the adaptive mode (no retraining), with a
   plot (fresh phase-3 recognizers per point: as long again as step 3, so off by default; ``stpcore sweep``
   does the same on any checkpoint);
5. anonymizes a few test videos over the whole frame (model windows stitched back, ``stpcore anonymize``'s
   code path and default view), written side by side with the input.

Everything lands in one output folder. Finished steps are kept: running the demo again on the same
folder reuses the dataset and resumes or reuses the training (delete the folder to start over). A rerun with
other data or training settings than the folder's is refused (another ``--out``, or delete the folder).
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from stpcore import media

# The DemoConfig fields that make the synthetic dataset (recorded beside it, checked when it is reused).
DATA_FIELDS = ("videos", "seed", "width", "height", "frames")


@dataclass(frozen=True)
class DemoConfig:
    """The demo's knobs (each also a ``stpcore demo`` flag).

    Args:
        out: output folder.
        videos: synthetic videos (spread over 7 action classes; a third are test videos).
        seed: seeds the dataset, the training and the evaluation.
        preset: model preset of STPrivacy and the recognizers ("tiny": 8 x 32 x 32 clips, 64 tubelets).
        width, height, frames: synthetic video size and length.
        stride: frame stride of the clips: 3 spans the whole 24-frame video with the preset's 8 frames,
            which the motions need (raw-video top-1 in phase 3 was 49% at stride 2, 71% at stride 3).
        phase1_epochs, phase2_epochs, eval_epochs: training lengths (phase 3 per method).
        batch_size: clips per step.
        lr: the learning rate itself [G: the demo trains from scratch, so it does not use the paper's
            1e-3 x batch / 512 rule meant for ImageNet-initialised ViT-S].
        action_weight, privacy_weight: phase-2 weights of CE(action) and of the privacy term (the paper: 0.5
            and 0.5 with BCE; the demo: 1.0 and 4.0 with the entropy, which is at most ln 2).
        privacy_objective: ``TrainConfig.privacy_objective``: "bce" is the paper's; the demo maximises the
            privacy recognizer's entropy instead, with a larger privacy weight (see BENCHMARKS.md for the
            runs behind this choice, the paper's setting among them).
        decoder_init: ``TrainConfig.decoder_init`` ("lstsq": phase 2 starts from the ridge-regression
            decoder of the phase-1 tokens, not a random projection; see BENCHMARKS.md for both).
        privacy_nullspace: ``TrainConfig.privacy_nullspace``: rounds of privacy probes whose directions are
            projected out of the reconstruction head when phase 2 ends (0: off; see BENCHMARKS.md for how 8 was
            chosen and what it does).
        baseline: the baseline evaluated beside raw video and STPrivacy.
        sweep: run the trade-off sweep (step 4), which trains fresh recognizers for every point.
        sweep_ratios: keep ratios of the trade-off sweep (the trained ratio is evaluated in step 3).
        threads: torch threads (0: torch's default).

    Fixed, not fields: 2 warm-up epochs for every lr schedule (phases 1-2 and phase 3), the PyAV decoder with
    decoded videos kept in memory, 8 test videos per batch.
    """

    out: str = "out/demo"
    videos: int = 210
    seed: int = 0
    preset: str = "tiny"
    width: int = 96
    height: int = 72
    frames: int = 24
    stride: int = 3
    phase1_epochs: int = 30
    phase2_epochs: int = 60
    eval_epochs: int = 100
    batch_size: int = 16
    lr: float = 1e-3
    action_weight: float = 1.0
    privacy_weight: float = 4.0
    privacy_objective: str = "entropy"
    decoder_init: str = "lstsq"
    privacy_nullspace: int = 8
    baseline: str = "blur_strong"
    sweep: bool = False
    sweep_ratios: tuple[float, ...] = (1.0, 0.5)
    threads: int = 0


def _loaders(cfg: DemoConfig, data: Path, num_frames: int, size: int):
    from stpcore.runtime import clip_loader

    common = dict(labels=data / "vp_labels.csv", num_frames=num_frames, crop=size, stride=cfg.stride,
                  decoder="pyav", cache=True, seed=cfg.seed)
    return (clip_loader(data, train=True, batch_size=cfg.batch_size, **common),
            clip_loader(data, train=False, batch_size=8, **common))


def train_config(cfg: DemoConfig, data: Path, out_dir: Path, **overrides):
    """The demo's phases 1-2 as a TrainConfig (``overrides``: TrainConfig fields)."""
    from stpcore.training import TrainConfig

    fields = dict(
        data_root=str(data), labels=str(data / "vp_labels.csv"), out_dir=str(out_dir), preset=cfg.preset,
        stride=cfg.stride, batch_size=cfg.batch_size, phase1_epochs=cfg.phase1_epochs, phase2_epochs=cfg.phase2_epochs,
        base_lr=cfg.lr * 512 / cfg.batch_size, warmup_epochs=2, seed=cfg.seed, checkpoint_every=0, log_every=5,
        action_weight=cfg.action_weight, privacy_weight=cfg.privacy_weight, decoder_init=cfg.decoder_init,
        privacy_objective=cfg.privacy_objective, privacy_nullspace=cfg.privacy_nullspace,
    )
    return TrainConfig(**(fields | overrides))


def eval_config(cfg: DemoConfig, data: Path, out_dir: Path, **overrides):
    """The demo's phase 3 as an EvalConfig (``overrides``: EvalConfig fields)."""
    from stpcore.evaluation import EvalConfig

    fields = dict(
        data_root=str(data), labels=str(data / "vp_labels.csv"), preset=cfg.preset, epochs=cfg.eval_epochs,
        stride=cfg.stride, batch_size=cfg.batch_size, base_lr=cfg.lr * 512 / cfg.batch_size, warmup_epochs=2,
        out_dir=str(out_dir), seed=cfg.seed, device="cpu", attackers="vit,stats",
    )
    return EvalConfig(**(fields | overrides))


def run_demo(cfg: DemoConfig) -> int:
    """Run the demo (module docstring) into ``cfg.out``; prints where its outputs are. Returns 0."""
    from stpcore.anonymize import anonymize_files
    from stpcore.data.synth import make_synthetic_dataset
    from stpcore.evaluation import METHODS, SweepPoint, evaluate, sweep, write_results, write_sweep
    from stpcore.models import STPrivacyConfig, load_anonymizer
    from stpcore.training import Trainer

    # Before any work: phase 3 would refuse these only after the training (blacken needs person boxes).
    baselines = [m for m in METHODS if m not in ("raw", "stprivacy", "blacken")]
    if cfg.baseline not in baselines:
        raise ValueError(f"baseline must be one of {baselines} (evaluated beside raw video and STPrivacy), got "
                         f"{cfg.baseline!r}")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    timings: dict[str, float] = {}

    def step(name: str) -> None:
        timings[name] = round(time.perf_counter() - start - sum(timings.values()), 1)

    # 1. Data.
    data = out / "data"
    data_settings = {k: getattr(cfg, k) for k in DATA_FIELDS}
    stamp = data / "demo-data.json"
    if not (data / "vp_labels.csv").is_file():
        print(f"[1/5] writing {cfg.videos} synthetic videos to {data}")
        make_synthetic_dataset(data, videos=cfg.videos, seed=cfg.seed, width=cfg.width, height=cfg.height,
                               frames=cfg.frames, workers=2, progress=True, overwrite=True)  # an interrupted one
        with media.atomic_path(stamp) as tmp:
            tmp.write_text(json.dumps(data_settings))
    else:
        saved = json.loads(stamp.read_text()) if stamp.is_file() else None  # None: made before it was recorded
        if saved is not None and saved != data_settings:
            changed = {k: (saved.get(k), v) for k, v in data_settings.items() if saved.get(k) != v}
            raise ValueError(f"{data} holds a dataset made with other settings {changed} (saved, now); run the "
                             f"demo into another --out, or delete {out} to start over")
        print(f"[1/5] reusing the synthetic dataset in {data}")
    model_cfg = STPrivacyConfig.from_name(cfg.preset)
    train_loader, test_loader = _loaders(cfg, data, model_cfg.num_frames, model_cfg.image_size)
    step("data")

    # 2. Phases 1 and 2.
    train_dir = out / "train"
    checkpoint = train_dir / "stprivacy.pt"
    train_cfg = train_config(cfg, data, train_dir)
    _check_same_training(train_cfg, train_dir, out)
    if checkpoint.is_file():
        print(f"[2/5] reusing the trained STPrivacy {checkpoint}")
    else:
        last = train_dir / "last.pt"
        print(f"[2/5] training STPrivacy ({cfg.preset}): phase 1 {cfg.phase1_epochs} epochs, phase 2 "
              f"{cfg.phase2_epochs} epochs" + (f", resuming {last}" if last.is_file() else ""))
        Trainer(train_cfg, train_loader).fit(resume=last if last.is_file() else None)
    step("train")

    # 3. Phase 3: raw video, STPrivacy, one baseline.
    eval_cfg = eval_config(cfg, data, out / "eval")
    print(f"[3/5] phase 3: fresh recognizers ({cfg.eval_epochs} epochs each) on raw, STPrivacy and "
          f"{cfg.baseline} videos")
    results = evaluate(eval_cfg, checkpoint=checkpoint, methods=("raw", "stprivacy", cfg.baseline),
                       train_loader=train_loader, test_loader=test_loader)
    write_results(results, out / "eval")
    step("evaluate")

    # 4. Trade-off sweep (the trained keep ratio is the STPrivacy row above).
    points, sweep_png = [], None
    if cfg.sweep:
        print(f"[4/5] trade-off sweep over keep ratios {list(cfg.sweep_ratios)} and the adaptive mode (t = 0.5)")
        raw = results[0]
        points = sweep(eval_cfg, checkpoint, keep_ratios=cfg.sweep_ratios, thresholds=(0.5,), raw=raw,
                       train_loader=train_loader, test_loader=test_loader)
        points = [SweepPoint.from_result(results[1], "keep_ratio", model_cfg.keep_ratio), *points]
        sweep_csv, sweep_png = write_sweep(points, out / "eval", raw=raw)
    else:
        print("[4/5] trade-off sweep skipped (--sweep runs it; so does `stpcore sweep --checkpoint ...`)")
    step("sweep")

    # 5. Anonymized side-by-side videos of a few test videos.
    model = load_anonymizer(checkpoint)
    videos = sorted({test_loader.records[i].path for i in range(min(3, len(test_loader.records)))})
    print(f"[5/5] anonymizing {len(videos)} test videos, full frame, side by side")
    report = anonymize_files(
        videos, out / "anonymized", model, stride=cfg.stride, side_by_side=True, output_size="source", verbose=False,
    )
    step("anonymize")

    _print_summary(results, points, report, out, checkpoint, sweep_png, timings)
    summary = {
        "config": dataclasses.asdict(cfg),
        "results": [dataclasses.asdict(r) for r in results],
        "sweep": [dataclasses.asdict(p) for p in points],
        "checkpoint": str(checkpoint),
        "anonymized": {k: [str(p) for p in v] for k, v in report.written.items()},
        "seconds": timings,
    }
    with media.atomic_path(out / "summary.json") as tmp:
        tmp.write_text(json.dumps(summary, indent=2, default=float))
    return 0


def _check_same_training(train_cfg, train_dir: Path, out: Path) -> None:
    """ValueError when train_dir holds a model (or a run to resume) trained with other settings than
    ``train_cfg``: the demo would report that model under settings it was not trained with."""
    from stpcore.training.state import RESUME_FREE

    saved_file = train_dir / "config.json"
    if not (saved_file.is_file() and ((train_dir / "stprivacy.pt").is_file() or (train_dir / "last.pt").is_file())):
        return
    saved = json.loads(saved_file.read_text())
    now = json.loads(json.dumps(dataclasses.asdict(train_cfg)))
    changed = {k: (saved.get(k), v) for k, v in now.items() if k not in RESUME_FREE and saved.get(k) != v}
    if changed:
        raise ValueError(f"{train_dir} holds a model trained with other settings {changed} (saved, now); run the "
                         f"demo into another --out, or delete {out} to start over")


def _print_summary(results, points, report, out, checkpoint, sweep_png, timings) -> None:
    from stpcore.evaluation import paper_table

    raw, ours, base = results[0], results[1], results[2]
    print()
    print("Phase 3 on the synthetic test split (ours) and the paper's VP-HMDB51 numbers (orientation only: "
          "other data):")
    print(f"| {'method':<22} | top-1 % (up) | F1 (down) | cMAP % (down) |")
    print(f"|{'-' * 24}|-------------:|----------:|--------------:|")
    for r in results:
        print(f"| {r.method:<22} | {r.top1:12.2f} | {r.f1:9.3f} | {r.cmap:13.2f} |")
    for row in paper_table("hmdb51"):
        name = f"paper: {row['method']}"
        print(f"| {name:<22} | {row['top1']:12.2f} | {row['f1']:9.3f} | {row['cmap']:13.2f} |")
    print()
    d_top1, d_cmap = raw.top1 - ours.top1, raw.cmap - ours.cmap
    print(f"STPrivacy vs raw video: action top-1 {-d_top1:+.2f} points, privacy cMAP {-d_cmap:+.2f} points "
          f"(target: top-1 within 10 points, cMAP down by at least 15); kept {ours.kept_fraction:.2f} of the "
          f"tubelets")
    if ours.attackers:
        from stpcore.evaluation.results import worst_case

        w = worst_case(raw, ours)
        drops = ", ".join(f"{n} {d:+.2f}" for n, d in w["drops"].items())
        print(f"privacy against every attacker (cMAP drop from raw video): {drops}; worst case "
              f"{w['worst_drop']:.2f} points (the best attack on raw video against the best on STPrivacy's, "
              f"{w['best_attacker']}; target: at least 15)")
    print("(one training run: whether it meets these targets changes with the training seed and with the machine, "
          "which rounds the training its own way; BENCHMARKS.md, 'The demo on synthetic data', has the spread)")
    print(f"{base.method}: top-1 {base.top1:.2f}, cMAP {base.cmap:.2f}")
    if points:
        print("trade-off sweep: " + "; ".join(f"{p.label} top-1 {p.top1:.1f} cMAP {p.cmap:.1f}" for p in points))
    print(f"seconds per step: {timings}")
    print()
    print(f"trained STPrivacy (for `stpcore anonymize --checkpoint`): {checkpoint}")
    print(f"results table: {out / 'eval' / 'results.md'}" + (f"; trade-off plot: {sweep_png}" if sweep_png else ""))
    for outs in report.written.values():
        print(f"anonymized: {outs[-1]}")
    print(f"outputs in {out.resolve()}")

