"""Closed windows' features kept as sorted columns, so that a drift report
over a large window reads its values without walking its rows, and without
sorting them again.

Reading a million stored predictions row by row costs seconds on SQLite (one
B-tree step and a Python tuple per row); the same values packed into a few
chunks of float64 bytes read back in a fraction of a second. Every drift
statistic is univariate and blind to row order, and the Kolmogorov-Smirnov
and Wasserstein ones need each column sorted: so each numerical column is
sorted once, when the window closes (the evaluator's own report uses the
sorted copy), and kept sorted. Categorical columns and the outputs keep the
rows' order (the prediction drift reads each output row).

A window's values never change once it closes, except when rows leave it (an
erasure, the retention): then its packed copy is dropped and reports read the
rows again.
"""

from __future__ import annotations

import enum
import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Final

import numpy as np
import numpy.typing as npt
from sqlalchemy import and_, delete, exists, func, select
from sqlalchemy.engine import Connection, Engine

from conveyor.services.monitor import schema
from conveyor.shared.storage import read_transaction, write_transaction

CHUNK_BYTES: Final = 32 * 1024 * 1024
"""About this many bytes per stored chunk (far under SQLite's 1 GB value limit)."""

packed = schema.packed_windows


class Part(enum.IntEnum):
    """What a stored chunk holds."""

    NUMERICAL = 1
    """Whole numerical columns, each sorted (NaN last), one after another."""
    CATEGORICAL = 2
    """A run of rows' category values, JSON."""
    OUTPUTS = 3
    """A run of rows' outputs, row-major float64."""


@dataclass(frozen=True, eq=False)
class FeatureRows:
    """What a drift report reads: the successful rows' values as columns."""

    numerical: npt.NDArray[np.float64]
    categorical: npt.NDArray[np.str_]
    outputs: npt.NDArray[np.float64]
    """Successful rows only, like the two above."""
    sorted_columns: bool = field(default=False, kw_only=True)
    """Each numerical column sorted on its own (NaN last): the columns no
    longer line up into rows."""


def sorted_features(rows: FeatureRows) -> FeatureRows:
    """``rows`` with each numerical column sorted, as columns of one
    column-major matrix (``numerical.T`` is contiguous)."""
    if rows.sorted_columns:
        return rows
    columns = np.sort(rows.numerical.T, axis=1)
    return FeatureRows(columns.T, rows.categorical, rows.outputs, sorted_columns=True)


def put(
    engine: Engine, model_version: str, index: int, rows: FeatureRows, *, stored_rows: int
) -> bool:
    """Keep the closed window's successful rows (:func:`sorted_features`),
    read from its ``stored_rows`` rows; False (nothing kept) when rows left the
    window since they were read."""
    rows = sorted_features(rows)
    count = rows.numerical.shape[0]
    chunks = [
        *_numerical_chunks(np.ascontiguousarray(rows.numerical.T)),
        *_row_chunks(Part.OUTPUTS, rows.outputs, _outputs_bytes),
    ]
    if rows.categorical.shape[1]:
        chunks.extend(_row_chunks(Part.CATEGORICAL, rows.categorical, _categories_json))
    values = [
        {"model_version": model_version, "window_index": index, "row_count": count, **chunk}
        for chunk in chunks
    ]
    predictions = schema.predictions
    with write_transaction(engine) as connection:
        still = connection.execute(
            select(func.count()).where(
                predictions.c.model_version == model_version,
                predictions.c.window_index == index,
            )
        ).scalar_one()
        if still != stored_rows:
            return False
        drop(connection, [(model_version, index)])
        connection.execute(packed.insert(), values)
    return True


