"""The ``ovlabel`` command line. Glue only: parse arguments, call the library, print."""

from __future__ import annotations

import argparse
import sys

from . import __version__


def _cmd_methods(args: argparse.Namespace) -> int:
    from .legrad import describe_methods

    for name, summary in describe_methods().items():
        print(f"{name:<15} {summary}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ovlabel", description="Label images from text with CLIP "
                                     "explainability maps (LeGrad), no training.")
    parser.add_argument("--version", action="version", version=f"ovlabel {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("methods", help="list the explainer methods")
    p.set_defaults(func=_cmd_methods)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
