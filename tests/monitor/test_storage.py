"""The monitor's store on SQLite and PostgreSQL: the migrations build exactly
the schema the code expects, and the prediction log works the same on both."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect

from conveyor.monitor.v1 import monitor_messages_pb2 as rpc
from conveyor.monitor.v1 import resources_pb2 as pb
from conveyor.services.monitor import schema
from conveyor.services.monitor.migrate import VERSION_TABLE, upgrade_to_head
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
