"""The prediction log and what is kept about it: windows, feedback, references,
configs and the reports computed when windows close.

Synchronous SQLAlchemy Core over SQLite or PostgreSQL, called from worker
threads. A call's records are stored in one transaction, so a rejected or
failed call leaves nothing behind. Windows are aggregated as records arrive
(counts and time span updated in the same transaction), so nothing ever
rescans history: a report reads one window's rows through its index.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from operator import itemgetter
from typing import Any, Final

from sqlalchemy import and_, delete, func, insert, select, tuple_, update
from sqlalchemy.engine import Connection, Engine

from conveyor.monitor.v1 import resources_pb2 as pb
from conveyor.services.monitor import packed_windows, schema
from conveyor.services.monitor.config import WindowSize
from conveyor.services.monitor.ingest import PreparedRows
from conveyor.services.monitor.window_rows import WindowRows, bulk_read, rows_to_columns
from conveyor.services.monitor.windows import (
    StoredWindow,
    is_full,
    micros,
    new_window,
    open_window,
    stored_window,
)
from conveyor.shared.storage import read_transaction, write_transaction

_IN_CHUNK: Final = 500
"""Keys per ``IN (...)`` list: under SQLite's default limit of bound variables."""
_US: Final = 1_000_000

predictions = schema.predictions
windows = schema.windows


@dataclass(frozen=True)
class IngestResult:
    accepted: int
    duplicates: int
    closed_windows: list[tuple[str, int]]
    """(model version, window index) of every window the call closed."""
    by_version: dict[str, tuple[int, int]]
    """Accepted and duplicate records per version."""


@dataclass(frozen=True)
class FeedbackResult:
    accepted: int
    matched: int
    ignored: int


