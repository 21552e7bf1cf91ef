"""Helpers for the auth tests: the real policies as an Authorizer, principals,
a clock, and a real registry servicer behind the authentication interceptor."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import grpc

from conveyor.registry.v1 import registry_service_pb2_grpc
from conveyor.services.policy.engine import PolicyEngine
from conveyor.services.registry import authorization
from conveyor.services.registry.server import SERVICE_NAME, open_store
from conveyor.services.registry.servicer import NoPromotionGate, RegistryServicer
from conveyor.services.registry.settings import RegistrySettings
from conveyor.services.registry.signing import ArtifactSigner
from conveyor.services.registry.store import RegistryStore
from conveyor.services.registry.watch import AliasWatchHub
from conveyor.shared.auth import (
    AuthorizationResult,
    Principal,
    Resource,
    ResourceResolver,
)
from conveyor.shared.secrets import SecretStore
from conveyor.shared.server import ConveyorServer, ServiceRegistration, create_server
from conveyor.shared.settings import ServiceSettings
from conveyor.shared.workers import WorkerThreads

POLICY_DIR = Path(__file__).resolve().parents[2] / "policies"

ALICE = Principal(kind="user", id="alice", roles=("data_scientist",), team="team-a")
"""A data scientist of team A."""
MALLORY = Principal(kind="user", id="mallory", roles=("data_scientist",), team="team-b")
"""A data scientist of team B."""
NOBODY = Principal(kind="user", id="nobody")
"""A user with no role: the policies allow it nothing."""


class ManualClock:
    """A clock that moves only when the test says so."""

    def __init__(self, now: float = 1_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@dataclass(frozen=True)
class Asked:
    """One question an :class:`EngineAuthorizer` answered."""

    principal: Principal
    action: str
    resource: Resource
    context: Mapping[str, str]
    allowed: bool


@dataclass
class EngineAuthorizer:
    """The Authorizer protocol over the real Cedar policies, in process, recording
    every question (what the policy service does, minus the audit log)."""

    engine: PolicyEngine
    asked: list[Asked] = field(default_factory=list)

    async def authorize(
        self,
        principal: Principal,
        action: str,
        resource: Resource,
        context: Mapping[str, str],
    ) -> AuthorizationResult:
        decision = self.engine.authorize(principal, action, resource, context)
        self.asked.append(Asked(principal, action, resource, dict(context), decision.allowed))
        return AuthorizationResult(
            allowed=decision.allowed,
            decision_id=str(uuid.uuid4()),
            policy_ids=tuple(decision.policy_ids),
            reasons=tuple(decision.reasons),
            cache_ttl=timedelta(0),
        )


_RESOLVER_WORKERS = WorkerThreads(2, name="auth-test-resolver")


def registry_resolver(store: RegistryStore) -> ResourceResolver:
    """The registry's own resolver over ``store`` (with the tests' worker threads)."""
    return authorization.registry_resolver(store, _RESOLVER_WORKERS)


@dataclass
class HostedRegistry:
    """A real registry servicer served behind the given interceptors."""

    server: ConveyorServer
    store: RegistryStore

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.server.port}"


async def host_registry(
    settings: ServiceSettings,
    secret_store: SecretStore,
    interceptors: Callable[[RegistryStore], Sequence[grpc.aio.ServerInterceptor[Any, Any]]],
) -> HostedRegistry:
    """Build the registry's servicer the way its server module does, and serve it
    with ``create_server(settings, ..., interceptors=interceptors(store))``."""
    registry_settings = RegistrySettings(data_dir=settings.data_dir)
    store = await asyncio.to_thread(open_store, registry_settings)
    workers = WorkerThreads(2, name="registry-auth-test")
    watch_hub = AliasWatchHub(store, workers, poll_interval_s=1.0)
    signer = ArtifactSigner(secret_store, registry_settings.artifact_signing_key)
    await asyncio.to_thread(signer.ensure_key)
    servicer = RegistryServicer(
        store,
        watch_hub,
        workers,
        gate=NoPromotionGate(),
        signer=signer,
        max_artifact_bytes=registry_settings.max_artifact_bytes,
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
        interceptors=interceptors(store),
    )
    server.before_stop.append(watch_hub.close)
    server.on_shutdown.extend([workers.shutdown, store.engine.dispose])
    return HostedRegistry(server=server, store=store)
