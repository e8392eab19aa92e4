"""The ``stpcore`` command line: ``python -m stpcore`` or the ``stpcore`` console script."""

from __future__ import annotations

import argparse
import pickle
import sys
from pathlib import Path


def _cmd_info(args: argparse.Namespace) -> int:
    from stpcore.info import backend_errors, report

    print(report())
    errors = backend_errors()
    if errors:  # a bad STPCORE_BACKEND: every call of these ops would fail
        print("error: STPCORE_BACKEND: " + errors[0] + (f" (and {len(errors) - 1} more op(s) above)"
                                                         if len(errors) > 1 else ""), file=sys.stderr)
        return 2
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from stpcore.config import dataclass_from_args
    from stpcore.demo import DemoConfig, run_demo

    return run_demo(dataclass_from_args(DemoConfig, args))


def _cmd_train(args: argparse.Namespace) -> int:
    from stpcore.config import dataclass_from_args
    from stpcore.runtime import shutdown_distributed
    from stpcore.training import TrainConfig, Trainer, TrainingDiverged, TrainingInterrupted
    from stpcore.training.distributed import MainWriteFailed

    cfg = dataclass_from_args(TrainConfig, args)
    if args.select and not (cfg.validation > 0 and cfg.candidate_every > 0 and cfg.phase2_epochs > 0):
        print("error: --select needs a validation part and phase-2 candidates: add --validation FRACTION "
              "(e.g. 0.2) and --candidate-every N, with --phase2-epochs > 0", file=sys.stderr)
        return 2
    if args.select and cfg.recognizer_warmup_epochs >= cfg.phase2_epochs and cfg.decoder_init != "lstsq":
        print(f"error: --select needs a phase-2 candidate with a trained reconstruction head, and all "
              f"{cfg.phase2_epochs} phase-2 epochs are recognizer warm-up (--recognizer-warmup-epochs "
              f"{cfg.recognizer_warmup_epochs}), which leaves it untrained: use fewer warm-up epochs, more phase-2 "
              f"epochs, or --decoder-init lstsq", file=sys.stderr)
        return 2
    if args.select and cfg.privacy_nullspace:
        print("error: --select deploys a phase-2 candidate, and candidates are taken before the "
              "--privacy-nullspace projection, which would then be lost: use one of the two (--privacy-nullspace 0 "
              "to select among candidates)", file=sys.stderr)
        return 2
    trainer = Trainer(cfg)
    # The ranks agree on how fit() ends (finished, interrupted, diverged, a file rank 0 could not write), so all of
    # them leave the process group together on those paths; an unexpected error propagates at once (a barrier there
    # could wait forever).
    try:
        trainer.fit(resume=args.resume, overwrite=args.overwrite)
    except TrainingInterrupted as exc:
        shutdown_distributed()
        print(f"stopped: {exc}", file=sys.stderr)
        return 130
    except TrainingDiverged as exc:
        shutdown_distributed()
        print(f"diverged: {exc}", file=sys.stderr)
        return 1
    except MainWriteFailed as exc:  # rank 0 could not write a file; every rank raised it at the same point
        shutdown_distributed()
        print(f"error: {exc}", file=sys.stderr)
        return 1
    shutdown_distributed()
    if trainer.dist.main:
        print(f"trained STPrivacy: {Path(cfg.out_dir) / 'stprivacy.pt'} (full state: {Path(cfg.out_dir) / 'last.pt'})")
        if args.select:
            import signal

            # SIGTERM stops the scoring like Ctrl-C: the models scored so far are saved, a resume goes on from there.
            previous = signal.signal(signal.SIGTERM, _raise_interrupt)
            try:
                _select(cfg, args)
            except KeyboardInterrupt:
                print(f"stopped: the selection was interrupted; the models scored so far are kept, and "
                      f"{Path(cfg.out_dir) / 'stprivacy.pt'} is still the final model: rerun the same command with "
                      f"--resume {Path(cfg.out_dir) / 'last.pt'} to finish it", file=sys.stderr)
                return 130
            except ValueError as exc:
                print(f"error: selection failed ({exc}); the final model stays in "
                      f"{Path(cfg.out_dir) / 'stprivacy.pt'}", file=sys.stderr)
                return 1
            finally:
                signal.signal(signal.SIGTERM, previous)
    return 0


