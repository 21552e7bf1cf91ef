"""Alerts through real windows: a rule opens one alert per incident after
``trigger_windows`` breaching windows, updates it while the condition holds
and resolves it after ``resolve_windows`` clear ones; every condition kind
opens alerts; alerts are acknowledged, listed and watched; disabling or
deleting a rule resolves its alerts; and a rollback action moves the
registry's alias back."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import grpc
import numpy as np
import pytest

from conveyor.monitor.v1 import monitor_messages_pb2 as rpc
from conveyor.monitor.v1 import resources_pb2 as pb
from conveyor.registry.v1 import registry_messages_pb2 as registry_rpc
from conveyor.shared.auth.principal import ANONYMOUS
from tests.monitor.conftest import Suite, records
from tests.support.registry import expect_error, refused

WINDOW = 200
FIRING = pb.ALERT_STATE_FIRING
ACKNOWLEDGED = pb.ALERT_STATE_ACKNOWLEDGED
RESOLVED = pb.ALERT_STATE_RESOLVED
EXISTING = pb.ALERT_EVENT_TYPE_EXISTING
OPENED = pb.ALERT_EVENT_TYPE_OPENED
UPDATED = pb.ALERT_EVENT_TYPE_UPDATED
ACKED = pb.ALERT_EVENT_TYPE_ACKNOWLEDGED
RESOLVED_EVENT = pb.ALERT_EVENT_TYPE_RESOLVED


class Windows:
    """Feeds one model version whole windows of stable, shifted or outlying rows."""

    def __init__(self, suite: Suite, version: str, seed: int) -> None:
        self.suite = suite
        self.version = version
        self.rng = np.random.default_rng(seed)
        self.logged = 0

    def rows(self, shift: float = 0.0, far: int = 0) -> np.ndarray:
        values = self.rng.normal(size=(WINDOW, 4)) + shift
        values[:far] += 25.0
        return values

    async def log(self, values: np.ndarray, **fields: Any) -> None:
        batch = records(self.version, values, prefix=f"w{self.logged}-", **fields)
        self.logged += 1
        await self.suite.log(batch)

    async def stable(self) -> None:
        await self.log(self.rows())

    async def shifted(self) -> None:
        await self.log(self.rows(shift=1.5))

    async def outlying(self) -> None:
        await self.log(self.rows(far=WINDOW // 2))


async def monitored(
    suite: Suite, model_id: str = "fraud", *, seed: int = 0, create: bool = True
) -> Windows:
    """A version with a reference, in windows of 200 rows (at least 100)."""
    version = await suite.register(model_id, create=create)
    await suite.set_reference(version, np.random.default_rng(seed).normal(size=(500, 4)))
    await suite.configure(
        f"models/{model_id}", ["window"], window=pb.WindowSpec(row_count=WINDOW, min_rows=100)
    )
    return Windows(suite, version, seed + 1)


async def create_rule(suite: Suite, rule_id: str, **fields: Any) -> pb.AlertRule:
    fields.setdefault("model", "models/fraud")
    reply = await suite.monitor.CreateAlertRule(
        rpc.CreateAlertRuleRequest(alert_rule=pb.AlertRule(**fields), alert_rule_id=rule_id),
        timeout=10,
    )
    return reply.alert_rule


def dataset_drift(**fields: Any) -> dict[str, Any]:
    return {"drift": pb.DriftCondition(scope=pb.DRIFT_SCOPE_DATASET), **fields}


def outliers(rate: float = 0.2, **fields: Any) -> dict[str, Any]:
    return {"outliers": pb.OutlierCondition(max_outlier_rate=rate), **fields}


async def alerts(suite: Suite, **fields: Any) -> list[pb.Alert]:
    reply = await suite.monitor.ListAlerts(rpc.ListAlertsRequest(**fields), timeout=10)
    return list(reply.alerts)


async def get_alert(suite: Suite, name: str) -> pb.Alert:
    return (await suite.monitor.GetAlert(rpc.GetAlertRequest(name=name), timeout=10)).alert


async def acknowledge(suite: Suite, name: str, comment: str = "") -> pb.Alert:
    reply = await suite.monitor.AcknowledgeAlert(
        rpc.AcknowledgeAlertRequest(name=name, comment=comment), timeout=10
    )
    return reply.alert


async def drift_report(suite: Suite, version: str, index: int) -> pb.DriftReport:
    reply = await suite.monitor.GetDriftReport(
        rpc.GetDriftReportRequest(model_version=version, window=pb.WindowSelector(index=index)),
        timeout=30,
    )
    return reply.drift_report


async def test_one_alert_per_incident_through_real_windows(suite: Suite) -> None:
    windows = await monitored(suite)
    rule = await create_rule(suite, "drift", **dataset_drift(trigger_windows=2, resolve_windows=2))

    await windows.shifted()  # window 0
    after_one = await alerts(suite)
    await windows.shifted()  # window 1: the second in a row opens the alert
    opened = await alerts(suite)
    await windows.shifted()  # window 2: the same incident
    await windows.shifted()  # window 3
    ongoing = await alerts(suite)
    await windows.stable()  # window 4: one clear window is not enough
    still_open = await alerts(suite)
    await windows.stable()  # window 5: resolved
    resolved = await alerts(suite)
    await windows.shifted()  # windows 6 and 7: a new incident
    await windows.shifted()
    everything = await alerts(suite, order_by="open_time asc")

    assert after_one == []
    assert len(opened) == 1
    alert = opened[0]
    report = await drift_report(suite, windows.version, 1)
    assert report.dataset.drifted
    assert alert.alert_rule == rule.name
    assert alert.model_version == windows.version
    assert alert.state == FIRING
    assert alert.severity == pb.ALERT_SEVERITY_WARNING  # unset means WARNING
    assert alert.breached_windows == 2
    assert alert.trigger_window.index == 1
    assert alert.value == pytest.approx(report.dataset.drifted_share)
    assert alert.threshold == pytest.approx(report.dataset.share_threshold)
    assert "dataset drift" in alert.summary
    assert "in windows 0-1" in alert.summary
    assert alert.HasField("open_time")
    assert alert.update_time == alert.open_time
    assert [a.name for a in ongoing] == [alert.name]
    assert ongoing[0].breached_windows == 4
    assert "in windows 0-3" in ongoing[0].summary
    assert ongoing[0].update_time.ToMicroseconds() >= alert.update_time.ToMicroseconds()
    assert (still_open[0].state, still_open[0].breached_windows) == (FIRING, 4)
    assert [(a.name, a.state) for a in resolved] == [(alert.name, RESOLVED)]
    assert resolved[0].HasField("resolve_time")
    assert "clear for 2 consecutive windows" in resolved[0].summary
    assert [a.state for a in everything] == [RESOLVED, FIRING]
    assert everything[0].name == alert.name
    assert everything[1].name != alert.name
    assert (everything[1].trigger_window.index, everything[1].breached_windows) == (7, 2)
    assert await get_alert(suite, alert.name) == resolved[0]


async def test_outliers_slos_and_performance_open_alerts(suite: Suite) -> None:
    windows = await monitored(suite)
    for slo_id, goal in (("availability", 0.99),):
        await suite.monitor.CreateServiceLevelObjective(
            rpc.CreateServiceLevelObjectiveRequest(
                service_level_objective=pb.ServiceLevelObjective(
                    model="models/fraud",
                    indicator=pb.SERVICE_LEVEL_INDICATOR_AVAILABILITY,
                    goal=goal,
                ),
                service_level_objective_id=slo_id,
            ),
            timeout=10,
        )
    slo_name = "serviceLevelObjectives/availability"
    await create_rule(suite, "outliers", **outliers(0.2, severity=pb.ALERT_SEVERITY_CRITICAL))
    await create_rule(suite, "slo", slo=pb.SloCondition(service_level_objective=slo_name))
    await create_rule(
        suite,
        "burn",
        slo=pb.SloCondition(service_level_objective=slo_name, burn_rate_threshold=10.0),
    )
    await create_rule(
        suite,
        "accuracy",
        performance=pb.PerformanceCondition(
            metric=pb.PERFORMANCE_METRIC_ACCURACY, max_degradation=0.05
        ),
    )

    # Window 0: half the rows far from the reference.
    await windows.outlying()
    after_outliers = {a.alert_rule: a for a in await alerts(suite)}
    operations = await suite.monitor.GetOperationsReport(
        rpc.GetOperationsReportRequest(
            model_version=windows.version, window=pb.WindowSelector(index=0)
        ),
        timeout=10,
    )

    # Window 1: a quarter of the predictions fail (UNAVAILABLE).
    await windows.log(windows.rows()[:150])
    failed = records(windows.version, windows.rows()[:50], prefix="failed-", status_code=14)
    await suite.log(failed)
    after_errors = {a.alert_rule: a for a in await alerts(suite)}

    # Window 2: labels, sent before the predictions, agree with half of them.
    values = windows.rows()
    predicted = (values[:, 0] > 0).astype(int)
    labels = np.where(np.arange(WINDOW) % 2 == 0, predicted, 1 - predicted)
    prefix = f"w{windows.logged}-"
    await suite.monitor.LogFeedback(
        rpc.LogFeedbackRequest(
            feedback=[
                pb.Feedback(model="models/fraud", request_id=f"{prefix}{i}", label=int(labels[i]))
                for i in range(WINDOW)
            ]
        ),
        timeout=30,
    )
    await windows.log(values)
    after_labels = {a.alert_rule: a for a in await alerts(suite)}
    performance = await suite.monitor.GetPerformanceReport(
        rpc.GetPerformanceReportRequest(
            model_version=windows.version, window=pb.WindowSelector(index=2)
        ),
        timeout=30,
    )

    report = operations.operations_report
    outlier_alert = after_outliers["alertRules/outliers"]
    assert set(after_outliers) == {"alertRules/outliers"}
    assert outlier_alert.severity == pb.ALERT_SEVERITY_CRITICAL
    assert outlier_alert.value == pytest.approx(report.outlier_rate)
    assert outlier_alert.value > 0.2
    assert outlier_alert.threshold == pytest.approx(0.2)

    assert set(after_errors) == {
        "alertRules/outliers",
        "alertRules/slo",
        "alertRules/burn",
    }
    slo_alert = after_errors["alertRules/slo"]
    assert slo_alert.value == pytest.approx(350 / 400)  # the SLI: 50 of 400 failed
    assert slo_alert.threshold == pytest.approx(0.99)
    burn_alert = after_errors["alertRules/burn"]
    assert burn_alert.value == pytest.approx((50 / 200) / (1 - 0.99))  # the window's burn rate
    assert burn_alert.threshold == pytest.approx(10.0)
    assert after_errors["alertRules/outliers"].state == RESOLVED  # window 1 is clear
    assert burn_alert.trigger_window.index == 1

    accuracy = {m.metric: m for m in performance.performance_report.metrics}[
        pb.PERFORMANCE_METRIC_ACCURACY
    ]
    performance_alert = after_labels["alertRules/accuracy"]
    assert performance.performance_report.labelled_rows == WINDOW
    assert accuracy.value == pytest.approx(0.5)
    assert performance_alert.state == FIRING
    assert performance_alert.value == pytest.approx(accuracy.value)
    assert performance_alert.threshold == pytest.approx(accuracy.registered_value - 0.05)
    assert performance_alert.trigger_window.index == 2


async def test_acknowledging_an_alert(suite: Suite) -> None:
    windows = await monitored(suite)
    rule = await create_rule(suite, "outliers", **outliers())
    await windows.outlying()
    (alert,) = await alerts(suite)

    acknowledged = await acknowledge(suite, alert.name, comment="looking into it")
    again = await acknowledge(suite, alert.name, comment="a retry")
    await windows.outlying()  # the condition still holds
    updated = await get_alert(suite, alert.name)

    assert acknowledged.state == ACKNOWLEDGED
    assert acknowledged.acknowledged_by == ANONYMOUS
    assert acknowledged.acknowledge_comment == "looking into it"
    assert acknowledged.HasField("acknowledge_time")
    assert again == acknowledged  # unchanged
    assert updated.state == ACKNOWLEDGED  # an update keeps the acknowledgement
    assert updated.acknowledge_comment == "looking into it"
    assert updated.breached_windows == 2
    for name, comment, code in [
        ("alerts/alert-nope", "", grpc.StatusCode.NOT_FOUND),
        ("alerts/", "", grpc.StatusCode.INVALID_ARGUMENT),
        ("alertRules/outliers", "", grpc.StatusCode.INVALID_ARGUMENT),
        (alert.name, "x" * 1025, grpc.StatusCode.INVALID_ARGUMENT),
    ]:
        await expect_error(acknowledge(suite, name, comment), code)

    await suite.monitor.DeleteAlertRule(rpc.DeleteAlertRuleRequest(name=rule.name), timeout=10)
    resolved = await get_alert(suite, alert.name)
    error = await refused(acknowledge(suite, alert.name), grpc.StatusCode.FAILED_PRECONDITION)

    assert resolved.state == RESOLVED
    assert "the rule was deleted" in resolved.summary
    assert resolved.acknowledged_by == ANONYMOUS  # the history is kept
    assert error.reason == "ALERT_RESOLVED"
    await expect_error(
        suite.monitor.GetAlert(rpc.GetAlertRequest(name="alerts/alert-nope"), timeout=10),
        grpc.StatusCode.NOT_FOUND,
    )
    await expect_error(
        suite.monitor.GetAlert(rpc.GetAlertRequest(name="alerts/Nope"), timeout=10),
        grpc.StatusCode.INVALID_ARGUMENT,
    )


async def test_alerts_are_listed_filtered_ordered_and_paged(suite: Suite) -> None:
    windows = await monitored(suite)
    await create_rule(suite, "a", **outliers(0.2))
    rule_b = await create_rule(suite, "b", **outliers(0.3, severity=pb.ALERT_SEVERITY_INFO))
    await windows.outlying()  # opens a and b
    await suite.monitor.DeleteAlertRule(rpc.DeleteAlertRuleRequest(name=rule_b.name), timeout=10)
    await create_rule(suite, "c", **outliers(0.25))
    await windows.outlying()  # updates a, opens c

    newest = await alerts(suite)
    oldest = await alerts(suite, order_by="open_time asc")
    firing = await alerts(suite, filter="state = FIRING")
    either = await alerts(
        suite,
        filter='model = "models/fraud" AND (alert_rule = "alertRules/b" OR severity = INFO)',
    )
    by_time = await alerts(suite, filter=f'open_time > "{oldest[1].open_time.ToJsonString()}"')
    first = await suite.monitor.ListAlerts(rpc.ListAlertsRequest(page_size=2), timeout=10)
    rest = await suite.monitor.ListAlerts(
        rpc.ListAlertsRequest(page_size=2, page_token=first.next_page_token), timeout=10
    )

    def key(alert: pb.Alert) -> tuple[int, str]:
        return alert.open_time.ToMicroseconds(), alert.name

    assert len(newest) == 3
    assert [a.name for a in oldest] == [a.name for a in sorted(newest, key=key)]
    assert [a.name for a in newest] == [a.name for a in reversed(oldest)]
    assert next(a.alert_rule for a in newest) == "alertRules/c"
    assert sorted(a.alert_rule for a in firing) == ["alertRules/a", "alertRules/c"]
    assert [a.alert_rule for a in either] == ["alertRules/b"]
    assert [a.alert_rule for a in by_time] == ["alertRules/c"]
    assert [a.name for a in [*first.alerts, *rest.alerts]] == [a.name for a in newest]
    assert first.next_page_token
    assert not rest.next_page_token
    for fields in (
        {"order_by": "severity"},
        {"order_by": "open_time sideways"},
        {"page_size": -1},
        {"filter": "state = OPEN"},
        {"filter": "(state = FIRING"},
        {"filter": "state = FIRING OR"},
        {"page_token": "nope"},
        {"page_size": 2, "page_token": first.next_page_token, "order_by": "open_time asc"},
    ):
        await expect_error(alerts(suite, **fields), grpc.StatusCode.INVALID_ARGUMENT)


async def next_event(call: Any) -> rpc.WatchAlertsResponse:
    event = await asyncio.wait_for(call.read(), 30)
    assert event is not grpc.aio.EOF
    response: rpc.WatchAlertsResponse = event
    return response


async def test_watching_alerts(suite: Suite) -> None:
    windows = await monitored(suite)
    first_rule = await create_rule(suite, "first", **outliers())
    await windows.outlying()  # opens the first rule's alert
    (existing,) = await alerts(suite)

    watch = suite.monitor.WatchAlerts(rpc.WatchAlertsRequest(), timeout=60)
    snapshot = await next_event(watch)
    await create_rule(suite, "second", **outliers(0.3))
    await windows.outlying()  # updates the first alert, opens the second
    await acknowledge(suite, existing.name)
    await suite.monitor.DeleteAlertRule(
        rpc.DeleteAlertRuleRequest(name=first_rule.name), timeout=10
    )
    changes = [await next_event(watch) for _ in range(4)]
    watch.cancel()

    assert snapshot.type == EXISTING
    assert snapshot.alert == existing
    assert snapshot.sequence >= 1
    assert [(c.type, c.alert.alert_rule) for c in changes] == [
        (UPDATED, "alertRules/first"),
        (OPENED, "alertRules/second"),
        (ACKED, "alertRules/first"),
        (RESOLVED_EVENT, "alertRules/first"),
    ]
    sequences = [c.sequence for c in changes]
    assert sequences == list(range(snapshot.sequence + 1, snapshot.sequence + 5))
    assert changes[0].alert.breached_windows == 2
    assert changes[2].alert.state == ACKNOWLEDGED
    assert changes[3].alert.state == RESOLVED
    assert changes[3].alert == await get_alert(suite, existing.name)

    # Reconnecting after the first change replays the rest, without a snapshot.
    resumed = suite.monitor.WatchAlerts(
        rpc.WatchAlertsRequest(resume_after_sequence=changes[0].sequence), timeout=60
    )
    replayed = [await next_event(resumed) for _ in range(3)]
    resumed.cancel()
    assert [(r.type, r.sequence, r.alert) for r in replayed] == [
        (c.type, c.sequence, c.alert) for c in changes[1:]
    ]

    # A filtered watch: a snapshot of the second rule's open alert, then its changes.
    filtered = suite.monitor.WatchAlerts(
        rpc.WatchAlertsRequest(filter='alert_rule = "alertRules/second" AND state != RESOLVED'),
        timeout=60,
    )
    second_snapshot = await next_event(filtered)
    await windows.outlying()
    second_update = await next_event(filtered)
    filtered.cancel()
    assert (second_snapshot.type, second_snapshot.alert.alert_rule) == (
        EXISTING,
        "alertRules/second",
    )
    assert second_snapshot.sequence == changes[1].sequence  # its latest event
    assert (second_update.type, second_update.alert.breached_windows) == (UPDATED, 2)
    assert second_update.sequence > changes[3].sequence

    for request in (
        rpc.WatchAlertsRequest(resume_after_sequence=-1),
        rpc.WatchAlertsRequest(filter="colour = red"),
        rpc.WatchAlertsRequest(filter='open_time > "2025-01-01T00:00:00Z"'),
    ):
        await expect_error(
            suite.monitor.WatchAlerts(request, timeout=10).read(),
            grpc.StatusCode.INVALID_ARGUMENT,
        )


async def test_old_alert_events_are_purged_up_to_the_latest_of_an_open_alert(
    suite: Suite,
) -> None:
    windows = await monitored(suite)
    watch = suite.monitor.WatchAlerts(rpc.WatchAlertsRequest(), timeout=60)  # nothing open yet
    first_rule = await create_rule(suite, "first", **outliers())
    await windows.outlying()  # opens the first rule's alert
    await create_rule(suite, "second", **outliers(0.3))
    await windows.outlying()  # updates the first alert, opens the second
    await suite.monitor.DeleteAlertRule(
        rpc.DeleteAlertRuleRequest(name=first_rule.name), timeout=10
    )  # resolves the first
    events = [await next_event(watch) for _ in range(4)]
    watch.cancel()
    assert [(e.type, e.alert.alert_rule) for e in events] == [
        (OPENED, "alertRules/first"),
        (UPDATED, "alertRules/first"),
        (OPENED, "alertRules/second"),
        (RESOLVED_EVENT, "alertRules/first"),
    ]

    # A month and a day later every event is past the 30 days, but the open
    # second alert's latest event, and all after it, stay.
    await suite.parts.evaluator.purge(int((time.time() + 31 * 86_400) * 1e6))

    error = await refused(
        suite.monitor.WatchAlerts(
            rpc.WatchAlertsRequest(resume_after_sequence=events[0].sequence), timeout=10
        ).read(),
        grpc.StatusCode.FAILED_PRECONDITION,
    )
    assert error.reason == "EVENTS_PURGED"
    resumed = suite.monitor.WatchAlerts(
        rpc.WatchAlertsRequest(resume_after_sequence=events[1].sequence), timeout=60
    )
    replayed = [await next_event(resumed) for _ in range(2)]
    resumed.cancel()
    assert [r.sequence for r in replayed] == [events[2].sequence, events[3].sequence]
    snapshot = suite.monitor.WatchAlerts(rpc.WatchAlertsRequest(), timeout=60)
    existing = await next_event(snapshot)
    snapshot.cancel()
    assert (existing.type, existing.sequence) == (EXISTING, events[2].sequence)


async def test_a_watch_ends_with_unavailable_when_the_server_stops(suite: Suite) -> None:
    windows = await monitored(suite)
    await create_rule(suite, "outliers", **outliers())
    await windows.outlying()
    watch = suite.monitor.WatchAlerts(rpc.WatchAlertsRequest(), timeout=60)
    snapshot = await next_event(watch)

    await suite.parts.server.shutdown()

    error = await refused(asyncio.wait_for(watch.read(), 30), grpc.StatusCode.UNAVAILABLE)
    assert error.metadata["resume_after_sequence"] == str(snapshot.sequence)


async def test_disabling_or_deleting_a_rule_resolves_its_alerts(suite: Suite) -> None:
    windows = await monitored(suite)
    kept = await create_rule(suite, "kept", **outliers(0.2))
    paused = await create_rule(suite, "paused", **outliers(0.2))
    dropped = await create_rule(suite, "dropped", **outliers(0.2))
    await windows.outlying()
    opened = {a.alert_rule: a for a in await alerts(suite)}

    await suite.monitor.UpdateAlertRule(
        rpc.UpdateAlertRuleRequest(
            alert_rule=pb.AlertRule(name=paused.name, disabled=True),
            update_mask={"paths": ["disabled"]},
        ),
        timeout=10,
    )
    await suite.monitor.DeleteAlertRule(rpc.DeleteAlertRuleRequest(name=dropped.name), timeout=10)
    after = {a.alert_rule: a for a in await alerts(suite)}
    await windows.outlying()  # the disabled rule is not evaluated
    while_disabled = await alerts(suite, filter=f'alert_rule = "{paused.name}"')
    await suite.monitor.UpdateAlertRule(
        rpc.UpdateAlertRuleRequest(
            alert_rule=pb.AlertRule(name=paused.name, disabled=False),
            update_mask={"paths": ["disabled"]},
        ),
        timeout=10,
    )
    await windows.outlying()  # enabled again: a new incident
    reenabled = await alerts(suite, filter=f'alert_rule = "{paused.name}"', order_by="open_time")

    assert set(opened) == {kept.name, paused.name, dropped.name}
    assert after[kept.name].state == FIRING
    assert after[paused.name].state == RESOLVED
    assert "the rule was disabled" in after[paused.name].summary
    assert after[dropped.name].state == RESOLVED
    assert "the rule was deleted" in after[dropped.name].summary
    assert [a.state for a in while_disabled] == [RESOLVED]
    assert [a.state for a in reenabled] == [RESOLVED, FIRING]
    assert reenabled[1].breached_windows == 1


async def test_a_changed_condition_keeps_the_open_alert(suite: Suite) -> None:
    windows = await monitored(suite)
    rule = await create_rule(suite, "outliers", **outliers(0.2, trigger_windows=1))
    await windows.outlying()
    (alert,) = await alerts(suite)

    await suite.monitor.UpdateAlertRule(
        rpc.UpdateAlertRuleRequest(
            alert_rule=pb.AlertRule(
                name=rule.name, outliers=pb.OutlierCondition(max_outlier_rate=0.3)
            ),
            update_mask={"paths": ["outliers"]},
        ),
        timeout=10,
    )
    await windows.outlying()  # still breaching under the new condition
    updated = await alerts(suite)
    await windows.stable()
    resolved = await alerts(suite)

    assert [(a.name, a.state, a.breached_windows) for a in updated] == [(alert.name, FIRING, 2)]
    assert updated[0].threshold == pytest.approx(0.3)
    assert [(a.name, a.state) for a in resolved] == [(alert.name, RESOLVED)]


async def test_a_rollback_action_moves_production_back(suite: Suite) -> None:
    first = await suite.register("fraud")
    windows = await monitored(suite, create=False, seed=5)  # v2, now in production
    rule = await create_rule(
        suite,
        "rollback",
        model_version=windows.version,
        actions=[pb.AlertAction(rollback=pb.RollbackAction())],
        **outliers(),
    )

    await windows.outlying()
    await suite.parts.alerts.settled()

    (alert,) = await alerts(suite)
    aliases = await suite.registry.ListAliases(
        registry_rpc.ListAliasesRequest(parent="models/fraud"), timeout=10
    )
    production = {a.name: a for a in aliases.aliases}["models/fraud/aliases/production"]
    assert windows.version != first
    assert alert.alert_rule == rule.name
    assert len(alert.actions) == 1
    action = alert.actions[0]
    assert action.kind == pb.ACTION_KIND_ROLLBACK
    assert action.state == pb.ACTION_STATE_SUCCEEDED, action.message
    assert list(action.resources) == ["models/fraud@production"]
    assert action.HasField("start_time")
    assert action.HasField("end_time")
    assert production.version == first
    assert alert.state == FIRING  # the action does not resolve the alert
