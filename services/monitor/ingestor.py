"""The ingest path: prediction batches checked whole and stored, with bounded
work in progress (RESOURCE_EXHAUSTED at once beyond it, never a growing buffer).

The checks and transforms of one version's records are :func:`.ingest.prepare`'s;
this module groups a call's records by version, finds each version's profile,
and stores the batch in one transaction (:meth:`.store.MonitorStore.ingest`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Final

from conveyor.monitor.v1 import resources_pb2 as pb
from conveyor.services.monitor.ingest import PreparedRows, SubjectHasher, VersionProfile, prepare
from conveyor.services.monitor.metrics import MonitorMetrics
from conveyor.services.monitor.profiles import VersionProfiles, exact_version
from conveyor.services.monitor.store import MonitorStore
from conveyor.shared.errors import (
    FieldViolation,
    InvalidArgumentError,
    NotFoundError,
    ResourceExhaustedError,
    invalid_field,
    raise_if_any,
)
from conveyor.shared.workers import WorkerThreads

MAX_RECORDS: Final = 10_000
RETRY_AFTER_MS: Final = "250"

WindowsClosed = Callable[[list[tuple[str, int]]], None]


def now_us() -> int:
    return time.time_ns() // 1000


class Ingestor:
    """Checks and stores prediction batches, at most ``capacity`` records at
    once over every caller (RESOURCE_EXHAUSTED beyond, at once)."""

    def __init__(
        self,
        store: MonitorStore,
        profiles: VersionProfiles,
        workers: WorkerThreads,
        hasher: SubjectHasher,
        metrics: MonitorMetrics,
        *,
        capacity: int,
        max_violations: int,
        on_windows_closed: WindowsClosed,
    ) -> None:
        self._store = store
        self._profiles = profiles
        self._workers = workers
        self._hasher = hasher
        self._metrics = metrics
        self._capacity = capacity
        self._max_violations = max_violations
        self._on_windows_closed = on_windows_closed
        self.in_flight = 0

    async def ingest(self, records: list[pb.PredictionRecord]) -> tuple[int, int]:
        """Store the batch whole or not at all: (accepted, duplicates)."""
        if not records:
            raise invalid_field("records", "required: at least one record")
        if len(records) > MAX_RECORDS:
            raise invalid_field("records", f"at most {MAX_RECORDS:,} records per message")
        if self.in_flight + len(records) > self._capacity:
            self._metrics.count_rejected("INGEST_QUEUE_FULL", len(records))
            raise ResourceExhaustedError(
                f"the ingest queue is full ({self.in_flight:,} records in progress); retry shortly",
                reason="INGEST_QUEUE_FULL",
                metadata={"retry_after_ms": RETRY_AFTER_MS},
            )
        self.in_flight += len(records)
        try:
            return await self._ingest(records)
        finally:
            self.in_flight -= len(records)

    async def _ingest(self, records: list[pb.PredictionRecord]) -> tuple[int, int]:
        by_version: dict[str, list[tuple[int, pb.PredictionRecord]]] = {}
        violations: list[FieldViolation] = []
        for index, record in enumerate(records):
            try:
                version = exact_version(
                    record.model_version, field=f"records[{index}].model_version"
                )
            except InvalidArgumentError as error:
                violations.extend(error.violations)
                continue
            by_version.setdefault(version, []).append((index, record))
        raise_if_any(violations[: self._max_violations], "invalid prediction records")
        profiles: dict[str, VersionProfile] = {}
        for version, members in by_version.items():
            try:
                profiles[version] = await self._profiles.get(version)
            except NotFoundError:
                violations.append(
                    FieldViolation(
                        f"records[{members[0][0]}].model_version",
                        f"{version} is not a version the registry knows",
                    )
                )
        raise_if_any(violations, "invalid prediction records")
        stamp = now_us()
        prepared = await self._workers.run(self._prepare, profiles, by_version, stamp)
        for _, found in prepared:
            violations.extend(found)
        if violations:
            self._metrics.count_rejected("INVALID_ARGUMENT", len(records))
        raise_if_any(violations[: self._max_violations], "invalid prediction records")
        batches = [batch for batch, _ in prepared]
        sizes = {version: profile.config.window for version, profile in profiles.items()}
        result = await self._workers.run(self._store.ingest, batches, sizes, now_us=stamp)
        for batch in batches:
            if batch.output_columns is not None:
                self._profiles.learned_outputs(batch.model_version, batch.output_columns)
        for version, (stored, repeated) in result.by_version.items():
            self._metrics.count_ingest(version, accepted=stored, duplicates=repeated)
        if result.closed_windows:
            self._on_windows_closed(result.closed_windows)
        return result.accepted, result.duplicates

    def _prepare(
        self,
        profiles: dict[str, VersionProfile],
        by_version: dict[str, list[tuple[int, pb.PredictionRecord]]],
        stamp: int,
    ) -> list[tuple[PreparedRows, list[FieldViolation]]]:
        return [
            prepare(
                profiles[version],
                members,
                hasher=self._hasher,
                now_us=stamp,
                max_violations=self._max_violations,
            )
            for version, members in by_version.items()
        ]
