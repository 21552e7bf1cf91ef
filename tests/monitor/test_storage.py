"""The monitor's store on SQLite and PostgreSQL: the migrations build exactly
the schema the code expects, and the prediction log works the same on both."""

from __future__ import annotations

import gc
import json
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import grpc
import numpy as np
import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import func, insert, inspect, select

from conveyor.monitor.v1 import monitor_messages_pb2 as rpc
from conveyor.monitor.v1 import resources_pb2 as pb
from conveyor.services.monitor import packed_windows, schema, window_rows
from conveyor.services.monitor.config import WindowSize
from conveyor.services.monitor.ingest import PreparedRows
from conveyor.services.monitor.migrate import VERSION_TABLE, alembic_config, upgrade_to_head
from conveyor.services.monitor.store import MonitorStore
from conveyor.shared.storage import create_engine
from conveyor.shared.storage.database import sqlite_url
from tests.monitor.conftest import records, running_suite
from tests.support.postgres import ThrowawayPostgres
from tests.support.registry import expect_error


@pytest.fixture(scope="module")
def postgres() -> Iterator[ThrowawayPostgres]:
    cluster = ThrowawayPostgres()
    cluster.start()
    yield cluster
    cluster.stop()


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "postgresql":
        url: str = request.getfixturevalue("postgres").create_database()
        return url
    return sqlite_url(tmp_path / "monitor-test.db")


def test_migrated_database_matches_the_schema(database_url: str) -> None:
    engine = create_engine(database_url)
    upgrade_to_head(engine)
    upgrade_to_head(engine)  # a second run finds nothing to do
    with engine.connect() as connection:
        context = MigrationContext.configure(connection, opts={"version_table": VERSION_TABLE})
        differences = compare_metadata(context, schema.metadata)
        tables = set(inspect(connection).get_table_names())
    engine.dispose()
    assert differences == []
    assert tables == set(schema.metadata.tables) | {VERSION_TABLE}


async def test_the_log_windows_feedback_and_erasure_on_either_database(
    database_url: str, tmp_path: Path
) -> None:
    async for suite in running_suite(tmp_path, database_url=database_url):
        version = await suite.register("churn")
        rng = np.random.default_rng(0)
        await suite.set_reference(version, rng.normal(size=(300, 4)))
        await suite.configure("models/churn", ["window"], window=pb.WindowSpec(row_count=100))
        batch = records(version, rng.normal(size=(150, 4)), subject="s-1")

        first = await suite.log(batch)
        again = await suite.log(batch[:10])
        feedback = await suite.monitor.LogFeedback(
            rpc.LogFeedbackRequest(
                feedback=[pb.Feedback(model="models/churn", request_id="r3", label=1)]
            ),
            timeout=10,
        )
        drift = await suite.monitor.GetDriftReport(
            rpc.GetDriftReportRequest(model_version=version), timeout=30
        )
        erased = await suite.monitor.ErasePredictions(
            rpc.ErasePredictionsRequest(subject_key="s-1"), timeout=10
        )

        assert (first.accepted_count, again.duplicate_count) == (150, 10)
        assert feedback.matched_count == 1
        assert drift.drift_report.window.row_count == 100
        assert len(drift.drift_report.features) == 4
        assert (erased.erased_predictions, erased.erased_feedback) == (150, 1)
        await expect_error(
            suite.monitor.GetDriftReport(
                rpc.GetDriftReportRequest(model_version=version, window=pb.WindowSelector(index=0)),
                timeout=10,
            ),
            grpc.StatusCode.FAILED_PRECONDITION,  # the window's rows are gone
        )


def _stored_rows(
    version: str, numerical: np.ndarray, categories: list[str], *, now_us: int
) -> PreparedRows:
    """Rows as ``ingest.prepare`` makes them; the first has a subject and the
    last one failed (no values)."""
    rows = []
    for i, values in enumerate(numerical):
        failed = i == len(numerical) - 1
        rows.append(
            {
                "model": version.split("/versions/")[0],
                "request_id": f"r{i}",
                "model_version": version,
                "time_us": now_us + i,
                "window_index": 0,
                "status_code": 13 if failed else 0,
                "latency_us": 1000 + i,
                "shadow": False,
                "numerical": b"" if failed else values.tobytes(),
                "categorical": "[]" if failed else json.dumps([categories[i]]),
                "outputs": b"" if failed else np.array([0.25, 0.75 + i]).tobytes(),
                "subject_hash": "subject-hash" if i == 0 else None,
                "outlier_score": None,
                "outlier": False,
                "label": None,
                "label_time_us": None,
                "ingest_time_us": now_us,
            }
        )
    return PreparedRows(version, rows, 2)


