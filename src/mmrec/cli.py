"""The ``mmrec`` command line: one console script with subcommands."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence


def _demo(args: argparse.Namespace) -> int:
    from mmrec.demo import DemoOptions, run_demo

    run_demo(DemoOptions(tokens=args.tokens, window=args.window, seed=args.seed, generate=args.generate))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mmrec",
        description="MM-Rec: long-context language modelling with a dual memory.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    demo = sub.add_parser("demo", help="stream the built-in text through a fresh MM-Rec; show constant state")
    demo.add_argument("--tokens", type=int, default=65536, help="tokens to stream (default: %(default)s)")
    demo.add_argument("--window", type=int, default=4096, help="tokens per forward call (default: %(default)s)")
    demo.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    demo.add_argument("--generate", type=int, default=48, help="bytes to generate at the end (default: %(default)s)")
    demo.set_defaults(func=_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from mmrec.utils.cpu import tune_glibc_malloc

    tune_glibc_malloc()
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
