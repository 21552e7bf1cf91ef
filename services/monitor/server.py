"""Builds the monitor service's server: the gRPC API, the window evaluator,
the alert engine and the Prometheus endpoint."""

from __future__ import annotations

import asyncio
import logging
import secrets as random_secrets
from dataclasses import dataclass
from typing import Final

from conveyor.monitor.v1 import monitor_service_pb2, monitor_service_pb2_grpc
from conveyor.registry.v1 import registry_service_pb2
from conveyor.services.monitor.actions import ActionRunner
from conveyor.services.monitor.alert_servicer import AlertServicer
from conveyor.services.monitor.alert_store import AlertStore
from conveyor.services.monitor.alerts import AlertEngine
from conveyor.services.monitor.authorization import monitor_resolver
from conveyor.services.monitor.canary_analysis import CanaryAnalyst
from conveyor.services.monitor.evaluation import WindowEvaluator
from conveyor.services.monitor.ingest import SubjectHasher
from conveyor.services.monitor.ingestor import Ingestor
from conveyor.services.monitor.metrics import MonitorMetrics
from conveyor.services.monitor.migrate import upgrade_to_head
from conveyor.services.monitor.profiles import VersionProfiles
from conveyor.services.monitor.report_servicer import ReportServicer
from conveyor.services.monitor.servicer import MonitorServicer
from conveyor.services.monitor.settings import MonitorSettings
from conveyor.services.monitor.store import MonitorStore
from conveyor.shared.auth.credentials import server_auth_interceptors, service_channel
from conveyor.shared.auth.interceptor import AuthInterceptor
from conveyor.shared.errors import NotFoundError
from conveyor.shared.metrics_http import MetricsServer, start_metrics_server
from conveyor.shared.registry_client import RegistryClient
from conveyor.shared.secrets import SecretStore
from conveyor.shared.server import ConveyorServer, ServiceRegistration, create_server
from conveyor.shared.storage import create_engine
from conveyor.shared.storage.database import sqlite_url
from conveyor.shared.workers import WorkerThreads
from conveyor.trainer.v1 import trainer_service_pb2

logger = logging.getLogger(__name__)

SERVICE_NAME: Final = monitor_service_pb2.DESCRIPTOR.services_by_name["MonitorService"].full_name
REGISTRY_SERVICE: Final = registry_service_pb2.DESCRIPTOR.services_by_name["RegistryService"]
TRAINER_SERVICE: Final = trainer_service_pb2.DESCRIPTOR.services_by_name["TrainerService"]
SUBJECT_KEY_FIELD: Final = "key"


def combined_servicer(*parts: object) -> monitor_service_pb2_grpc.MonitorServiceServicer:
    """One servicer for the whole ``MonitorService``, each RPC taken from the
    part that implements it (the data plane, the alerting); every RPC must be
    implemented by exactly one part."""
    base = monitor_service_pb2_grpc.MonitorServiceServicer
    methods: dict[str, object] = {}
    for method in monitor_service_pb2.DESCRIPTOR.services_by_name["MonitorService"].methods:
        owners = [p for p in parts if hasattr(type(p), method.name)]
        if len(owners) != 1:
            raise TypeError(f"{method.name} is implemented by {len(owners)} parts, not one")
        methods[method.name] = getattr(owners[0], method.name)
    combined: monitor_service_pb2_grpc.MonitorServiceServicer = type(
        "MonitorService", (base,), methods
    )()
    return combined


@dataclass(frozen=True)
class Monitor:
    """The running monitor's parts that tests and benchmarks look into."""

    server: ConveyorServer
    evaluator: WindowEvaluator
    alerts: AlertEngine
    ingestor: Ingestor
    metrics_port: int | None


def open_store(settings: MonitorSettings) -> MonitorStore:
    directory = settings.service_data_dir
    directory.mkdir(parents=True, exist_ok=True)
    engine = create_engine(
        settings.database_url or sqlite_url(directory / "monitor.db"),
        pool_size=settings.worker_threads,
        # Packed windows are read in large values: twice as fast memory-mapped.
        sqlite_mmap_bytes=1 << 30,
    )
    upgrade_to_head(engine)
    return MonitorStore(engine)


