"""The registry and the policy service together, both authenticating every call
and asking policy about it, as ``conveyor up`` runs them: the fixture for the
security tests.

Both servers share one local secret store (token keys, artifact and audit
signing keys). Each needs the other's address: the policy service's port is
reserved first (bound and released), the registry starts told to ask policy
there, then the policy service starts on that port, told where the registry is.
"""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING

import grpc

from conveyor.policy.v1 import policy_service_pb2_grpc
from conveyor.registry.v1 import registry_service_pb2_grpc
from conveyor.services.policy.server import build_server as build_policy
from conveyor.services.policy.settings import PolicySettings
from conveyor.services.registry.server import build_server as build_registry
from conveyor.services.registry.settings import RegistrySettings
from conveyor.shared.auth import TokenIssuer
from conveyor.shared.auth.principal import Principal
from conveyor.shared.auth.settings import AuthSettings
from conveyor.shared.channel import create_channel
from conveyor.shared.secrets import LocalSecretStore
from conveyor.shared.server import ConveyorServer

if TYPE_CHECKING:
    from conveyor.policy.v1.policy_service_pb2_grpc import PolicyServiceAsyncStub
    from conveyor.registry.v1.registry_service_pb2_grpc import RegistryServiceAsyncStub

ALICE = Principal("user", "alice", ("data_scientist",), "team-a")
"""Data scientist of team A."""
ERIN = Principal("user", "erin", ("ml_engineer",), "team-a")
"""ML engineer of team A: may move team A's production alias."""
BOB = Principal("user", "bob", ("approver",))
CAROL = Principal("user", "carol", ("approver",))
SAM = Principal("user", "sam", ("security_auditor",))
MALLORY = Principal("user", "mallory", ("data_scientist",), "team-b")
"""Data scientist of team B."""


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def free_base_port() -> int:
    """N such that N+1 … N+7 are free on loopback now (``conveyor up --base-port``)."""
    for _ in range(50):
        base = free_port() - 1
        if base + 8 > 65535:
            continue
        try:
            for offset in range(1, 8):
                with socket.socket() as taken:
                    taken.bind(("127.0.0.1", base + offset))
        except OSError:
            continue
        return base
    raise RuntimeError("no block of 7 free ports")


@dataclass
class Suite:
    """Running registry and policy servers and a token issuer for people."""

    registry_server: ConveyorServer
    policy_server: ConveyorServer
    secret_store: LocalSecretStore
    data_dir: Path
    _channels: list[grpc.aio.Channel] = field(default_factory=list)

    @property
    def registry_target(self) -> str:
        return f"127.0.0.1:{self.registry_server.port}"

    @property
    def policy_target(self) -> str:
        return f"127.0.0.1:{self.policy_server.port}"

    def token(self, principal: Principal, audiences: Iterable[str] = ("registry", "policy")) -> str:
        return TokenIssuer(self.secret_store).issue(
            principal, tuple(audiences), timedelta(minutes=5)
        )

    def _channel(self, target: str, principal: Principal | None) -> grpc.aio.Channel:
        token = self.token(principal) if principal is not None else None
        channel = create_channel(target, bearer_token=token, default_timeout=timedelta(seconds=30))
        self._channels.append(channel)
        return channel

    def registry(self, principal: Principal | None) -> RegistryServiceAsyncStub:
        """A registry stub calling as ``principal`` (None: no credentials)."""
        return registry_service_pb2_grpc.RegistryServiceStub(
            self._channel(self.registry_target, principal)
        )

    def policy(self, principal: Principal | None) -> PolicyServiceAsyncStub:
        """A policy stub calling as ``principal`` (None: no credentials)."""
        return policy_service_pb2_grpc.PolicyServiceStub(
            self._channel(self.policy_target, principal)
        )

    async def close(self) -> None:
        for channel in self._channels:
            await channel.close(None)
        await self.registry_server.shutdown()
        await self.policy_server.shutdown()


@asynccontextmanager
async def running_suite(
    data_dir: Path, *, decision_cache_ttl: timedelta = timedelta(seconds=5)
) -> AsyncIterator[Suite]:
    """Start the registry and the policy service with authentication on."""
    secret_store = LocalSecretStore(data_dir / "secrets")
    policy_port = free_port()
    auth = AuthSettings(mode="enforce", policy_addr=f"127.0.0.1:{policy_port}")
    registry_server = await build_registry(
        RegistrySettings(data_dir=data_dir, auth=auth), secret_store=secret_store
    )
    policy_server = await build_policy(
        PolicySettings(
            data_dir=data_dir,
            listen=f"127.0.0.1:{policy_port}",
            auth=auth,
            registry_addr=f"127.0.0.1:{registry_server.port}",
            decision_cache_ttl=decision_cache_ttl,
            head_sign_interval=timedelta(seconds=3600),
        ),
        secret_store=secret_store,
    )
    suite = Suite(registry_server, policy_server, secret_store, data_dir)
    try:
        yield suite
    finally:
        await suite.close()