def _select(cfg, args: argparse.Namespace) -> None:
    """Score the candidates of a finished run and deploy the chosen one as stprivacy.pt (the final model stays
    in candidates/)."""
    import shutil

    from stpcore.evaluation import EvalConfig
    from stpcore.evaluation.selection import SELECTION_ATTACKERS, select_candidate
    from stpcore.media import atomic_path

    out = Path(cfg.out_dir)
    candidates = sorted((out / "candidates").glob("phase2-epoch*.pt"))
    eval_cfg = EvalConfig(data_root=cfg.data_root, labels=cfg.labels, kind=cfg.kind, split=cfg.split,
                          epochs=args.select_epochs, batch_size=cfg.batch_size, workers=cfg.workers,
                          decoder=cfg.decoder, stride=cfg.stride, short_side=cfg.short_side, base_lr=cfg.base_lr,
                          warmup_epochs=min(cfg.warmup_epochs, args.select_epochs / 4), amp=cfg.amp,
                          out_dir=str(out / "selection"), seed=cfg.seed, progress=cfg.progress,
                          attackers=SELECTION_ATTACKERS)
    # A resumed run (train --resume ... --select) also goes on with a selection it interrupted.
    record = select_candidate(candidates, eval_cfg, cfg.validation, target=args.select_target,
                              out=out / "selection.json", resume=args.resume is not None)
    chosen = Path(record["chosen"]["path"])
    with atomic_path(out / "stprivacy.pt") as tmp:  # flushed to disk before the rename: never a torn model
        shutil.copyfile(chosen, tmp)
    print(f"selected {chosen.name} ({record['rule']}); deployed as {out / 'stprivacy.pt'}; scores in "
          f"{out / 'selection.json'}")


def _cmd_export(args: argparse.Namespace) -> int:
    from stpcore.deploy import export_onnx
    from stpcore.models import load_anonymizer

    model = load_anonymizer(args.checkpoint)
    try:
        report = export_onnx(model, args.out, keep_ratio=args.keep_ratio, verify=not args.no_verify)
    except RuntimeError as exc:  # the deploy extra missing, or an operator ONNX cannot express: said by name
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"exported {report.path} (keep ratio {report.keep_ratio:g} per stage, batch axis dynamic; the adaptive "
          f"mode stays in PyTorch)")
    if not args.no_verify:
        print(f"ONNX Runtime vs PyTorch on batches {list(report.batches)}: keep decisions equal "
              f"{100 * report.keep_agreement:.2f}%, largest video difference {report.max_video_diff:.3g}")
    return 0