def get(
    engine: Engine,
    model_version: str,
    index: int,
    *,
    numerical_columns: int,
    categorical_columns: int,
) -> FeatureRows | None:
    """The window's packed columns (sorted), None when it has none (still
    open, or dropped)."""
    with read_transaction(engine) as connection:
        chunks = connection.execute(
            select(packed.c.part, packed.c.row_count, packed.c.columns, packed.c.data)
            .where(packed.c.model_version == model_version, packed.c.window_index == index)
            .order_by(packed.c.part, packed.c.chunk)
        ).all()
    if not chunks:
        return None
    count = chunks[0].row_count
    by_part: dict[int, list[Any]] = {part: [] for part in Part}
    for chunk in chunks:
        by_part[chunk.part].append(chunk)
    # Straight into the arrays: one copy of the bytes, not a join first.
    columns = np.empty((numerical_columns, count))
    first = 0
    for chunk in by_part[Part.NUMERICAL]:
        columns[first : first + chunk.columns] = np.frombuffer(chunk.data).reshape(
            chunk.columns, count
        )
        first += chunk.columns
    width = by_part[Part.OUTPUTS][0].columns
    outputs = np.empty((count, width))
    start = 0
    for chunk in by_part[Part.OUTPUTS]:
        part = np.frombuffer(chunk.data).reshape(-1, width)
        outputs[start : start + part.shape[0]] = part
        start += part.shape[0]
    categorical = (
        np.asarray(
            [row for chunk in by_part[Part.CATEGORICAL] for row in json.loads(chunk.data)],
            dtype=np.str_,
        ).reshape(count, categorical_columns)
        if categorical_columns and count
        else np.empty((count, categorical_columns), dtype=np.str_)
    )
    return FeatureRows(columns.T, categorical, outputs, sorted_columns=True)


def has_copy(connection: Connection, model_version: str, index: int) -> bool:
    """Whether the window has a packed copy (in ``connection``'s transaction)."""
    found = connection.execute(
        select(packed.c.chunk)
        .where(packed.c.model_version == model_version, packed.c.window_index == index)
        .limit(1)
    ).first()
    return found is not None


def drop(connection: Connection, windows: Iterable[tuple[str, int]]) -> None:
    """Forget the packed columns of these (model version, window index)."""
    for model_version, index in sorted(set(windows)):
        connection.execute(
            delete(packed).where(
                packed.c.model_version == model_version, packed.c.window_index == index
            )
        )


def drop_started_before(connection: Connection, model: str, cutoff_us: int) -> None:
    """Forget the packed columns of ``model``'s windows holding rows older than
    ``cutoff_us`` (the retention is removing those rows)."""
    windows = schema.windows
    connection.execute(
        delete(packed).where(
            packed.c.model_version.startswith(f"{model}/versions/", autoescape=True),
            exists().where(
                and_(
                    windows.c.model_version == packed.c.model_version,
                    windows.c.window_index == packed.c.window_index,
                    windows.c.start_us < cutoff_us,
                )
            ),
        )
    )


def _numerical_chunks(columns: npt.NDArray[np.float64]) -> list[dict[str, Any]]:
    """Whole columns (rows of ``columns``) per chunk, at least one column each."""
    n_num, count = columns.shape
    per_chunk = max(1, CHUNK_BYTES // max(1, 8 * count))
    return [
        {
            "part": Part.NUMERICAL,
            "chunk": number,
            "columns": min(per_chunk, n_num - first),
            "data": columns[first : first + per_chunk].tobytes(),
        }
        for number, first in enumerate(range(0, n_num, per_chunk))
    ]


def _row_chunks(part: Part, values: npt.NDArray[Any], encode: Any) -> list[dict[str, Any]]:
    """Runs of whole rows of ``values`` per chunk; one (maybe empty) at least."""
    count, width = values.shape
    per_chunk = max(1, CHUNK_BYTES // (8 * max(1, width)))
    return [
        {
            "part": part,
            "chunk": number,
            "columns": width,
            "data": encode(values[start : start + per_chunk]),
        }
        for number, start in enumerate(range(0, max(count, 1), per_chunk))
    ]


def _outputs_bytes(rows: npt.NDArray[np.float64]) -> bytes:
    return np.ascontiguousarray(rows).tobytes()


def _categories_json(rows: npt.NDArray[np.str_]) -> bytes:
    return json.dumps(rows.tolist()).encode()
