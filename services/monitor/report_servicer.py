"""``conveyor.monitor.v1.MonitorService``'s reports: drift, performance,
operations and canary analysis (the rest is :mod:`.servicer`'s and
:mod:`.alert_servicer`'s; the RPC surface joins them).

A closed window's drift report is served as stored while the settings it was
computed under are current, else computed from the window's packed columns
(and kept), else from its rows; performance and operations reports are
computed from the rows' non-feature columns.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from conveyor.monitor.v1 import monitor_messages_pb2 as rpc
from conveyor.monitor.v1 import resources_pb2 as pb
from conveyor.services.monitor import packed_windows, reports
from conveyor.services.monitor.ingest import VersionProfile
from conveyor.services.monitor.packed_windows import FeatureRows
from conveyor.services.monitor.profiles import VersionProfiles, require_reference, resolve_version
from conveyor.services.monitor.store import MonitorStore
from conveyor.services.monitor.window_rows import WindowRows
from conveyor.services.monitor.windows import StoredWindow
from conveyor.shared import names
from conveyor.shared.errors import FailedPreconditionError, NotFoundError, invalid_field
from conveyor.shared.registry_client import RegistryClient
from conveyor.shared.wellknown import checked_microseconds
from conveyor.shared.workers import WorkerThreads


@dataclass(frozen=True)
class SelectedWindow:
    """The window (or time range) a report covers."""

    profile: VersionProfile
    window: pb.Window
    stored: StoredWindow | None
    """None for a time range."""
    time_range: tuple[int, int] | None
    """``[start, end)`` in microseconds, for a time range."""


class ReportServicer:
    """The report RPCs of ``MonitorService``."""

    def __init__(
        self,
        store: MonitorStore,
        profiles: VersionProfiles,
        registry: RegistryClient,
        workers: WorkerThreads,
        *,
        canary_analysis: Callable[[str], Awaitable[pb.CanaryAnalysis]],
    ) -> None:
        self._store = store
        self._profiles = profiles
        self._registry = registry
        self._workers = workers
        self._canary_analysis = canary_analysis

    async def GetDriftReport(
        self, request: rpc.GetDriftReportRequest, context: Any
    ) -> rpc.GetDriftReportResponse:
        selected = await self._select(request.model_version, request)
        reference, data = require_reference(selected.profile)
        stored = selected.stored
        if stored is not None and stored.closed and not request.include_distributions:
            # Computed when the window closed (or on an earlier request); still
            # valid unless the config or the reference changed since (or an
            # erasure removed rows of it).
            body = await self._workers.run(
                self._store.report,
                stored.model_version,
                stored.index,
                "drift",
                settings_time_us=selected.profile.settings_time_us,
            )
            if body is not None:
                return rpc.GetDriftReportResponse(drift_report=pb.DriftReport.FromString(body))
        features: FeatureRows | None = None
        if stored is not None and stored.closed:
            features = await self._workers.run(
                packed_windows.get,
                self._store.engine,
                stored.model_version,
                stored.index,
                numerical_columns=len(selected.profile.schema.numerical),
                categorical_columns=len(selected.profile.schema.categorical),
            )
        report = await self._workers.run(
            reports.drift_report,
            selected.profile,
            reference,
            data,
            selected.window,
            features if features is not None else await self._rows(selected),
            distributions=request.include_distributions,
        )
        if stored is not None and features is not None and not request.include_distributions:
            # The next request under these settings is answered from storage.
            await self._workers.run(
                self._store.keep_computed_report,
                stored.model_version,
                stored.index,
                "drift",
                report,
                settings_time_us=selected.profile.settings_time_us,
            )
        return rpc.GetDriftReportResponse(drift_report=report)

    async def GetPerformanceReport(
        self, request: rpc.GetPerformanceReportRequest, context: Any
    ) -> rpc.GetPerformanceReportResponse:
        selected = await self._select(request.model_version, request)
        reference, _ = require_reference(selected.profile)
        if reference.output_type == pb.OUTPUT_TYPE_UNSPECIFIED:
            raise FailedPreconditionError(
                f"{reference.name} does not say what the outputs are (output_type)",
                reason="OUTPUT_TYPE_UNKNOWN",
            )
        rows = await self._rows(selected, features=False)
        report = await self._workers.run(
            reports.performance_report,
            selected.profile,
            reference.output_type,
            selected.window,
            rows,
        )
        return rpc.GetPerformanceReportResponse(performance_report=report)

    async def GetOperationsReport(
        self, request: rpc.GetOperationsReportRequest, context: Any
    ) -> rpc.GetOperationsReportResponse:
        selected = await self._select(request.model_version, request)
        rows = await self._rows(selected, features=False)
        report = reports.operations_report(selected.profile.model_version, selected.window, rows)
        return rpc.GetOperationsReportResponse(operations_report=report)

    async def GetCanaryAnalysis(
        self, request: rpc.GetCanaryAnalysisRequest, context: Any
    ) -> rpc.GetCanaryAnalysisResponse:
        if not request.name.endswith("/canaryAnalysis"):
            raise invalid_field("name", "models/{model}/canaryAnalysis")
        model = names.model_name(
            names.parse_model_name(request.name.removesuffix("/canaryAnalysis"), field="name")
        )
        await self._registry.model(model)
        return rpc.GetCanaryAnalysisResponse(canary_analysis=await self._canary_analysis(model))

    async def _select(self, name: str, request: Any) -> SelectedWindow:
        """The version and the window (or time range) a report request names,
        without its rows."""
        version = await resolve_version(self._registry, name, field="model_version")
        profile = await self._profiles.get(version)
        selector = request.window
        which = selector.WhichOneof("selector")
        store = self._store
        if which == "time_range":
            start = checked_microseconds(
                selector.time_range.start_time, field="window.time_range.start_time"
            )
            end = checked_microseconds(
                selector.time_range.end_time, field="window.time_range.end_time"
            )
            if end <= start:
                raise invalid_field("window.time_range", "end_time must be after start_time")
            window = pb.Window(closed=True)
            window.start_time.CopyFrom(selector.time_range.start_time)
            window.end_time.CopyFrom(selector.time_range.end_time)
            return SelectedWindow(profile, window, None, (start, end))
        if which == "index":
            if selector.index < 0:
                raise invalid_field("window.index", "must not be negative")
            stored = await self._workers.run(store.window, version, selector.index)
            if stored is None:
                raise NotFoundError(
                    f"{version} has not reached window {selector.index}", reason="WINDOW_NOT_FOUND"
                )
        else:
            stored = await self._workers.run(
                store.latest_window, version, closed=which != "open_window"
            )
            if stored is None:
                state = "open" if which == "open_window" else "closed"
                raise FailedPreconditionError(
                    f"{version} has no {state} window yet", reason="NO_WINDOW"
                )
        return SelectedWindow(profile, stored.to_proto(), stored, None)

    async def _rows(self, selected: SelectedWindow, *, features: bool = True) -> WindowRows:
        """The selected window's (or time range's) rows; FAILED_PRECONDITION
        when retention purged them."""
        profile, stored = selected.profile, selected.stored
        rows = await self._workers.run(
            self._store.window_rows,
            profile.model_version,
            index=None if stored is None else stored.index,
            time_range=selected.time_range,
            numerical_columns=len(profile.schema.numerical),
            categorical_columns=len(profile.schema.categorical),
            features=features,
        )
        if stored is None:
            selected.window.row_count = int(rows.status_codes.size)
        elif stored.row_count and rows.status_codes.size == 0:
            raise FailedPreconditionError(
                f"the rows of {profile.model_version}'s window {stored.index} were purged "
                "by retention",
                reason="WINDOW_PURGED",
            )
        return rows
