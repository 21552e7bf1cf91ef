"""A window's aggregates as stored, and how records fall into windows.

Count windows close after ``WindowSize.rows`` records; time windows tumble
over prediction time, each starting where the last one ended (spans without
predictions skipped). The store keeps the open window as a dict while it
assigns a call's records, then writes it back (``store.py``).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Final

from sqlalchemy.engine import Row

from conveyor.monitor.v1 import resources_pb2 as pb
from conveyor.services.monitor.config import WindowSize

_US: Final = 1_000_000


@dataclass(frozen=True)
class StoredWindow:
    """A window's aggregates."""

    model_version: str
    index: int
    start_us: int
    end_us: int
    deadline_us: int | None
    row_count: int
    error_count: int
    outlier_count: int
    closed: bool

    def to_proto(self) -> pb.Window:
        window = pb.Window(index=self.index, row_count=self.row_count, closed=self.closed)
        window.start_time.FromMicroseconds(self.start_us)
        window.end_time.FromMicroseconds(self.end_us)
        return window


def micros(duration: timedelta) -> int:
    """A duration in whole microseconds (the store's unit of time)."""
    return int(duration.total_seconds() * _US)


def new_window(
    model_version: str,
    previous_index: int,
    first: dict[str, Any],
    size: WindowSize,
    previous: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The window after ``previous_index``, opened by the record ``first``."""
    start = first["time_us"]
    deadline = None
    if size.duration is not None:
        span = micros(size.duration)
        if previous is not None and previous["deadline_us"] is not None:
            # Tumbling: the next window starts where the last one ended, skipping
            # spans without predictions.
            base = previous["deadline_us"]
            start = base + max(0, (first["time_us"] - base) // span) * span
        deadline = start + span
    return {
        "model_version": model_version,
        "window_index": previous_index + 1,
        "start_us": first["time_us"],
        "end_us": first["time_us"],
        "deadline_us": deadline,
        "row_count": 0,
        "error_count": 0,
        "outlier_count": 0,
    }


def is_full(window: dict[str, Any], size: WindowSize, time_us: int) -> bool:
    """Whether a record at ``time_us`` belongs to the next window."""
    if size.rows is not None:
        return bool(window["row_count"] >= size.rows)
    if window["deadline_us"] is None and size.duration is not None:
        # A count window left open when the config switched to time windows.
        window["deadline_us"] = window["start_us"] + micros(size.duration)
    return window["deadline_us"] is not None and time_us >= window["deadline_us"]


def open_window(row: Row[Any]) -> dict[str, Any]:
    """A stored open window as the dict records are assigned to."""
    return {
        "model_version": row.model_version,
        "window_index": row.window_index,
        "start_us": row.start_us,
        "end_us": row.end_us,
        "deadline_us": row.deadline_us,
        "row_count": row.row_count,
        "error_count": row.error_count,
        "outlier_count": row.outlier_count,
    }


def stored_window(row: Row[Any]) -> StoredWindow:
    """A ``windows`` row as a :class:`StoredWindow`."""
    return StoredWindow(
        model_version=row.model_version,
        index=row.window_index,
        start_us=row.start_us,
        end_us=row.end_us,
        deadline_us=row.deadline_us,
        row_count=row.row_count,
        error_count=row.error_count,
        outlier_count=row.outlier_count,
        closed=row.closed,
    )
