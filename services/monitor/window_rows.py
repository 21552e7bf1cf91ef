"""A window's (or time range's) stored rows as columns, read in bulk.

The store fetches the driver's tuples (status, latency, time, outputs, label,
outlier, then the feature columns it was asked for) and this module turns them
into one array per column; the performance and operations reports read no
feature column.
"""

from __future__ import annotations

import gc
import json
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from itertools import compress
from typing import Any, Final

import numpy as np
import numpy.typing as npt

from conveyor.services.monitor.packed_windows import FeatureRows

_US: Final = 1_000_000


@dataclass(frozen=True, eq=False)
class WindowRows(FeatureRows):
    """A window's (or time range's) stored rows as columns."""

    labels: npt.NDArray[np.int64]
    """Per successful row, -1 where no label arrived."""
    status_codes: npt.NDArray[np.int32]
    """Every row."""
    latencies_s: npt.NDArray[np.float64]
    """Every row."""
    outliers: npt.NDArray[np.bool_]
    """Per successful row."""
    times_us: npt.NDArray[np.int64]
    """Every row."""


class CollectorPause:
    """Pauses Python's cyclic garbage collector while any thread reads rows in
    bulk: a million rows are millions of tuples that cannot form cycles, and
    the collector rescanned them again and again (a third of the read)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._readers = 0
        self._resume = False

    @contextmanager
    def __call__(self) -> Iterator[None]:
        with self._lock:
            if self._readers == 0:
                self._resume = gc.isenabled()
                gc.disable()
            self._readers += 1
        try:
            yield
        finally:
            with self._lock:
                self._readers -= 1
                if self._readers == 0 and self._resume:
                    gc.enable()


bulk_read = CollectorPause()
"""Entered around every bulk read of rows."""


def rows_to_columns(rows: Sequence[Any], n_num: int | None, n_cat: int | None) -> WindowRows:
    """Driver rows (status, latency, time, outputs, label, outlier[, numerical]
    [, categorical]) as columns; a feature kind not read (None) comes back with
    no columns."""
    count = len(rows)
    if count == 0:
        return WindowRows(
            np.empty((0, n_num or 0)),
            np.empty((0, n_cat or 0), dtype=np.str_),
            np.empty((0, 0)),
            np.empty(0, dtype=np.int64),
            np.empty(0, dtype=np.int32),
            np.empty(0),
            np.empty(0, dtype=np.bool_),
            np.empty(0, dtype=np.int64),
        )
    by_column = list(zip(*rows, strict=True))
    status = np.array(by_column[0], dtype=np.int32)
    latencies = np.array(by_column[1], dtype=np.float64) / _US
    times = np.array(by_column[2], dtype=np.int64)
    ok = status == 0
    successes = int(np.count_nonzero(ok))

    def successful(column: int) -> Sequence[Any]:
        values: Sequence[Any] = by_column[column]
        return values if successes == count else list(compress(values, ok.tolist()))

    outputs_bytes = successful(3)
    width = len(outputs_bytes[0]) // 8 if successes else 0
    outputs = np.frombuffer(b"".join(outputs_bytes), dtype=np.float64).reshape(successes, width)
    labels = np.array(successful(4), dtype=np.int64)
    outliers = np.array(successful(5), dtype=np.bool_)
    numerical = (
        np.frombuffer(b"".join(successful(6)), dtype=np.float64).reshape(successes, n_num)
        if n_num
        else np.empty((successes, 0))
    )
    categorical = (
        np.asarray(
            [json.loads(text) for text in successful(7 if n_num else 6)], dtype=np.str_
        ).reshape(successes, n_cat)
        if n_cat and successes
        else np.empty((successes, n_cat or 0), dtype=np.str_)
    )
    return WindowRows(numerical, categorical, outputs, labels, status, latencies, outliers, times)
