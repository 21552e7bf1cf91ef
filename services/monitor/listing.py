"""``ListPredictions``: a version's stored records, filtered in SQL and paged,
newest first, as the records the API returns (no subject key)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime
from typing import Any, Final

import numpy as np
from sqlalchemy import select
from sqlalchemy.engine import Engine, Row

from conveyor.monitor.v1 import resources_pb2 as pb
from conveyor.services.monitor import schema
from conveyor.shared.filtering import Restriction
from conveyor.shared.storage import read_transaction

_US: Final = 1_000_000
predictions = schema.predictions

_OPERATORS: Final = {
    "=": lambda c, v: c == v,
    "!=": lambda c, v: c != v,
    "<": lambda c, v: c < v,
    "<=": lambda c, v: c <= v,
    ">": lambda c, v: c > v,
    ">=": lambda c, v: c >= v,
}


def _restriction_clause(restriction: Restriction) -> Any:
    """A ``ListPredictions`` filter restriction as a SQL condition."""
    field, op, value = restriction.field, restriction.op, restriction.value
    if field == "has_label":
        present = predictions.c.label.is_not(None)
        return present if (value == "TRUE") == (op == "=") else ~present
    if field in ("shadow", "outlier"):
        column = predictions.c[field]
        return column.is_(value == "TRUE") if op == "=" else column.is_not(value == "TRUE")
    if field == "time":
        assert isinstance(value, datetime)
        return _OPERATORS[op](predictions.c.time_us, int(value.timestamp() * _US))
    if field == "request_id" and op == ":":
        text = str(value)
        if text.endswith("*"):
            return predictions.c.request_id.startswith(text[:-1], autoescape=True)
        return predictions.c.request_id == text
    column = predictions.c[field]
    return _OPERATORS[op](column, value)


def list_predictions(
    engine: Engine,
    model_version: str,
    restrictions: Sequence[Restriction],
    *,
    offset: int,
    limit: int,
) -> tuple[list[Row[Any]], bool]:
    """A page of a version's records, newest first, and whether more follow."""
    query = (
        select(predictions)
        .where(
            predictions.c.model == model_version.split("/versions/")[0],
            predictions.c.model_version == model_version,
            *[_restriction_clause(r) for r in restrictions],
        )
        .order_by(predictions.c.time_us.desc(), predictions.c.request_id.desc())
        .offset(offset)
        .limit(limit + 1)
    )
    with read_transaction(engine) as connection:
        rows = list(connection.execute(query).all())
    return rows[:limit], len(rows) > limit


def record_of(row: Row[Any]) -> pb.PredictionRecord:
    """A stored row as the record ``ListPredictions`` returns (no subject key)."""
    record = pb.PredictionRecord(
        model_version=row.model_version,
        request_id=row.request_id,
        status_code=row.status_code,
        shadow=row.shadow,
        outputs=np.frombuffer(row.outputs, dtype=np.float64).tolist(),
        outlier=row.outlier,
    )
    record.time.FromMicroseconds(row.time_us)
    record.ingest_time.FromMicroseconds(row.ingest_time_us)
    record.latency.FromMicroseconds(row.latency_us)
    if row.status_code == 0:
        record.features.numerical.extend(np.frombuffer(row.numerical, dtype=np.float64).tolist())
        record.features.categorical.extend(json.loads(row.categorical))
    if row.outlier_score is not None:
        record.outlier_score = row.outlier_score
    if row.label is not None:
        record.label = row.label
        record.label_time.FromMicroseconds(row.label_time_us)
    return record
