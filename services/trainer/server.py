"""Builds the trainer's gRPC server from its settings."""

from __future__ import annotations

import asyncio
import logging

import torch

from conveyor.registry.v1 import registry_service_pb2
from conveyor.services.trainer.jobs import JobManager
from conveyor.services.trainer.migrate import upgrade_to_head
from conveyor.services.trainer.registration import Registrar, trainer_resolver
from conveyor.services.trainer.servicer import TrainerServicer
from conveyor.services.trainer.settings import TrainerSettings
from conveyor.services.trainer.store import TrainerStore
from conveyor.services.trainer.sweep_store import SweepStore
from conveyor.services.trainer.sweeps import SweepManager
from conveyor.services.trainer.watch import SweepWatchHub, TrainingWatchHub
from conveyor.shared.auth.credentials import server_auth_interceptors, service_channel
from conveyor.shared.auth.interceptor import AuthInterceptor
from conveyor.shared.errors import ConveyorError
from conveyor.shared.secrets import SecretStore
from conveyor.shared.server import ConveyorServer, ServiceRegistration, create_server
from conveyor.shared.storage import BlobStore, create_engine
from conveyor.shared.storage.database import sqlite_url
from conveyor.shared.workers import WorkerThreads
from conveyor.trainer.v1 import trainer_service_pb2, trainer_service_pb2_grpc

logger = logging.getLogger(__name__)

SERVICE_NAME = trainer_service_pb2.DESCRIPTOR.services_by_name["TrainerService"].full_name
REGISTRY_SERVICE = registry_service_pb2.DESCRIPTOR.services_by_name["RegistryService"]


def open_store(settings: TrainerSettings) -> TrainerStore:
    """The store under the settings' database and data directory, migrated.
    Uploaded files are kept in ``<data_dir>/trainer/datasets``."""
    directory = settings.service_data_dir
    directory.mkdir(parents=True, exist_ok=True)
    engine = create_engine(
        settings.database_url or sqlite_url(directory / "trainer.db"),
        pool_size=settings.worker_threads,
    )
    upgrade_to_head(engine)
    return TrainerStore(engine, BlobStore(directory / "datasets"))


async def build_server(
    settings: TrainerSettings, *, secret_store: SecretStore | None = None
) -> ConveyorServer:
    """Open (and migrate) the store, start serving behind authentication, then
    resume the jobs a previous trainer left running and start the queue.

    ``secret_store`` holds the token keys (the trainer's own tokens for the
    registry, and the keys that verify its callers'); by default the one the
    settings configure.
    """
    secrets = secret_store or settings.open_secret_store()
    store = await asyncio.to_thread(open_store, settings)
    removed = await asyncio.to_thread(store.collect_garbage)
    if removed:
        logger.info("removed orphaned dataset files", extra={"count": removed})
    workers = WorkerThreads(settings.worker_threads, name="trainer-store")
    hub = TrainingWatchHub()
    registry_channel = service_channel(
        settings,
        secrets,
        target=settings.registry_addr,
        audience="registry",
        services=[REGISTRY_SERVICE],
    )
    registrar = Registrar(registry_channel, workers, attempts=settings.registration_attempts)
    manager = JobManager(settings, store, workers, hub, registrar)
    sweep_store = SweepStore(store.engine)
    sweep_hub = SweepWatchHub()
    sweeps = SweepManager(settings, sweep_store, manager, workers, sweep_hub, registrar)

    async def registration_model_of(name: str) -> str:
        try:
            if name.startswith("sweepJobs/"):
                sweep = await sweeps.get(name.removeprefix("sweepJobs/"))
                return sweep.spec.base_spec.registration.model
            job = await manager.get(name.removeprefix("trainingJobs/"))
        except ConveyorError:  # unknown: the method itself answers NOT_FOUND
            return ""
        return job.spec.registration.model

    interceptors = server_auth_interceptors(
        settings, secrets, resolver=trainer_resolver(registrar, registration_model_of)
    )
    servicer = TrainerServicer(
        store,
        manager,
        hub,
        sweeps,
        sweep_store,
        sweep_hub,
        workers,
        registrar,
        max_dataset_bytes=settings.max_dataset_bytes,
        max_queued_jobs=settings.max_queued_jobs,
        cuda_available=await asyncio.to_thread(torch.cuda.is_available),
    )
    server = await create_server(
        settings,
        [
            ServiceRegistration(
                SERVICE_NAME,
                lambda s: trainer_service_pb2_grpc.add_TrainerServiceServicer_to_server(
                    servicer, s
                ),
            )
        ],
        interceptors=interceptors,
    )
    await manager.start()
    await sweeps.start()

    async def close_channels() -> None:
        for interceptor in interceptors:
            if isinstance(interceptor, AuthInterceptor):
                await interceptor.close()
        await registry_channel.close(None)

    server.before_stop.extend([hub.close, sweep_hub.close])
    # Sweeps and workers stop first (their jobs resume at the next start), then the
    # channels, then the threads that may still hold database connections, then
    # the database.
    server.on_shutdown.extend(
        [sweeps.close, manager.close, close_channels, workers.shutdown, store.engine.dispose]
    )
    return server
