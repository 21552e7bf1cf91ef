"""Builds the inference service's server: the Open Inference Protocol and the
control plane on one port, in one or several processes.

With ``processes`` > 1 this process binds the port with ``SO_REUSEPORT`` and
starts the others (``conveyor serve inference`` with ``worker_of`` set to
this process's id) on the same port; the kernel spreads connections over
them. They share the deployments database and the artifact cache; this
process alone serves ``/metrics``, aggregated over all of them
(prometheus-client's multiprocess mode), and each answers ``ModelStatistics``
for all of them (:mod:`.group_statistics`). A serving process that dies is
started again; each one ends when this one does.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
from collections.abc import Callable, Sequence
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from importlib import metadata
from typing import Any, Final

from google.protobuf.message import Message

from conveyor.inference.v1 import inference_service_pb2, inference_service_pb2_grpc
from conveyor.inference.v1 import resources_pb2 as pb
from conveyor.monitor.v1 import monitor_service_pb2
from conveyor.monitor.v1.resources_pb2 import PredictionRecord
from conveyor.oip.v2 import grpc_service_pb2, grpc_service_pb2_grpc
from conveyor.registry.v1 import registry_service_pb2
from conveyor.services.inference.group_statistics import StatisticsBoard
from conveyor.services.inference.management import ManagementServicer
from conveyor.services.inference.metrics import (
    InferenceMetrics,
    MetricsServer,
    multiprocess_directory,
    start_metrics_server,
)
from conveyor.services.inference.migrate import upgrade_to_head
from conveyor.services.inference.oip import InferenceServicer
from conveyor.services.inference.prediction_log import (
    Observe,
    Outcome,
    PredictionLog,
    counts_by_model,
    monitor_sender,
    records_for,
)
from conveyor.services.inference.registry_source import RegistrySource
from conveyor.services.inference.repository import ModelRepository
from conveyor.services.inference.settings import InferenceSettings
from conveyor.services.inference.store import DeploymentStore
from conveyor.services.inference.versions import (
    BatchObserver,
    LoadedVersion,
    Observers,
    ShadowListener,
)
from conveyor.shared.artifacts import ArtifactCache
from conveyor.shared.auth.credentials import server_auth_interceptors, service_channel
from conveyor.shared.auth.interceptor import AuthInterceptor, ResourceResolver, default_resource
from conveyor.shared.auth.principal import Resource, model_attributes
from conveyor.shared.errors import ConveyorError
from conveyor.shared.secrets import SecretStore
from conveyor.shared.server import ConveyorServer, ServiceRegistration, create_server
from conveyor.shared.storage import create_engine
from conveyor.shared.storage.database import sqlite_url
from conveyor.shared.workers import WorkerThreads

logger = logging.getLogger(__name__)

OIP_SERVICE: Final = grpc_service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
MANAGEMENT_SERVICE: Final = inference_service_pb2.DESCRIPTOR.services_by_name[
    "InferenceManagementService"
].full_name
REGISTRY_SERVICE: Final = registry_service_pb2.DESCRIPTOR.services_by_name["RegistryService"]
MONITOR_SERVICE: Final = monitor_service_pb2.DESCRIPTOR.services_by_name["MonitorService"]
RESTART_BACKOFF_S: Final = (0.5, 1.0, 2.0, 5.0, 10.0)
PARENT_CHECK_S: Final = 1.0


def open_store(settings: InferenceSettings) -> DeploymentStore:
    """The deployments store, migrated."""
    directory = settings.service_data_dir
    directory.mkdir(parents=True, exist_ok=True)
    engine = create_engine(settings.database_url or sqlite_url(directory / "inference.db"))
    upgrade_to_head(engine)
    return DeploymentStore(engine)


def inference_resolver(source: RegistrySource) -> ResourceResolver:
    """Names a call's resource for policy: a model (or deployment) belongs to
    the team that owns it in the registry."""

    async def resolve(method: str, request: Message) -> Resource:
        resource = default_resource("inference", method, request)
        model_id = resource.name
        deployment = getattr(request, "deployment", None)
        if isinstance(deployment, pb.Deployment):  # Create and Update: the model inside
            model_id = deployment.model or deployment.name
        for prefix in ("deployments/", "models/"):
            model_id = model_id.removeprefix(prefix)
        model_id = model_id.split("/")[0].split("@")[0]
        if not model_id:
            return resource
        try:
            model = await source.model(f"models/{model_id}")
        except ConveyorError:
            return resource
        return replace(resource, owner_team=model.owner_team, attributes=model_attributes(model))

    return resolve


async def build_server(
    settings: InferenceSettings, *, secret_store: SecretStore | None = None
) -> ConveyorServer:
    """Open the store, start serving, then load the stored deployments and
    follow the registry's aliases; with ``processes`` > 1, start the others."""
    extra_process = settings.worker_of != 0
    secrets = secret_store or settings.open_secret_store()
    store = await asyncio.to_thread(open_store, settings)
    workers = WorkerThreads(4, name="inference-store")
    registry_channel = service_channel(
        settings,
        secrets,
        target=settings.registry_addr,
        audience="registry",
        services=[REGISTRY_SERVICE],
    )
    monitor_channel = service_channel(
        settings,
        secrets,
        target=settings.monitor_addr,
        audience="monitor",
        services=[MONITOR_SERVICE],
    )
    cache = await asyncio.to_thread(
        ArtifactCache,
        settings.service_data_dir / "artifacts",
        secrets,
        settings.artifact_signing_key,
    )
    source = RegistrySource(registry_channel, cache)
    metrics = InferenceMetrics()
    prediction_log = PredictionLog(
        monitor_sender(monitor_channel, timeout=timedelta(seconds=5)),
        capacity=settings.prediction_log_capacity,
        batch_size=settings.prediction_log_batch_size,
        flush_interval=settings.prediction_log_flush_interval,
        sample_rate=settings.prediction_log_sample_rate,
        observe=_count_log_outcomes(metrics),
    )
    repository = ModelRepository(
        settings,
        store,
        source,
        workers=workers,
        observers=Observers(
            on_batch=_batch_observer(metrics), on_shadow=_shadow_listener(metrics, prediction_log)
        ),
    )
    stopping = asyncio.Event()
    board = (
        StatisticsBoard(settings.service_data_dir / "statistics")
        if settings.processes > 1
        else None
    )
    if board is not None and not extra_process:
        board.clear()  # an earlier group's counts
    oip_servicer = InferenceServicer(
        repository,
        metrics=metrics,
        prediction_log=prediction_log,
        default_sample_rate=settings.prediction_log_sample_rate,
        server_version=_version(),
        draining=stopping.is_set,
        statistics_board=board,
    )
    management = ManagementServicer(store, repository, source, workers)
    interceptors = server_auth_interceptors(settings, secrets, resolver=inference_resolver(source))
    server = await create_server(
        settings,
        [
            ServiceRegistration(
                OIP_SERVICE,
                lambda s: grpc_service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(
                    oip_servicer, s
                ),
                fresh_trace_ids=False,
            ),
            ServiceRegistration(
                MANAGEMENT_SERVICE,
                lambda s: (
                    inference_service_pb2_grpc.add_InferenceManagementServiceServicer_to_server(
                        management, s
                    )
                ),
            ),
        ],
        interceptors=interceptors,
        reuse_port=settings.processes > 1 or extra_process,
    )
    prediction_log.start()
    await repository.start()
    metrics_server: MetricsServer | None = None
    if settings.metrics_listen and not extra_process:
        metrics_server = await asyncio.to_thread(
            start_metrics_server, settings.metrics_listen, metrics
        )
    gauges = asyncio.ensure_future(_update_gauges(repository, metrics))
    publisher = (
        asyncio.ensure_future(board.keep_publishing(oip_servicer.local_statistics))
        if board is not None
        else None
    )
    supervisor: ProcessSupervisor | None = None
    if board is not None and not extra_process:
        supervisor = ProcessSupervisor(settings, server.port, board)
        await supervisor.start()
    watchdog = asyncio.ensure_future(_end_with_parent(settings, server)) if extra_process else None

    async def close() -> None:
        for task in (gauges, watchdog, publisher):
            if task is not None:
                task.cancel()
        if supervisor is not None:
            await supervisor.stop()
        await repository.close()
        await prediction_log.close(timedelta(seconds=2))
        if metrics_server is not None:
            metrics_server.close()
        for interceptor in interceptors:
            if isinstance(interceptor, AuthInterceptor):
                await interceptor.close()
        await registry_channel.close(None)
        await monitor_channel.close(None)

    server.before_stop.append(stopping.set)
    server.on_shutdown.extend([close, workers.shutdown, store.engine.dispose])
    return server


