"""Helpers for the policy service's tests: a service identity's stub, checks of
error details and health, and direct access to the stores' SQLite databases (to
tamper with them the way an attacker with file access would)."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, closing, contextmanager
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING

import grpc

from conveyor.policy.v1 import policy_messages_pb2 as policy_rpc
from conveyor.policy.v1 import policy_service_pb2_grpc
from conveyor.policy.v1 import resources_pb2 as policy_pb
from conveyor.registry.v1 import resources_pb2 as pb
from conveyor.shared.auth.principal import Principal
from conveyor.shared.channel import create_channel
from conveyor.shared.errors import InvalidArgumentError
from conveyor.shared.health import serving_status
from tests.support.registry import create_model, create_version, refused
from tests.support.suite import ALICE, ERIN, Suite

if TYPE_CHECKING:
    from conveyor.policy.v1.policy_service_pb2_grpc import PolicyServiceAsyncStub

TRAINER = Principal("service", "trainer", ("service",))
"""The trainer's service identity: may ask policy for decisions (Authorize)."""
REGISTRY = Principal("service", "registry", ("service",))
"""The registry's service identity: may evaluate promotions for its callers."""


@asynccontextmanager
async def service_stub(
    suite: Suite, principal: Principal, audiences: tuple[str, ...] = ("policy",)
) -> AsyncIterator[PolicyServiceAsyncStub]:
    """A policy stub calling with a token for ``principal`` and ``audiences``."""
    channel = create_channel(
        suite.policy_target,
        bearer_token=suite.token(principal, audiences),
        default_timeout=timedelta(seconds=30),
    )
    try:
        yield policy_service_pb2_grpc.PolicyServiceStub(channel)
    finally:
        await channel.close(None)


async def invalid(call: object, *fields: str) -> InvalidArgumentError:
    """The INVALID_ARGUMENT a call fails with, after checking that its field
    violations name exactly ``fields`` (in any order) when given."""
    error = await refused(call, grpc.StatusCode.INVALID_ARGUMENT)
    assert isinstance(error, InvalidArgumentError)
    if fields:
        assert sorted(v.field for v in error.violations) == sorted(fields), error.violations
    return error


async def assert_serving(target: str) -> None:
    """The server at ``target`` still reports SERVING (asked from a thread: the
    server runs on this event loop)."""
    assert await asyncio.to_thread(serving_status, target) == "SERVING"


def policy_db(suite: Suite) -> Path:
    return suite.data_dir / "policy" / "policy.db"


def registry_db(suite: Suite) -> Path:
    return suite.data_dir / "registry" / "registry.db"


@contextmanager
def sqlite(path: Path) -> Iterator[sqlite3.Connection]:
    """A connection to a service's database that commits on success."""
    with closing(sqlite3.connect(path, timeout=10)) as connection, connection:
        yield connection


async def governed_model(
    suite: Suite, model_id: str = "fraud", risk: int = pb.RISK_TIER_MEDIUM
) -> None:
    """A team A model with an accuracy threshold of 0.9 and a GDPR tag."""
    await create_model(
        suite.registry(ERIN),
        model_id,
        owner_team="team-a",
        risk_tier=risk,
        compliance_tags=["gdpr"],
        promotion_thresholds=[
            pb.MetricThreshold(
                metric="accuracy", comparison=pb.THRESHOLD_COMPARISON_GREATER_OR_EQUAL, value=0.9
            )
        ],
    )


async def team_a_model(
    suite: Suite, model_id: str = "fraud", risk: int = pb.RISK_TIER_MEDIUM
) -> pb.ModelVersion:
    """A :func:`governed_model` and its first version (accuracy 0.95)."""
    await governed_model(suite, model_id, risk)
    return await create_version(suite.registry(ALICE), model_id, b"v1", metrics={"accuracy": 0.95})


def authorize_request(
    principal: Principal = ALICE,
    action: str = "registry.SetAlias",
    resource_type: str = "registry.conveyor.dev/Model",
    resource_name: str = "models/fraud",
    **context: object,
) -> policy_rpc.AuthorizeRequest:
    """A question a service asks about ``principal`` (context: an alias change
    to ``staging`` unless given)."""
    request = policy_rpc.AuthorizeRequest(
        principal=principal.to_proto(),
        action=action,
        resource=policy_pb.Resource(name=resource_name, type=resource_type, owner_team="team-a"),
    )
    request.context.update(context or {"alias": "staging"})
    return request