class MonitorStore:
    """The monitor's database."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    # -- ingest --------------------------------------------------------------

    def ingest(
        self, batches: Sequence[PreparedRows], sizes: dict[str, WindowSize], *, now_us: int
    ) -> IngestResult:
        """Store every new record of ``batches`` (one per version) in one
        transaction, assigning each to its version's window (``sizes``);
        records already stored (same version and request id) are duplicates."""
        accepted = duplicates = 0
        closed: list[tuple[str, int]] = []
        by_version: dict[str, tuple[int, int]] = {}
        with write_transaction(self.engine) as connection:
            for batch in batches:
                fresh = self._fresh(connection, batch)
                duplicates += len(batch.rows) - len(fresh)
                by_version[batch.model_version] = (len(fresh), len(batch.rows) - len(fresh))
                if not fresh:
                    continue
                fresh.sort(key=lambda row: row["time_us"])
                closed.extend(
                    self._assign_windows(
                        connection, batch.model_version, fresh, sizes[batch.model_version], now_us
                    )
                )
                self._join_feedback(connection, fresh)
                _insert_predictions(connection, fresh)
                accepted += len(fresh)
        return IngestResult(accepted, duplicates, closed, by_version)

    def _fresh(self, connection: Connection, batch: PreparedRows) -> list[dict[str, Any]]:
        """The batch's rows not stored yet, each request id once."""
        if not batch.rows:
            return []
        model = batch.rows[0]["model"]
        ids = list(dict.fromkeys(row["request_id"] for row in batch.rows))
        stored: set[str] = set()
        for start in range(0, len(ids), _IN_CHUNK):
            chunk = ids[start : start + _IN_CHUNK]
            stored.update(
                found
                for (found,) in _driver_rows(
                    connection,
                    "SELECT request_id FROM predictions WHERE model = ? AND model_version = ? "
                    f"AND request_id IN ({_markers(len(chunk))})",
                    (model, batch.model_version, *chunk),
                )
            )
        fresh: list[dict[str, Any]] = []
        for row in batch.rows:
            if row["request_id"] not in stored:
                stored.add(row["request_id"])
                fresh.append(row)
        return fresh

    def _assign_windows(
        self,
        connection: Connection,
        model_version: str,
        rows: list[dict[str, Any]],
        size: WindowSize,
        now_us: int,
    ) -> list[tuple[str, int]]:
        """Set each row's window (rows in time order), updating the windows'
        aggregates; returns the windows that closed."""
        open_row = connection.execute(
            select(windows)
            .where(windows.c.model_version == model_version, windows.c.closed.is_(False))
            .order_by(windows.c.window_index.desc())
            .limit(1)
        ).first()
        if open_row is None:
            last = connection.execute(
                select(func.max(windows.c.window_index)).where(
                    windows.c.model_version == model_version
                )
            ).scalar()
            current = new_window(model_version, -1 if last is None else last, rows[0], size)
            is_new = True
        else:
            current = open_window(open_row)
            is_new = False
        closed: list[tuple[str, int]] = []
        for row in rows:
            if is_full(current, size, row["time_us"]):
                self._save_window(connection, current, is_new, closed_at=now_us)
                closed.append((model_version, current["window_index"]))
                current = new_window(model_version, current["window_index"], row, size, current)
                is_new = True
            row["window_index"] = current["window_index"]
            current["row_count"] += 1
            current["start_us"] = min(current["start_us"], row["time_us"])
            current["end_us"] = max(current["end_us"], row["time_us"])
            current["error_count"] += row["status_code"] != 0
            current["outlier_count"] += bool(row["outlier"])
        if size.rows is not None and current["row_count"] >= size.rows:
            self._save_window(connection, current, is_new, closed_at=now_us)
            closed.append((model_version, current["window_index"]))
        else:
            self._save_window(connection, current, is_new, closed_at=None)
        return closed

    def _save_window(
        self, connection: Connection, window: dict[str, Any], is_new: bool, *, closed_at: int | None
    ) -> None:
        values = dict(window, closed=closed_at is not None, close_time_us=closed_at)
        if is_new:
            connection.execute(insert(windows).values(**values))
        else:
            connection.execute(
                update(windows)
                .where(
                    windows.c.model_version == window["model_version"],
                    windows.c.window_index == window["window_index"],
                )
                .values(**values)
            )

    def _join_feedback(self, connection: Connection, rows: list[dict[str, Any]]) -> None:
        """Labels that arrived before their predictions."""
        model = rows[0]["model"]
        by_id = {row["request_id"]: row for row in rows}
        ids = list(by_id)
        for start in range(0, len(ids), _IN_CHUNK):
            chunk = ids[start : start + _IN_CHUNK]
            for request_id, label, time_us in _driver_rows(
                connection,
                "SELECT request_id, label, time_us FROM feedback WHERE model = ? "
                f"AND request_id IN ({_markers(len(chunk))})",
                (model, *chunk),
            ):
                by_id[request_id]["label"] = label
                by_id[request_id]["label_time_us"] = time_us

    def close_expired(self, now_us: int) -> list[tuple[str, int]]:
        """Close every time window whose deadline has passed."""
        with write_transaction(self.engine) as connection:
            expired = connection.execute(
                select(windows.c.model_version, windows.c.window_index).where(
                    windows.c.closed.is_(False),
                    windows.c.deadline_us.is_not(None),
                    windows.c.deadline_us <= now_us,
                )
            ).all()
            for model_version, index in expired:
                connection.execute(
                    update(windows)
                    .where(
                        windows.c.model_version == model_version,
                        windows.c.window_index == index,
                    )
                    .values(closed=True, close_time_us=now_us)
                )
        return [(row.model_version, row.window_index) for row in expired]

    # -- feedback ------------------------------------------------------------

    def record_feedback(
        self, feedback: Sequence[tuple[str, str, int, int]], *, now_us: int
    ) -> FeedbackResult:
        """Store labels ``(model, request_id, label, time_us)``: a label with an
        older time than the stored one, or identical to it, is ignored; the
        others replace it and are joined to every stored prediction of that
        model and request id."""
        table = schema.feedback
        accepted = matched = ignored = 0
        with write_transaction(self.engine) as connection:
            for model, request_id, label, time_us in feedback:
                key = (table.c.model == model, table.c.request_id == request_id)
                stored = connection.execute(
                    select(table.c.label, table.c.time_us).where(*key)
                ).first()
                if stored is not None and (
                    time_us < stored.time_us or (time_us, label) == (stored.time_us, stored.label)
                ):
                    ignored += 1
                    continue
                values = {"label": label, "time_us": time_us, "ingest_time_us": now_us}
                if stored is None:
                    connection.execute(
                        insert(table).values(model=model, request_id=request_id, **values)
                    )
                else:
                    connection.execute(update(table).where(*key).values(**values))
                joined = connection.execute(
                    update(predictions)
                    .where(predictions.c.model == model, predictions.c.request_id == request_id)
                    .values(label=label, label_time_us=time_us)
                ).rowcount
                accepted += 1
                matched += joined > 0
        return FeedbackResult(accepted, matched, ignored)

    def output_widths(self, keys: Sequence[tuple[str, str]]) -> dict[tuple[str, str], int]:
        """The output width of the stored successful prediction of each
        (model, request id), where there is one."""
        widths: dict[tuple[str, str], int] = {}
        with read_transaction(self.engine) as connection:
            for model in sorted({model for model, _ in keys}):
                ids = sorted({request_id for m, request_id in keys if m == model})
                for start in range(0, len(ids), _IN_CHUNK):
                    for row in connection.execute(
                        select(predictions.c.request_id, func.length(predictions.c.outputs)).where(
                            predictions.c.model == model,
                            predictions.c.status_code == 0,
                            predictions.c.request_id.in_(ids[start : start + _IN_CHUNK]),
                        )
                    ):
                        widths[(model, row[0])] = int(row[1]) // 8
        return widths

    # -- reading -------------------------------------------------------------

    def window(self, model_version: str, index: int) -> StoredWindow | None:
        with read_transaction(self.engine) as connection:
            row = connection.execute(
                select(windows).where(
                    windows.c.model_version == model_version, windows.c.window_index == index
                )
            ).first()
        return None if row is None else stored_window(row)

    def latest_window(self, model_version: str, *, closed: bool) -> StoredWindow | None:
        with read_transaction(self.engine) as connection:
            row = connection.execute(
                select(windows)
                .where(windows.c.model_version == model_version, windows.c.closed.is_(closed))
                .order_by(windows.c.window_index.desc())
                .limit(1)
            ).first()
        return None if row is None else stored_window(row)

    def window_rows(
        self,
        model_version: str,
        *,
        index: int | None = None,
        time_range: tuple[int, int] | None = None,
        numerical_columns: int,
        categorical_columns: int,
        include_shadow: bool = True,
        features: bool = True,
    ) -> WindowRows:
        """One window's rows, or those of a version in ``[start, end)``
        microseconds; without ``features`` the feature columns come back
        empty (the performance and operations reports do not read them)."""
        read_numerical = features and numerical_columns > 0
        read_categorical = features and categorical_columns > 0
        columns = [
            predictions.c.status_code,
            predictions.c.latency_us,
            predictions.c.time_us,
            predictions.c.outputs,
            func.coalesce(predictions.c.label, -1),
            predictions.c.outlier,
        ]
        if read_numerical:
            columns.append(predictions.c.numerical)
        if read_categorical:
            columns.append(predictions.c.categorical)
        where: list[Any] = [predictions.c.model_version == model_version]
        if index is not None:
            where.append(predictions.c.window_index == index)
        if time_range is not None:
            where.extend(
                [predictions.c.time_us >= time_range[0], predictions.c.time_us < time_range[1]]
            )
        if not include_shadow:
            where.append(predictions.c.shadow.is_(False))
        with bulk_read(), read_transaction(self.engine) as connection:
            # The driver's tuples: for a million rows SQLAlchemy's Row objects
            # cost more than the fetch itself.
            rows = connection.execute(select(*columns).where(and_(*where))).cursor.fetchall()
            return rows_to_columns(
                rows,
                numerical_columns if read_numerical else None,
                categorical_columns if read_categorical else None,
            )

    # -- erasure and retention -------------------------------------------------

    def erase_subject(self, subject_hash: str, model: str | None) -> tuple[int, int]:
        """Delete every prediction of the subject (of ``model`` when given), the
        feedback joined to them and the stored reports of the windows they were
        in; the windows keep their aggregates (which hold no row)."""
        feedback = schema.feedback
        where = [predictions.c.subject_hash == subject_hash]
        if model is not None:
            where.append(predictions.c.model == model)
        with write_transaction(self.engine) as connection:
            keys = connection.execute(
                select(
                    predictions.c.model,
                    predictions.c.request_id,
                    predictions.c.model_version,
                    predictions.c.window_index,
                ).where(*where)
            ).all()
            erased = connection.execute(delete(predictions).where(*where)).rowcount
            erased_feedback = 0
            pairs = sorted({(k.model, k.request_id) for k in keys})
            for start in range(0, len(pairs), _IN_CHUNK):
                erased_feedback += connection.execute(
                    delete(feedback).where(
                        tuple_(feedback.c.model, feedback.c.request_id).in_(
                            pairs[start : start + _IN_CHUNK]
                        )
                    )
                ).rowcount
            # Reports and packed columns of the windows would still hold them.
            reports = schema.reports
            touched = sorted({(k.model_version, k.window_index) for k in keys})
            for model_version, index in touched:
                connection.execute(
                    delete(reports).where(
                        reports.c.model_version == model_version, reports.c.window_index == index
                    )
                )
            packed_windows.drop(connection, touched)
        return erased, erased_feedback

    def purge(
        self, retention_by_model: dict[str, timedelta], default: timedelta, now_us: int
    ) -> int:
        """Delete prediction and feedback rows older than their model's retention."""
        deleted = 0
        with write_transaction(self.engine) as connection:
            models = connection.execute(select(predictions.c.model).distinct()).scalars().all()
            feedback_models = (
                connection.execute(select(schema.feedback.c.model).distinct()).scalars().all()
            )
            for model in sorted(set(models) | set(feedback_models)):
                cutoff = now_us - micros(retention_by_model.get(model, default))
                packed_windows.drop_started_before(connection, model, cutoff)
                deleted += connection.execute(
                    delete(predictions).where(
                        predictions.c.model == model, predictions.c.time_us < cutoff
                    )
                ).rowcount
                connection.execute(
                    delete(schema.feedback).where(
                        schema.feedback.c.model == model,
                        schema.feedback.c.ingest_time_us < cutoff,
                    )
                )
        return deleted

    # -- bodies: references, configs, reports, canary -------------------------

    def put_reference(
        self,
        model_version: str,
        reference: pb.Reference,
        data: bytes,
        scorer: bytes | None,
        method: int,
    ) -> None:
        table = schema.references
        with write_transaction(self.engine) as connection:
            connection.execute(delete(table).where(table.c.model_version == model_version))
            connection.execute(
                insert(table).values(
                    model_version=model_version,
                    body=reference.SerializeToString(),
                    data=data,
                    scorer=scorer,
                    scorer_method=method,
                )
            )

    def clear_scorers(self, model: str) -> None:
        """Forget the fitted outlier scorers of ``model``'s versions (the
        outlier or privacy settings changed): they are refitted on next use."""
        table = schema.references
        with write_transaction(self.engine) as connection:
            connection.execute(
                update(table)
                .where(table.c.model_version.startswith(f"{model}/versions/", autoescape=True))
                .values(scorer=None)
            )

    def reference(self, model_version: str) -> tuple[pb.Reference, bytes, bytes | None, int] | None:
        table = schema.references
        with read_transaction(self.engine) as connection:
            row = connection.execute(
                select(table).where(table.c.model_version == model_version)
            ).first()
        if row is None:
            return None
        return pb.Reference.FromString(row.body), row.data, row.scorer, row.scorer_method

    def put_config(self, config: pb.MonitoringConfig) -> None:
        model = config.name.removesuffix("/monitoringConfig")
        self._put_body(schema.monitoring_configs, {"model": model}, config)

    def config(self, model: str) -> pb.MonitoringConfig | None:
        body = self._body(schema.monitoring_configs, model=model)
        return None if body is None else pb.MonitoringConfig.FromString(body)

    def configs(self) -> list[pb.MonitoringConfig]:
        with read_transaction(self.engine) as connection:
            bodies = connection.execute(select(schema.monitoring_configs.c.body)).scalars().all()
        return [pb.MonitoringConfig.FromString(body) for body in bodies]

    def put_report(
        self, model_version: str, index: int, kind: str, report: Any, *, settings_time_us: int
    ) -> None:
        """Keep a closed window's report, computed under the settings (config
        and reference) of ``settings_time_us``."""
        self._put_body(
            schema.reports,
            {"model_version": model_version, "window_index": index, "kind": kind},
            report,
            settings_time_us=settings_time_us,
        )

    def keep_computed_report(
        self, model_version: str, index: int, kind: str, report: Any, *, settings_time_us: int
    ) -> bool:
        """Keep a report computed on request from the closed window's packed
        copy, as :meth:`put_report` does, unless the copy is gone by now: rows
        left the window since it was read, and the report still counts them."""
        key = {"model_version": model_version, "window_index": index, "kind": kind}
        with write_transaction(self.engine) as connection:
            if not packed_windows.has_copy(connection, model_version, index):
                return False
            _replace_body(
                connection, schema.reports, key, report, settings_time_us=settings_time_us
            )
        return True

    def report(
        self, model_version: str, index: int, kind: str, *, settings_time_us: int
    ) -> bytes | None:
        """The window's stored report, if it was computed under the settings of
        ``settings_time_us`` (a report computed under older ones is stale)."""
        return self._body(
            schema.reports,
            model_version=model_version,
            window_index=index,
            kind=kind,
            settings_time_us=settings_time_us,
        )

    def put_canary_analysis(self, model: str, analysis: pb.CanaryAnalysis) -> None:
        self._put_body(schema.canary_analyses, {"model": model}, analysis)

    def canary_analysis(self, model: str) -> pb.CanaryAnalysis | None:
        body = self._body(schema.canary_analyses, model=model)
        return None if body is None else pb.CanaryAnalysis.FromString(body)

    def version_output_columns(self, model_version: str) -> int | None:
        """The width of the version's stored output rows (None before any)."""
        with read_transaction(self.engine) as connection:
            outputs = connection.execute(
                select(predictions.c.outputs)
                .where(predictions.c.model_version == model_version, predictions.c.status_code == 0)
                .limit(1)
            ).scalar()
        return None if outputs is None else len(outputs) // 8

    def _put_body(self, table: Any, key: dict[str, Any], message: Any, **columns: Any) -> None:
        with write_transaction(self.engine) as connection:
            _replace_body(connection, table, key, message, **columns)

    def _body(self, table: Any, **key: Any) -> bytes | None:
        where = [table.c[name] == value for name, value in key.items()]
        with read_transaction(self.engine) as connection:
            body: bytes | None = connection.execute(select(table.c.body).where(*where)).scalar()
        return body