def _cmd_anonymize(args: argparse.Namespace) -> int:
    import signal

    from stpcore.anonymize import ModelError, anonymize_files, prepare_output_dir
    from stpcore.config import debug_enabled
    from stpcore.inference import load_trained

    if args.output_size == "source" and args.view != "full":
        print("error: --output-size source needs --view full (the centre view is one window)",
              file=sys.stderr)
        return 2
    if args.overlap and args.view != "full":  # it would be ignored, and still recorded as a setting
        print("error: --overlap applies to the full view's windows; --view center is one window, so drop --overlap",
              file=sys.stderr)
        return 2
    from stpcore.stream import is_stream

    live = [x for x in args.inputs if is_stream(x)]
    if live:
        bad = ("several inputs" if len(args.inputs) > 1 else "--adaptive" if args.adaptive is not None else
               "--side-by-side" if args.side_by_side else "--skip-existing" if args.skip_existing else None)
        if bad:
            print(f"error: {live[0]} is a live stream, which is anonymized alone and without {bad} "
                  f"(streams: one input, top-k, segments only)", file=sys.stderr)
            return 2
    else:
        given = [flag for flag, value in (("--input-format", args.input_format), ("--name", args.name),
                                          ("--segment-seconds", args.segment_seconds),
                                          ("--stream-timeout", args.stream_timeout),
                                          ("--drop/--no-drop", args.drop)) if value is not None]
        if given:  # they would be ignored: say so rather than write files the user asked otherwise of
            print(f"error: {', '.join(given)} {'is' if len(given) == 1 else 'are'} for a live stream (stdin '-', a "
                  f"URL or a device), not for files (FFmpeg probes them; each is written whole), so drop "
                  f"{'it' if len(given) == 1 else 'them'}", file=sys.stderr)
            return 2
        prepare_output_dir(args.output)  # before the model loads: a bad -o fails at once
    if args.runtime == "auto" and args.adaptive is not None:
        args.runtime = "torch"  # the adaptive mode runs in PyTorch only
    if args.runtime != "torch" and args.adaptive is not None:
        print(f"error: --adaptive runs in PyTorch only (data-dependent shapes); drop --runtime "
              f"{args.runtime} or --adaptive", file=sys.stderr)
        return 2
    if args.onnx and args.runtime in ("torch", "auto"):
        print("error: --onnx needs --runtime onnxruntime or --runtime openvino", file=sys.stderr)
        return 2
    anonymizer = load_trained(args.checkpoint, device=args.device, precision=args.precision, threads=args.threads,
                              compile=args.compile, runtime=args.runtime, **({"onnx": args.onnx} if args.onnx else {}))
    cfg = anonymizer.model.cfg
    meta = getattr(anonymizer, "onnx_meta", None)
    if meta and args.keep_ratio is not None and list(cfg.kept_per_slot(args.keep_ratio)) != meta["kept_per_slot"]:
        print(f"error: --keep-ratio {args.keep_ratio:g}, but {args.onnx} was exported at "
              f"{meta['keep_ratio']:g}; export one at this ratio (stpcore export --keep-ratio {args.keep_ratio:g}) "
              f"or drop --keep-ratio", file=sys.stderr)
        return 2
    if args.overlap >= cfg.image_size:
        print(f"error: --overlap {args.overlap} must be below the window, {cfg.image_size} px",
              file=sys.stderr)
        return 2
    print(f"STPrivacy {cfg.num_frames}x{cfg.image_size}x{cfg.image_size} from {args.checkpoint} "
          f"({anonymizer.description})")
    if live:
        return _anonymize_stream(args, anonymizer)
    # SIGTERM (a service manager, `kill`) stops like Ctrl-C: the file being written is dropped, no temp file
    # is left, and the summary of what finished is printed.
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        report = anonymize_files(
            args.inputs, args.output, anonymizer, stride=args.stride, batch_size=args.batch_size,
            keep_ratio=args.keep_ratio, adaptive_threshold=args.adaptive, side_by_side=args.side_by_side,
            view=args.view, output_size=args.output_size, min_overlap=args.overlap, short_side=args.short_side,
            skip_existing=args.skip_existing,
        )
    except KeyboardInterrupt as exc:
        partial = getattr(exc, "report", None)
        if partial is not None:
            print(partial.summary())
        print("interrupted: finished files are complete; run again with --skip-existing to go on", file=sys.stderr)
        return 130
    except ModelError as exc:  # every input would fail alike: one error, not one per file
        if exc.report is not None and (exc.report.written or exc.report.failed or exc.report.skipped):
            print(exc.report.summary())
        if debug_enabled():
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        signal.signal(signal.SIGTERM, previous)
    print(report.summary())
    return 1 if report.failed else 0


def _anonymize_stream(args: argparse.Namespace, anonymizer) -> int:
    """``stpcore anonymize`` on a live source (stpcore.stream): SIGTERM and Ctrl-C end it cleanly."""
    import signal
    import threading

    from stpcore.anonymize import ModelError
    from stpcore.config import debug_enabled
    from stpcore.stream import StreamError, anonymize_stream

    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda signum, frame: stop.set()) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        report = anonymize_stream(
            args.inputs[0], args.output, anonymizer, name=args.name or "stream",
            segment_seconds=args.segment_seconds or 10.0,
            stride=args.stride, batch_size=args.batch_size, keep_ratio=args.keep_ratio, view=args.view,
            output_size=args.output_size, min_overlap=args.overlap, short_side=args.short_side,
            input_format=args.input_format, timeout=args.stream_timeout or 10.0, stop=stop, verbose=True,
            drop=args.drop)
    except StreamError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 130 if stop.is_set() else 2  # stopped (SIGTERM, Ctrl-C) before the stream opened
    except ModelError as exc:
        if debug_enabled():
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    print(report.summary())
    return 1 if report.ended.startswith("stream lost") else 0


def _raise_interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def _positive_seconds(text: str) -> float:
    import math

    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"expected a number of seconds > 0, got {text!r}")
    return value


def _segment_name(text: str) -> str:
    from stpcore.stream import SEGMENT_NAME

    if not SEGMENT_NAME.fullmatch(text):
        raise argparse.ArgumentTypeError(f"expected a plain file name (letters, digits, '.', '_', '-'; not starting "
                                         f"with '.'), got {text!r}")
    return text


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}")
    return value


