"""The alert engine on a real database with a stand-in action runner: actions
a stopped monitor left unfinished are resumed (or failed, when they can no
longer run) when the next one starts, and acknowledgements made while an
action runs are kept."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

import pytest

from conveyor.monitor.v1 import resources_pb2 as pb
from conveyor.services.monitor import schema
from conveyor.services.monitor.actions import ActionRunner
from conveyor.services.monitor.alert_store import AlertStore
from conveyor.services.monitor.alerts import AlertEngine, new_alert_name
from conveyor.services.monitor.metrics import MonitorMetrics
from conveyor.services.monitor.profiles import VersionProfiles
from conveyor.shared.storage import create_engine
from conveyor.shared.storage.database import sqlite_url
from conveyor.shared.workers import WorkerThreads

VERSION = "models/fraud/versions/2"
ROLLBACK = pb.AlertAction(rollback=pb.RollbackAction())


@dataclass
class StandInActions:
    """Succeeds every action, after ``release`` is set."""

    release: asyncio.Event = field(default_factory=asyncio.Event)
    started: asyncio.Event = field(default_factory=asyncio.Event)
    ran: list[tuple[str, pb.AlertAction]] = field(default_factory=list)

    async def run(self, alert: pb.Alert, action: pb.AlertAction) -> pb.ActionExecution:
        self.ran.append((alert.name, action))
        self.started.set()
        await self.release.wait()
        execution = pb.ActionExecution(
            kind=pb.ACTION_KIND_ROLLBACK,
            state=pb.ACTION_STATE_SUCCEEDED,
            resources=["models/fraud@production"],
        )
        execution.start_time.GetCurrentTime()
        execution.end_time.GetCurrentTime()
        return execution


@dataclass
class Parts:
    store: AlertStore
    actions: StandInActions
    workers: WorkerThreads

    def engine(self) -> AlertEngine:
        return AlertEngine(
            self.store,
            cast(VersionProfiles, None),  # not needed: no rule names a feature
            cast(ActionRunner, self.actions),
            self.workers,
            MonitorMetrics(process_metrics=False),
        )


@pytest.fixture
async def parts(tmp_path: Path) -> AsyncIterator[Parts]:
    engine = create_engine(sqlite_url(tmp_path / "alerts.db"))
    schema.metadata.create_all(engine)
    workers = WorkerThreads(2, name="alerts-test")
    try:
        yield Parts(AlertStore(engine), StandInActions(), workers)
    finally:
        await workers.shutdown()
        engine.dispose()


def a_rule(rule_id: str, actions: list[pb.AlertAction]) -> pb.AlertRule:
    return pb.AlertRule(
        name=f"alertRules/{rule_id}",
        model="models/fraud",
        outliers=pb.OutlierCondition(max_outlier_rate=0.1),
        actions=actions,
    )


def an_alert(
    rule: pb.AlertRule, *states: Any, alert_state: Any = pb.ALERT_STATE_FIRING
) -> pb.Alert:
    alert = pb.Alert(
        name=new_alert_name(),
        alert_rule=rule.name,
        model_version=VERSION,
        state=alert_state,
        actions=[pb.ActionExecution(kind=pb.ACTION_KIND_ROLLBACK, state=s) for s in states],
    )
    alert.open_time.FromDatetime(datetime.now(UTC))
    return alert


async def test_unfinished_actions_are_resumed_when_the_engine_starts(parts: Parts) -> None:
    rule = a_rule("rollback", [ROLLBACK, ROLLBACK])
    parts.store.create_rule(rule, request_id="", request_hash="")
    done = pb.ACTION_STATE_SUCCEEDED
    interrupted = an_alert(rule, done, pb.ACTION_STATE_RUNNING)
    finished = an_alert(rule, done, done)
    parts.store.record(
        [(pb.ALERT_EVENT_TYPE_OPENED, interrupted), (pb.ALERT_EVENT_TYPE_OPENED, finished)]
    )
    engine = parts.engine()
    parts.actions.release.set()

    engine.start()
    await engine.settled()

    resumed = parts.store.alert(interrupted.name)
    assert [a.state for a in resumed.actions] == [done, done]
    assert parts.actions.ran == [(interrupted.name, ROLLBACK)]  # the second action only
    assert parts.store.alert(finished.name) == finished
    await engine.close()


async def test_actions_that_cannot_run_any_more_are_failed(parts: Parts) -> None:
    kept = a_rule("kept", [ROLLBACK])
    parts.store.create_rule(kept, request_id="", request_hash="")
    orphan = an_alert(a_rule("deleted", [ROLLBACK]), pb.ACTION_STATE_PENDING)
    over = an_alert(kept, pb.ACTION_STATE_RUNNING, alert_state=pb.ALERT_STATE_RESOLVED)
    parts.store.record([(pb.ALERT_EVENT_TYPE_OPENED, orphan), (pb.ALERT_EVENT_TYPE_OPENED, over)])
    engine = parts.engine()

    engine.start()
    await engine.settled()

    for name in (orphan.name, over.name):
        action = parts.store.alert(name).actions[0]
        assert action.state == pb.ACTION_STATE_FAILED
        assert action.message
        assert action.HasField("end_time")
    assert parts.actions.ran == []
    await engine.close()


async def test_an_acknowledgement_during_an_action_is_kept(parts: Parts) -> None:
    rule = a_rule("rollback", [ROLLBACK])
    parts.store.create_rule(rule, request_id="", request_hash="")
    alert = an_alert(rule, pb.ACTION_STATE_PENDING)
    parts.store.record([(pb.ALERT_EVENT_TYPE_OPENED, alert)])
    engine = parts.engine()
    engine.start()
    await parts.actions.started.wait()  # the action is running

    acknowledged = await engine.acknowledge(alert.name, principal="user:ada", comment="on it")
    parts.actions.release.set()
    await engine.settled()

    stored = parts.store.alert(alert.name)
    assert acknowledged.state == pb.ALERT_STATE_ACKNOWLEDGED
    assert stored.state == pb.ALERT_STATE_ACKNOWLEDGED
    assert stored.acknowledged_by == "user:ada"
    assert stored.actions[0].state == pb.ACTION_STATE_SUCCEEDED
    events = parts.store.events_after(0)
    assert [e.type for e in events] == [
        pb.ALERT_EVENT_TYPE_OPENED,
        pb.ALERT_EVENT_TYPE_UPDATED,  # RUNNING
        pb.ALERT_EVENT_TYPE_ACKNOWLEDGED,
        pb.ALERT_EVENT_TYPE_UPDATED,  # SUCCEEDED
    ]
    assert [e.sequence for e in events] == [1, 2, 3, 4]
    await engine.close()
