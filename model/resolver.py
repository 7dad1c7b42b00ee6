"""One resolver for the project's dataclass configs: the model's (`ModelConfig`, `MemoryConfig`) and the job's
(`training.config.JobConfig`).

`nest` turns dotted keys (`memory.k`, as the command line and model overrides write them) into nested mappings;
`update_dataclass` applies a nested mapping to a dataclass, converting each value to its field's declared type.
The types are the resolved annotations (`typing.get_type_hints`), never their spelling: `X | None`, `bool`,
`int`, `float`, `str`, `tuple[int, ...]` / `tuple[float, float]`, `list[str]`, `dict` and nested dataclasses.
Every error is a one-line ValueError naming the full key (`config key 'model.memory.k': ...`).
"""
from __future__ import annotations

import dataclasses
import functools
import types
import typing
from typing import Any

_TRUE, _FALSE = ("true", "1", "yes"), ("false", "0", "no")


class _WrongType(Exception):
    """A value that does not convert to the declared type (turned into the one-line error by `coerce`)."""


def merge(base: dict, update: dict) -> dict:
    """`update` over `base`, mappings merged key by key at every depth (neither argument is modified)."""
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def nest(flat: dict[str, Any], *, source: str = "") -> dict[str, Any]:
    """{'memory.heads': 8, 'dim': 64} -> {'memory': {'heads': 8}, 'dim': 64}. A mapping and dotted keys that
    reach into it are merged (later keys win); a section given as a plain value and as keys is an error. Only
    the keys are split: a mapping's own keys are left as written (a level nests its keys when it is applied)."""
    where = f" ({source})" if source else ""
    nested: dict[str, Any] = {}
    for key, value in flat.items():
        parts = str(key).split(".")
        node = nested
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ValueError(f"config key '{key}'{where} conflicts with a scalar value")
        leaf = parts[-1]
        if isinstance(node.get(leaf), dict):
            if not isinstance(value, dict):
                raise ValueError(f"config key '{key}'{where} conflicts with the section's keys given elsewhere")
            value = merge(node[leaf], value)
        node[leaf] = value
    return nested


@functools.lru_cache(maxsize=None)
def field_types(cls: type) -> dict[str, Any]:
    """The resolved type of each field of dataclass `cls` (string annotations evaluated)."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints.get(f.name, Any) for f in dataclasses.fields(cls)}


def type_name(hint: Any) -> str:
    """How a type reads in a message: int, float | None, tuple[int, ...], list[str]."""
    if hint is type(None):
        return "None"
    if hint is Ellipsis:
        return "..."
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " | ".join(type_name(a) for a in args)
    if origin is not None:
        return f"{origin.__name__}[{', '.join(type_name(a) for a in args)}]" if args else origin.__name__
    return getattr(hint, "__name__", str(hint))


def coerce(value: Any, hint: Any, key: str) -> Any:
    """`value` converted to type `hint`, or a one-line ValueError naming `key` and the expected type."""
    try:
        return _convert(value, hint)
    except (_WrongType, TypeError, ValueError):
        raise ValueError(f"config key '{key}': {value!r} has the wrong type: expected {type_name(hint)}") from None


def _convert(value: Any, hint: Any) -> Any:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for arm in (a for a in args if a is not type(None)):
            try:
                return _convert(value, arm)
            except (_WrongType, TypeError, ValueError):
                continue
        raise _WrongType
    if hint is bool:
        return _to_bool(value)
    if hint is int:
        return _to_int(value)
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise _WrongType
        return float(value)
    if hint is str:
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            raise _WrongType
        return str(value)
    if hint is tuple or origin is tuple:
        return _to_tuple(value, args)
    if hint is list or origin is list:
        items = _sequence(value, strip_quotes=True)
        return [_convert(v, args[0]) for v in items] if args else list(items)
    if hint is dict or origin is dict:
        if not isinstance(value, dict):
            raise _WrongType
        return value
    return value                            # Any, or a type this resolver leaves to the field's validation


def _to_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in _TRUE + _FALSE:
        return value.strip().lower() in _TRUE
    raise _WrongType


def _to_int(value: Any) -> int:
    if isinstance(value, bool):
        raise _WrongType
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        if not value.is_integer():
            raise _WrongType
        return int(value)
    if isinstance(value, str):
        return int(value.strip())
    raise _WrongType


def _sequence(value: Any, *, strip_quotes: bool = False) -> list:
    """A list or tuple as it is; a string "a,b", "(1, 2)" or "[a, b]" (the command line's form) split on commas;
    one number as a list of one."""
    if isinstance(value, (list, tuple)):
        return list(value)
    if isinstance(value, str):
        items = [v.strip() for v in value.strip().strip("[]()").split(",") if v.strip()]
        return [v.strip("'\"") for v in items] if strip_quotes else items
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return [value]
    raise _WrongType


def _to_tuple(value: Any, args: tuple) -> tuple:
    items = _sequence(value)
    if not args:
        return tuple(items)
    if len(args) == 2 and args[1] is Ellipsis:
        return tuple(_convert(v, args[0]) for v in items)
    if len(items) != len(args):
        raise _WrongType
    return tuple(_convert(v, a) for v, a in zip(items, args))


def update_dataclass(obj: Any, updates: dict[str, Any], *, prefix: str) -> Any:
    """A copy of dataclass `obj` with `updates` (nested or dotted keys) applied, each value converted to its
    field's type; an unknown key or a wrong type is a one-line ValueError naming `prefix` + the key."""
    types_ = field_types(type(obj))
    changes = {}
    for key, value in nest(updates).items():
        if key not in types_:
            raise ValueError(f"unknown config key '{prefix}{key}'; valid keys: {', '.join(sorted(types_))}")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ValueError(f"config key '{prefix}{key}' must be a mapping of its fields, got {value!r}")
            changes[key] = update_dataclass(current, value, prefix=f"{prefix}{key}.")
        else:
            changes[key] = coerce(value, types_[key], f"{prefix}{key}")
    return dataclasses.replace(obj, **changes)
