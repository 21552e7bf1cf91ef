"""The alert engine: evaluates every rule at each window close, keeps one
alert per incident, runs the rules' actions, and wakes ``WatchAlerts``.

The rule logic (conditions, hysteresis) is :mod:`.alerting`'s and SLO
arithmetic :mod:`.slo`'s; this module joins them to the store, the actions
and the watchers. Changes are stored before watchers hear of them, so a
watcher that reconnects with its last sequence misses nothing.

Every read-modify-write of alerts and rule states (window evaluation,
acknowledgements, action progress, rule updates and deletions) runs under one
lock, so none of them overwrites another's change: an acknowledgement is
never lost to a window that updates the same alert, nor an action's outcome.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import AsyncIterator, Callable, Coroutine, Sequence
from datetime import UTC, datetime
from typing import Any, Final

from conveyor.monitor.v1 import resources_pb2 as pb
from conveyor.services.monitor import slo as slos
from conveyor.services.monitor.actions import ActionRunner
from conveyor.services.monitor.alert_store import AlertEvent, AlertStore, Change
from conveyor.services.monitor.alerting import (
    RuleState,
    SloMeasurement,
    WindowFindings,
    acknowledge,
    advance,
    applies_to,
    evaluate_condition,
    resolve,
)
from conveyor.services.monitor.metrics import MonitorMetrics
from conveyor.services.monitor.profiles import VersionProfiles
from conveyor.shared.errors import (
    FieldViolation,
    NotFoundError,
    ResourceExhaustedError,
    raise_if_any,
)
from conveyor.shared.workers import WorkerThreads

logger = logging.getLogger(__name__)

MAX_WATCHES: Final = 256
_UNFINISHED: Final = (pb.ACTION_STATE_PENDING, pb.ACTION_STATE_RUNNING)


def new_alert_name() -> str:
    """A fresh ``alerts/{id}``; ids start with a letter, as every id must."""
    return f"alerts/alert-{uuid.uuid4().hex[:16]}"


class _Watch:
    """One watcher's wake-up: set on every stored change and on shutdown."""

    def __init__(self, stopping: asyncio.Event) -> None:
        self._changed = asyncio.Event()
        self._stopping = stopping

    def notify(self) -> None:
        self._changed.set()

    async def wait_or_stop(self, timeout_s: float) -> bool:
        """Wait for a change (or ``timeout_s``); True once the server is stopping."""
        if self._stopping.is_set():
            return True
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._changed.wait(), timeout_s)
        self._changed.clear()
        return self._stopping.is_set()


