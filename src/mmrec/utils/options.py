"""Command-line options generated from dataclasses: one construction for every subcommand.

Every field of an options dataclass becomes ``--field-name``, with its
``metadata["help"]`` as help text, its default and allowed values shown, in the
help group ``metadata["group"]``. Only flags actually given land in the parsed
namespace (defaults are ``SUPPRESS``), so a config file is never silently
shadowed by defaults: dataclass defaults < ``--config FILE`` < flags.
Values from files are converted to the field's type (YAML reads ``1e-3`` as a
string; it becomes the float 0.001 here) with an error that names the field.

Why our own generator rather than jsonargparse or tyro: it is ~150 lines over
argparse, keeps our flag spellings (``--no-carry-state``, repeatable
``--data``) and error messages, and adds no dependency to the core package.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import types
import typing
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from mmrec.utils.errors import ConfigError

_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}


def base_type(tp: Any) -> tuple[Any, bool]:
    """(underlying type, optional) for annotations like ``int | None``."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return (args[0] if len(args) == 1 else tp), len(args) < len(typing.get_args(tp))
    return tp, False


def convert_value(name: str, value: Any, tp: Any) -> Any:
    """``value`` (from a flag or a config file) as the field's type; ConfigError naming the field otherwise."""
    kind, optional = base_type(tp)
    if value is None or (optional and isinstance(value, str) and value.lower() in ("none", "null", "")):
        if optional:
            return None
        raise ConfigError(f"{name}: a value is required")
    try:
        if kind is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in _TRUE | _FALSE:
                return value.lower() in _TRUE
            raise ValueError
        if kind is int:
            if isinstance(value, float) and value.is_integer():
                return int(value)
            if isinstance(value, bool) or not isinstance(value, (int, str)):
                raise ValueError
            return int(value)
        if kind is float:
            if isinstance(value, bool):
                raise ValueError
            number = float(value)
            if math.isnan(number):
                raise ValueError
            return number
        if kind is str:
            if isinstance(value, (dict, list)):
                raise ValueError
            return str(value)
        if typing.get_origin(kind) is list:
            (item,) = typing.get_args(kind)
            values = value if isinstance(value, list) else [value]
            return [convert_value(name, v, item) for v in values]
    except (TypeError, ValueError):
        raise ConfigError(f"{name}: expected {_type_name(kind)}, got {value!r}") from None
    return value


def _type_name(kind: Any) -> str:
    if typing.get_origin(kind) is list:
        return f"a list of {_type_name(typing.get_args(kind)[0])}"
    names = {bool: "true or false", int: "an integer", float: "a number", str: "text"}
    return names.get(kind, str(kind))


def convert_values(hints: type | dict[str, Any], values: dict[str, Any]) -> dict[str, Any]:
    """Each value converted to the type of its field in ``hints`` (a dataclass or a name -> type mapping)."""
    types_ = hints if isinstance(hints, dict) else typing.get_type_hints(hints)
    return {k: convert_value(k, v, types_[k]) if k in types_ else v for k, v in values.items()}


def _default(f: dataclasses.Field[Any]) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def _parser_type(name: str, tp: Any) -> Any:
    def parse(text: str) -> Any:
        try:
            return convert_value(name, text, tp)
        except ConfigError as e:
            raise argparse.ArgumentTypeError(str(e).split(": ", 1)[-1]) from None

    kind, _ = base_type(tp)
    parse.__name__ = getattr(kind, "__name__", "value")
    return parse


def add_options(
    parser: argparse.ArgumentParser,
    cls: type,
    *,
    skip: Iterable[str] = (),
    only: Iterable[str] | None = None,
    group: str | None = None,
    defaults: dict[str, str] | None = None,
    required: Iterable[str] = (),
    positional: Iterable[str] = (),
) -> None:
    """Add a flag for every field of dataclass ``cls`` to ``parser``.

    ``group`` puts them all in one help group (otherwise each field's
    ``metadata["group"]``); ``defaults`` overrides the default shown in the help
    (for fields whose default depends on others); ``required`` and ``positional``
    name fields that must be given.
    """
    hints = typing.get_type_hints(cls)
    skip, required, positional = set(skip), set(required), set(positional)
    wanted = None if only is None else set(only)
    groups: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if f.name in skip or (wanted is not None and f.name not in wanted) or not f.metadata.get("help"):
            continue
        title = group or f.metadata.get("group")
        target: Any = parser
        if title:
            if title not in groups:
                groups[title] = parser.add_argument_group(title)
            target = groups[title]
        tp, _ = base_type(hints[f.name])
        help_text = f.metadata["help"].rstrip()
        choices = f.metadata.get("choices")
        shown = (defaults or {}).get(f.name)
        if shown is None:
            value = _default(f)
            shown = None if value in (None, [], "") else repr(value) if isinstance(value, str) else str(value)
        if shown is not None and f.name not in required | positional:
            help_text += f" (default: {shown})"
        help_text = help_text.replace("%", "%%")
        if f.name in positional:
            target.add_argument(f.name, type=_parser_type(f.name, hints[f.name]), help=help_text, choices=choices)
            continue
        flag = "--" + f.name.replace("_", "-")
        kwargs: dict[str, Any] = {"dest": f.name, "default": argparse.SUPPRESS, "help": help_text}
        if f.name in required:
            kwargs["required"] = True
        if tp is bool:
            target.add_argument(flag, action=argparse.BooleanOptionalAction, **kwargs)
        elif typing.get_origin(tp) is list:
            # Repeatable and many-valued alike: --data a --data b, or --lengths 1024 4096.
            (item,) = typing.get_args(tp)
            target.add_argument(
                flag, action="extend", nargs="+", type=_parser_type(f.name, item), metavar=_metavar(f), **kwargs
            )
        else:
            if choices:
                kwargs["choices"] = choices
            target.add_argument(flag, type=_parser_type(f.name, hints[f.name]), metavar=_metavar(f, choices), **kwargs)


def _metavar(f: dataclasses.Field[Any], choices: tuple[str, ...] | None = None) -> str:
    return "{" + ",".join(choices) + "}" if choices else f.name.upper()


def given(args: argparse.Namespace, names: Iterable[str]) -> dict[str, Any]:
    """The options among ``names`` that were given on the command line."""
    present = vars(args)
    return {n: present[n] for n in names if n in present}


def field_names(cls: type) -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(cls))


def build(cls: type, values: dict[str, Any]) -> Any:
    """An instance of ``cls`` from option values (converted; unknown names refused)."""
    names = set(field_names(cls))
    unknown = sorted(set(values) - names)
    if unknown:
        raise ConfigError(f"unknown option(s): {', '.join(unknown)}")
    try:
        return cls(**convert_values(cls, values))
    except TypeError as e:
        raise ConfigError(str(e)) from e


def load_config_file(path: str | Path) -> dict[str, Any]:
    """Option values from a YAML or JSON file (a mapping; dashes in names read as underscores)."""
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
    except Exception as e:  # yaml.YAMLError is not a ValueError
        raise ConfigError(f"--config: {path} is not valid YAML: {e}") from e
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"--config: {path} must hold a mapping of option names to values")
    return {k.replace("-", "_"): v for k, v in data.items()}
