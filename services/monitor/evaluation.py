"""What happens when a window closes, and on every evaluation tick.

A closed window gets its drift, performance and operations reports computed
once, stored (the history alerts and ``/metrics`` read; a drift report asked
for later is served from there), its features packed as columns (a report
computed later reads those, :mod:`.packed_windows`), exported to
Prometheus, and handed to the listeners (alert rules, canary analysis). The
tick closes time windows whose end has passed and purges rows past their
model's retention (and alert events past theirs). Work runs in one
background task, in order, so a burst of closed windows queues here instead
of slowing ingest.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import Final

from conveyor.monitor.v1 import resources_pb2 as pb
from conveyor.services.monitor import config as configs
from conveyor.services.monitor import packed_windows, reports
from conveyor.services.monitor.alerting import SloMeasurement, WindowFindings
from conveyor.services.monitor.ingest import VersionProfile
from conveyor.services.monitor.metrics import MonitorMetrics
from conveyor.services.monitor.packed_windows import FeatureRows
from conveyor.services.monitor.profiles import VersionProfiles
from conveyor.services.monitor.store import MonitorStore
from conveyor.services.monitor.window_rows import WindowRows
from conveyor.shared.errors import ConveyorError
from conveyor.shared.workers import WorkerThreads

logger = logging.getLogger(__name__)

FindingsListener = Callable[[WindowFindings], Awaitable[None]]
SloMeasurer = Callable[[str, pb.Window], Awaitable[dict[str, SloMeasurement]]]
MAX_QUEUED: Final = 10_000


class WindowEvaluator:
    """Reports for every closed window, then the listeners, in order."""

    def __init__(
        self,
        store: MonitorStore,
        profiles: VersionProfiles,
        workers: WorkerThreads,
        metrics: MonitorMetrics,
        *,
        measure_slos: SloMeasurer,
        listeners: list[FindingsListener],
        tick_interval: timedelta,
        purge_interval: timedelta,
        purge_alert_events: Callable[[int], int],
        alert_event_retention: timedelta,
    ) -> None:
        self._store = store
        self._profiles = profiles
        self._workers = workers
        self._metrics = metrics
        self._measure_slos = measure_slos
        self._listeners = listeners
        self._tick_s = tick_interval.total_seconds()
        self._purge_s = purge_interval.total_seconds()
        self._purge_alert_events = purge_alert_events
        self._alert_event_retention_us = int(alert_event_retention.total_seconds() * 1_000_000)
        self._queue: asyncio.Queue[tuple[str, int]] = asyncio.Queue(MAX_QUEUED)
        self._tasks: list[asyncio.Task[None]] = []
        self.evaluated = 0
        """Windows evaluated so far (tests wait on it)."""
        self._idle = asyncio.Event()
        self._idle.set()

    def start(self) -> None:
        self._tasks = [
            asyncio.ensure_future(self._work()),
            asyncio.ensure_future(self._tick()),
        ]

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def windows_closed(self, closed: list[tuple[str, int]]) -> None:
        """Queue closed windows (dropped with a warning when the queue is full:
        their reports can still be asked for; only their alert evaluation is lost)."""
        for window in closed:
            try:
                self._queue.put_nowait(window)
                self._idle.clear()
            except asyncio.QueueFull:
                logger.warning("window evaluation queue full; %s window %d skipped", *window)

    async def settled(self) -> None:
        """Wait until every queued window has been evaluated."""
        await self._idle.wait()

    async def _work(self) -> None:
        while True:
            model_version, index = await self._queue.get()
            try:
                await self.evaluate(model_version, index)
            except Exception:
                logger.exception("evaluating %s window %d failed", model_version, index)
            finally:
                self.evaluated += 1
                if self._queue.empty():
                    self._idle.set()

    async def evaluate(self, model_version: str, index: int) -> WindowFindings | None:
        """Compute, store and export the window's reports, then tell the listeners."""
        try:
            profile = await self._profiles.get(model_version)
        except ConveyorError as error:
            logger.warning("cannot evaluate %s window %d: %s", model_version, index, error.message)
            return None
        stored = await self._workers.run(self._store.window, model_version, index)
        if stored is None:
            return None
        window = stored.to_proto()
        rows = await self._workers.run(
            self._store.window_rows,
            model_version,
            index=index,
            numerical_columns=len(profile.schema.numerical),
            categorical_columns=len(profile.schema.categorical),
        )
        operations = reports.operations_report(model_version, window, rows)
        # Sorted once: for this drift report and for every later one (packed).
        features = await self._workers.run(packed_windows.sorted_features, rows)
        drift, performance = await self._workers.run(
            _quality_reports, profile, window, rows, features
        )
        for kind, report in (
            ("operations", operations),
            ("drift", drift),
            ("performance", performance),
        ):
            if report is not None:
                await self._workers.run(
                    self._store.put_report,
                    model_version,
                    index,
                    kind,
                    report,
                    settings_time_us=profile.settings_time_us,
                )
        if rows.status_codes.size:
            await self._workers.run(
                packed_windows.put,
                self._store.engine,
                model_version,
                index,
                features,
                stored_rows=int(rows.status_codes.size),
            )
        self._metrics.observe_operations(operations)
        if drift is not None:
            self._metrics.observe_drift(drift)
        if performance is not None:
            self._metrics.observe_performance(performance)
        findings = WindowFindings(
            model_version=model_version,
            window=window,
            drift=drift,
            performance=performance,
            operations=operations,
            slos=await self._measure_slos(model_version, window),
        )
        for listener in self._listeners:
            try:
                await listener(findings)
            except Exception:
                logger.exception("a window listener failed on %s window %d", model_version, index)
        return findings

    async def _tick(self) -> None:
        last_purge = 0.0
        while True:
            await asyncio.sleep(self._tick_s)
            try:
                now = time.time_ns() // 1000
                expired = await self._workers.run(self._store.close_expired, now)
                self.windows_closed(expired)
                if time.monotonic() - last_purge >= self._purge_s:
                    await self.purge(now)
                    last_purge = time.monotonic()
            except Exception:
                logger.exception("the evaluation tick failed")

    async def purge(self, now_us: int) -> int:
        """Delete rows older than each model's retention, and alert events
        older than theirs; returns the prediction rows deleted."""
        stored = await self._workers.run(self._store.configs)
        retention = {
            c.name.removesuffix("/monitoringConfig"): configs.resolve(c).privacy.retention
            for c in stored
        }
        deleted = await self._workers.run(
            self._store.purge, retention, configs.DEFAULT_RETENTION, now_us
        )
        if deleted:
            logger.info("purged %d prediction rows past their retention", deleted)
        events = await self._workers.run(
            self._purge_alert_events, now_us - self._alert_event_retention_us
        )
        if events:
            logger.info("purged %d alert events past their retention", events)
        return deleted


def _quality_reports(
    profile: VersionProfile, window: pb.Window, rows: WindowRows, features: FeatureRows
) -> tuple[pb.DriftReport | None, pb.PerformanceReport | None]:
    """Drift (from ``features``, the rows' sorted columns) and performance,
    where the version's reference allows them."""
    reference, data = profile.reference, profile.reference_data
    if reference is None or data is None or rows.outputs.shape[0] == 0:
        return None, None
    drift = reports.drift_report(profile, reference, data, window, features, distributions=False)
    performance = None
    if reference.output_type != pb.OUTPUT_TYPE_UNSPECIFIED:
        performance = reports.performance_report(profile, reference.output_type, window, rows)
    return drift, performance
