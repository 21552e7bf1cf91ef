"""Typed readers for loosely typed arguments (``google.protobuf.Struct`` values).

Architecture and generator arguments arrive as a ``Struct``, where every number
is a double and every list a ``ListValue``. These helpers turn one argument
into the Python type a builder wants, or record a :class:`FieldViolation`
naming it, so that every bad argument is reported at once.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

from google.protobuf import json_format, struct_pb2

from conveyor.shared.errors import FieldViolation

Arguments = Mapping[str, Any]
"""Arguments as plain Python values: what ``Struct`` holds, as a mapping."""


def to_mapping(args: struct_pb2.Struct | Arguments | None) -> dict[str, Any]:
    """Plain Python values of ``args`` (a ``Struct`` or a mapping; None is empty)."""
    if args is None:
        return {}
    if isinstance(args, struct_pb2.Struct):
        converted: dict[str, Any] = json_format.MessageToDict(args)
        return converted
    return dict(args)


def to_struct(args: Arguments) -> struct_pb2.Struct:
    """``args`` as a ``Struct`` (tuples become lists)."""
    struct = struct_pb2.Struct()
    struct.update({key: _plain(value) for key, value in args.items()})
    return struct


def unknown_keys(
    args: Arguments, known: Iterable[str], field: str, violations: list[FieldViolation]
) -> None:
    """Record a violation for every key of ``args`` not in ``known``."""
    allowed = sorted(known)
    for key in sorted(set(args) - set(allowed)):
        violations.append(
            FieldViolation(f"{field}.{key}", f"unknown argument; known: {', '.join(allowed)}")
        )


def integer(
    args: Arguments,
    key: str,
    default: int,
    field: str,
    violations: list[FieldViolation],
    *,
    minimum: int,
    maximum: int,
) -> int:
    """``args[key]`` as an integer in ``[minimum, maximum]`` (``default`` when absent)."""
    if key not in args:
        return default
    value = _as_int(args[key])
    if value is None or not minimum <= value <= maximum:
        violations.append(
            FieldViolation(f"{field}.{key}", f"an integer from {minimum} to {maximum}")
        )
        return default
    return value


def real(
    args: Arguments,
    key: str,
    default: float,
    field: str,
    violations: list[FieldViolation],
    *,
    minimum: float,
    maximum: float,
    exclusive_minimum: bool = False,
) -> float:
    """``args[key]`` as a finite number in its range (``default`` when absent)."""
    if key not in args:
        return default
    value = _as_float(args[key])
    low_ok = value is not None and (value > minimum if exclusive_minimum else value >= minimum)
    if value is None or not low_ok or value > maximum:
        bracket = "(" if exclusive_minimum else "["
        violations.append(
            FieldViolation(f"{field}.{key}", f"a number in {bracket}{minimum}, {maximum}]")
        )
        return default
    return value


def choice(
    args: Arguments,
    key: str,
    default: str,
    field: str,
    violations: list[FieldViolation],
    *,
    choices: Iterable[str],
) -> str:
    """``args[key]`` as one of ``choices`` (``default`` when absent)."""
    allowed = tuple(choices)
    if key not in args:
        return default
    value = args[key]
    if not isinstance(value, str) or value not in allowed:
        violations.append(FieldViolation(f"{field}.{key}", f"one of {', '.join(allowed)}"))
        return default
    return value


def integer_list(
    args: Arguments,
    key: str,
    default: tuple[int, ...],
    field: str,
    violations: list[FieldViolation],
    *,
    minimum: int,
    maximum: int,
    min_length: int,
    max_length: int,
) -> tuple[int, ...]:
    """``args[key]`` as a list of integers, each in range (``default`` when absent)."""
    if key not in args:
        return default
    raw = args[key]
    values = [_as_int(item) for item in raw] if isinstance(raw, list | tuple) else None
    if (
        values is None
        or not min_length <= len(values) <= max_length
        or any(v is None or not minimum <= v <= maximum for v in values)
    ):
        violations.append(
            FieldViolation(
                f"{field}.{key}",
                f"a list of {min_length} to {max_length} integers from {minimum} to {maximum}",
            )
        )
        return default
    return tuple(v for v in values if v is not None)


def _as_int(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        return int(value)
    return None


def _as_float(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    number = float(value)
    return number if math.isfinite(number) else None


def _plain(value: Any) -> Any:
    if isinstance(value, tuple | list):
        return [_plain(item) for item in value]
    if isinstance(value, Mapping):
        return {key: _plain(item) for key, item in value.items()}
    return value
