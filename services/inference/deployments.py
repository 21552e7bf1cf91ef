"""One deployment at run time: its loaded versions, the traffic split, hot swaps.

A :class:`DeploymentRuntime` serves one registry model. Requests read its
current :class:`Route` — an immutable snapshot of the split (with the
versions it points at) and the shadow — so a swap is one assignment: a
request either saw the old route or the new one, never a mix.

:meth:`DeploymentRuntime.apply` makes the route match a configuration:
every reference is resolved through the registry (aliases included), the
versions not loaded yet are loaded and warmed beside the serving ones, the
route is replaced, and the versions that left it drain their requests in
flight and unload. A reference whose new version fails to load keeps the
version it had (DEGRADED); an alias move triggers the same path
(:meth:`DeploymentRuntime.follow_alias`). Versions named explicitly by a
request (``model_version``) are loaded on demand, least recently used
unloaded first.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import numpy.typing as npt
from google.protobuf.timestamp_pb2 import Timestamp

from conveyor.inference.v1 import resources_pb2 as pb
from conveyor.registry.v1 import resources_pb2 as registry_pb
from conveyor.services.inference.deployment_config import (
    on_demand_idle,
    on_demand_limit,
    serving_options,
    traffic_targets,
)
from conveyor.services.inference.registry_source import RegistrySource
from conveyor.services.inference.routing import PERCENT, Route, ShadowCounters, duration
from conveyor.services.inference.settings import InferenceSettings
from conveyor.services.inference.versions import (
    NO_OBSERVERS,
    LoadedVersion,
    Observers,
    ServingOptions,
    load_version,
)
from conveyor.shared.errors import ConveyorError, FailedPreconditionError, UnavailableError
from conveyor.shared.names import parse_model_version_ref

logger = logging.getLogger(__name__)

Arrays = dict[str, npt.NDArray[Any]]


@dataclass(frozen=True)
class _ShadowCopy:
    route: Route
    inputs: Arrays
    served: Arrays
    request_id: str
    served_latency_s: float


class DeploymentRuntime:
    """The serving side of one deployment."""

    def __init__(
        self,
        config: pb.Deployment,
        *,
        source: RegistrySource,
        settings: InferenceSettings,
        observers: Observers = NO_OBSERVERS,
    ) -> None:
        self.config = config
        self.model_id = config.model.removeprefix("models/")
        self._source = source
        self._settings = settings
        self._options: ServingOptions | None = None
        self.route: Route | None = None
        self.serving: dict[str, LoadedVersion] = {}
        """The version serving each reference of the configuration."""
        self.on_demand: dict[str, LoadedVersion] = {}
        self.failed: dict[str, LoadedVersion] = {}
        """The last failed load of each reference that has one."""
        self.draining: set[LoadedVersion] = set()
        self.last_swap: pb.SwapEvent | None = None
        self.shadow_counters: ShadowCounters | None = None
        self.alias_revision = 0
        self.applying = False
        self.first_load = asyncio.Event()
        self._lock = asyncio.Lock()
        self._on_demand_loads: dict[str, asyncio.Task[LoadedVersion]] = {}
        self._shadow_queue: asyncio.Queue[_ShadowCopy] = asyncio.Queue(settings.shadow_queue_size)
        self._observers = observers
        self._background: set[asyncio.Task[None]] = set()
        self._shadow_worker: asyncio.Task[None] | None = None
        self.closed = False

    # -- configuration ----------------------------------------------------------------

    @property
    def references(self) -> list[str]:
        """Every reference the configuration serves: the split, then the shadow."""
        refs = [ref for ref, _ in traffic_targets(self.config, self._settings.default_alias)]
        if self.config.HasField("shadow"):
            refs.append(self.config.shadow.model_version)
        return refs

    async def apply(self, config: pb.Deployment, *, alias_revision: int = 0) -> None:
        """Make the route match ``config``: load what is new beside what serves,
        switch, drain what left. Never raises for a version that fails to load:
        it is recorded, and the reference keeps its previous version."""
        async with self._lock:
            if self.closed:
                return
            self.applying = True
            try:
                await self._apply(config, alias_revision)
            finally:
                self.applying = False
                self.first_load.set()

    async def follow_alias(self, model_id: str, alias_id: str, revision: int) -> bool:
        """Re-resolve the configuration when it serves ``models/m@alias``;
        whether it does."""
        reference = f"models/{model_id}@{alias_id}"
        if model_id != self.model_id or reference not in self.references:
            self.alias_revision = max(self.alias_revision, revision)
            return False
        await self.apply(self.config, alias_revision=revision)
        return True

    async def _apply(self, config: pb.Deployment, alias_revision: int) -> None:
        options = serving_options(config, self._settings)
        reload_all = options != self._options
        self.config = config
        wanted: dict[str, pb.VersionRole.ValueType] = {
            ref: pb.VERSION_ROLE_TRAFFIC
            for ref, _ in traffic_targets(config, self._settings.default_alias)
        }
        if config.HasField("shadow"):
            wanted[config.shadow.model_version] = pb.VERSION_ROLE_SHADOW
        resolved: dict[str, registry_pb.ModelVersion] = {}
        failures: dict[str, str] = {}
        for ref in wanted:
            try:
                resolved[ref] = await self._source.version(ref)
            except ConveyorError as error:
                failures[ref] = error.message
        current = {v.name: v for v in self.serving.values()}
        swaps = {
            ref: version.name
            for ref, version in resolved.items()
            if ref not in self.serving or self.serving[ref].name != version.name
        }
        started = datetime.now(UTC)
        if swaps:
            first = next(iter(swaps))
            self.last_swap = pb.SwapEvent(
                target=first,
                from_version=self.serving[first].name if first in self.serving else "",
                to_version=swaps[first],
                alias_revision=alias_revision,
                outcome=pb.SWAP_OUTCOME_IN_PROGRESS,
                start_time=_timestamp(started),
            )
        to_load: dict[str, tuple[str, registry_pb.ModelVersion]] = {}
        for ref, version in resolved.items():
            existing = current.get(version.name)
            if existing is not None and not reload_all and existing.ready:
                continue
            to_load.setdefault(version.name, (ref, version))
        loads = await asyncio.gather(
            *(
                load_version(
                    version,
                    fetch=self._source.artifact,
                    target=ref,
                    role=wanted[ref],
                    options=options,
                    observers=self._observers,
                )
                for ref, version in to_load.values()
            )
        )
        loaded = {version.name: version for version in loads}
        serving: dict[str, LoadedVersion] = {}
        self.failed = {}
        for ref, role in wanted.items():
            version_name = resolved[ref].name if ref in resolved else ""
            fresh = loaded.get(version_name)
            if fresh is not None and not fresh.ready:
                self.failed[ref] = fresh
                failures[ref] = fresh.error_message
            candidate = fresh if fresh is not None and fresh.ready else current.get(version_name)
            if candidate is None or not candidate.ready:
                # Keep what served this reference before (a failed swap).
                candidate = self.serving.get(ref)
            if candidate is not None and candidate.ready:
                candidate.role = role
                candidate.target = ref
                serving[ref] = candidate
        self._options = options
        previous = set(self.serving.values())
        self.serving = serving
        self.route = self._route(config, serving)
        if self.alias_revision < alias_revision:
            self.alias_revision = alias_revision
        self._update_shadow_counters(config, serving)
        self._finish_swap(swaps, serving, failures)
        for gone in previous - set(serving.values()):
            self._drain(gone)
        if failures:
            logger.warning(
                "deployment degraded", extra={"deployment": config.name, "failures": failures}
            )

    def _route(self, config: pb.Deployment, serving: Mapping[str, LoadedVersion]) -> Route | None:
        targets = [
            (serving[ref], percent)
            for ref, percent in traffic_targets(config, self._settings.default_alias)
            if ref in serving
        ]
        if not targets:
            return None
        if sum(percent for _, percent in targets) == 0:
            # The only loaded targets carry 0%: serve rather than refuse.
            targets = [(version, 1) for version, _ in targets]
        shadow = serving.get(config.shadow.model_version) if config.HasField("shadow") else None
        return Route(
            targets=tuple(targets),
            sticky=config.traffic.sticky,
            shadow=shadow,
            shadow_sample_percent=config.shadow.sample_percent or PERCENT,
            shadow_tolerance=config.shadow.tolerance,
        )

    def _update_shadow_counters(
        self, config: pb.Deployment, serving: Mapping[str, LoadedVersion]
    ) -> None:
        shadow = serving.get(config.shadow.model_version) if config.HasField("shadow") else None
        if shadow is None:
            self.shadow_counters = None
        elif self.shadow_counters is None or self.shadow_counters.model_version != shadow.name:
            self.shadow_counters = ShadowCounters(shadow.name)

    def _finish_swap(
        self,
        swaps: Mapping[str, str],
        serving: Mapping[str, LoadedVersion],
        failures: Mapping[str, str],
    ) -> None:
        if self.last_swap is None or not swaps:
            return
        ref = self.last_swap.target
        self.last_swap.end_time.CopyFrom(_timestamp(datetime.now(UTC)))
        if ref in serving and serving[ref].name == swaps[ref]:
            self.last_swap.outcome = pb.SWAP_OUTCOME_SUCCEEDED
            logger.info(
                "hot swap",
                extra={
                    "target": ref,
                    "from": self.last_swap.from_version,
                    "to": self.last_swap.to_version,
                },
            )
        else:
            self.last_swap.outcome = pb.SWAP_OUTCOME_FAILED
            self.last_swap.error_message = failures.get(ref, "the new version did not load")

    def _drain(self, version: LoadedVersion) -> None:
        self.draining.add(version)

        async def drain() -> None:
            try:
                await version.drain_and_unload(self._settings.drain_timeout)
            finally:
                self.draining.discard(version)

        self._spawn(drain())

    # -- requests ---------------------------------------------------------------------

    def pick(self, request_id: str) -> LoadedVersion:
        """The version that answers a request naming no version."""
        route = self.route
        if route is None:
            if self.closed:
                raise UnavailableError(
                    f"models/{self.model_id} is being unloaded", reason="MODEL_UNLOADING"
                )
            raise UnavailableError(
                f"models/{self.model_id} has no version ready to serve"
                + (" yet; it is loading" if self.applying else f": {self._failure_summary()}"),
                reason="MODEL_NOT_READY",
            )
        return route.pick(request_id)

    async def version(self, number: str) -> LoadedVersion:
        """The version ``number`` of this model, loading it on demand when no
        reference serves it. NOT_FOUND when the registry has no such version."""
        name = f"models/{self.model_id}/versions/{number}"
        for version in (*self.serving.values(), *self.on_demand.values()):
            if version.name == name and version.ready:
                version.last_used = time.monotonic()
                return version
        limit = on_demand_limit(self.config)
        if limit == 0:
            raise FailedPreconditionError(
                f"{name} is not in this deployment's split and on-demand versions are off "
                "(max_on_demand_versions = 0)",
                reason="ON_DEMAND_DISABLED",
            )
        parse_model_version_ref(name, field="model_version")
        task = self._on_demand_loads.get(name)
        if task is None:
            task = asyncio.ensure_future(self._load_on_demand(name, limit))
            self._on_demand_loads[name] = task
            task.add_done_callback(lambda _: self._on_demand_loads.pop(name, None))
        return await asyncio.shield(task)

    async def _load_on_demand(self, name: str, limit: int) -> LoadedVersion:
        registered = await self._source.version(name)
        options = self._options or serving_options(self.config, self._settings)
        version = await load_version(
            registered,
            fetch=self._source.artifact,
            target="",
            role=pb.VERSION_ROLE_ON_DEMAND,
            options=options,
            observers=self._observers,
        )
        if not version.ready:
            raise FailedPreconditionError(
                f"{name} could not be loaded: {version.error_message}", reason="MODEL_UNLOADABLE"
            )
        while len(self.on_demand) >= limit:
            oldest = min(self.on_demand.values(), key=lambda v: v.last_used)
            del self.on_demand[oldest.name]
            self._drain(oldest)
        self.on_demand[name] = version
        return version

    def unload_idle(self) -> None:
        """Unload on-demand versions idle longer than the configured timeout."""
        cutoff = time.monotonic() - on_demand_idle(self.config).total_seconds()
        for name, version in list(self.on_demand.items()):
            if version.last_used < cutoff and version.in_flight == 0:
                del self.on_demand[name]
                self._drain(version)

    def mirror(
        self, route: Route, inputs: Arrays, served: Arrays, request_id: str, latency_s: float
    ) -> bool:
        """Queue a copy of a served request for the shadow; never blocks.
        False when the copy was dropped (the shadow's queue is full)."""
        counters = self.shadow_counters
        if route.shadow is None or counters is None or not route.shadows():
            return True
        try:
            self._shadow_queue.put_nowait(_ShadowCopy(route, inputs, served, request_id, latency_s))
        except asyncio.QueueFull:
            counters.dropped += 1
            return False
        counters.mirrored += 1
        if self._shadow_worker is None or self._shadow_worker.done():
            self._shadow_worker = asyncio.ensure_future(self._run_shadow())
        return True

    async def _run_shadow(self) -> None:
        while not self._shadow_queue.empty():
            copy = self._shadow_queue.get_nowait()
            counters = self.shadow_counters
            shadow = copy.route.shadow
            if shadow is None or counters is None or not shadow.ready:
                continue
            started = time.perf_counter()
            try:
                answer, _ = await shadow.infer(copy.inputs, deadline=None)
            except ConveyorError:
                counters.errors += 1
                continue
            counters.served_latency_s += copy.served_latency_s
            counters.shadow_latency_s += time.perf_counter() - started
            agreed = counters.compare(copy.served, answer, copy.route.shadow_tolerance)
            if not agreed:
                logger.info(
                    "shadow disagreed",
                    extra={"model_version": shadow.name, "request_id": copy.request_id},
                )
            if self._observers.on_shadow is not None:
                self._observers.on_shadow(shadow, copy.inputs, answer, copy.request_id, agreed)

    # -- status -----------------------------------------------------------------------

    @property
    def state(self) -> pb.DeploymentState.ValueType:
        if self.route is None:
            if self.applying or not self.first_load.is_set():
                return pb.DEPLOYMENT_STATE_LOADING
            return pb.DEPLOYMENT_STATE_FAILED
        if self.applying:
            return pb.DEPLOYMENT_STATE_UPDATING
        if self.failed or set(self.references) - set(self.serving):
            return pb.DEPLOYMENT_STATE_DEGRADED
        return pb.DEPLOYMENT_STATE_READY

    def loaded_versions(self) -> list[LoadedVersion]:
        """Every version this deployment holds: serving, on demand, draining, failed."""
        versions = list(dict.fromkeys([*self.serving.values(), *self.on_demand.values()]))
        versions += [v for v in self.draining if v not in versions]
        versions += list(self.failed.values())
        return versions

    def status(self) -> pb.DeploymentStatus:
        route = self.route
        percents: dict[int, int] = {}
        if route is not None:
            for version, percent in route.targets:
                percents[id(version)] = percents.get(id(version), 0) + percent
        status = pb.DeploymentStatus(
            name=f"{self.config.name}/status",
            state=self.state,
            alias_revision=self.alias_revision,
            update_time=_timestamp(datetime.now(UTC)),
        )
        for version in self.loaded_versions():
            status.versions.append(describe(version, percents.get(id(version), 0)))
        if self.last_swap is not None:
            status.last_swap.CopyFrom(self.last_swap)
        if self.shadow_counters is not None:
            status.shadow_stats.CopyFrom(self.shadow_counters.to_proto())
        return status

    def _failure_summary(self) -> str:
        if not self.failed:
            return "no reference resolved to a servable version"
        ref, version = next(iter(self.failed.items()))
        return f"{ref} failed to load: {version.error_message}"

    # -- life cycle -------------------------------------------------------------------

    async def close(self) -> None:
        """Stop taking requests, finish those in flight, unload everything."""
        async with self._lock:
            self.closed = True
            versions = {*self.serving.values(), *self.on_demand.values()}
            self.route = None
            self.serving = {}
            self.on_demand = {}
        if self._shadow_worker is not None:
            self._shadow_worker.cancel()
        await asyncio.gather(*(v.drain_and_unload(self._settings.drain_timeout) for v in versions))
        if self._background:
            await asyncio.gather(*self._background, return_exceptions=True)

    def _spawn(self, work: Any) -> None:
        task: asyncio.Task[None] = asyncio.ensure_future(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)


def describe(version: LoadedVersion, traffic_percent: int) -> pb.LoadedVersion:
    """A version's line in a deployment's status."""
    described = pb.LoadedVersion(
        model_version=version.name,
        target=version.target,
        role=version.role,
        state=version.state,
        traffic_percent=traffic_percent,
        execution_provider=version.execution_provider,
        device=version.device,
        artifact_sha256=version.registered.artifact.sha256,
        max_batch_size=version.max_batch_size,
        load_duration=duration(version.load_duration.total_seconds()),
        warmup_duration=duration(version.warmup_duration.total_seconds()),
        queue_depth=version.batcher.queue_depth if version.batcher else 0,
        error_message=version.error_message,
    )
    if version.ready_time is not None:
        described.ready_time.CopyFrom(_timestamp(version.ready_time))
    return described


def _timestamp(moment: datetime) -> Timestamp:
    stamp = Timestamp()
    stamp.FromDatetime(moment)
    return stamp