def _replace_body(
    connection: Connection, table: Any, key: dict[str, Any], message: Any, **columns: Any
) -> None:
    connection.execute(delete(table).where(*(table.c[k] == v for k, v in key.items())))
    connection.execute(insert(table).values(**key, body=message.SerializeToString(), **columns))


_PREDICTION_COLUMNS: Final = tuple(column.name for column in predictions.columns)
_prediction_values = itemgetter(*_PREDICTION_COLUMNS)


def _insert_predictions(connection: Connection, rows: list[dict[str, Any]]) -> None:
    """Insert through the driver with tuples: SQLAlchemy's per-row parameter
    handling cost more than SQLite's own insert."""
    statement = _driver_sql(
        connection,
        f"INSERT INTO {predictions.name} ({', '.join(_PREDICTION_COLUMNS)}) "
        f"VALUES ({_markers(len(_PREDICTION_COLUMNS))})",
    )
    connection.exec_driver_sql(statement, [_prediction_values(row) for row in rows])


def _driver_rows(connection: Connection, statement: str, parameters: tuple[Any, ...]) -> Any:
    """A hot query through the driver (``?`` markers): SQLAlchemy compiles an
    ``IN`` list of hundreds of values afresh on every call."""
    return connection.exec_driver_sql(_driver_sql(connection, statement), parameters).cursor


def _driver_sql(connection: Connection, statement: str) -> str:
    return statement if connection.dialect.paramstyle == "qmark" else statement.replace("?", "%s")


def _markers(count: int) -> str:
    return ", ".join(["?"] * count)
