"""A subcommand as data: its options dataclass and the function that runs them."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from mmrec.utils.options import add_options, build, field_names, given


@dataclass
class Command:
    """One subcommand: its options dataclass and what runs them."""

    name: str
    options: type
    run: Callable[[Any], int]
    help: str
    description: str = ""
    required: tuple[str, ...] = ()
    positional: tuple[str, ...] = ()
    shown_defaults: dict[str, str] = field(default_factory=dict)
    skip: tuple[str, ...] = ()  # fields that get no flag of their own
    # Adds flags that do not come from ``options`` (train: the model options) ...
    extend: Callable[[argparse.ArgumentParser], None] | None = None
    # ... and builds the options from the parsed namespace itself (default: the dataclass from the given flags).
    parse: Callable[[argparse.Namespace], Any] | None = None

    def add_to(self, subparsers: Any, path: str) -> argparse.ArgumentParser:
        parser = subparsers.add_parser(self.name, help=self.help, description=self.description or self.help)
        add_options(
            parser,
            self.options,
            required=self.required,
            positional=self.positional,
            defaults=self.shown_defaults,
            skip=self.skip,
        )
        if self.extend is not None:
            self.extend(parser)
        parser.set_defaults(_command=self, _path=path)
        return parser

    def build(self, args: argparse.Namespace) -> Any:
        if self.parse is not None:
            return self.parse(args)
        return build(self.options, given(args, field_names(self.options)))


def group(subparsers: Any, name: str, help_text: str, commands: list[Command], path: str) -> Any:
    """A subcommand with actions of its own (``mmrec eval bpb``, ``mmrec synth mqar``, ...)."""
    parser = subparsers.add_parser(name, help=help_text, description=help_text)
    actions = parser.add_subparsers(dest=f"{name}_action", metavar="ACTION")
    actions.required = True
    for command in commands:
        if command is not None:
            command.add_to(actions, f"{path} {command.name}")
    return actions
