"""``ModelStatistics`` over every serving process of one port.

Each serving process counts what it serves itself. With several processes on
one port (``CONVEYOR_INFERENCE_PROCESSES``), a client's connection reaches one
of them, so each publishes its counts — a serialised
``ModelStatisticsResponse`` in ``statistics/<pid>.pb`` under the service's
data directory, written whole (a temporary file renamed over the last) every
:data:`PUBLISH_INTERVAL_S` — and a ``ModelStatistics`` call is answered with
the answering process's live counts plus the latest published counts of the
others. Each snapshot counts every part of a request in one step, so their sum
is consistent too; the others' share is at most one interval old.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Final

from google.protobuf.message import DecodeError

from conveyor.oip.v2 import grpc_service_pb2 as oip

logger = logging.getLogger(__name__)

PUBLISH_INTERVAL_S: Final = 0.25
_SUFFIX: Final = ".pb"


class StatisticsBoard:
    """The published counts of the serving processes sharing ``directory``."""

    def __init__(self, directory: Path, *, pid: int | None = None) -> None:
        self.directory = directory
        self.pid = os.getpid() if pid is None else pid
        directory.mkdir(parents=True, exist_ok=True)

    def clear(self) -> None:
        """Forget every published count (the first process, when a group starts)."""
        for path in self.directory.glob(f"*{_SUFFIX}"):
            path.unlink(missing_ok=True)

    def forget(self, pid: int) -> None:
        """Drop a process's counts (it ended; its replacement starts from zero)."""
        (self.directory / f"{pid}{_SUFFIX}").unlink(missing_ok=True)

    def publish(self, counts: oip.ModelStatisticsResponse) -> None:
        path = self.directory / f"{self.pid}{_SUFFIX}"
        partial = path.with_suffix(".tmp")
        partial.write_bytes(counts.SerializeToString())
        os.replace(partial, path)

    def others(self) -> list[oip.ModelStatisticsResponse]:
        """The latest counts every other process published."""
        found = []
        for path in sorted(self.directory.glob(f"*{_SUFFIX}")):
            if path.stem == str(self.pid):
                continue
            # A process that just ended may have taken its file with it.
            with contextlib.suppress(FileNotFoundError):
                try:
                    found.append(oip.ModelStatisticsResponse.FromString(path.read_bytes()))
                except DecodeError:
                    logger.warning("unreadable statistics ignored", extra={"path": str(path)})
        return found

    async def keep_publishing(self, counts: Callable[[], oip.ModelStatisticsResponse]) -> None:
        """Publish ``counts()`` every interval until cancelled, and once more then
        (a process draining still answers what it counted)."""
        try:
            while True:
                await asyncio.to_thread(self.publish, counts())
                await asyncio.sleep(PUBLISH_INTERVAL_S)
        finally:
            with contextlib.suppress(OSError):
                self.publish(counts())


def merged(
    own: oip.ModelStatisticsResponse, others: Iterable[oip.ModelStatisticsResponse]
) -> oip.ModelStatisticsResponse:
    """``own`` with every other process's counts added, version by version
    (versions only others serve are included), sorted by model and version,
    batch sizes in order."""
    totals: dict[tuple[str, str], oip.ModelStatistics] = {}
    batches: dict[tuple[str, str], dict[int, oip.InferBatchStatistics]] = {}
    for response in (own, *others):
        for part in response.model_stats:
            key = (part.name, part.version)
            total = totals.setdefault(
                key, oip.ModelStatistics(name=part.name, version=part.version)
            )
            total.last_inference = max(total.last_inference, part.last_inference)
            total.inference_count += part.inference_count
            total.execution_count += part.execution_count
            _add_durations(total.inference_stats, part.inference_stats)
            sizes = batches.setdefault(key, {})
            for entry in part.batch_stats:
                size = sizes.setdefault(
                    entry.batch_size, oip.InferBatchStatistics(batch_size=entry.batch_size)
                )
                _add_durations(size, entry)
    response = oip.ModelStatisticsResponse()
    for key in sorted(totals):
        stats = response.model_stats.add()
        stats.CopyFrom(totals[key])
        stats.batch_stats.extend(batches[key][size] for size in sorted(batches[key]))
    return response


def _add_durations(
    total: oip.InferStatistics | oip.InferBatchStatistics,
    part: oip.InferStatistics | oip.InferBatchStatistics,
) -> None:
    """Adds every ``StatisticDuration`` field of ``part`` to ``total``'s."""
    for field, source in part.ListFields():
        if field.message_type is oip.StatisticDuration.DESCRIPTOR:
            into = getattr(total, field.name)
            into.count += source.count
            into.ns += source.ns
