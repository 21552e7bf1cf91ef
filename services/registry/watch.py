"""The alias watch stream: current state, then every change in order.

Changes are read back from the ``alias_events`` table, so the stream is the
same whichever registry replica made the change; an in-process notification
wakes watchers at once, and a short poll covers changes made elsewhere.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from conveyor.registry.v1 import registry_messages_pb2 as rpc
from conveyor.registry.v1 import resources_pb2 as pb
from conveyor.services.registry.store import RegistryStore
from conveyor.shared.errors import FieldViolation, InvalidArgumentError, UnavailableError
from conveyor.shared.workers import WorkerThreads


class AliasWatchHub:
    """Serves WatchAliases streams from the store's alias history."""

    def __init__(
        self, store: RegistryStore, workers: WorkerThreads, *, poll_interval_s: float
    ) -> None:
        self._store = store
        self._workers = workers
        self._poll_interval_s = poll_interval_s
        self._changed = asyncio.Event()
        self._closed = False

    def notify(self) -> None:
        """An alias changed in this process: wake every watcher."""
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    def close(self) -> None:
        """End every stream (server shutdown)."""
        self._closed = True
        self.notify()

    async def watch(
        self, model_id: str | None, alias_ids: list[str], start_revision: int
    ) -> AsyncIterator[rpc.WatchAliasesResponse]:
        if model_id is not None:
            await self._workers.run(self._store.get_model, model_id)  # NOT_FOUND when unknown
        current = await self._workers.run(self._store.aliases.current_revision)
        if start_revision > current:
            raise InvalidArgumentError(
                f"start_revision {start_revision} is ahead of the registry ({current})",
                violations=[
                    FieldViolation("start_revision", f"at most {current}, the newest revision")
                ],
            )
        history = None
        if start_revision:
            history = await self._workers.run(
                self._store.aliases.events_after, start_revision, model_id, alias_ids
            )
        if history is None:  # a fresh watch, or the history to resume from is gone
            aliases, last = await self._workers.run(
                self._store.aliases.snapshot, model_id, alias_ids
            )
            # In revision order, so that revisions never go down along the stream
            # and a client cut off mid-snapshot can resume from the last one.
            for alias in sorted(aliases, key=lambda a: a.revision):
                yield rpc.WatchAliasesResponse(
                    type=pb.ALIAS_EVENT_TYPE_EXISTING, alias=alias, revision=alias.revision
                )
        else:
            events, last = history
            for event in events:
                yield rpc.WatchAliasesResponse(
                    type=event.event_type, alias=event.alias, revision=event.revision
                )
        yield rpc.WatchAliasesResponse(type=pb.ALIAS_EVENT_TYPE_SYNCED, revision=last)
        while not self._closed:
            changed = self._changed  # taken before reading, so no change slips between
            found = await self._workers.run(
                self._store.aliases.events_after, last, model_id, alias_ids
            )
            if found is not None:
                events, last = found
                for event in events:
                    yield rpc.WatchAliasesResponse(
                        type=event.event_type, alias=event.alias, revision=event.revision
                    )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(changed.wait(), self._poll_interval_s)
        raise UnavailableError(
            f"the registry is shutting down; watch again from revision {last}",
            reason="DRAINING",
            metadata={"revision": str(last)},
        )