class ProcessSupervisor:
    """The extra serving processes: started on the shared port, restarted with
    back-off when one dies, stopped with this one."""

    def __init__(self, settings: InferenceSettings, port: int, board: StatisticsBoard) -> None:
        self._settings = settings
        self._port = port
        self._board = board
        self._processes: dict[int, asyncio.subprocess.Process] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping = asyncio.Event()
        self.restarts = 0

    async def start(self) -> None:
        for index in range(1, self._settings.processes):
            self._tasks.append(asyncio.ensure_future(self._keep_running(index)))

    async def stop(self) -> None:
        """SIGTERM every process (each drains within its grace), wait for them;
        whatever is still running after the grace and a margin is killed."""
        self._stopping.set()
        for process in self._processes.values():
            if process.returncode is None:
                process.send_signal(signal.SIGTERM)
        grace = self._settings.shutdown_grace.total_seconds() + 5
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=grace)
        for process in self._processes.values():
            if process.returncode is None:
                process.kill()
                await process.wait()
        for task in self._tasks:
            task.cancel()

    async def _keep_running(self, index: int) -> None:
        failures = 0
        while not self._stopping.is_set():
            process = await self._spawn(index)
            self._processes[index] = process
            if self._stopping.is_set():
                # Stopped while this one was starting: it ends with the rest.
                process.send_signal(signal.SIGTERM)
            code = await process.wait()
            _forget_metrics_of(process.pid)
            self._board.forget(process.pid)
            if self._stopping.is_set():
                return
            logger.warning(
                "serving process ended; starting it again",
                extra={"index": index, "exit_code": code},
            )
            self.restarts += 1
            backoff = RESTART_BACKOFF_S[min(failures, len(RESTART_BACKOFF_S) - 1)]
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), backoff)
            failures += 1

    async def _spawn(self, index: int) -> asyncio.subprocess.Process:
        host = self._settings.listen.rsplit(":", 1)[0]
        environment = dict(os.environ)
        environment["CONVEYOR_INFERENCE_WORKER_OF"] = str(os.getpid())
        environment["CONVEYOR_INFERENCE_PROCESSES"] = str(self._settings.processes)
        return await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "conveyor.services.cli",
            "serve",
            "inference",
            "--listen",
            f"{host}:{self._port}",
            "--data-dir",
            str(self._settings.data_dir),
            env=environment,
        )


