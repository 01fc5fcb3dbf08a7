"""Command-line options generated from config dataclasses.

Every dataclass field becomes ``--field-name`` with its ``metadata["help"]``
as help text. Precedence: dataclass defaults < ``--config FILE`` (YAML or
JSON) < flags given on the command line. Only flags actually given override
the file, so a config file is never silently shadowed by defaults.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import types
import typing
from pathlib import Path
from typing import Any

from mmrec.config import ConfigError


def _base_type(tp: Any) -> tuple[Any, bool]:
    """(underlying type, optional) for annotations like ``int | None``."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0], len(args) < len(typing.get_args(tp))
    return tp, False


def _parse_optional(kind: Any) -> Any:
    def parse(text: str) -> Any:
        return None if text.lower() in ("none", "null", "") else kind(text)

    parse.__name__ = getattr(kind, "__name__", "value")
    return parse


def add_dataclass_arguments(parser: argparse.ArgumentParser, cls: type, skip: tuple[str, ...] = ()) -> None:
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        flag = "--" + f.name.replace("_", "-")
        help_text = f.metadata.get("help", "")
        default = (
            f.default
            if f.default is not dataclasses.MISSING
            else (
                f.default_factory() if f.default_factory is not dataclasses.MISSING else None  # type: ignore[misc]
            )
        )
        help_text += f" (default: {default!r})" if default not in (None, [], "") else ""
        tp, optional = _base_type(hints[f.name])
        kwargs: dict[str, Any] = {"dest": f.name, "default": argparse.SUPPRESS, "help": help_text}
        if tp is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, **kwargs)
        elif typing.get_origin(tp) is list:
            (item,) = typing.get_args(tp)
            parser.add_argument(flag, action="append", type=item, metavar=f.name.upper(), **kwargs)
        else:
            kind = tp if tp in (int, float, str) else str
            parser.add_argument(
                flag, type=_parse_optional(kind) if optional else kind, metavar=f.name.upper(), **kwargs
            )


def load_config_file(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--config: no such file {path}")
    text = path.read_text()
    try:
        if path.suffix.lower() in (".yaml", ".yml"):
            try:
                import yaml
            except ImportError as e:
                raise ConfigError("--config: reading YAML needs PyYAML (pip install pyyaml), or use JSON") from e
            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except (ValueError, ImportError) as e:
        if isinstance(e, ConfigError):
            raise
        kind = "YAML" if path.suffix.lower() in (".yaml", ".yml") else "JSON"
        raise ConfigError(f"--config: {path} is not valid {kind}: {e}") from e
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"--config: {path} must hold a mapping of option names to values")
    return {k.replace("-", "_"): v for k, v in data.items()}


def build_config(cls: type, args: argparse.Namespace, file_values: dict[str, Any] | None = None) -> Any:
    """The dataclass from file values overridden by the flags present in ``args``."""
    names = {f.name for f in dataclasses.fields(cls)}
    values = dict(file_values or {})
    unknown = sorted(set(values) - names)
    if unknown:
        raise ConfigError(f"unknown option(s) in the config file: {', '.join(unknown)}")
    values.update({k: v for k, v in vars(args).items() if k in names})
    try:
        return cls(**values)
    except TypeError as e:
        raise ConfigError(str(e)) from e
