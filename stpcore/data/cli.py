"""The `stpcore data ...` subcommands; `add_data_parser(subparsers)` is wired in by stpcore/cli.py."""

from __future__ import annotations

import argparse
import sys


def add_data_parser(subparsers: argparse._SubParsersAction) -> None:
    """Add `data` with `labels export|import`, `check`, `synth`, `transcode`; each sets func=(args) -> int."""
    data = subparsers.add_parser("data", help="datasets: labels, checks, synthetic data, transcoding")
    sub = data.add_subparsers(dest="data_command", required=True)

    labels = sub.add_parser("labels", help="privacy label files")
    lsub = labels.add_subparsers(dest="labels_command", required=True)
    exp = lsub.add_parser("export", help="released label pickle -> CSV (read with a numpy-only unpickler)")
    exp.add_argument("labels", help="vp_*_privacy_labels.pickle")
    exp.add_argument("out", help="output CSV")
    exp.set_defaults(func=_labels_export)
    imp = lsub.add_parser("import", help="validate and normalise a hand-made label CSV")
    imp.add_argument("src", help="input CSV (video,skin_color,face,gender,nudity,relationship)")
    imp.add_argument("out", help="normalised output CSV")
    imp.set_defaults(func=_labels_import)

    check = sub.add_parser(
        "check", help="validate a dataset folder",
        description="Check a dataset root ROOT/<class>/<video> (HMDB51 or UCF101 as published, or a transcoded "
                    "copy): unreadable, truncated, too-short videos, codecs the decoder cannot read, split entries "
                    "without a file, and label coverage. Exit 0 if nothing blocks training, 1 if something does, "
                    "2 if ROOT is not a dataset root (a folder of videos with no class folders is not: check the "
                    "folder above it).")
    check.add_argument("root", help="dataset root holding <class>/<video> folders")
    check.add_argument("--splits", default=None, help="folder of the split files (default: ROOT)")
    check.add_argument("--labels", default=None, help="privacy label file (.pickle or .csv)")
    check.add_argument("--decoder", default="pyav", choices=("pyav", "dali-cpu", "dali-gpu"))
    check.add_argument("--kind", default="auto", choices=("auto", "hmdb51", "ucf101"))
    check.set_defaults(func=_check)

    synth = sub.add_parser("synth", help="write the synthetic privacy dataset (HMDB51 layout)")
    synth.add_argument("out")
    synth.add_argument("--videos", type=int, default=70)
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--codec", default="vp9", choices=("vp9", "h264"))
    synth.add_argument("--width", type=int, default=320)
    synth.add_argument("--height", type=int, default=240)
    synth.add_argument("--frames", type=int, default=40)
    synth.add_argument("--fps", type=int, default=25)
    synth.add_argument("--workers", type=int, default=1)
    synth.add_argument("--overwrite", action="store_true",
                       help="replace an earlier synthetic dataset in OUT (its videos, splits and labels); without "
                            "it a folder that holds anything is refused")
    synth.set_defaults(func=_synth)

    tr = sub.add_parser(
        "transcode", help="published .avi -> constant-frame-rate H.264/VP9 that DALI reads",
        description="Mirror the videos of SRC into DST as constant-frame-rate H.264 (.mp4) or VP9 (.webm): "
                    "SRC/<class>/<video> (a dataset root) -> DST/<class>/<video>, and SRC/<video> (a folder of "
                    "videos, e.g. one class folder) -> DST/<video>. Split and label files (*.txt, *.pickle, *.pkl, "
                    "*.csv) at the top of SRC are copied; outputs already in DST are skipped, so a rerun resumes. An "
                    "odd width or height loses its last column or row (4:2:0 needs even sizes). Exit "
                    "1 if a file failed, 2 if SRC holds no video in either place.")
    tr.add_argument("src", help="dataset root (SRC/<class>/<video>) or folder of videos (SRC/<video>)")
    tr.add_argument("dst", help="output folder, laid out as SRC")
    tr.add_argument("--codec", required=True, choices=("h264", "vp9"))
    tr.add_argument("--workers", type=int, default=1)
    tr.set_defaults(func=_transcode)


def _labels_export(args: argparse.Namespace) -> int:
    from stpcore.data.labels import load_privacy_pickle, write_labels_csv

    try:
        labels = load_privacy_pickle(args.labels)
    except Exception as e:  # UnsafePickleError, LabelError, OSError: report, do not trace back
        print(f"error: {e}", file=sys.stderr)
        return 2
    write_labels_csv(labels, args.out)
    print(f"wrote {len(labels)} videos to {args.out}")
    return 0


def _labels_import(args: argparse.Namespace) -> int:
    from stpcore.data.labels import LabelError, read_labels_csv, write_labels_csv

    try:
        labels = read_labels_csv(args.src)
    except (LabelError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    write_labels_csv(labels, args.out)
    print(f"wrote {len(labels)} videos to {args.out}")
    return 0


def _check(args: argparse.Namespace) -> int:
    from stpcore.data.check import check_dataset

    report = check_dataset(args.root, split_dir=args.splits, labels=args.labels, decoder=args.decoder, kind=args.kind)
    print(report.summary())
    return 0 if report.ok else 1


def _synth(args: argparse.Namespace) -> int:
    from stpcore.data.synth import make_synthetic_dataset

    videos = make_synthetic_dataset(
        args.out, videos=args.videos, seed=args.seed, codec=args.codec, width=args.width, height=args.height,
        frames=args.frames, fps=args.fps, workers=args.workers, progress=True, overwrite=args.overwrite,
    )
    print(f"wrote {len(videos)} videos to {args.out}")
    return 0


def _transcode(args: argparse.Namespace) -> int:
    from stpcore.data.transcode import transcode_dataset

    report = transcode_dataset(args.src, args.dst, codec=args.codec, workers=args.workers)
    print(report.summary())
    return 0 if not report.failed else 1
