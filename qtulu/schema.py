"""Validate plain data (parsed YAML) against dataclasses, from their type hints.

Written by hand because it is small and exact about what recipes need: an unknown key or a value
of the wrong type is reported through ``err(dotted_key, message)`` (the caller names the file);
``int`` is accepted where ``float`` is expected, never ``bool`` for a number, never NaN/inf; ``Literal``,
``Optional``/unions, ``list[...]``, ``dict[str, ...]`` and nested dataclasses are supported. A
field with ``metadata={"schema": False}`` is not part of the schema.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from typing import Any, Literal, Union


def type_name(tp: Any) -> str:
    """How a type reads in an error message (``float``, ``'tulu' | 'tokenizer'``, ...)."""
    origin = typing.get_origin(tp)
    if tp is type(None):
        return "null"
    if tp is Any:
        return "any"
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " | ".join(type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"list of {type_name(typing.get_args(tp)[0])}"
    if origin is dict:
        return "mapping"
    if dataclasses.is_dataclass(tp):
        return "mapping"
    return getattr(tp, "__name__", str(tp))


class _Mismatch(Exception):
    pass


def _coerce(value: Any, tp: Any, where: str, err) -> Any:
    """Check ``value`` against type ``tp`` and return it converted (int -> float, dict -> dataclass)."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if tp is type(None):
        if value is None:
            return None
        raise _Mismatch
    if origin is Literal:
        if value in typing.get_args(tp) and not isinstance(value, bool):
            return value
        raise _Mismatch
    if origin in (Union, types.UnionType):
        # exact-type members first, so int stays int in `int | float`
        args = typing.get_args(tp)
        for a in args:
            if isinstance(a, type) and type(value) is a:
                return value
        for a in args:
            try:
                return _coerce(value, a, where, err)
            except _Mismatch:
                continue
        raise _Mismatch
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise _Mismatch
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise _Mismatch
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise _Mismatch
    if tp is str:
        if isinstance(value, str):
            return value
        raise _Mismatch
    if origin is list:
        if not isinstance(value, list):
            raise _Mismatch
        (item_tp,) = typing.get_args(tp)
        return [_check(v, item_tp, f"{where}.{i}", err) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise _Mismatch
        _, val_tp = typing.get_args(tp)
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                err(f"{where}.{k}", f"keys must be strings, got {type(k).__name__}")
            out[k] = _check(v, val_tp, f"{where}.{k}", err)
        return out
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise _Mismatch
        return build(tp, value, where, err)
    raise TypeError(f"recipe schema: unsupported type {tp!r} at {where}")


def _check(value: Any, tp: Any, where: str, err) -> Any:
    if isinstance(value, float) and not math.isfinite(value):  # YAML's .nan / .inf: never a valid setting
        err(where, f"must be a finite number, got {value}")
    try:
        return _coerce(value, tp, where, err)
    except _Mismatch:
        err(where, f"expected {type_name(tp)}, got {type(value).__name__} {value!r}")


def schema_fields(cls) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(cls) if f.metadata.get("schema", True)]


def build(cls, data: dict[str, Any], where: str, err):
    """An instance of dataclass ``cls`` from ``data``; ``where`` is the dotted key of ``data``."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in schema_fields(cls)}
    prefix = f"{where}." if where else ""
    for key in data:
        if key not in fields:
            err(f"{prefix}{key}", f"unknown key (valid keys: {', '.join(sorted(fields))})")
    kwargs = {}
    for name, f in fields.items():
        if name in data:
            kwargs[name] = _check(data[name], hints[name], f"{prefix}{name}", err)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            err(f"{prefix}{name}", "required key is missing")
    return cls(**kwargs)
