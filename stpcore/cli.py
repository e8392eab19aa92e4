"""The ``stpcore`` command line: ``python -m stpcore`` or the ``stpcore`` console script."""

from __future__ import annotations

import argparse
import sys


def _cmd_info(args: argparse.Namespace) -> int:
    from stpcore.info import report

    print(report())
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from stpcore.demo import run_demo

    return run_demo(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="stpcore", description="STPrivacy engine: train, evaluate, anonymize.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("info", help="versions, devices, and which backends can run (and why not)")
    p.set_defaults(func=_cmd_info)

    p = sub.add_parser("demo", help="the main job on the built-in default (see README)")
    p.add_argument("--out", default="out/demo", help="output folder (default: out/demo)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--preset", default="vit_small", help="model preset (default: vit_small)")
    p.set_defaults(func=_cmd_demo)

    try:
        from stpcore.data.cli import add_data_parser
    except ImportError:  # the data layer is optional at this level; `info` must always work
        add_data_parser = None
    if add_data_parser is not None:
        add_data_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
