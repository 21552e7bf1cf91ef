"""Well-known protobuf values from callers, checked before they are used.

A ``Duration`` or ``Timestamp`` on the wire is any pair of integers, and a
``Struct`` number any double: protobuf's own conversions (``ToTimedelta``,
``ToMicroseconds``, ``json_format.MessageToDict``) raise ``ValueError`` or
``OverflowError`` for values outside their documented ranges, which a server
would answer as INTERNAL. These helpers say "not valid" instead, so the
request can be refused with INVALID_ARGUMENT naming the field.
"""

from __future__ import annotations

import math
from datetime import timedelta
from typing import Any

from google.protobuf import duration_pb2, json_format, struct_pb2, timestamp_pb2

from conveyor.shared.errors import invalid_field

MAX_DURATION_SECONDS = 315_576_000_000
"""About 10,000 years: the range ``google.protobuf.Duration`` documents."""
MIN_TIMESTAMP_SECONDS = -62_135_596_800
"""0001-01-01T00:00:00Z, the earliest ``google.protobuf.Timestamp``."""
MAX_TIMESTAMP_SECONDS = 253_402_300_799
"""9999-12-31T23:59:59Z, the latest ``google.protobuf.Timestamp``."""
_MAX_NANOS = 999_999_999


def to_timedelta(duration: duration_pb2.Duration) -> timedelta | None:
    """``duration`` as a ``timedelta``; None when it is not a valid Duration
    (beyond ±10,000 years, or nanos out of range or of the other sign)."""
    seconds, nanos = duration.seconds, duration.nanos
    if abs(seconds) > MAX_DURATION_SECONDS or abs(nanos) > _MAX_NANOS:
        return None
    if (seconds < 0 < nanos) or (nanos < 0 < seconds):
        return None
    microseconds = int(nanos / 1000)  # toward zero, as protobuf's ToTimedelta
    return timedelta(seconds=seconds, microseconds=microseconds)


def to_microseconds(timestamp: timestamp_pb2.Timestamp) -> int | None:
    """``timestamp`` in microseconds since the epoch; None when it is not a
    valid Timestamp (before year 1, after year 9999, nanos out of range)."""
    seconds, nanos = timestamp.seconds, timestamp.nanos
    if not MIN_TIMESTAMP_SECONDS <= seconds <= MAX_TIMESTAMP_SECONDS:
        return None
    if not 0 <= nanos <= _MAX_NANOS:
        return None
    return seconds * 1_000_000 + nanos // 1000


def checked_timedelta(duration: duration_pb2.Duration, *, field: str) -> timedelta:
    """:func:`to_timedelta`, or INVALID_ARGUMENT naming ``field``."""
    value = to_timedelta(duration)
    if value is None:
        raise invalid_field(field, "not a valid duration (at most 10,000 years either way)")
    return value


def checked_microseconds(timestamp: timestamp_pb2.Timestamp, *, field: str) -> int:
    """:func:`to_microseconds`, or INVALID_ARGUMENT naming ``field``."""
    value = to_microseconds(timestamp)
    if value is None:
        raise invalid_field(field, "not a valid timestamp (years 1 to 9999, nanos 0 to 1e9)")
    return value


def struct_to_dict(struct: struct_pb2.Struct, *, field: str) -> dict[str, Any]:
    """``struct`` as plain JSON values, as ``json_format.MessageToDict`` gives
    them; INVALID_ARGUMENT naming ``field`` (down to the key) for a number
    that is NaN or infinite, which JSON cannot carry."""
    for key, value in struct.fields.items():
        _check_finite(value, f"{field}.{key}")
    converted: dict[str, Any] = json_format.MessageToDict(struct)
    return converted


def _check_finite(value: struct_pb2.Value, field: str) -> None:
    kind = value.WhichOneof("kind")
    if kind == "number_value" and not math.isfinite(value.number_value):
        raise invalid_field(field, "numbers must be finite (not NaN or infinite)")
    if kind == "struct_value":
        for key, item in value.struct_value.fields.items():
            _check_finite(item, f"{field}.{key}")
    elif kind == "list_value":
        for index, item in enumerate(value.list_value.values):
            _check_finite(item, f"{field}[{index}]")