def test_closed_windows_are_packed_in_chunks_and_dropped_when_rows_leave(
    database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = create_engine(database_url)
    upgrade_to_head(engine)
    store = MonitorStore(engine)
    version = "models/churn/versions/1"
    numerical = np.random.default_rng(7).normal(size=(50, 3))
    categories = [f"c{i % 4}" for i in range(50)]
    now_us = time.time_ns() // 1000
    result = store.ingest(
        [_stored_rows(version, numerical, categories, now_us=now_us)],
        {version: WindowSize(rows=50, duration=None, min_rows=1)},
        now_us=now_us,
    )
    assert result.closed_windows == [(version, 0)]
    rows = store.window_rows(version, index=0, numerical_columns=3, categorical_columns=1)

    # 400 bytes a chunk: one column of 49 values, 25 rows of 2 outputs or
    # 50 rows of categories: 3 + 2 + 1 chunks.
    monkeypatch.setattr(packed_windows, "CHUNK_BYTES", 400)
    assert packed_windows.put(engine, version, 0, rows, stored_rows=50)
    assert not packed_windows.put(engine, version, 0, rows, stored_rows=51)  # rows changed
    with engine.connect() as connection:
        chunks = connection.execute(
            select(func.count()).select_from(schema.packed_windows)
        ).scalar_one()
    assert chunks == 6

    def packed_window(index: int) -> packed_windows.FeatureRows | None:
        return packed_windows.get(
            engine, version, index, numerical_columns=3, categorical_columns=1
        )

    packed = packed_window(0)
    assert packed is not None
    assert packed.sorted_columns
    np.testing.assert_array_equal(packed.numerical, np.sort(numerical[:49], axis=0))
    np.testing.assert_array_equal(packed.categorical[:, 0], categories[:49])
    np.testing.assert_array_equal(packed.outputs[:, 1], 0.75 + np.arange(49))
    assert packed_window(1) is None

    # An erasure takes rows out of the window: its packed copy goes with them.
    assert store.erase_subject("subject-hash", None) == (1, 0)
    assert packed_window(0) is None
    # A report computed from the copy before the erasure is not kept after it.
    computed = pb.DriftReport(model_version=version)
    assert not store.keep_computed_report(version, 0, "drift", computed, settings_time_us=1)
    assert store.report(version, 0, "drift", settings_time_us=1) is None
    rows = store.window_rows(version, index=0, numerical_columns=3, categorical_columns=1)
    assert packed_windows.put(engine, version, 0, rows, stored_rows=49)
    assert store.keep_computed_report(version, 0, "drift", computed, settings_time_us=1)
    assert store.report(version, 0, "drift", settings_time_us=1) == computed.SerializeToString()
    assert store.report(version, 0, "drift", settings_time_us=2) is None  # other settings

    # So does the retention: the window holds rows older than the cutoff.
    store.purge({"models/churn": timedelta(seconds=1)}, timedelta(days=30), now_us + 10_000_000)
    assert packed_window(0) is None
    engine.dispose()


def test_bulk_reads_pause_the_collector_and_leave_it_as_they_found_it() -> None:
    pause = window_rows.CollectorPause()
    assert gc.isenabled()
    with pause():
        assert not gc.isenabled()
        with pause():  # a second reader, e.g. on another thread
            assert not gc.isenabled()
        assert not gc.isenabled()  # the first still reads
    assert gc.isenabled()
    gc.disable()
    try:
        with pause():
            assert not gc.isenabled()
        assert not gc.isenabled()  # it was off before: stays off
    finally:
        gc.enable()


def test_a_database_of_the_first_schema_upgrades_with_its_data(database_url: str) -> None:
    engine = create_engine(database_url)
    config = alembic_config()
    with engine.begin() as connection:
        config.attributes["connection"] = connection
        command.upgrade(config, "0001")
    with engine.begin() as connection:
        connection.execute(
            insert(schema.reports).values(
                model_version="models/churn/versions/1", window_index=0, kind="drift", body=b"r"
            )
        )
        connection.execute(
            insert(schema.alert_events).values(event_type=1, alert_id="a1", body=b"e")
        )
    upgrade_to_head(engine)

    with engine.connect() as connection:
        differences = compare_metadata(
            MigrationContext.configure(connection, opts={"version_table": VERSION_TABLE}),
            schema.metadata,
        )
        report = connection.execute(select(schema.reports)).one()
        event = connection.execute(select(schema.alert_events)).one()
    engine.dispose()
    assert differences == []
    # Kept, and never served as current (no settings time) or purged (no time).
    assert (report.body, report.settings_time_us) == (b"r", None)
    assert (event.body, event.time_us) == (b"e", None)