def subject_key(store: SecretStore, path: str) -> bytes:
    """The key of subject and personal-feature hashes, created on first start."""
    try:
        return bytes.fromhex(store.read_secret(path)[SUBJECT_KEY_FIELD])
    except NotFoundError:
        key = random_secrets.token_bytes(32)
        store.write_secret(path, {SUBJECT_KEY_FIELD: key.hex()})
        return key


async def build_server(
    settings: MonitorSettings, *, secret_store: SecretStore | None = None
) -> ConveyorServer:
    """Open (and migrate) the store, start serving, evaluating windows and
    serving ``/metrics``."""
    return (await build_monitor(settings, secret_store=secret_store)).server


async def build_monitor(
    settings: MonitorSettings, *, secret_store: SecretStore | None = None
) -> Monitor:
    """:func:`build_server`, with the parts it started."""
    secrets = secret_store or settings.open_secret_store()
    store = await asyncio.to_thread(open_store, settings)
    hasher = SubjectHasher(
        await asyncio.to_thread(subject_key, secrets, settings.subject_key_secret)
    )
    workers = WorkerThreads(settings.worker_threads, name="monitor")
    registry_channel = service_channel(
        settings,
        secrets,
        target=settings.registry_addr,
        audience="registry",
        services=[REGISTRY_SERVICE],
    )
    trainer_channel = service_channel(
        settings,
        secrets,
        target=settings.trainer_addr,
        audience="trainer",
        services=[TRAINER_SERVICE],
    )
    registry = RegistryClient(registry_channel)
    metrics = MonitorMetrics()
    profiles = VersionProfiles(store, registry, workers, hasher)
    alert_store = AlertStore(store.engine)
    actions = ActionRunner(registry, trainer_channel, store, profiles, workers)
    engine = AlertEngine(alert_store, profiles, actions, workers, metrics)
    analyst = CanaryAnalyst(store, profiles, registry, workers, metrics)
    evaluator = WindowEvaluator(
        store,
        profiles,
        workers,
        metrics,
        measure_slos=engine.measure_slos,
        listeners=[engine.on_window, analyst.on_window],
        tick_interval=settings.evaluation_interval,
        purge_interval=settings.purge_interval,
        purge_alert_events=alert_store.purge_events,
        alert_event_retention=settings.alert_event_retention,
    )
    ingestor = Ingestor(
        store,
        profiles,
        workers,
        hasher,
        metrics,
        capacity=settings.ingest_capacity,
        max_violations=settings.max_violations,
        on_windows_closed=evaluator.windows_closed,
    )
    service = combined_servicer(
        MonitorServicer(
            store,
            profiles,
            registry,
            workers,
            ingestor,
            hasher,
            metrics,
        ),
        ReportServicer(store, profiles, registry, workers, canary_analysis=analyst.analyse),
        AlertServicer(alert_store, engine, registry, workers),
    )
    interceptors = server_auth_interceptors(
        settings, secrets, resolver=monitor_resolver(registry, alert_store)
    )
    server = await create_server(
        settings,
        [
            ServiceRegistration(
                SERVICE_NAME,
                lambda s: monitor_service_pb2_grpc.add_MonitorServiceServicer_to_server(service, s),
            )
        ],
        interceptors=interceptors,
    )
    evaluator.start()
    engine.start()
    metrics_server: MetricsServer | None = None
    if settings.metrics_listen:
        metrics_server = await asyncio.to_thread(
            start_metrics_server, settings.metrics_listen, metrics.registry
        )

    async def close() -> None:
        await evaluator.close()
        await engine.close()
        if metrics_server is not None:
            metrics_server.close()
        for interceptor in interceptors:
            if isinstance(interceptor, AuthInterceptor):
                await interceptor.close()
        await registry_channel.close(None)
        await trainer_channel.close(None)

    server.before_stop.append(engine.stop_watches)
    server.on_shutdown.extend([close, workers.shutdown, store.engine.dispose])
    return Monitor(
        server,
        evaluator,
        engine,
        ingestor,
        None if metrics_server is None else metrics_server.port,
    )
