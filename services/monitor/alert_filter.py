"""The filters of ``ListAlerts`` and ``WatchAlerts``: AIP-160 restrictions
(parsed by :mod:`conveyor.shared.filtering`) joined with ``AND`` and ``OR``
and grouped with parentheses, as in
``model = "models/cnn" AND (state = FIRING OR state = ACKNOWLEDGED)``.

As AIP-160 specifies, ``OR`` binds tighter than ``AND``: ``a AND b OR c``
means ``a AND (b OR c)``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Final

from conveyor.shared.errors import FieldViolation, InvalidArgumentError
from conveyor.shared.filtering import FilterField, Restriction, matches, parse_filter

_TOKEN: Final = re.compile(
    r'\s*(?:(?P<quoted>"(?:[^"\\]|\\.)*")|(?P<paren>[()])|(?P<word>[^\s()"]+))'
)
MAX_DEPTH: Final = 16


@dataclass(frozen=True)
class _All:
    parts: tuple[Expression, ...]


@dataclass(frozen=True)
class _Any:
    parts: tuple[Expression, ...]


Expression = _All | _Any | Restriction


@dataclass(frozen=True)
class Filter:
    """A parsed filter; the empty filter matches everything."""

    expression: Expression | None

    def matches(self, resolve: Callable[[str], object]) -> bool:
        """Whether the resource behind ``resolve`` (see
        :func:`conveyor.shared.filtering.matches`) passes the filter."""
        return self.expression is None or _holds(self.expression, resolve)


def parse(text: str, fields: Mapping[str, FilterField]) -> Filter:
    """``text`` parsed against ``fields``; INVALID_ARGUMENT naming ``filter``."""
    tokens = _tokens(text)
    if not tokens:
        return Filter(None)
    parser = _Parser(tokens, fields)
    expression = parser.conjunction(0)
    if parser.position != len(tokens):
        raise _invalid(f"unexpected {tokens[parser.position]!r}")
    return Filter(expression)


def _tokens(text: str) -> list[str]:
    found: list[str] = []
    position = 0
    while position < len(text):
        if not text[position:].strip():
            break
        match = _TOKEN.match(text, position)
        if match is None or match.end() == position:
            raise _invalid(f"cannot read {text[position:].strip()[:40]!r}")
        found.append(match[0].strip())
        position = match.end()
    return found


class _Parser:
    def __init__(self, tokens: list[str], fields: Mapping[str, FilterField]) -> None:
        self.tokens = tokens
        self.fields = fields
        self.position = 0

    def _peek(self) -> str | None:
        return self.tokens[self.position] if self.position < len(self.tokens) else None

    def conjunction(self, depth: int) -> Expression:
        parts = [self.disjunction(depth)]
        while self._peek() == "AND":
            self.position += 1
            parts.append(self.disjunction(depth))
        return parts[0] if len(parts) == 1 else _All(tuple(parts))

    def disjunction(self, depth: int) -> Expression:
        parts = [self.term(depth)]
        while self._peek() == "OR":
            self.position += 1
            parts.append(self.term(depth))
        return parts[0] if len(parts) == 1 else _Any(tuple(parts))

    def term(self, depth: int) -> Expression:
        token = self._peek()
        if token == "(":
            if depth >= MAX_DEPTH:
                raise _invalid(f"more than {MAX_DEPTH} nested parentheses")
            self.position += 1
            inner = self.conjunction(depth + 1)
            if self._peek() != ")":
                raise _invalid("a '(' is not closed")
            self.position += 1
            return inner
        words: list[str] = []
        while (token := self._peek()) is not None and token not in ("(", ")", "AND", "OR"):
            words.append(token)
            self.position += 1
        if not words:
            raise _invalid(f"expected a restriction (field OP value), got {token or 'the end'!r}")
        parsed = parse_filter(" ".join(words), self.fields)
        if len(parsed) != 1:
            raise _invalid(f"cannot parse {' '.join(words)!r}: expected field OP value")
        return parsed[0]


def _holds(expression: Expression, resolve: Callable[[str], object]) -> bool:
    if isinstance(expression, _All):
        return all(_holds(part, resolve) for part in expression.parts)
    if isinstance(expression, _Any):
        return any(_holds(part, resolve) for part in expression.parts)
    return matches([expression], resolve)


def _invalid(description: str) -> InvalidArgumentError:
    return InvalidArgumentError(
        f"invalid filter: {description}",
        violations=[FieldViolation("filter", description)],
        reason="INVALID_FILTER",
    )
