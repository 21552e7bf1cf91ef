"""Credentials a service presents, the interceptors it serves with, and the
developer tokens of ``conveyor up``.

- :class:`ServiceCredentials`: a service's own short-lived tokens, one per
  audience (the peer called), renewed before they expire; pass
  ``credentials.token_provider("registry")`` to
  :func:`conveyor.shared.channel.create_channel`.
- :func:`service_channel`: a channel to a peer that calls as this service.
- :func:`server_auth_interceptors`: what ``build_server`` passes to
  :func:`conveyor.shared.server.create_server`.
- :func:`write_dev_credentials`: token files (0600) for local users.
"""

from __future__ import annotations

import functools
import logging
import os
import re
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import grpc
from google.protobuf.descriptor import ServiceDescriptor

from conveyor.policy.v1 import policy_service_pb2
from conveyor.shared.auth.authorizer import Authorizer, DecisionCache, PolicyServiceAuthorizer
from conveyor.shared.auth.interceptor import AuthInterceptor, ResourceResolver, default_resource
from conveyor.shared.auth.principal import Principal, Resource, service_principal
from conveyor.shared.auth.tokens import (
    DEFAULT_ISSUER,
    TokenIssuer,
    TokenVerifier,
    ensure_token_keys,
)
from conveyor.shared.channel import MIB, create_channel
from conveyor.shared.ports import SERVICE_PORTS
from conveyor.shared.secrets.base import SecretStore

if TYPE_CHECKING:  # conveyor.shared.settings imports this package: no import cycle at run time
    from conveyor.shared.settings import ClientSettings, ServiceSettings

logger = logging.getLogger(__name__)

RENEW_AT: Final = 0.8
"""Share of a token's lifetime after which :class:`ServiceCredentials` renews it."""

DEV_USERS: Final = (
    Principal(kind="user", id="alice", roles=("data_scientist",), team="team-a"),
    Principal(kind="user", id="erin", roles=("ml_engineer",), team="team-a"),
    Principal(kind="user", id="bob", roles=("approver",)),
    Principal(kind="user", id="sam", roles=("security_auditor",)),
    Principal(kind="user", id="priya", roles=("privacy_officer",)),
)
"""The local users ``conveyor up`` issues tokens to: one per role."""

_FILE_STEM = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}\Z")

POLICY_SERVICE: Final = policy_service_pb2.DESCRIPTOR.services_by_name["PolicyService"]


