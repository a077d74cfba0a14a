"""Typed configs from JSON/TOML values: unknown keys and wrong types are one-line errors naming the key."""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from typing import Any

from .errors import SurgeryError


def from_dict(cls, data: Any, where: str):
    """Build dataclass `cls` from a dict, recursing into dataclass-typed fields.

    `where` names the place in the file (e.g. "stage1"), so errors read "stage1.lr must be float".
    """
    if not isinstance(data, dict):
        raise SurgeryError(f"{where} must be a table of settings, got {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise SurgeryError(f"{where}: unknown key {unknown[0]!r} (known: {', '.join(fields) or 'none'})")
    hints = typing.get_type_hints(cls)
    values = {name: coerce(value, hints[name], f"{where}.{name}") for name, value in data.items()}
    try:
        return cls(**values)
    except (TypeError, ValueError) as e:
        raise SurgeryError(f"{where}: {e}") from None


def to_dict(obj) -> dict[str, Any]:
    """A dataclass as plain JSON/TOML values (tuples become lists)."""
    return {f.name: _plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}


def _plain(value):
    if dataclasses.is_dataclass(value):
        return to_dict(value)
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    return value


def coerce(value, hint, where: str):
    """Accept the JSON/TOML spelling of a declared type (lists for tuples, ints for floats); reject the rest."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        first_error = None
        for arg in (a for a in args if a is not type(None)):
            try:
                return coerce(value, arg, where)
            except SurgeryError as e:
                first_error = first_error or e
        raise first_error
    if origin is typing.Literal:
        if value not in args:
            raise SurgeryError(f"{where} must be one of {', '.join(map(repr, args))}, got {value!r}")
        return value
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise SurgeryError(f"{where} must be a list, got {value!r}")
        if origin is list or (len(args) == 2 and args[1] is Ellipsis):
            inner = args[0] if args else Any
            items = [coerce(v, inner, where) for v in value]
            return items if origin is list else tuple(items)
        if len(value) != len(args):
            raise SurgeryError(f"{where} must have {len(args)} entries, got {value!r}")
        return tuple(coerce(v, a, where) for v, a in zip(value, args))
    if origin is dict:
        if not isinstance(value, dict):
            raise SurgeryError(f"{where} must be a table, got {value!r}")
        key_type, value_type = args
        return {coerce(k, key_type, where): coerce(v, value_type, f"{where}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(hint):
        return from_dict(hint, value, where)
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise SurgeryError(f"{where} must be float, got {value!r}")
        if not math.isfinite(value):  # TOML spells nan and inf; no setting means either
            raise SurgeryError(f"{where} must be a finite number, got {value!r}")
        return float(value)
    if hint in (int, str, bool):
        if type(value) is not hint:
            raise SurgeryError(f"{where} must be {hint.__name__}, got {value!r}")
        return value
    if hint is dict and not isinstance(value, dict):
        raise SurgeryError(f"{where} must be a table, got {value!r}")
    return value
