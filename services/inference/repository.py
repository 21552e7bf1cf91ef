"""Every deployment a serving process runs, kept in step with the store and the registry.

The :class:`ModelRepository` owns one :class:`~.deployments.DeploymentRuntime`
per deployment. Three things change them:

- the control plane (:mod:`.management`) and the protocol's repository
  calls write the store and apply the change at once in the process that
  took the call;
- every process polls the store's etags (``config_poll_interval``) and
  applies changes made through another process, so all serving processes
  sharing the port converge on one configuration;
- a watch on the registry's alias stream re-resolves the deployments that
  serve a moved alias: the hot swap. It resumes from the last revision it
  saw when the stream breaks.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any, Final

from conveyor.inference.v1 import resources_pb2 as pb
from conveyor.registry.v1 import registry_messages_pb2 as registry_rpc
from conveyor.registry.v1 import resources_pb2 as registry_pb
from conveyor.services.inference.deployment_config import check_deployment
from conveyor.services.inference.deployments import DeploymentRuntime
from conveyor.services.inference.registry_source import RegistrySource
from conveyor.services.inference.settings import InferenceSettings
from conveyor.services.inference.store import DeploymentStore, deployment_name
from conveyor.services.inference.versions import NO_OBSERVERS, Observers
from conveyor.shared.errors import AlreadyExistsError, ConveyorError, NotFoundError
from conveyor.shared.names import check_id
from conveyor.shared.workers import WorkerThreads

logger = logging.getLogger(__name__)

WATCH_BACKOFF_S: Final = (0.5, 1.0, 2.0, 5.0)
IDLE_SWEEP_S: Final = 30.0
SERVICE_PRINCIPAL: Final = "service:inference"


class ModelRepository:
    """The deployments of this process."""

    def __init__(
        self,
        settings: InferenceSettings,
        store: DeploymentStore,
        source: RegistrySource,
        *,
        workers: WorkerThreads,
        observers: Observers = NO_OBSERVERS,
    ) -> None:
        self._settings = settings
        self._store = store
        self._source = source
        self._workers = workers
        self._observers = observers
        self.runtimes: dict[str, DeploymentRuntime] = {}
        """By model id (the Open Inference Protocol's model name)."""
        self._etags: dict[str, str] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._applying: set[asyncio.Future[None]] = set()
        self._sync_lock = asyncio.Lock()
        self.alias_revision = 0
        self.watching = False

    async def start(self) -> None:
        """Load the stored deployments (in the background: the server answers
        while they load) and start following the store and the registry."""
        await self.sync()
        self._tasks = [
            asyncio.ensure_future(self._poll_store()),
            asyncio.ensure_future(self._follow_aliases()),
            asyncio.ensure_future(self._sweep_idle()),
        ]

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await asyncio.gather(*(runtime.close() for runtime in self.runtimes.values()))
        self.runtimes.clear()

    def runtime(self, model_id: str) -> DeploymentRuntime:
        """The deployment serving ``model_id``; NOT_FOUND when there is none."""
        runtime = self.runtimes.get(model_id)
        if runtime is None:
            raise NotFoundError(
                f"no model named {model_id!r} is deployed on this server; load it with "
                "RepositoryModelLoad or create a deployment",
                reason="MODEL_NOT_DEPLOYED",
                metadata={"model": model_id},
            )
        return runtime

    async def ensure(self, model_id: str, *, created_by: str) -> DeploymentRuntime:
        """The deployment of ``model_id``, created with the defaults when the
        registry has the model and nothing serves it yet."""
        if model_id in self.runtimes:
            return self.runtimes[model_id]
        check_id(model_id, field="model_name")
        await self._source.model(f"models/{model_id}")
        deployment = pb.Deployment(
            name=deployment_name(model_id), model=f"models/{model_id}", created_by=created_by
        )
        check_deployment(deployment)
        try:
            stored = await self._workers.run(self._store.create, deployment)
        except AlreadyExistsError:
            # Created a moment ago (another request, another process).
            stored = await self._workers.run(self._store.get, deployment.name)
        await self.applied(stored)
        return self.runtimes[model_id]

    async def applied(self, deployment: pb.Deployment, *, wait: bool = True) -> None:
        """Serve ``deployment`` as stored; with ``wait``, return once its
        versions have loaded (or failed to)."""
        model_id = deployment.model.removeprefix("models/")
        self._etags[deployment.name] = deployment.etag
        runtime = self.runtimes.get(model_id)
        if runtime is None or runtime.closed:
            runtime = DeploymentRuntime(
                deployment,
                source=self._source,
                settings=self._settings,
                observers=self._observers,
            )
            self.runtimes[model_id] = runtime
        work = asyncio.ensure_future(runtime.apply(deployment))
        self._applying.add(work)
        work.add_done_callback(self._applying.discard)
        if wait:
            await work

    async def delete(self, name: str, *, expected_etag: str = "") -> None:
        """Delete the deployment ``name`` from the store and stop serving it."""
        await self._workers.run(self._store.delete, name, expected_etag=expected_etag)
        await self.removed(name)

    async def registry_models(self, limit: int) -> list[Any]:
        """The registry's models (the repository the protocol indexes)."""
        return await self._source.models(limit=limit)

    async def removed(self, name: str) -> None:
        """Stop serving the deployment ``name``: in-flight requests finish."""
        self._etags.pop(name, None)
        runtime = self.runtimes.pop(name.removeprefix("deployments/"), None)
        if runtime is not None:
            await runtime.close()

    async def sync(self) -> None:
        """Apply every change made to the store since the last look."""
        async with self._sync_lock:
            current = await self._workers.run(self._store.etags)
            for name in set(self._etags) - set(current):
                await self.removed(name)
            for name, etag in current.items():
                if self._etags.get(name) == etag:
                    continue
                try:
                    deployment = await self._workers.run(self._store.get, name)
                except NotFoundError:
                    continue
                await self.applied(deployment, wait=False)

    @property
    def ready(self) -> bool:
        """Whether every deployment has finished its first load."""
        return all(runtime.first_load.is_set() for runtime in self.runtimes.values())

    async def _poll_store(self) -> None:
        while True:
            await asyncio.sleep(self._settings.config_poll_interval.total_seconds())
            try:
                await self.sync()
            except Exception:
                logger.exception("deployment store poll failed")

    async def _follow_aliases(self) -> None:
        failures = 0
        while True:
            try:
                async for event in self._source.alias_events(self.alias_revision):
                    self.watching = True
                    failures = 0
                    await self._on_alias_event(event)
            except ConveyorError as error:
                logger.warning(
                    "alias watch interrupted; resuming",
                    extra={"error": error.message, "revision": self.alias_revision},
                )
            self.watching = False
            await asyncio.sleep(WATCH_BACKOFF_S[min(failures, len(WATCH_BACKOFF_S) - 1)])
            failures += 1

    async def _on_alias_event(self, event: registry_rpc.WatchAliasesResponse) -> None:
        revision = event.revision
        if event.type == registry_pb.ALIAS_EVENT_TYPE_SYNCED or not event.HasField("alias"):
            self.alias_revision = max(self.alias_revision, revision)
            return
        # models/{model}/aliases/{alias}
        parts = event.alias.name.split("/")
        if len(parts) == 4:
            model_id, alias_id = parts[1], parts[3]
            runtime = self.runtimes.get(model_id)
            if runtime is not None and revision > runtime.alias_revision:
                await runtime.follow_alias(model_id, alias_id, revision)
        self.alias_revision = max(self.alias_revision, revision)

    async def _sweep_idle(self) -> None:
        while True:
            await asyncio.sleep(IDLE_SWEEP_S)
            for runtime in list(self.runtimes.values()):
                runtime.unload_idle()
