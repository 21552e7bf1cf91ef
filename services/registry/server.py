"""Builds the registry's gRPC server from its settings."""

from __future__ import annotations

import asyncio
import logging

from conveyor.policy.v1 import policy_service_pb2
from conveyor.registry.v1 import registry_service_pb2, registry_service_pb2_grpc
from conveyor.services.registry.authorization import PolicyPromotionGate, registry_resolver
from conveyor.services.registry.migrate import upgrade_to_head
from conveyor.services.registry.servicer import NoPromotionGate, PromotionGate, RegistryServicer
from conveyor.services.registry.settings import RegistrySettings
from conveyor.services.registry.signing import ArtifactSigner
from conveyor.services.registry.store import RegistryStore
from conveyor.services.registry.watch import AliasWatchHub
from conveyor.shared.auth.credentials import server_auth_interceptors, service_channel
from conveyor.shared.auth.interceptor import AuthInterceptor
from conveyor.shared.errors import UnavailableError
from conveyor.shared.secrets import SecretStore
from conveyor.shared.server import ConveyorServer, ServiceRegistration, create_server
from conveyor.shared.storage import BlobStore, SecretStoreBlobKeys, create_engine
from conveyor.shared.storage.database import sqlite_url
from conveyor.shared.workers import WorkerThreads

logger = logging.getLogger(__name__)

SERVICE_NAME = registry_service_pb2.DESCRIPTOR.services_by_name["RegistryService"].full_name


def artifact_keys(
    settings: RegistrySettings, secret_store: SecretStore | None = None
) -> SecretStoreBlobKeys:
    """Where the blob store gets and unwraps data keys: the settings' artifact
    encryption key in ``secret_store`` (by default the one the settings configure)."""
    return SecretStoreBlobKeys(
        secret_store or settings.open_secret_store(), settings.artifact_encryption_key
    )


def open_store(
    settings: RegistrySettings, *, keys: SecretStoreBlobKeys | None = None
) -> RegistryStore:
    """The store under the settings' database and data directory, migrated.

    Blobs are encrypted when ``settings.encrypt_artifacts`` is on, with data keys
    from ``keys`` (by default :func:`artifact_keys` of the settings), which also
    decrypt blobs stored encrypted earlier.
    """
    directory = settings.service_data_dir
    directory.mkdir(parents=True, exist_ok=True)
    engine = create_engine(
        settings.database_url or sqlite_url(directory / "registry.db"),
        pool_size=settings.worker_threads,
    )
    upgrade_to_head(engine)
    blobs = BlobStore(
        directory / "blobs",
        keys=keys or artifact_keys(settings),
        encrypt=settings.encrypt_artifacts,
    )
    return RegistryStore(engine, blobs)


async def build_server(
    settings: RegistrySettings,
    *,
    gate: PromotionGate | None = None,
    secret_store: SecretStore | None = None,
) -> ConveyorServer:
    """Open (and migrate) the store, sweep orphaned blobs, make sure the artifact
    signing and encryption keys exist, start serving behind authentication.

    ``secret_store`` signs artifact digests, wraps the data keys that encrypt
    blobs at rest and holds the token keys; by default
    the one the settings configure (the local store under the data directory
    unless Vault is set). ``gate`` defaults to the policy service's promotion
    gates (``settings.promotion_gate``).
    """
    secrets = secret_store or settings.open_secret_store()
    signer = ArtifactSigner(secrets, settings.artifact_signing_key)
    keys = artifact_keys(settings, secrets)
    ensure = [signer.ensure_key, *([keys.ensure_key] if settings.encrypt_artifacts else [])]
    for ensure_key in ensure:
        try:
            await asyncio.to_thread(ensure_key)
        except UnavailableError as error:
            # Serve what needs no secret store (plaintext blobs, metadata), and
            # refuse uploads until it is back (each one tries the key again).
            logger.warning(
                "secret store unavailable at start-up; uploads fail until it returns",
                extra={"backend": secrets.backend, "cause": error.reason},
            )
            break
    if not settings.encrypt_artifacts:
        logger.warning("artifacts are stored unencrypted (encrypt_artifacts is off)")
    store = await asyncio.to_thread(open_store, settings, keys=keys)
    removed = await asyncio.to_thread(store.collect_garbage)
    if removed:
        logger.info("removed orphaned blobs", extra={"count": removed})
    workers = WorkerThreads(settings.worker_threads, name="registry-store")
    watch_hub = AliasWatchHub(
        store, workers, poll_interval_s=settings.watch_poll_interval.total_seconds()
    )
    policy_channel = None
    if gate is None and settings.promotion_gate == "policy":
        policy_channel = service_channel(
            settings,
            secrets,
            target=settings.auth.policy_addr,
            audience="policy",
            services=[policy_service_pb2.DESCRIPTOR.services_by_name["PolicyService"]],
        )
        gate = PolicyPromotionGate(policy_channel)
    elif gate is None:
        logger.warning("promotion gates are off: aliases move without policy checks")
        gate = NoPromotionGate()
    interceptors = server_auth_interceptors(
        settings, secrets, resolver=registry_resolver(store, workers)
    )
    servicer = RegistryServicer(
        store,
        watch_hub,
        workers,
        gate=gate,
        signer=signer,
        max_artifact_bytes=settings.max_artifact_bytes,
    )
    server = await create_server(
        settings,
        [
            ServiceRegistration(
                SERVICE_NAME,
                lambda s: registry_service_pb2_grpc.add_RegistryServiceServicer_to_server(
                    servicer, s
                ),
            )
        ],
        interceptors=interceptors,
    )

    async def close_channels() -> None:
        for interceptor in interceptors:
            if isinstance(interceptor, AuthInterceptor):
                await interceptor.close()
        if policy_channel is not None:
            await policy_channel.close(None)

    server.before_stop.append(watch_hub.close)
    # Threads of cancelled calls may still hold connections: let them finish first.
    server.on_shutdown.extend([workers.shutdown, store.engine.dispose, close_channels])
    return server
