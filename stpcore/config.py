"""Frozen-dataclass configs on the command line: one flag per field, a JSON config file for defaults.

``add_dataclass_arguments(parser, Cls)`` adds ``--field-name`` for every field of ``Cls`` (bools as
``--flag/--no-flag``); ``dataclass_from_args(Cls, args)`` builds the config from, in increasing priority,
the class defaults, ``--config FILE`` (JSON object of field values), and the flags given.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

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


def add_dataclass_arguments(parser: argparse.ArgumentParser, cls: type, *, skip: tuple[str, ...] = ()) -> None:
    """One ``--flag`` per field of the dataclass ``cls`` (defaults left to the config; see module doc)."""
    hints = typing.get_type_hints(cls)
    group = parser.add_argument_group(f"{cls.__name__} fields (override --config)")
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        tp = _base_type(hints[f.name])
        if tp is None:
            continue  # structured fields (dicts, tuples) come from the config file only
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not dataclasses.MISSING else None
        if tp is bool:
            group.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None,
                               help=f"(default: {default})")
        else:
            group.add_argument(flag, dest=f.name, type=tp, default=None,
                               help=f"(default: {default})" if default is not None else "(default: none)")


def dataclass_from_args(cls: type[_T], args: argparse.Namespace, **fixed: Any) -> _T:
    """Build ``cls`` from defaults < ``args.config`` JSON < flags given < ``fixed``."""
    values: dict[str, Any] = {}
    names = {f.name for f in dataclasses.fields(cls)}
    config = getattr(args, "config", None)
    if config:
        loaded = json.loads(Path(config).read_text())
        if not isinstance(loaded, dict):
            raise ValueError(f"{config}: a config file must hold a JSON object of field values")
        unknown = sorted(set(loaded) - names)
        if unknown:
            raise ValueError(f"{config}: unknown field(s) {unknown}; {cls.__name__} fields are {sorted(names)}")
        values.update(loaded)
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