class AlertEngine:
    """Rules evaluated per closed window; alerts stored, acted on and watched."""

    def __init__(
        self,
        store: AlertStore,
        profiles: VersionProfiles,
        actions: ActionRunner,
        workers: WorkerThreads,
        metrics: MonitorMetrics,
    ) -> None:
        self._store = store
        self._profiles = profiles
        self._actions = actions
        self._workers = workers
        self._metrics = metrics
        self._watches: set[_Watch] = set()
        self._stopping = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()
        self._acting: set[str] = set()
        """Alerts whose actions a task of this engine is running."""
        self._lock = asyncio.Lock()

    def start(self) -> None:
        """Finish the actions a previous run left PENDING or RUNNING (it
        stopped while they ran); otherwise nothing runs between windows."""
        self._spawn(self._resume_actions())

    async def close(self) -> None:
        self.stop_watches()
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def stop_watches(self) -> None:
        """End every ``WatchAlerts`` stream (the server is draining)."""
        self._stopping.set()
        for watch in self._watches:
            watch.notify()

    async def settled(self) -> None:
        """Wait for every running action (tests and shutdown)."""
        while self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    @contextlib.asynccontextmanager
    async def watching(self) -> AsyncIterator[_Watch]:
        """A wake-up for one ``WatchAlerts`` stream; RESOURCE_EXHAUSTED when
        :data:`MAX_WATCHES` are open."""
        if len(self._watches) >= MAX_WATCHES:
            raise ResourceExhaustedError(
                f"{MAX_WATCHES} alert watches are open; retry later", reason="TOO_MANY_WATCHES"
            )
        watch = _Watch(self._stopping)
        self._watches.add(watch)
        try:
            yield watch
        finally:
            self._watches.discard(watch)

    # -- SLOs ----------------------------------------------------------------------

    async def with_status(self, slo: pb.ServiceLevelObjective) -> pb.ServiceLevelObjective:
        """The SLO with its compliance over the rolling period, exported to Prometheus."""
        now = datetime.now(UTC)
        since = now - slos.resolved_rolling_period(slo)
        good, total = await self._workers.run(
            self._store.slo_counts, slo, since_us=int(since.timestamp() * 1e6)
        )
        result = pb.ServiceLevelObjective()
        result.CopyFrom(slo)
        result.status.CopyFrom(slos.slo_status(slo, good=good, total=total, evaluate_time=now))
        self._metrics.observe_slo(result)
        return result

    def forget_slo(self, name: str) -> None:
        self._metrics.forget_slo(name)

    async def measure_slos(
        self, model_version: str, window: pb.Window
    ) -> dict[str, SloMeasurement]:
        """Each SLO covering the version: its status now and the window's own counts."""
        model = model_version.split("/versions/")[0]
        found: dict[str, SloMeasurement] = {}
        for slo in await self._workers.run(self._store.all_slos):
            if slo.model != model or (slo.model_version and slo.model_version != model_version):
                continue
            measured = await self.with_status(slo)
            good, total = await self._workers.run(
                self._store.slo_counts, slo, model_version=model_version, window_index=window.index
            )
            found[slo.name] = SloMeasurement(measured, measured.status, good, total)
        return found

    # -- rules ---------------------------------------------------------------------

    async def check_references(self, rule: pb.AlertRule) -> None:
        """What a rule names must exist and fit: its SLO (NOT_FOUND; of the
        same model, INVALID_ARGUMENT) and, for a feature drift condition on a
        version, the feature in the version's schema (INVALID_ARGUMENT)."""
        violations: list[FieldViolation] = []
        condition = rule.WhichOneof("condition")
        if condition == "slo":
            name = rule.slo.service_level_objective
            slo = await self._workers.run(self._store.slo, name)
            if slo.model != rule.model:
                violations.append(
                    FieldViolation(
                        "alert_rule.slo.service_level_objective",
                        f"{name} is on {slo.model}, not {rule.model}",
                    )
                )
            elif slo.model_version and rule.model_version not in ("", slo.model_version):
                violations.append(
                    FieldViolation(
                        "alert_rule.slo.service_level_objective",
                        f"{name} counts only {slo.model_version}, not {rule.model_version}",
                    )
                )
        if (
            condition == "drift"
            and rule.drift.scope == pb.DRIFT_SCOPE_FEATURE
            and rule.model_version
        ):
            profile = await self._profiles.get(rule.model_version)
            names = [f.name for f in profile.schema.features]
            if rule.drift.feature not in names:
                violations.append(
                    FieldViolation(
                        "alert_rule.drift.feature",
                        f"{rule.model_version} has no feature {rule.drift.feature!r}; "
                        f"its features: {', '.join(names[:20]) or 'none'}",
                    )
                )
        raise_if_any(violations, "invalid alert rule")
        for action in rule.actions:
            if action.HasField("retrain") and action.retrain.training_job:
                await self._actions.check_training_job(action.retrain.training_job)

    async def on_window(self, findings: WindowFindings) -> None:
        """Advance every enabled rule that watches the window's version."""
        async with self._lock:
            for rule in await self._workers.run(self._store.all_rules):
                if rule.disabled or not applies_to(rule, findings.model_version):
                    continue
                await self._advance(rule, findings)
        await self._export_open_alerts()

    async def _advance(self, rule: pb.AlertRule, findings: WindowFindings) -> None:
        version = findings.model_version
        stored = await self._workers.run(self._store.rule_state, rule.name, version)
        opened = await self._workers.run(self._store.open_alerts, rule.name, version)
        open_alert = opened[0] if opened else None
        # Without a stored state (a new rule, or a changed condition restarted
        # its streaks) an open alert still stands for the incident: it is
        # updated or resolved, never joined by a second one.
        state = (
            RuleState(open_alert=open_alert)
            if stored is None
            else RuleState.from_json(stored, open_alert)
        )
        result = evaluate_condition(rule, findings)
        after, transitions = advance(
            rule,
            state,
            result,
            findings,
            now=datetime.now(UTC),
            new_alert_name=new_alert_name,
        )
        if after == state and not transitions:
            return
        events = await self._workers.run(
            self._store.record,
            [(t.event_type, t.alert) for t in transitions],
            rule_name=rule.name,
            model_version=version,
            state=after.to_json(),
        )
        self._announce(events)
        for event in events:
            if event.type == pb.ALERT_EVENT_TYPE_OPENED and rule.actions:
                self._acting.add(event.alert.name)
                self._spawn(self._run_actions(rule, event.alert.name, 0))

    async def update_rule(
        self, name: str, change: Callable[[pb.AlertRule], pb.AlertRule]
    ) -> pb.AlertRule:
        """Store ``change(current rule)``. A changed condition or scope
        restarts the rule's streaks; disabling it resolves its open alerts, and
        narrowing its scope resolves those on versions it no longer watches."""
        async with self._lock:
            current = await self._workers.run(self._store.rule, name)
            updated = change(current)
            now = datetime.now(UTC)
            changes: list[Change] = []
            for alert in await self._workers.run(self._store.open_alerts, name):
                if updated.disabled:
                    reason = "the rule was disabled"
                elif not applies_to(updated, alert.model_version):
                    reason = f"the rule no longer watches {alert.model_version}"
                else:
                    continue
                changes.append(
                    (pb.ALERT_EVENT_TYPE_RESOLVED, resolve(alert, now=now, reason=reason))
                )
            reset = (
                _condition(updated) != _condition(current)
                or updated.model_version != current.model_version
                or updated.disabled != current.disabled
            )
            events = await self._workers.run(
                self._store.replace_rule, updated, reset_state=reset, changes=changes
            )
        self._announce(events)
        await self._export_open_alerts()
        return updated

    async def delete_rule(self, name: str) -> None:
        """Delete the rule and resolve its open alerts, at once."""
        async with self._lock:
            now = datetime.now(UTC)
            changes: list[Change] = [
                (pb.ALERT_EVENT_TYPE_RESOLVED, resolve(a, now=now, reason="the rule was deleted"))
                for a in await self._workers.run(self._store.open_alerts, name)
            ]
            events = await self._workers.run(self._store.delete_rule, name, changes=changes)
        self._announce(events)
        await self._export_open_alerts()

    # -- alerts --------------------------------------------------------------------------

    async def acknowledge(self, name: str, *, principal: str, comment: str) -> pb.Alert:
        """Acknowledge the alert (unchanged when it already is);
        FAILED_PRECONDITION once resolved."""
        async with self._lock:
            current = await self._workers.run(self._store.alert, name)
            updated = acknowledge(
                current, principal=principal, comment=comment, now=datetime.now(UTC)
            )
            if updated.state == current.state:
                return updated
            events = await self._workers.run(
                self._store.record, [(pb.ALERT_EVENT_TYPE_ACKNOWLEDGED, updated)]
            )
        self._announce(events)
        await self._export_open_alerts()
        return updated

    # -- actions ---------------------------------------------------------------------

    async def _run_actions(self, rule: pb.AlertRule, alert_name: str, first: int) -> None:
        """Run the rule's actions from ``first`` on, in order, storing each
        one's progress (RUNNING, then its outcome) as an UPDATED event."""
        try:
            await self._run_actions_from(rule, alert_name, first)
        finally:
            self._acting.discard(alert_name)

    async def _run_actions_from(self, rule: pb.AlertRule, alert_name: str, first: int) -> None:
        for index in range(first, len(rule.actions)):

            def running(alert: pb.Alert, index: int = index) -> None:
                alert.actions[index].state = pb.ACTION_STATE_RUNNING
                alert.actions[index].start_time.GetCurrentTime()

            alert = await self._change_alert(alert_name, running)
            execution = await self._actions.run(alert, rule.actions[index])

            def finished(
                alert: pb.Alert, index: int = index, execution: pb.ActionExecution = execution
            ) -> None:
                alert.actions[index].CopyFrom(execution)

            await self._change_alert(alert_name, finished)

    async def _change_alert(self, name: str, change: Callable[[pb.Alert], None]) -> pb.Alert:
        async with self._lock:
            alert = await self._workers.run(self._store.alert, name)
            change(alert)
            alert.update_time.GetCurrentTime()
            events = await self._workers.run(
                self._store.record, [(pb.ALERT_EVENT_TYPE_UPDATED, alert)]
            )
        self._announce(events)
        return alert

    async def _resume_actions(self) -> None:
        """Run the actions that a stopped server left unfinished, from the
        first unfinished one; fail them when their alert resolved or their
        rule is gone or changed. Decided under the lock, so an alert that
        opens meanwhile has its actions run once, by its own task."""
        resumed: list[tuple[pb.AlertRule, str, int]] = []
        async with self._lock:
            abandoned: list[Change] = []
            for alert in await self._workers.run(self._store.all_alerts, newest_first=False):
                pending = [i for i, a in enumerate(alert.actions) if a.state in _UNFINISHED]
                if not pending or alert.name in self._acting:
                    continue
                try:
                    rule: pb.AlertRule | None = await self._workers.run(
                        self._store.rule, alert.alert_rule
                    )
                except NotFoundError:
                    rule = None
                if alert.state == pb.ALERT_STATE_RESOLVED:
                    message = "the monitor stopped before the action ran, and the alert resolved"
                elif rule is None or [_action_kind(a) for a in rule.actions] != [
                    a.kind for a in alert.actions
                ]:
                    message = f"{alert.alert_rule} was deleted or changed before the action ran"
                else:
                    self._acting.add(alert.name)
                    resumed.append((rule, alert.name, pending[0]))
                    continue
                for execution in alert.actions:
                    if execution.state in _UNFINISHED:
                        execution.state = pb.ACTION_STATE_FAILED
                        execution.message = message
                        execution.end_time.GetCurrentTime()
                alert.update_time.GetCurrentTime()
                abandoned.append((pb.ALERT_EVENT_TYPE_UPDATED, alert))
            events = await self._workers.run(self._store.record, abandoned) if abandoned else []
        self._announce(events)
        for rule, name, first in resumed:
            logger.info("resuming the actions of %s", name)
            self._spawn(self._run_actions(rule, name, first))

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(work)
        self._tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            logger.error("alert actions failed", exc_info=task.exception())

    # -- helpers ----------------------------------------------------------------------

    def _announce(self, events: Sequence[AlertEvent]) -> None:
        """Log stored events and wake the watchers."""
        for event in events:
            logger.info(
                "alert %s: %s (%s)",
                pb.AlertEventType.Name(event.type).removeprefix("ALERT_EVENT_TYPE_").lower(),
                event.alert.name,
                event.alert.summary,
            )
        if events:
            for watch in self._watches:
                watch.notify()

    async def _export_open_alerts(self) -> None:
        counts: dict[tuple[str, str], int] = {}
        for alert in await self._workers.run(self._store.open_alerts):
            key = (
                alert.model_version.split("/versions/")[0],
                pb.AlertSeverity.Name(alert.severity),
            )
            counts[key] = counts.get(key, 0) + 1
        try:
            self._metrics.set_open_alerts(counts)
        except ValueError as error:
            logger.warning("open alerts not exported: %s", error)


def _condition(rule: pb.AlertRule) -> tuple[str | None, bytes]:
    """The rule's condition, comparable: a change restarts the window counts."""
    which = rule.WhichOneof("condition")
    body = getattr(rule, which).SerializeToString(deterministic=True) if which else b""
    return which, body


def _action_kind(action: pb.AlertAction) -> pb.ActionKind.ValueType:
    if action.WhichOneof("action") == "rollback":
        return pb.ACTION_KIND_ROLLBACK
    return pb.ACTION_KIND_RETRAIN