MAX_SHORT_SIDE = 4320  # 8K's short side: past it the working frames alone outgrow any machine's memory


def _short_side(text: str) -> int:
    value = _positive_int(text)
    if value > MAX_SHORT_SIDE:
        raise argparse.ArgumentTypeError(f"expected at most {MAX_SHORT_SIDE} pixels (8K's short side; the frames are "
                                         f"resized to it, in memory), got {value}")
    return value


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 0, got {text!r}")
    return value


def _fraction(high_closed: bool = True):
    """An argparse type for a number in (0, 1] (or (0, 1) with high_closed=False)."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = float("nan")
        if not (value > 0 and (value <= 1 if high_closed else value < 1)):
            raise argparse.ArgumentTypeError(f"expected a number in (0, {'1]' if high_closed else '1)'}, got {text!r}")
        return value

    return parse


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from exc


def _device(text: str) -> str:
    """An argparse type for a torch device name of a kind stpcore runs on (cpu, cuda, cuda:N)."""
    import torch

    try:
        kind = torch.device(text).type
    except (RuntimeError, ValueError):
        kind = None
    if kind not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"expected cpu, cuda or cuda:N, got {text!r}")
    return text


def _fractions(high_closed: bool = True):
    """An argparse type for comma-separated numbers, each in (0, 1] (or (0, 1) with high_closed=False)."""
    one = _fraction(high_closed)

    def parse(text: str) -> tuple[float, ...]:
        return tuple(one(v.strip()) for v in text.split(",") if v.strip())

    return parse


def _load_boxes(path: str | None) -> dict[str, tuple[float, float, float, float]] | None:
    """Person boxes for the blackening baseline: JSON {"<class>/<stem>": [x0, y0, x1, y1]} in [0, 1]."""
    if path is None:
        return None
    import json

    from stpcore.data.labels import validate_key

    raw = json.loads(Path(path).read_text())
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected a JSON object {{video_id: [x0, y0, x1, y1]}}")
    boxes = {}
    for key, box in raw.items():
        validate_key(key, where=str(path))
        if not (isinstance(box, list) and len(box) == 4 and all(isinstance(v, (int, float)) for v in box)
                and 0 <= box[0] <= box[2] <= 1 and 0 <= box[1] <= box[3] <= 1):
            raise ValueError(f"{path}: box of {key!r} must be [x0, y0, x1, y1] with 0 <= x0 <= x1 <= 1 and "
                             f"0 <= y0 <= y1 <= 1, got {box!r}")
        boxes[key] = tuple(float(v) for v in box)
    return boxes


def _cmd_eval(args: argparse.Namespace) -> int:
    from stpcore.config import dataclass_from_args
    from stpcore.evaluation import EvalConfig, evaluate, results_table

    cfg = dataclass_from_args(EvalConfig, args)
    methods = tuple(m.strip() for m in args.methods.split(",") if m.strip())
    results = evaluate(cfg, checkpoint=args.checkpoint, methods=methods, keep_ratio=args.keep_ratio,
                       boxes=_load_boxes(args.boxes), threshold=args.adaptive, resume=args.resume)
    print(results_table(results)[0])
    print(f"results in {Path(cfg.out_dir).resolve()}")
    return 0


def _cmd_sweep(args: argparse.Namespace) -> int:
    from stpcore.config import dataclass_from_args
    from stpcore.evaluation import EvalConfig, evaluate, sweep, write_sweep

    cfg = dataclass_from_args(EvalConfig, args)
    raw = evaluate(cfg, checkpoint=args.checkpoint, methods=("raw",))[0] if args.with_raw else None
    points = sweep(cfg, args.checkpoint, keep_ratios=args.keep_ratios, thresholds=args.thresholds, raw=raw)
    csv_path, png_path = write_sweep(points, cfg.out_dir, raw=raw)
    for p in points:
        print(f"{p.label:>16}: kept {p.kept_fraction:.3f}  top-1 {p.top1:.2f}  cMAP {p.cmap:.2f}  F1 {p.f1:.3f}")
    print(f"sweep: {csv_path}, {png_path}")
    return 0


def _command_of(argv: list[str]) -> str | None:
    """The subcommand named on the command line (its first word that is not an option), if any."""
    return next((a for a in argv if not a.startswith("-")), None)


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The ``stpcore`` parser. Every subcommand is listed; the flags made from a config dataclass (train, eval,
    sweep, demo), whose modules are imported to read them, are added for ``command`` alone (all of them when
    None), so ``stpcore info`` or ``stpcore anonymize`` load no training or evaluation code."""
    parser = argparse.ArgumentParser(prog="stpcore", description="STPrivacy engine: train, evaluate, anonymize.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    def wanted(name: str) -> bool:
        return command is None or command == name

    p = sub.add_parser("info", help="versions, devices, and which backends can run (and why not)")
    p.set_defaults(func=_cmd_info)

    from stpcore.config import add_dataclass_arguments

    p = sub.add_parser("train", help="train STPrivacy (phases 1 and 2); torchrun for several processes")
    p.add_argument("--config", help="JSON file of TrainConfig fields (flags override it)")
    p.add_argument("--resume", help="continue from a checkpoint (e.g. OUT_DIR/last.pt)")
    p.add_argument("--overwrite", action="store_true",
                   help="start afresh (or --resume a run saved elsewhere) in an --out-dir that holds an earlier run "
                        "(its checkpoints, metrics, candidates and selection are removed); without it such a folder "
                        "is refused")
    p.add_argument("--select", action="store_true",
                   help="after training, score the phase-2 candidates on the validation part (needs --validation "
                        "and --candidate-every) and deploy the one the rule picks as stprivacy.pt (selection.json "
                        "records every score; stpcore.evaluation.selection)")
    p.add_argument("--select-target", type=float, default=15.0, metavar="POINTS",
                   help="the worst-case cMAP drop a candidate must reach (default 15)")
    p.add_argument("--select-epochs", type=_positive_int, default=20, metavar="N",
                   help="epochs of the selection's quick recognizers and attackers (default 20)")
    if wanted("train"):
        from stpcore.training.config import TrainConfig

        add_dataclass_arguments(p, TrainConfig)
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("export", help="export a trained STPrivacy to ONNX (inference path, top-k; needs "
                                      "stpcore[deploy])",
                       description="Export the inference path (per-slot top-k at a fixed keep ratio, batch axis "
                                   "dynamic) to ONNX and check it against PyTorch with ONNX Runtime. The adaptive "
                                   "mode stays in PyTorch.")
    p.add_argument("checkpoint", help="stprivacy.pt (or last.pt) from stpcore train")
    p.add_argument("out", help="the .onnx file to write")
    p.add_argument("--keep-ratio", type=_fraction(), default=None, help="alpha per stage (default: the trained one)")
    p.add_argument("--no-verify", action="store_true", help="skip the ONNX Runtime check")
    p.set_defaults(func=_cmd_export)

    p = sub.add_parser(
        "anonymize", help="anonymize video files with a trained STPrivacy checkpoint",
        description="Anonymize whole videos, clip by clip at their own frame rate. Frames are resized to the scale "
                    "the model was trained at (short side 8/7 of its image size) and, with --view full (the "
                    "default), covered by model windows whose outputs are stitched back into the whole frame; "
                    "--view center anonymizes and writes the centre window only. Per input: "
                    "<name>.anonymized.mp4 (dropped tubelets black), <name>.keep.npz (keep masks per window, "
                    "with the windows' positions) and, with --side-by-side, <name>.side_by_side.mp4. A file "
                    "that cannot be read is reported and skipped.")
    p.add_argument("inputs", nargs="+", help="video files (any format FFmpeg reads), or one live stream: an rtsp://, "
                   "udp://, tcp://, srt://, rtmp:// or http(s):// URL, a V4L2 device /dev/videoN, or - (stdin)")
    p.add_argument("-o", "--output", required=True, help="output folder")
    p.add_argument("--checkpoint", required=True, help="stprivacy.pt (or last.pt) written by `stpcore train`")
    ratio = p.add_mutually_exclusive_group()
    ratio.add_argument("--keep-ratio", type=_fraction(), help="keep ratio per stage, in (0, 1] (default: the "
                       "trained one)")
    ratio.add_argument("--adaptive", type=_fraction(high_closed=False), metavar="T",
                       help="keep tubelets whose keep probability is above T, in (0, 1)")
    p.add_argument("--side-by-side", action="store_true", help="also write input and output side by side")
    p.add_argument("--view", choices=("full", "center"), default="full",
                   help="full: the whole frame in model windows (default); center: the centre window only")
    p.add_argument("--output-size", choices=("work", "source"), default="work",
                   help="work: the working scale (default); source: resized back to the input's size (--view full)")
    p.add_argument("--overlap", type=_non_negative_int, default=0, metavar="PX",
                   help="least overlap in pixels between neighbouring windows (default 0: only what covering "
                        "the frame evenly needs)")
    p.add_argument("--short-side", type=_short_side, default=None, metavar="PX",
                   help="working scale: the frames' short side before windowing (default: the training scale, "
                        "8/7 of the model's image size)")
    p.add_argument("--skip-existing", action="store_true",
                   help="resume an interrupted run: skip an input whose outputs are in the folder and whose keep "
                        "file records that same, unchanged input and the same settings (others are redone)")
    p.add_argument("--stride", type=_positive_int, default=1, help="frame stride inside a clip (default 1)")
    p.add_argument("--batch-size", type=_positive_int, default=8,
                   help="model clips per forward, each one window of one chunk (of one stride phase) (default 8)")
    p.add_argument("--device", type=_device, default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16", "int8"),
                   help="auto: bf16 on CUDA and on CPUs with native bf16, else int8 dynamic on CPU where available "
                        "(see stpcore.inference)")
    p.add_argument("--threads", type=_positive_int, default=None, help="CPU threads (default: torch's)")
    p.add_argument("--runtime", default="torch", choices=("torch", "onnxruntime", "openvino", "auto"),
                   help="auto: the path measured fastest on this kind of CPU (stpcore.inference.AUTO_CHOICES; torch "
                        "where none was measured); torch; onnxruntime or openvino: the model exported to ONNX and run "
                        "by that runtime on the CPU (onnxruntime fp32 or int8; openvino fp32, bf16 or int8 "
                        "calibrated on the first batch of the first input given, also when --skip-existing finds it "
                        "done; --precision auto picks fp32, or bf16 for openvino where the CPU has it); needs "
                        "stpcore[deploy]; not with --adaptive")
    p.add_argument("--onnx", metavar="FILE",
                   help="with --runtime onnxruntime/openvino: run this graph from stpcore export (of the same "
                        "checkpoint; its keep ratio is used) instead of exporting one at start")
    p.add_argument("--compile", action="store_true",
                   help="run the model through torch.compile (compiled before the first input: batches of 2 or "
                        "more clips share one graph; a batch of 1, such as a file's last, compiles its own once; "
                        "see BENCHMARKS.md for when it pays)")
    live = p.add_argument_group("live streams", "rolling segments <name>.NNNNN.mp4 and <name>.segments.jsonl; a "
                                "chunk is dropped (and counted) when compute falls behind a live source (--drop), "
                                "a recording waits for it (--no-drop); SIGTERM ends cleanly")
    live.add_argument("--segment-seconds", type=_positive_seconds, default=None,
                      help="length of each segment file (default 10)")
    live.add_argument("--name", type=_segment_name, default=None,
                      help="segment file prefix, a plain file name (default 'stream')")
    live.add_argument("--input-format", help="the container of the stream when FFmpeg cannot probe it (e.g. mpegts)")
    live.add_argument("--stream-timeout", type=_positive_seconds, default=None, metavar="S",
                      help="seconds to open the stream, and without data before a network stream counts as lost "
                           "(default 10; stdin and V4L2 have no read timeout)")
    live.add_argument("--drop", action=argparse.BooleanOptionalAction, default=None,
                      help="--drop: when compute falls behind, drop chunks to keep latency bounded (a live source); "
                           "--no-drop: wait, writing every frame (a recording). Default: --no-drop for a source that "
                           "declares a duration (a file over HTTP; an MP4 piped in may declare one too), --drop "
                           "otherwise (cameras, RTSP, an MPEG-TS pipe)")
    p.set_defaults(func=_cmd_anonymize)

    p = sub.add_parser("eval", help="phase 3: fresh recognizers on transformed videos; the paper's Table 1")
    p.add_argument("--config", help="JSON file of EvalConfig fields (flags override it)")
    p.add_argument("--checkpoint", help="trained STPrivacy (needed for the stprivacy method)")
    p.add_argument("--methods", default="raw,stprivacy,downsample4",
                   help="comma-separated: raw, stprivacy, downsample2, downsample4, blur_weak, blur_strong, blacken")
    ratio = p.add_mutually_exclusive_group()
    ratio.add_argument("--keep-ratio", type=_fraction(), help="STPrivacy keep ratio per stage, in (0, 1] (default: "
                                                              "the trained one)")
    ratio.add_argument("--adaptive", type=_fraction(high_closed=False), metavar="T",
                       help="STPrivacy adaptive mode at threshold T, in (0, 1)")
    p.add_argument("--boxes", help="JSON {video_id: [x0, y0, x1, y1]} person boxes for the blacken baseline, relative "
                   "to the whole (upright) frame; each clip's crop and flip map them into it")
    p.add_argument("--resume", action="store_true",
                   help="go on with an interrupted evaluation: a method finished in --out-dir (methods/<name>.json) "
                        "with the same settings, checkpoint and data is read back, not trained again")
    if wanted("eval"):
        from stpcore.evaluation.config import EvalConfig

        add_dataclass_arguments(p, EvalConfig)
    p.set_defaults(func=_cmd_eval)

    p = sub.add_parser("sweep", help="privacy/utility trade-off of one trained model over keep ratios")
    p.add_argument("--config", help="JSON file of EvalConfig fields (flags override it)")
    p.add_argument("--checkpoint", required=True, help="trained STPrivacy")
    p.add_argument("--keep-ratios", type=_fractions(), default=(1.0, 0.85, 0.7, 0.55, 0.4),
                   help="comma-separated keep ratios per stage, each in (0, 1]")
    p.add_argument("--thresholds", type=_fractions(high_closed=False), default=(0.5,),
                   help="comma-separated adaptive-mode thresholds, each in (0, 1); \"\" for none")
    p.add_argument("--with-raw", action="store_true", help="also evaluate raw video, drawn for reference")
    if wanted("sweep"):
        from stpcore.evaluation.config import EvalConfig

        add_dataclass_arguments(p, EvalConfig)
    p.set_defaults(func=_cmd_sweep)

    p = sub.add_parser("demo", help="the main job on the built-in default: synthetic data, phases 1-3, videos")
    p.add_argument("--config", help="JSON file of DemoConfig fields (flags override it)")
    if wanted("demo"):
        from stpcore.demo import DemoConfig

        add_dataclass_arguments(p, DemoConfig)
    p.set_defaults(func=_cmd_demo)

    try:
        from stpcore.data.cli import add_data_parser
    except ImportError:  # the data layer is optional at this level; `info` must always work
        add_data_parser = None
    if add_data_parser is not None:
        add_data_parser(sub)
    return parser


class _Console:
    """sys.stdout or sys.stderr while a command runs: a reader that goes away (``stpcore anonymize ... | head``, a
    dead ``tee``, a closed terminal) ends the console output, not the job. The first write or flush that finds the
    pipe closed points the stream's file descriptor at os.devnull (what was buffered goes there, and so does the
    interpreter's last flush, which would otherwise fail at exit), and the command carries on with its files."""

    def __init__(self, stream) -> None:
        self._stream = stream

    def __getattr__(self, name: str):
        return getattr(self._stream, name)

    def write(self, text: str) -> int:
        try:
            return self._stream.write(text)
        except BrokenPipeError:
            self._to_devnull()
            return len(text)

    def writelines(self, lines) -> None:
        for line in lines:
            self.write(line)

    def flush(self) -> None:
        try:
            self._stream.flush()
        except BrokenPipeError:
            self._to_devnull()

    def _to_devnull(self) -> None:
        import os

        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
        except OSError:
            return
        try:
            os.dup2(devnull, self._stream.fileno())
        except (OSError, ValueError, AttributeError):  # not a file (a test's capture): later writes are dropped here
            pass
        finally:
            os.close(devnull)


def main(argv: list[str] | None = None) -> int:
    out, err = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = _Console(out), _Console(err)
    try:
        return _main(argv)
    finally:
        sys.stdout, sys.stderr = out, err


def _main(argv: list[str] | None) -> int:
    from stpcore.config import debug_enabled

    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(_command_of(argv))
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (ValueError, OSError, pickle.UnpicklingError) as exc:
        # Bad settings, paths or files: the message says what and where; a traceback would only hide it.
        if debug_enabled():
            raise
        print(f"error: {exc}", file=sys.stderr)
        print("(set STPCORE_DEBUG=1 for the traceback)", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
