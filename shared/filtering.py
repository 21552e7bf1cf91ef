"""A small AIP-160 filter language: restrictions joined with ``AND``.

Each restriction is ``field OP value`` with OP one of ``= != < <= > >= :``.
Values are quoted strings, numbers, bare words (enum values) or ``*`` (with
``:``, "is present"). Each List method declares its fields and their kinds
(:class:`FieldKind`); anything else is INVALID_ARGUMENT naming ``filter``.
Services then test each resource with :func:`matches`, giving a resolver that
returns a field's value.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from datetime import datetime

from conveyor.shared.errors import FieldViolation, InvalidArgumentError

_RESTRICTION = re.compile(
    r"""^\s*(?P<field>[a-z_][a-z0-9_]*(?:\.[A-Za-z0-9_/-]+)*)\s*
    (?P<op>>=|<=|!=|=|<|>|:)\s*
    (?P<value>"(?:[^"\\]|\\.)*"|\*|[A-Za-z0-9_.:+-]+)\s*$""",
    re.VERBOSE,
)
_AND = re.compile(r"\s+AND\s+")


class FieldKind(enum.Enum):
    """What a filterable field holds, which decides the operators it takes."""

    STRING = "string"  # = != and : (with a trailing * for a prefix)
    ENUM = "enum"  # = != with the value's short name (PRODUCTION)
    NUMBER = "number"  # = != < <= > >=
    TIMESTAMP = "timestamp"  # = != < <= > >= with RFC 3339 values
    STRINGS = "strings"  # : has the element
    MAP = "map"  # key.=value, key.:* (the field is a prefix: labels.)
    PRESENCE = "presence"  # :* is set


_OPERATORS: dict[FieldKind, frozenset[str]] = {
    FieldKind.STRING: frozenset({"=", "!=", ":"}),
    FieldKind.ENUM: frozenset({"=", "!="}),
    FieldKind.NUMBER: frozenset({"=", "!=", "<", "<=", ">", ">="}),
    FieldKind.TIMESTAMP: frozenset({"=", "!=", "<", "<=", ">", ">="}),
    FieldKind.STRINGS: frozenset({":"}),
    FieldKind.MAP: frozenset({"=", "!=", ":"}),
    FieldKind.PRESENCE: frozenset({":"}),
}


@dataclass(frozen=True)
class FilterField:
    """A field a List method can filter on."""

    kind: FieldKind
    enum_values: Collection[str] = ()
    """For ENUM fields: the accepted short names."""
    numeric_values: bool = False
    """For MAP fields: the values are numbers (``metrics.accuracy>=0.9``)."""


@dataclass(frozen=True)
class Restriction:
    field: str
    """The field as the resolver knows it: ``labels.team`` or ``stage``."""
    op: str
    value: str | float | datetime
    kind: FieldKind


def parse_filter(text: str, fields: Mapping[str, FilterField]) -> list[Restriction]:
    """Parse ``text`` against ``fields`` (map fields are keyed ``labels.``)."""
    if not text.strip():
        return []
    return [_parse_restriction(part, fields) for part in _AND.split(text.strip())]


def matches(restrictions: list[Restriction], resolve: Callable[[str], object]) -> bool:
    """Whether the resource behind ``resolve`` meets every restriction.

    ``resolve(field)`` returns the value: a string (enum short name), a number,
    a datetime, a collection of strings, or None when absent.
    """
    return all(_holds(r, resolve(r.field)) for r in restrictions)


def _parse_restriction(text: str, fields: Mapping[str, FilterField]) -> Restriction:
    match = _RESTRICTION.match(text)
    if not match:
        raise _invalid(f"cannot parse {text!r}: expected field OP value")
    name, op, raw = match["field"], match["op"], match["value"]
    spec = fields.get(name) or fields.get(name.split(".", 1)[0] + ".")
    if spec is None:
        known = ", ".join(sorted(f.rstrip(".") + (".*" if f.endswith(".") else "") for f in fields))
        raise _invalid(f"cannot filter on {name!r}; supported: {known}")
    numeric = spec.kind is FieldKind.NUMBER or (spec.kind is FieldKind.MAP and spec.numeric_values)
    operators = _OPERATORS[FieldKind.NUMBER] | {":"} if numeric else _OPERATORS[spec.kind]
    if op not in operators:
        raise _invalid(f"{name!r} does not support {op!r}")
    if spec.kind is FieldKind.MAP and "." not in name:
        raise _invalid(f"{name!r} needs a key, as in {name}.key")
    quoted = raw.startswith('"')
    text_value = raw[1:-1].replace('\\"', '"') if quoted else raw
    value: str | float | datetime = text_value
    if raw == "*" and op != ":":
        raise _invalid(f"'*' only works with ':' (in {text!r})")
    if spec.kind is FieldKind.PRESENCE and raw != "*":
        raise _invalid(f"{name!r} can only be tested for presence: {name}:*")
    if numeric and raw != "*":
        try:
            value = float(text_value)
        except ValueError:
            raise _invalid(f"{name!r} compares numbers, got {raw!r}") from None
    elif spec.kind is FieldKind.TIMESTAMP:
        try:
            value = datetime.fromisoformat(text_value.replace("Z", "+00:00"))
        except ValueError:
            raise _invalid(f"{name!r} compares RFC 3339 times, got {raw!r}") from None
        if value.tzinfo is None:
            raise _invalid(f"{name!r} needs a time zone, as in 2026-01-01T00:00:00Z")
    elif spec.kind is FieldKind.ENUM:
        short = text_value.upper()
        if short not in spec.enum_values:
            raise _invalid(f"{name!r} is one of {', '.join(sorted(spec.enum_values))}")
        value = short
    return Restriction(field=name, op=op, value=value, kind=spec.kind)


def _holds(restriction: Restriction, actual: object) -> bool:
    op, expected = restriction.op, restriction.value
    if op == ":":
        if expected == "*":
            return actual is not None and actual != "" and actual != ()
        if isinstance(actual, str):
            assert isinstance(expected, str)
            return (
                actual.startswith(expected[:-1]) if expected.endswith("*") else actual == expected
            )
        if isinstance(actual, Collection):
            return expected in actual
        return actual == expected
    if actual is None:
        return op == "!="
    many = isinstance(actual, Collection) and not isinstance(actual, str)
    if op == "=":  # on a repeated value: one of its elements
        return expected in actual if many else actual == expected  # type: ignore[operator]
    if op == "!=":
        return expected not in actual if many else actual != expected  # type: ignore[operator]
    try:
        if op == "<":
            return actual < expected  # type: ignore[operator]
        if op == "<=":
            return actual <= expected  # type: ignore[operator]
        if op == ">":
            return actual > expected  # type: ignore[operator]
        return actual >= expected  # type: ignore[operator]
    except TypeError:
        return False


def _invalid(description: str) -> InvalidArgumentError:
    return InvalidArgumentError(
        f"invalid filter: {description}",
        violations=[FieldViolation("filter", description)],
        reason="INVALID_FILTER",
    )
