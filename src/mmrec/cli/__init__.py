"""The ``mmrec`` command line (``mmrec.cli:main``); nothing in the package imports it."""

from mmrec.cli.app import build_parser, main

__all__ = ["build_parser", "main"]
