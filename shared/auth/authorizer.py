"""Asking whether a principal may act, and remembering the answers briefly.

:class:`Authorizer` is what the authentication interceptor asks about each call.
Every service but the policy service uses :class:`PolicyServiceAuthorizer`,
which calls ``PolicyService.Authorize`` (where the decision is recorded in the
audit log) and keeps each answer in a :class:`DecisionCache` for as long as the
policy service allows, capped by the settings. When the policy service cannot
answer, the call is refused (fail closed), never allowed.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Hashable, Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Protocol

import grpc
from google.protobuf import struct_pb2

from conveyor.policy.v1 import policy_messages_pb2, policy_service_pb2_grpc, resources_pb2
from conveyor.shared.auth.principal import Principal, Resource
from conveyor.shared.errors import UnavailableError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class AuthorizationResult:
    """One answer: allowed or not, and why."""

    allowed: bool
    """True only on an explicit allow."""
    decision_id: str
    """The recorded decision (``decisions/{decision_id}``); empty if none was recorded."""
    policy_ids: tuple[str, ...]
    """The policies that determined the outcome."""
    reasons: tuple[str, ...]
    """Human-readable reasons, fit for the caller's error message."""
    cache_ttl: timedelta
    """How long the answer may be reused for the same question; 0: not at all."""


class Authorizer(Protocol):
    """Decides whether ``principal`` may perform ``action`` on ``resource``."""

    async def authorize(
        self,
        principal: Principal,
        action: str,
        resource: Resource,
        context: Mapping[str, str],
    ) -> AuthorizationResult:
        """The answer; raises UnavailableError when no answer can be had."""
        ...


CacheKey = tuple[Hashable, ...]
"""What identifies one question (see :func:`decision_cache_key`)."""


class DecisionCache:
    """A bounded LRU of answers, each kept until its own expiry.

    At most ``max_entries`` answers (the least recently used go first), each
    for ``min(its ttl, max_ttl)``; an answer with no time to live is not kept.
    ``clock`` is monotonic seconds (tests move it). Used from one event loop.

    :meth:`get_or_fetch` also joins concurrent misses for the same question into
    one request: without it, N callers that miss at once would each ask (and
    each be recorded in the audit log).
    """

    def __init__(
        self,
        max_entries: int,
        max_ttl: timedelta,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_entries < 0:
            raise ValueError("max_entries must not be negative")
        self.max_entries = max_entries
        self.max_ttl = max_ttl
        self._clock = clock
        self._entries: OrderedDict[CacheKey, tuple[float, AuthorizationResult]] = OrderedDict()
        self._in_flight: dict[CacheKey, asyncio.Task[AuthorizationResult]] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: CacheKey) -> AuthorizationResult | None:
        """The answer cached under ``key`` if it has not expired."""
        entry = self._entries.get(key)
        if entry is None:
            return None
        expires, result = entry
        if self._clock() >= expires:
            del self._entries[key]
            return None
        self._entries.move_to_end(key)
        return result

    @staticmethod
    def key(
        principal: Principal, action: str, resource: Resource, context: Mapping[str, str]
    ) -> CacheKey:
        """The key of a question (:func:`decision_cache_key`)."""
        return decision_cache_key(principal, action, resource, context)

    def put(self, key: CacheKey, result: AuthorizationResult, ttl: timedelta | None = None) -> None:
        """Keep ``result`` for ``min(ttl, max_ttl)`` if that is positive; ``ttl``
        defaults to the answer's own ``cache_ttl``."""
        keep_for = min(result.cache_ttl if ttl is None else ttl, self.max_ttl).total_seconds()
        if keep_for <= 0 or self.max_entries == 0:
            return
        self._entries[key] = (self._clock() + keep_for, result)
        self._entries.move_to_end(key)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)

    def clear(self) -> None:
        """Forget every answer."""
        self._entries.clear()

    async def get_or_fetch(
        self, key: CacheKey, fetch: Callable[[], Awaitable[AuthorizationResult]]
    ) -> AuthorizationResult:
        """The cached answer, or the answer of the one ``fetch`` in flight for
        ``key`` (started now if none is): concurrent misses share it, and its
        failure reaches each of them. A caller cancelled while waiting does not
        cancel the request the others wait for."""
        cached = self.get(key)
        if cached is not None:
            return cached
        task = self._in_flight.get(key)
        if task is None:
            task = asyncio.ensure_future(self._fetch_and_keep(key, fetch))
            self._in_flight[key] = task
            task.add_done_callback(lambda done: _consume_failure(done))
        return await asyncio.shield(task)

    async def _fetch_and_keep(
        self, key: CacheKey, fetch: Callable[[], Awaitable[AuthorizationResult]]
    ) -> AuthorizationResult:
        try:
            result = await fetch()
            self.put(key, result)
            return result
        finally:
            self._in_flight.pop(key, None)