class ServiceCredentials:
    """The bearer tokens of the service identity ``service``.

    :meth:`token` issues one token per audience and hands it out until 80% of
    ``ttl`` has passed, then issues a fresh one, so a token is never used close
    to its expiry. ``clock`` is monotonic seconds (tests move it). Thread-safe.
    """

    def __init__(
        self,
        issuer: TokenIssuer,
        service: str,
        ttl: timedelta = timedelta(minutes=5),
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if ttl <= timedelta(0):
            raise ValueError("a token lifetime must be positive")
        self.issuer = issuer
        self.principal = service_principal(service)
        self.ttl = ttl
        self._clock = clock
        self._lock = threading.Lock()
        self._tokens: dict[str, tuple[float, str]] = {}

    def __repr__(self) -> str:
        return f"ServiceCredentials(principal={self.principal.text!r}, ttl={self.ttl!r})"

    def token(self, audience: str) -> str:
        """A valid token for calls to the service ``audience``. Blocks when it issues
        one and the signing keys need reading."""
        with self._lock:
            now = self._clock()
            cached = self._tokens.get(audience)
            if cached is not None and now < cached[0]:
                return cached[1]
            token = self.issuer.issue(self.principal, [audience], self.ttl)
            self._tokens[audience] = (now + self.ttl.total_seconds() * RENEW_AT, token)
            return token

    def token_provider(self, audience: str) -> Callable[[], str]:
        """What ``create_channel(token_provider=...)`` takes for calls to ``audience``."""
        return functools.partial(self.token, audience)


def default_resolver(service: str) -> ResourceResolver:
    """A resolver that names resources by :func:`default_resource` alone (no owner
    team), for services whose policies do not look at ownership."""

    async def resolve(method: str, request: Any) -> Resource:
        return default_resource(service, method, request)

    return resolve


def service_channel(
    settings: ServiceSettings,
    store: SecretStore,
    *,
    target: str,
    audience: str,
    services: Iterable[ServiceDescriptor] = (),
    client: ClientSettings | None = None,
    max_message_bytes: int = 16 * MIB,
) -> grpc.aio.Channel:
    """A channel to the peer service ``audience`` at ``target`` on which every call
    carries a token of this service (``service:{settings.service_name}``) for that
    peer, renewed before it expires; messages up to ``max_message_bytes`` each way.

    TLS and the default deadline come from ``client`` (default:
    ``ClientSettings()``, that is ``CONVEYOR_TLS_*``). Tokens are sent whatever
    this service's own auth mode: the peer decides whether it needs them. They
    are issued on the first call, not here. Close the channel on shutdown.
    """
    if client is None:
        from conveyor.shared.settings import ClientSettings  # see the TYPE_CHECKING import

        client = ClientSettings()
    credentials = ServiceCredentials(
        TokenIssuer(store, settings.auth.issuer),
        settings.service_name,
        settings.auth.service_token_ttl,
    )
    return create_channel(
        target,
        services=services,
        default_timeout=client.default_timeout,
        tls=client.tls(),
        token_provider=credentials.token_provider(audience),
        max_message_bytes=max_message_bytes,
    )


def server_auth_interceptors(
    settings: ServiceSettings,
    store: SecretStore,
    *,
    resolver: ResourceResolver,
    authorizer: Authorizer | None = None,
    client: ClientSettings | None = None,
) -> list[grpc.aio.ServerInterceptor[Any, Any]]:
    """The interceptors a server of ``settings.service_name`` authenticates with.

    Empty when ``settings.auth.mode`` is ``off``. The default ``authorizer``
    asks the policy service at ``settings.auth.policy_addr`` as this service
    (its own tokens), over TLS when ``client`` (default: ``ClientSettings()``)
    names a CA, and caches answers per the auth settings; the policy service
    itself passes its local authorizer. A client certificate names the caller
    only where the server requires them (``tls_client_ca_file``).

    Call it on the event loop while building the server (it opens a channel);
    it blocks briefly to make sure the token keys exist in ``store``. Add each
    interceptor's ``close`` to the server's ``on_shutdown``.
    """
    auth = settings.auth
    service = settings.service_name
    if auth.mode == "off":
        logger.warning(
            "authentication is off: every call is allowed and attributed to user:anonymous",
            extra={"service": service},
        )
        return []
    ensure_token_keys(store)
    if authorizer is None:
        channel = service_channel(
            settings,
            store,
            target=auth.policy_addr,
            audience="policy",
            services=[POLICY_SERVICE],
            client=client,
        )
        authorizer = PolicyServiceAuthorizer(
            channel, DecisionCache(auth.decision_cache_size, auth.decision_cache_ttl)
        )
    verifier = TokenVerifier(store, service, auth.issuer, auth.clock_leeway)
    interceptor = AuthInterceptor(
        service,
        verifier,
        authorizer,
        resolver,
        trust_client_certificates=settings.tls_enabled and settings.tls_client_ca_file is not None,
    )
    return [interceptor]


def write_dev_credentials(
    store: SecretStore,
    directory: Path,
    users: Iterable[Principal] = DEV_USERS,
    *,
    ttl: timedelta = timedelta(hours=8),
    issuer: str = DEFAULT_ISSUER,
    audiences: Sequence[str] = tuple(SERVICE_PORTS),
) -> dict[str, Path]:
    """Write a token for each of ``users`` to ``directory/<id>.token`` (0600, in a
    0700 directory), valid at every service for ``ttl``; returns id -> path.

    For the one-command local run only: production users get tokens from the
    organisation's identity provider. Blocks (store and file I/O).
    """
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    directory.chmod(0o700)
    token_issuer = TokenIssuer(store, issuer)
    written: dict[str, Path] = {}
    for user in users:
        if not _FILE_STEM.match(user.id):
            raise ValueError(f"user id {user.id!r} cannot name a token file")
        path = directory / f"{user.id}.token"
        _write_private(path, token_issuer.issue(user, audiences, ttl).encode("ascii") + b"\n")
        written[user.id] = path
    logger.info(
        "wrote development credentials",
        extra={"directory": str(directory), "users": ",".join(sorted(written))},
    )
    return written


def _write_private(path: Path, data: bytes) -> None:
    """Replace ``path`` atomically with a new 0600 file holding ``data``."""
    temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(descriptor, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
