"""Builds the optimizer's gRPC server from its settings."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import replace

from google.protobuf.message import Message

from conveyor.optimizer.v1 import optimizer_service_pb2, optimizer_service_pb2_grpc
from conveyor.registry.v1 import registry_service_pb2
from conveyor.services.optimizer.jobs import JobManager, watch_hub
from conveyor.services.optimizer.migrate import upgrade_to_head
from conveyor.services.optimizer.registry_gateway import RegistryGateway
from conveyor.services.optimizer.servicer import OptimizerServicer
from conveyor.services.optimizer.settings import OptimizerSettings
from conveyor.services.optimizer.store import OptimizerStore
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

SERVICE_NAME = optimizer_service_pb2.DESCRIPTOR.services_by_name["OptimizerService"].full_name
REGISTRY_SERVICE = registry_service_pb2.DESCRIPTOR.services_by_name["RegistryService"]


def open_store(settings: OptimizerSettings) -> OptimizerStore:
    """The store under the settings' database, migrated."""
    directory = settings.service_data_dir
    directory.mkdir(parents=True, exist_ok=True)
    engine = create_engine(
        settings.database_url or sqlite_url(directory / "optimizer.db"),
        pool_size=settings.worker_threads,
    )
    upgrade_to_head(engine)
    return OptimizerStore(engine)


def optimizer_resolver(gateway: RegistryGateway, manager: JobManager) -> ResourceResolver:
    """Names an optimizer call's resource for policy: a job belongs to the team
    that owns its source's model (and carries that model's risk tier and
    compliance tags). Unknown jobs and models have no owner: the ownership
    rules deny them to people, and the method answers NOT_FOUND to services."""

    async def resolve(method: str, request: Message) -> Resource:
        resource = default_resource("optimizer", method, request)
        source = ""
        if method == "CreateOptimizationJob":
            source = request.optimization_job.source_model_version  # type: ignore[attr-defined]
        elif resource.name.startswith("optimizationJobs/"):
            job_id = resource.name.split("/")[1]
            try:
                source = (await manager.get(job_id)).resolved_source_model_version
            except ConveyorError:
                return resource
        model_name = source.split("/versions/")[0].split("@")[0]
        if not model_name.startswith("models/"):
            return resource
        try:
            model = await gateway.model(model_name)
        except ConveyorError:
            return resource
        return replace(resource, owner_team=model.owner_team, attributes=model_attributes(model))

    return resolve


async def build_server(
    settings: OptimizerSettings, *, secret_store: SecretStore | None = None
) -> ConveyorServer:
    """Open (and migrate) the store, start serving behind authentication, then
    queue again the jobs a previous optimizer left running and start the queue."""
    secrets = secret_store or settings.open_secret_store()
    store = await asyncio.to_thread(open_store, settings)
    workers = WorkerThreads(settings.worker_threads, name="optimizer-store")
    registry_channel = service_channel(
        settings,
        secrets,
        target=settings.registry_addr,
        audience="registry",
        services=[REGISTRY_SERVICE],
    )
    cache = await asyncio.to_thread(
        ArtifactCache,
        settings.service_data_dir / "artifacts",
        secrets,
        settings.artifact_signing_key,
    )
    gateway = RegistryGateway(registry_channel, cache, attempts=settings.registration_attempts)
    hub = watch_hub()
    manager = JobManager(settings, store, workers, hub, gateway)
    interceptors = server_auth_interceptors(
        settings, secrets, resolver=optimizer_resolver(gateway, manager)
    )
    servicer = OptimizerServicer(
        store, manager, hub, gateway, workers, max_queued_jobs=settings.max_queued_jobs
    )
    server = await create_server(
        settings,
        [
            ServiceRegistration(
                SERVICE_NAME,
                lambda s: optimizer_service_pb2_grpc.add_OptimizerServiceServicer_to_server(
                    servicer, s
                ),
            )
        ],
        interceptors=interceptors,
    )
    await manager.start()

    async def close_channels() -> None:
        for interceptor in interceptors:
            if isinstance(interceptor, AuthInterceptor):
                await interceptor.close()
        await registry_channel.close(None)

    server.before_stop.append(hub.close)
    # Running jobs stop first (they run again at the next start), then the
    # channels, the threads that may hold database connections, the database.
    server.on_shutdown.extend(
        [manager.close, close_channels, workers.shutdown, store.engine.dispose]
    )
    return server
