"""Frozen-dataclass configs on the command line: one flag per field, a JSON config file for defaults.

``add_dataclass_arguments(parser, Cls)`` adds ``--field-name`` for every field of ``Cls`` (bools as
``--flag/--no-flag``, ``tuple[float, ...]`` as comma-separated values); ``dataclass_from_args(Cls, args)``
builds the config from, in increasing priority, the class defaults, ``--config FILE`` (JSON object of field
values), and the flags given.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import os
import re
import types
import typing
from pathlib import Path
from typing import Any, TypeVar


def debug_enabled() -> bool:
    """Whether ``STPCORE_DEBUG`` asks for tracebacks: set to anything but empty, ``0``, ``false``, ``no`` or ``off``."""
    return os.environ.get("STPCORE_DEBUG", "").strip().lower() not in ("", "0", "false", "no", "off")


_T = TypeVar("_T")


def _base_type(tp: Any) -> Any:
    """The scalar type behind ``X | None`` annotations (str for anything unusual)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return _base_type(args[0]) if len(args) == 1 else str
    if tp in (int, float, str, bool):
        return tp
    return None


def _list_type(tp: Any) -> Any:
    """For ``tuple[X, ...]`` of a scalar X: an argparse type reading comma-separated values ("1,0.5"); else None."""
    args = typing.get_args(tp)
    if typing.get_origin(tp) is not tuple or len(args) != 2 or args[1] is not Ellipsis or args[0] not in (int, float):
        return None
    scalar = args[0]

    def parse(text: str) -> tuple:
        try:
            return tuple(scalar(v) for v in text.split(",") if v.strip())
        except ValueError as exc:
            raise argparse.ArgumentTypeError(f"expected comma-separated {scalar.__name__}s, got {text!r}") from exc

    parse.__name__ = f"{scalar.__name__}s"  # argparse names the type in its error messages
    return parse


def _checked(value: Any, tp: Any, where: str) -> Any:
    """``value`` from a JSON config file as the field's type ``tp``; ValueError naming the field otherwise.

    JSON has no tuples and no int/float distinction: lists become tuples for tuple fields, and whole
    numbers are accepted for float fields. Nothing else is converted ("false" is not a bool, "8" not an int).
    """
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in (o for o in options if o is not type(None)):
            try:
                return _checked(value, option, where)
            except ValueError as exc:
                errors.append(str(exc))
        raise ValueError(errors[0] if len(errors) == 1 else f"{where}: {value!r} fits none of {tp}")
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{where}: expected a JSON list, got {value!r}")
        args = typing.get_args(tp)
        item = args[0] if args else Any
        if (len(args) == 2 and args[1] is Ellipsis) or len(args) <= 1:
            return tuple(_checked(v, item, where) for v in value)
        if len(args) != len(value):
            raise ValueError(f"{where}: expected a list of {len(args)} values, got {value!r}")
        return tuple(_checked(v, a, where) for v, a in zip(value, args, strict=True))
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ValueError(f"{where}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ValueError(f"{where}: expected a whole number, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ValueError(f"{where}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ValueError(f"{where}: expected a string, got {value!r}")
    return value  # anything else (dicts, Any) is passed on for the config's own checks


def field_help(cls: type) -> dict[str, str]:
    """Field descriptions from the ``Args:`` or ``Attributes:`` section of ``cls``'s docstring (Google style;
    "a, b: text" describes both): each whole description, continuation lines joined, whitespace collapsed."""
    doc = inspect.getdoc(cls) or ""
    out: dict[str, str] = {}
    section, current = False, None
    for line in doc.splitlines():
        if line.strip() in ("Args:", "Attributes:"):
            section, current = True, None
            continue
        if not section:
            continue
        if line and not line.startswith(" "):  # the next section or paragraph
            section, current = False, None
            continue
        head = re.match(r"^ {4}([a-z_][a-z0-9_]*(?:, [a-z_][a-z0-9_]*)*): ?(.*)$", line)
        if head:
            current = [n.strip() for n in head.group(1).split(",")]
            for name in current:
                out[name] = head.group(2).strip()
        elif current and line.startswith("     "):
            for name in current:
                out[name] = (out[name] + " " + line.strip()).strip()
    return out


def add_dataclass_arguments(parser: argparse.ArgumentParser, cls: type, *, skip: tuple[str, ...] = ()) -> None:
    """One ``--flag`` per field of the dataclass ``cls`` (defaults left to the config; see module doc)."""
    hints = typing.get_type_hints(cls)
    docs = field_help(cls)
    group = parser.add_argument_group(f"{cls.__name__} fields (override --config)")
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        tp = _base_type(hints[f.name]) or _list_type(hints[f.name])
        if tp is None:
            continue  # structured fields (dicts, fixed-length tuples) come from the config file only
        flag = "--" + f.name.replace("_", "-")
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        default = "required" if required else f"default: {f.default if f.default is not dataclasses.MISSING else '-'}"
        # argparse formats help with %: a literal % in a docstring must be doubled.
        text = (docs.get(f.name, "") + f" ({default})").strip().replace("%", "%%")
        if tp is bool:
            group.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=text)
        else:
            group.add_argument(flag, dest=f.name, type=tp, default=None, help=text)


def dataclass_from_args(cls: type[_T], args: argparse.Namespace, **fixed: Any) -> _T:
    """Build ``cls`` from defaults < ``args.config`` JSON < flags given < ``fixed``."""
    values: dict[str, Any] = {}
    names = {f.name for f in dataclasses.fields(cls)}
    config = getattr(args, "config", None)
    if config:
        try:
            loaded = json.loads(Path(config).read_text())
        except json.JSONDecodeError as exc:
            raise ValueError(f"{config}: not valid JSON ({exc}); a config file holds one JSON object of "
                             f"{cls.__name__} fields") from exc
        if not isinstance(loaded, dict):
            raise ValueError(f"{config}: a config file must hold a JSON object of field values")
        unknown = sorted(set(loaded) - names)
        if unknown:
            raise ValueError(f"{config}: unknown field(s) {unknown}; {cls.__name__} fields are {sorted(names)}")
        hints = typing.get_type_hints(cls)
        for name, value in loaded.items():
            values[name] = _checked(value, hints[name], f"{config}: field {name!r}")
    for name in names:
        value = getattr(args, name, None)
        if value is not None:
            values[name] = value
    values.update(fixed)
    missing = [f.name for f in dataclasses.fields(cls) if f.name not in values and f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ValueError("missing required setting(s): " + ", ".join("--" + m.replace("_", "-") for m in missing)
                         + " (give them as flags or in --config)")
    return cls(**values)
