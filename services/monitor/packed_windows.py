"""Closed windows' features kept as columns, so that a drift report over a
large window reads its values without walking its rows.

Reading a million stored predictions row by row costs seconds on SQLite (one
B-tree step and a Python tuple per row); the same values packed into a few
chunks of float64 bytes read back in a fraction of a second. A window's
values never change once it closes, except when rows leave it (an erasure,
the retention): then its packed copy is dropped and reports read the rows
again. The copy is written by the evaluator, which reads the rows at close
anyway.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final

import numpy as np
import numpy.typing as npt
from sqlalchemy import and_, delete, exists, func, select
from sqlalchemy.engine import Connection, Engine

from conveyor.services.monitor import schema
from conveyor.shared.storage import read_transaction, write_transaction

CHUNK_BYTES: Final = 32 * 1024 * 1024
"""About this many bytes of values per chunk (far under SQLite's 1 GB value limit)."""

packed = schema.packed_windows


@dataclass(frozen=True, eq=False)
class FeatureRows:
    """What a drift report reads: the successful rows' values as columns."""

    numerical: npt.NDArray[np.float64]
    categorical: npt.NDArray[np.str_]
    outputs: npt.NDArray[np.float64]
    """Successful rows only, like the two above."""


def put(
    engine: Engine, model_version: str, index: int, rows: FeatureRows, *, stored_rows: int
) -> bool:
    """Keep the closed window's successful rows as columns, read from its
    ``stored_rows`` rows; False (nothing kept) when rows left the window since
    they were read."""
    count = rows.numerical.shape[0]
    n_num, n_cat = rows.numerical.shape[1], rows.categorical.shape[1]
    width = rows.outputs.shape[1]
    per_chunk = max(1, CHUNK_BYTES // (8 * max(1, n_num + width)))
    chunks = [
        {
            "model_version": model_version,
            "window_index": index,
            "chunk": number,
            "row_count": min(per_chunk, count - start),
            "numerical": np.ascontiguousarray(rows.numerical[start : start + per_chunk]).tobytes(),
            "categorical": (
                json.dumps(rows.categorical[start : start + per_chunk].tolist()) if n_cat else None
            ),
            "outputs": np.ascontiguousarray(rows.outputs[start : start + per_chunk]).tobytes(),
            "output_columns": width,
        }
        for number, start in enumerate(range(0, max(count, 1), per_chunk))
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
        connection.execute(packed.insert(), chunks)
    return True


def get(
    engine: Engine,
    model_version: str,
    index: int,
    *,
    numerical_columns: int,
    categorical_columns: int,
) -> FeatureRows | None:
    """The window's packed columns, None when it has none (still open, closed
    before this existed, or dropped)."""
    with read_transaction(engine) as connection:
        chunks = connection.execute(
            select(
                packed.c.row_count,
                packed.c.numerical,
                packed.c.categorical,
                packed.c.outputs,
                packed.c.output_columns,
            )
            .where(packed.c.model_version == model_version, packed.c.window_index == index)
            .order_by(packed.c.chunk)
        ).all()
    if not chunks:
        return None
    count = sum(chunk.row_count for chunk in chunks)
    width = chunks[0].output_columns
    numerical = np.empty((count, numerical_columns))
    outputs = np.empty((count, width))
    start = 0
    for chunk in chunks:
        end = start + chunk.row_count
        # Straight into the columns: one copy of the bytes, not a join first.
        numerical[start:end] = np.frombuffer(chunk.numerical, dtype=np.float64).reshape(
            -1, numerical_columns
        )
        outputs[start:end] = np.frombuffer(chunk.outputs, dtype=np.float64).reshape(-1, width)
        start = end
    categorical = (
        np.asarray(
            [row for chunk in chunks for row in json.loads(chunk.categorical)], dtype=np.str_
        ).reshape(count, categorical_columns)
        if categorical_columns and count
        else np.empty((count, categorical_columns), dtype=np.str_)
    )
    return FeatureRows(numerical, categorical, outputs)


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
