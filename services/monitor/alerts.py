"""The alert engine: evaluates every rule at each window close, keeps one
alert per incident, runs the rules' actions, and wakes ``WatchAlerts``.

The rule logic (conditions, hysteresis) is :mod:`.alerting`'s and SLO
arithmetic :mod:`.slo`'s; this module joins them to the store, the actions
and the watchers. Changes are stored before watchers hear of them, so a
watcher that reconnects with its last sequence misses nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import AsyncIterator, Coroutine, Sequence
from datetime import UTC, datetime
from typing import Any, Final

from conveyor.monitor.v1 import resources_pb2 as pb
from conveyor.services.monitor import slo as slos
from conveyor.services.monitor.actions import ActionRunner
from conveyor.services.monitor.alert_store import AlertEvent, AlertStore
from conveyor.services.monitor.alerting import (
    RuleState,
    SloMeasurement,
    WindowFindings,
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
        self._lock = asyncio.Lock()

    def start(self) -> None:
        """Nothing runs between windows: actions start as alerts open."""

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
        """What a rule names must exist and fit: its SLO (of the same model) and,
        for a feature drift condition on a version, the feature in its schema."""
        violations: list[FieldViolation] = []
        condition = rule.WhichOneof("condition")
        if condition == "slo":
            name = rule.slo.service_level_objective
            try:
                slo = await self._workers.run(self._store.slo, name)
            except NotFoundError:
                raise NotFoundError(f"{name} does not exist", reason="SLO_NOT_FOUND") from None
            if slo.model != rule.model:
                violations.append(
                    FieldViolation(
                        "alert_rule.slo.service_level_objective",
                        f"{name} is on {slo.model}, not {rule.model}",
                    )
                )
        if (
            condition == "drift"
            and rule.drift.scope == pb.DRIFT_SCOPE_FEATURE
            and rule.model_version
        ):
            profile = await self._profiles.get(rule.model_version)
            if rule.drift.feature not in {f.name for f in profile.schema.features}:
                violations.append(
                    FieldViolation(
                        "alert_rule.drift.feature",
                        f"{rule.model_version} has no feature {rule.drift.feature!r}",
                    )
                )
        raise_if_any(violations, "invalid alert rule")

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
        state = RuleState()
        if stored is not None:
            open_alert = None
            opened = [
                a
                for a in await self._workers.run(self._store.open_alerts, rule.name)
                if a.model_version == version
            ]
            if opened:
                open_alert = opened[0]
            state = RuleState.from_json(stored, open_alert)
        result = evaluate_condition(rule, findings)
        after, transitions = advance(
            rule,
            state,
            result,
            findings,
            now=datetime.now(UTC),
            new_alert_name=lambda: f"alerts/{uuid.uuid4().hex[:20]}",
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
        self._notify()
        for event in events:
            logger.info(
                "alert %s: %s (%s)",
                pb.AlertEventType.Name(event.type).removeprefix("ALERT_EVENT_TYPE_").lower(),
                event.alert.name,
                event.alert.summary,
            )
            if event.type == pb.ALERT_EVENT_TYPE_OPENED and rule.actions:
                self._spawn(self._run_actions(rule, event.alert))

    async def resolve_rule(self, rule_name: str, *, reason: str) -> None:
        """Resolve the rule's open alerts (deleted or disabled rule)."""
        async with self._lock:
            now = datetime.now(UTC)
            opened = await self._workers.run(self._store.open_alerts, rule_name)
            changes = [
                (pb.ALERT_EVENT_TYPE_RESOLVED, resolve(a, now=now, reason=reason)) for a in opened
            ]
            if changes:
                await self.record(changes)
        await self._export_open_alerts()

    async def record(
        self, changes: Sequence[tuple[pb.AlertEventType.ValueType, pb.Alert]]
    ) -> list[AlertEvent]:
        """Store alert changes made outside rule evaluation and wake watchers."""
        events = await self._workers.run(self._store.record, changes)
        self._notify()
        return events

    # -- actions ---------------------------------------------------------------------

    async def _run_actions(self, rule: pb.AlertRule, alert: pb.Alert) -> None:
        """Run the rule's actions in order, storing each one's progress."""
        for index, action in enumerate(rule.actions):
            current = await self._workers.run(self._store.alert, alert.name)
            current.actions[index].state = pb.ACTION_STATE_RUNNING
            current.actions[index].start_time.GetCurrentTime()
            await self.record([(pb.ALERT_EVENT_TYPE_UPDATED, current)])
            execution = await self._actions.run(current, action)
            finished = await self._workers.run(self._store.alert, alert.name)
            finished.actions[index].CopyFrom(execution)
            finished.update_time.GetCurrentTime()
            await self.record([(pb.ALERT_EVENT_TYPE_UPDATED, finished)])

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(work)
        self._tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            logger.error("an alert action failed", exc_info=task.exception())

    # -- helpers ----------------------------------------------------------------------

    def _notify(self) -> None:
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