async def _end_with_parent(settings: InferenceSettings, server: ConveyorServer) -> None:
    """An extra serving process drains and ends when the one that started it is gone."""
    while os.getppid() == settings.worker_of:  # noqa: ASYNC110 - no event says a parent died
        await asyncio.sleep(PARENT_CHECK_S)
    logger.warning("the first serving process is gone; draining")
    await server.shutdown()


def _forget_metrics_of(pid: int) -> None:
    if multiprocess_directory() is None:
        return
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(pid)  # type: ignore[no-untyped-call]


async def _update_gauges(repository: ModelRepository, metrics: InferenceMetrics) -> None:
    """Queue depths and loaded versions, sampled for the gauges."""
    seen: set[tuple[str, str]] = set()
    while True:
        current: set[tuple[str, str]] = set()
        for model_id, runtime in list(repository.runtimes.items()):
            states: dict[str, int] = {}
            for version in runtime.loaded_versions():
                current.add((model_id, version.number))
                state = _state_name(version)
                states[state] = states.get(state, 0) + 1
                depth = version.batcher.queue_depth if version.batcher is not None else 0
                metrics.set_queue_depth(model_id, version.number, depth)
            for state in ("LOADING", "WARMING", "READY", "DRAINING", "FAILED"):
                metrics.set_loaded(model_id, state, states.get(state, 0))
        for model_id, number in seen - current:
            metrics.remove_version(model_id, number)
        seen = current
        await asyncio.sleep(1.0)


def _state_name(version: LoadedVersion) -> str:
    return pb.VersionState.Name(version.state).removeprefix("VERSION_STATE_")


def _count_log_outcomes(metrics: InferenceMetrics) -> Observe:
    """What became of prediction records, counted per model."""

    def observe(records: Sequence[PredictionRecord], outcome: Outcome) -> None:
        for model, count in counts_by_model(records).items():
            if outcome == Outcome.SENT:
                metrics.count_prediction_log_sent(model, count)
            else:
                metrics.count_prediction_log_dropped(model, outcome.value, count)

    return observe


def _batch_observer(metrics: InferenceMetrics) -> Callable[[LoadedVersion], BatchObserver]:
    def observer_of(version: LoadedVersion) -> BatchObserver:
        return metrics.batch_observer(version.name.split("/")[1], version.number)

    return observer_of


def _shadow_listener(metrics: InferenceMetrics, log: PredictionLog) -> ShadowListener:
    """Shadow answers go to the prediction log (marked shadow) and the metrics."""

    def listen(
        version: LoadedVersion, inputs: Any, outputs: Any, request_id: str, agreed: bool
    ) -> None:
        model = version.name.split("/")[1]
        metrics.count_shadow(model, mirrored=1, disagreements=0 if agreed else 1)
        log.offer(
            lambda: records_for(
                version.name,
                request_id,
                inputs,
                outputs,
                latency=timedelta(0),
                time=datetime.now(UTC),
                shadow=True,
            )
        )

    return listen


def _version() -> str:
    try:
        return metadata.version("conveyor")
    except metadata.PackageNotFoundError:
        return "0"