def _consume_failure(task: asyncio.Task[AuthorizationResult]) -> None:
    # Every waiter sees the failure; if all of them were cancelled, asyncio would
    # otherwise report it as never retrieved.
    if not task.cancelled():
        task.exception()


def decision_cache_key(
    principal: Principal, action: str, resource: Resource, context: Mapping[str, str]
) -> CacheKey:
    """Everything an answer depends on, in a hashable form."""
    return (
        principal,
        action,
        resource.type,
        resource.name,
        resource.owner_team,
        json.dumps(resource.attributes, sort_keys=True, default=str),
        tuple(sorted(context.items())),
    )


class PolicyServiceAuthorizer:
    """Asks the policy service (``PolicyService.Authorize``), through ``cache``.

    ``channel_or_stub`` is a channel to the policy service (closed by
    :meth:`close`) or a ready stub (left to its owner). Any failure of the call,
    whatever its status, raises UnavailableError with reason
    ``POLICY_UNAVAILABLE``: without an answer the caller is refused.
    """

    def __init__(
        self,
        channel_or_stub: grpc.aio.Channel | policy_service_pb2_grpc.PolicyServiceAsyncStub,
        cache: DecisionCache,
        *,
        timeout: timedelta = timedelta(seconds=5),
    ) -> None:
        self._channel: grpc.aio.Channel | None = None
        if isinstance(channel_or_stub, grpc.aio.Channel):
            self._channel = channel_or_stub
            self._stub: policy_service_pb2_grpc.PolicyServiceAsyncStub = (
                policy_service_pb2_grpc.PolicyServiceStub(channel_or_stub)
            )
        else:
            self._stub = channel_or_stub
        self.cache = cache
        self._timeout = timeout.total_seconds()

    async def authorize(
        self,
        principal: Principal,
        action: str,
        resource: Resource,
        context: Mapping[str, str],
    ) -> AuthorizationResult:
        key = self.cache.key(principal, action, resource, context)
        return await self.cache.get_or_fetch(
            key, lambda: self._ask(principal, action, resource, context)
        )

    async def _ask(
        self,
        principal: Principal,
        action: str,
        resource: Resource,
        context: Mapping[str, str],
    ) -> AuthorizationResult:
        request = policy_messages_pb2.AuthorizeRequest(
            principal=principal.to_proto(),
            action=action,
            resource=resource.to_proto(),
            context=_struct(context),
        )
        try:
            response = await self._stub.Authorize(request, timeout=self._timeout)
        except Exception as error:  # noqa: BLE001 - no answer, whatever the cause: refuse
            # The status code or exception type only: a message might quote a credential.
            failure = (
                error.code().name
                if isinstance(error, grpc.aio.AioRpcError)
                else type(error).__name__
            )
            logger.warning(
                "policy service did not answer; refusing the call",
                extra={"action": action, "failure": failure},
            )
            raise UnavailableError(
                f"the policy service could not decide on {action} ({failure}); the call is refused",
                reason="POLICY_UNAVAILABLE",
                metadata={"action": action, "failure": failure},
            ) from None
        return AuthorizationResult(
            allowed=response.outcome == resources_pb2.OUTCOME_ALLOW,
            decision_id=response.decision_id,
            policy_ids=tuple(response.policy_ids),
            reasons=tuple(response.reasons),
            cache_ttl=response.cache_ttl.ToTimedelta(),
        )

    async def close(self) -> None:
        """Close the channel this authorizer was given, if it was given one."""
        if self._channel is not None:
            await self._channel.close(None)


def _struct(values: Mapping[str, str]) -> struct_pb2.Struct:
    struct = struct_pb2.Struct()
    struct.update(dict(values))
    return struct
