"""Aliases: set, move, compare-and-set, delete, list, and the promotion gate hook."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import grpc
import pytest
import sqlalchemy
from google.protobuf.field_mask_pb2 import FieldMask

from conveyor.registry.v1 import registry_messages_pb2 as rpc
from conveyor.registry.v1 import registry_service_pb2_grpc
from conveyor.registry.v1 import resources_pb2 as pb
from conveyor.services.registry import schema
from conveyor.services.registry.server import build_server
from conveyor.services.registry.settings import RegistrySettings
from conveyor.shared.errors import FailedPreconditionError
from tests.support.registry import create_model, create_version, download, refused, set_alias

if TYPE_CHECKING:
    Registry = registry_service_pb2_grpc.RegistryServiceAsyncStub

ANONYMOUS = "user:anonymous"


async def all_aliases(registry: Registry, parent: str = "models/-") -> dict[str, str]:
    """Alias name -> version, over every page."""
    found: dict[str, str] = {}
    token = ""
    while True:
        reply = await registry.ListAliases(
            rpc.ListAliasesRequest(parent=parent, page_token=token), timeout=10
        )
        found.update((a.name, a.version) for a in reply.aliases)
        if not (token := reply.next_page_token):
            return found


async def version_of(registry: Registry, name: str) -> pb.ModelVersion:
    reply = await registry.GetModelVersion(rpc.GetModelVersionRequest(name=name), timeout=10)
    return reply.model_version


# -- set and move ------------------------------------------------------------


async def test_set_alias_creates_then_moves_it(registry: Registry) -> None:
    await create_model(registry, "churn")
    v1 = await create_version(registry, "churn", b"one")
    v2 = await create_version(registry, "churn", b"two")

    created = await set_alias(registry, "models/churn/aliases/production", v1.name, "first release")
    assert created.name == "models/churn/aliases/production"
    assert created.version == v1.name
    assert created.previous_version == ""
    assert created.revision == 1  # a fresh registry: the first alias change
    assert created.updated_by == ANONYMOUS
    assert created.reason == "first release"
    assert created.decision == ""  # no policy service configured
    assert created.update_time.seconds > 0

    moved = await set_alias(registry, "models/churn/aliases/production", v2.name, "promote v2")
    assert moved.version == v2.name
    assert moved.previous_version == v1.name
    assert moved.revision == 2
    assert moved.reason == "promote v2"
    assert moved.update_time.ToNanoseconds() >= created.update_time.ToNanoseconds()

    # Setting it where it already points changes nothing, not even the reason.
    again = await set_alias(registry, "models/churn/aliases/production", v2.name, "again")
    assert again == moved

    # The revision counter is shared by every model.
    await create_model(registry, "fraud")
    fraud_v1 = await create_version(registry, "fraud")
    other = await set_alias(registry, "models/fraud/aliases/production", fraud_v1.name)
    assert other.revision == 3
    assert await all_aliases(registry) == {
        "models/churn/aliases/production": v2.name,
        "models/fraud/aliases/production": fraud_v1.name,
    }


async def test_models_and_versions_show_their_aliases_and_stage(registry: Registry) -> None:
    await create_model(registry, "churn")
    v1 = await create_version(registry, "churn", b"one")
    v2 = await create_version(registry, "churn", b"two")
    assert (await version_of(registry, v1.name)).stage == pb.STAGE_NONE

    stages = [
        ("staging", pb.STAGE_STAGING),
        ("canary", pb.STAGE_CANARY),
        ("production", pb.STAGE_PRODUCTION),
    ]
    held: list[str] = []
    for alias_id, stage in stages:  # each well-known alias outranks the ones before
        await set_alias(registry, f"models/churn/aliases/{alias_id}", v1.name)
        held.append(alias_id)
        got = await version_of(registry, v1.name)
        assert sorted(got.aliases) == sorted(held)
        assert got.stage == stage

    await set_alias(registry, "models/churn/aliases/shadow", v2.name)  # not a stage alias
    got_v2 = await version_of(registry, v2.name)
    assert list(got_v2.aliases) == ["shadow"]
    assert got_v2.stage == pb.STAGE_NONE

    await set_alias(registry, "models/churn/aliases/production", v2.name)
    assert (await version_of(registry, v2.name)).stage == pb.STAGE_PRODUCTION
    assert (await version_of(registry, v1.name)).stage == pb.STAGE_CANARY

    model = await registry.GetModel(rpc.GetModelRequest(name="models/churn"), timeout=10)
    assert dict(model.model.aliases) == {
        "staging": v1.name,
        "canary": v1.name,
        "production": v2.name,
        "shadow": v2.name,
    }


async def test_an_alias_reference_resolves_to_the_version_it_points_at(
    registry: Registry,
) -> None:
    await create_model(registry, "churn")
    v1 = await create_version(registry, "churn", b"weights of v1")
    v2 = await create_version(registry, "churn", b"weights of v2")
    await set_alias(registry, "models/churn/aliases/production", v1.name)

    assert (await version_of(registry, "models/churn@production")).name == v1.name
    messages, data = await download(registry, "models/churn@production")
    assert messages[0].model_version == v1.name
    assert data == b"weights of v1"

    await set_alias(registry, "models/churn/aliases/production", v2.name)
    assert (await version_of(registry, "models/churn@production")).name == v2.name
    messages, data = await download(registry, "models/churn@production")
    assert messages[0].model_version == v2.name
    assert data == b"weights of v2"

    error = await refused(
        registry.GetModelVersion(
            rpc.GetModelVersionRequest(name="models/churn@canary"), timeout=10
        ),
        grpc.StatusCode.NOT_FOUND,
    )
    assert error.reason == "VERSION_NOT_FOUND"


# -- compare-and-set ---------------------------------------------------------


async def test_expected_version_refuses_a_move_when_the_alias_moved(registry: Registry) -> None:
    await create_model(registry, "churn")
    v1, v2, v3 = [await create_version(registry, "churn", bytes([i])) for i in (1, 2, 3)]
    current = await set_alias(registry, "models/churn/aliases/production", v2.name)

    # A rollback computed against v1 must not undo the newer promotion to v2.
    error = await refused(
        registry.SetAlias(
            rpc.SetAliasRequest(
                name="models/churn/aliases/production",
                version=v3.name,
                reason="rollback",
                expected_version=v1.name,
            ),
            timeout=10,
        ),
        grpc.StatusCode.ABORTED,
    )
    assert error.reason == "ALIAS_MOVED"
    assert error.metadata["current_version"] == v2.name
    assert await all_aliases(registry) == {"models/churn/aliases/production": v2.name}
    # `-`: the alias must not exist yet.
    error = await refused(
        registry.SetAlias(
            rpc.SetAliasRequest(
                name="models/churn/aliases/production",
                version=v3.name,
                reason="create",
                expected_version="-",
            ),
            timeout=10,
        ),
        grpc.StatusCode.ABORTED,
    )
    assert error.reason == "ALIAS_MOVED"
    # An expected version on an alias that does not exist fails too.
    error = await refused(
        registry.SetAlias(
            rpc.SetAliasRequest(
                name="models/churn/aliases/canary",
                version=v3.name,
                reason="create",
                expected_version=v1.name,
            ),
            timeout=10,
        ),
        grpc.StatusCode.ABORTED,
    )
    assert error.reason == "ALIAS_MOVED"
    assert await all_aliases(registry) == {"models/churn/aliases/production": v2.name}

    moved = await set_alias(
        registry, "models/churn/aliases/production", v3.name, "promote", expected=v2.name
    )
    assert (moved.version, moved.previous_version) == (v3.name, v2.name)
    assert moved.revision == current.revision + 1  # the refusals used no revision
    created = await set_alias(
        registry, "models/churn/aliases/canary", v1.name, "create", expected="-"
    )
    assert created.revision == moved.revision + 1
    assert await all_aliases(registry) == {
        "models/churn/aliases/canary": v1.name,
        "models/churn/aliases/production": v3.name,
    }


async def test_concurrent_compare_and_set_lets_exactly_one_move_win(
    registry: Registry, registry_settings: RegistrySettings
) -> None:
    await create_model(registry, "churn")
    base, *rivals = [(await create_version(registry, "churn", bytes([i]))).name for i in range(4)]
    start = await set_alias(registry, "models/churn/aliases/production", base)

    async def move(target: str) -> pb.Alias | grpc.StatusCode:
        try:
            return await set_alias(
                registry, "models/churn/aliases/production", target, "race", expected=base
            )
        except grpc.aio.AioRpcError as error:
            return error.code()

    async with all_moves_in_flight(registry_settings, len(rivals)):
        moves = [asyncio.create_task(move(v)) for v in rivals]
    outcomes = await asyncio.gather(*moves)
    winners = [o for o in outcomes if isinstance(o, pb.Alias)]
    assert len(winners) == 1, f"{len(winners)} moves from {base} won"
    assert [o for o in outcomes if not isinstance(o, pb.Alias)] == [grpc.StatusCode.ABORTED] * 2
    assert winners[0].previous_version == base
    assert winners[0].revision == start.revision + 1
    assert await all_aliases(registry) == {"models/churn/aliases/production": winners[0].version}


@contextlib.asynccontextmanager
async def all_moves_in_flight(settings: RegistrySettings, moves: int) -> AsyncIterator[None]:
    """On PostgreSQL, hold the alias revision counter's row lock until `moves`
    transactions wait on a lock, so that they all run at once (left to the thread
    scheduler, the race is lost only some of the time). SQLite runs writers one
    at a time, so there is nothing to line up."""
    if settings.database_url is None:
        yield
        return
    engine = sqlalchemy.create_engine(settings.database_url)
    try:
        with engine.connect() as holder, engine.connect() as observer:
            counter = schema.counters.c.name == schema.ALIAS_REVISION_COUNTER
            holder.execute(sqlalchemy.select(schema.counters).where(counter).with_for_update())
            yield
            waiting = sqlalchemy.text(
                "SELECT count(*) FROM pg_stat_activity "
                "WHERE datname = current_database() AND wait_event_type = 'Lock'"
            )
            for _ in range(500):  # at most ~5 s; a fix may queue the moves elsewhere
                if observer.execute(waiting).scalar_one() >= moves:
                    break
                observer.rollback()
                await asyncio.sleep(0.01)
            holder.commit()
    finally:
        engine.dispose()


# -- bad input ---------------------------------------------------------------


@dataclass(frozen=True)
class BadSet:
    alias: str
    version: str
    code: grpc.StatusCode
    reason: str = ""
    field: str = ""
    why: str = "because"


BAD_SETS = {
    "uppercase alias id": BadSet(
        "models/churn/aliases/Prod", "models/churn/versions/1", grpc.StatusCode.INVALID_ARGUMENT,
        field="name",
    ),
    "all-digit alias id": BadSet(
        "models/churn/aliases/42", "models/churn/versions/1", grpc.StatusCode.INVALID_ARGUMENT,
        field="name",
    ),
    "not an alias name": BadSet(
        "models/churn/production", "models/churn/versions/1", grpc.StatusCode.INVALID_ARGUMENT,
        field="name",
    ),
    "latest is reserved": BadSet(
        "models/churn/aliases/latest", "models/churn/versions/1",
        grpc.StatusCode.INVALID_ARGUMENT, reason="INVALID_NAME", field="name",
    ),
    "version of another model": BadSet(
        "models/churn/aliases/canary", "models/fraud/versions/1",
        grpc.StatusCode.INVALID_ARGUMENT, field="version",
    ),
    "version given as an alias": BadSet(
        "models/churn/aliases/canary", "models/churn@production",
        grpc.StatusCode.INVALID_ARGUMENT, field="version",
    ),
    "missing reason": BadSet(
        "models/churn/aliases/canary", "models/churn/versions/1",
        grpc.StatusCode.INVALID_ARGUMENT, field="reason", why="  ",
    ),
    "reason over 1 KiB": BadSet(
        "models/churn/aliases/canary", "models/churn/versions/1",
        grpc.StatusCode.INVALID_ARGUMENT, field="reason", why="x" * 1025,
    ),
    "archived version": BadSet(
        "models/churn/aliases/canary", "models/churn/versions/2",
        grpc.StatusCode.FAILED_PRECONDITION, reason="VERSION_ARCHIVED",
    ),
    "blocked version": BadSet(
        "models/churn/aliases/canary", "models/churn/versions/3",
        grpc.StatusCode.FAILED_PRECONDITION, reason="DEPLOYMENT_BLOCKED",
    ),
    "archived model": BadSet(
        "models/retired/aliases/canary", "models/retired/versions/1",
        grpc.StatusCode.FAILED_PRECONDITION, reason="MODEL_ARCHIVED",
    ),
    "unknown model": BadSet(
        "models/nobody/aliases/canary", "models/nobody/versions/1",
        grpc.StatusCode.NOT_FOUND, reason="MODEL_NOT_FOUND",
    ),
    "unknown version": BadSet(
        "models/churn/aliases/canary", "models/churn/versions/9",
        grpc.StatusCode.NOT_FOUND, reason="VERSION_NOT_FOUND",
    ),
}  # fmt: skip


async def test_bad_alias_changes_are_refused_and_change_nothing(registry: Registry) -> None:
    # churn: v1 (production), v2 archived, v3 blocked; fraud: v1; retired: archived.
    await create_model(registry, "churn")
    v1, v2, v3 = [await create_version(registry, "churn", bytes([i])) for i in (1, 2, 3)]
    await set_alias(registry, "models/churn/aliases/production", v1.name)
    await registry.ArchiveModelVersion(rpc.ArchiveModelVersionRequest(name=v2.name), timeout=10)
    blocked = await registry.UpdateModelVersion(
        rpc.UpdateModelVersionRequest(
            model_version=pb.ModelVersion(
                name=v3.name, deployment_block=pb.DeploymentBlock(reason="int8 lost 3 points")
            ),
            update_mask=FieldMask(paths=["deployment_block"]),
        ),
        timeout=10,
    )
    assert blocked.model_version.deployment_block.reason == "int8 lost 3 points"
    assert blocked.model_version.deployment_block.created_by == ANONYMOUS
    await create_model(registry, "fraud")
    await create_version(registry, "fraud")
    await create_model(registry, "retired")
    await create_version(registry, "retired")
    await registry.ArchiveModel(rpc.ArchiveModelRequest(name="models/retired"), timeout=10)
    before = await all_aliases(registry)

    # One server for all cases (a server per case would cost more than the cases).
    for case_id, case in BAD_SETS.items():
        error = await refused(
            registry.SetAlias(
                rpc.SetAliasRequest(name=case.alias, version=case.version, reason=case.why),
                timeout=10,
            ),
            case.code,
        )
        if case.reason:
            assert error.reason == case.reason, case_id
        if case.field:
            fields = {v.field for v in error.violations}  # type: ignore[attr-defined]
            assert case.field in fields, case_id
        assert await all_aliases(registry) == before, case_id

    # The refusals used no revision: the next change gets the one after the setup's.
    after = await set_alias(registry, "models/churn/aliases/staging", v1.name)
    assert after.revision == 2


async def test_archiving_what_an_alias_holds_is_refused(registry: Registry) -> None:
    await create_model(registry, "churn")
    v1 = await create_version(registry, "churn")
    await set_alias(registry, "models/churn/aliases/production", v1.name)

    error = await refused(
        registry.ArchiveModelVersion(rpc.ArchiveModelVersionRequest(name=v1.name), timeout=10),
        grpc.StatusCode.FAILED_PRECONDITION,
    )
    assert error.reason == "VERSION_HAS_ALIASES"
    assert (await version_of(registry, v1.name)).state == pb.MODEL_VERSION_STATE_ACTIVE
    error = await refused(
        registry.ArchiveModel(rpc.ArchiveModelRequest(name="models/churn"), timeout=10),
        grpc.StatusCode.FAILED_PRECONDITION,
    )
    assert error.reason == "MODEL_HAS_ALIASES"
    got = await registry.GetModel(rpc.GetModelRequest(name="models/churn"), timeout=10)
    assert got.model.state == pb.MODEL_STATE_ACTIVE
    # Nor may a version that holds an alias be blocked from deployment.
    error = await refused(
        registry.UpdateModelVersion(
            rpc.UpdateModelVersionRequest(
                model_version=pb.ModelVersion(
                    name=v1.name, deployment_block=pb.DeploymentBlock(reason="bad")
                ),
                update_mask=FieldMask(paths=["deployment_block"]),
            ),
            timeout=10,
        ),
        grpc.StatusCode.FAILED_PRECONDITION,
    )
    assert error.reason == "VERSION_HAS_ALIASES"
    assert not (await version_of(registry, v1.name)).HasField("deployment_block")

    await registry.DeleteAlias(
        rpc.DeleteAliasRequest(name="models/churn/aliases/production", reason="retire"), timeout=10
    )
    archived = await registry.ArchiveModelVersion(
        rpc.ArchiveModelVersionRequest(name=v1.name), timeout=10
    )
    assert archived.model_version.state == pb.MODEL_VERSION_STATE_ARCHIVED
    assert archived.model_version.stage == pb.STAGE_ARCHIVED
    model = await registry.ArchiveModel(rpc.ArchiveModelRequest(name="models/churn"), timeout=10)
    assert model.model.state == pb.MODEL_STATE_ARCHIVED


# -- delete ------------------------------------------------------------------


async def test_delete_alias_returns_it_with_the_deletion_revision(registry: Registry) -> None:
    await create_model(registry, "churn")
    v1 = await create_version(registry, "churn", b"one")
    v2 = await create_version(registry, "churn", b"two")
    await set_alias(registry, "models/churn/aliases/production", v1.name)
    await set_alias(registry, "models/churn/aliases/production", v2.name, "promote")
    await set_alias(registry, "models/churn/aliases/canary", v2.name)

    deleted = await registry.DeleteAlias(
        rpc.DeleteAliasRequest(name="models/churn/aliases/production", reason="take it down"),
        timeout=10,
    )
    alias = deleted.alias
    assert alias.name == "models/churn/aliases/production"
    assert alias.version == v2.name
    assert alias.previous_version == v1.name
    assert alias.revision == 4
    assert alias.reason == "take it down"
    assert alias.updated_by == ANONYMOUS

    assert await all_aliases(registry) == {"models/churn/aliases/canary": v2.name}
    model = await registry.GetModel(rpc.GetModelRequest(name="models/churn"), timeout=10)
    assert dict(model.model.aliases) == {"canary": v2.name}
    assert list((await version_of(registry, v2.name)).aliases) == ["canary"]
    await refused(
        registry.GetModelVersion(
            rpc.GetModelVersionRequest(name="models/churn@production"), timeout=10
        ),
        grpc.StatusCode.NOT_FOUND,
    )
    # Re-creating it starts afresh, with the next revision.
    recreated = await set_alias(registry, "models/churn/aliases/production", v1.name)
    assert (recreated.previous_version, recreated.revision) == ("", 5)


async def test_delete_alias_refusals_change_nothing(registry: Registry) -> None:
    await create_model(registry, "churn")
    v1 = await create_version(registry, "churn", b"one")
    v2 = await create_version(registry, "churn", b"two")
    await set_alias(registry, "models/churn/aliases/production", v2.name)
    before = await all_aliases(registry)

    cases = [
        ("models/churn/aliases/canary", "gone", "", grpc.StatusCode.NOT_FOUND, "ALIAS_NOT_FOUND"),
        ("models/nobody/aliases/production", "x", "", grpc.StatusCode.NOT_FOUND, "MODEL_NOT_FOUND"),
        ("models/churn/aliases/production", "", "", grpc.StatusCode.INVALID_ARGUMENT, ""),
        ("models/churn/aliases/latest", "x", "", grpc.StatusCode.INVALID_ARGUMENT, "INVALID_NAME"),
        ("models/churn/aliases/production", "x", v1.name, grpc.StatusCode.ABORTED, "ALIAS_MOVED"),
    ]
    for name, reason, expected, code, error_reason in cases:
        request = rpc.DeleteAliasRequest(name=name, reason=reason, expected_version=expected)
        error = await refused(registry.DeleteAlias(request, timeout=10), code)
        if error_reason:
            assert error.reason == error_reason, name
        assert await all_aliases(registry) == before, name

    deleted = await registry.DeleteAlias(
        rpc.DeleteAliasRequest(
            name="models/churn/aliases/production", reason="retire", expected_version=v2.name
        ),
        timeout=10,
    )
    assert deleted.alias.revision == 2  # the refusals used no revision
    assert await all_aliases(registry) == {}


# -- listing -----------------------------------------------------------------


async def test_list_aliases_pages_over_every_model(registry: Registry) -> None:
    for model_id in ("alpha", "beta"):
        await create_model(registry, model_id)
        await create_version(registry, model_id)
    # Set out of name order: the listing is ordered by name, not by revision.
    await set_alias(registry, "models/beta/aliases/staging", "models/beta/versions/1")
    await set_alias(registry, "models/alpha/aliases/production", "models/alpha/versions/1")
    await set_alias(registry, "models/alpha/aliases/canary", "models/alpha/versions/1")

    pages: list[list[str]] = []
    token = ""
    while True:
        reply = await registry.ListAliases(
            rpc.ListAliasesRequest(parent="models/-", page_size=1, page_token=token), timeout=10
        )
        pages.append([a.name for a in reply.aliases])
        if not (token := reply.next_page_token):
            break
    assert pages == [
        ["models/alpha/aliases/canary"],
        ["models/alpha/aliases/production"],
        ["models/beta/aliases/staging"],
    ]

    one_model = await registry.ListAliases(
        rpc.ListAliasesRequest(parent="models/alpha"), timeout=10
    )
    assert [a.name for a in one_model.aliases] == [
        "models/alpha/aliases/canary",
        "models/alpha/aliases/production",
    ]
    assert one_model.next_page_token == ""

    first = await registry.ListAliases(
        rpc.ListAliasesRequest(parent="models/-", page_size=1), timeout=10
    )
    # A token belongs to the request it came from.
    await refused(
        registry.ListAliases(
            rpc.ListAliasesRequest(parent="models/beta", page_token=first.next_page_token),
            timeout=10,
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    await refused(
        registry.ListAliases(rpc.ListAliasesRequest(parent="models/-", page_size=-1), timeout=10),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    await refused(
        registry.ListAliases(rpc.ListAliasesRequest(parent="models/nobody"), timeout=10),
        grpc.StatusCode.NOT_FOUND,
    )


# -- the promotion gate ------------------------------------------------------


@dataclass
class ScriptedGate:
    """A promotion gate standing in for the policy service: refuses `production`
    (listing the failed gates), allows every other alias with a decision."""

    asked: list[tuple[str, str, str, str, str]] = field(default_factory=list)
    refuse_everything: bool = False

    async def evaluate(
        self,
        *,
        model: pb.Model,
        version: pb.ModelVersion,
        alias_id: str,
        change: str,
        principal: str,
        reason: str,
    ) -> str:
        self.asked.append((model.name, version.name, alias_id, principal, reason))
        if alias_id == "production" or self.refuse_everything:
            raise FailedPreconditionError(
                f"promotion of {version.name} to {alias_id} refused: 2 gates failed",
                reason="PROMOTION_REFUSED",
                metadata={
                    "decision": "decisions/refused-1",
                    "failed_gates": "explanation_report,four_eyes",
                },
            )
        return "decisions/abc"


@pytest.fixture
async def gated(
    registry_settings: RegistrySettings,
) -> AsyncIterator[tuple[Registry, ScriptedGate]]:
    gate = ScriptedGate()
    server = await build_server(registry_settings, gate=gate)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            yield registry_service_pb2_grpc.RegistryServiceStub(channel), gate
    finally:
        await server.shutdown()


async def test_the_promotion_gate_decides_every_alias_move(
    gated: tuple[Registry, ScriptedGate],
) -> None:
    registry, gate = gated
    await create_model(registry, "churn")
    v1 = await create_version(registry, "churn")

    allowed = await set_alias(registry, "models/churn/aliases/staging", v1.name, "ready to test")
    assert allowed.decision == "decisions/abc"
    assert gate.asked == [("models/churn", v1.name, "staging", ANONYMOUS, "ready to test")]
    listed = await registry.ListAliases(rpc.ListAliasesRequest(parent="models/churn"), timeout=10)
    assert listed.aliases[0].decision == "decisions/abc"

    error = await refused(
        registry.SetAlias(
            rpc.SetAliasRequest(
                name="models/churn/aliases/production", version=v1.name, reason="ship it"
            ),
            timeout=10,
        ),
        grpc.StatusCode.FAILED_PRECONDITION,
    )
    assert error.reason == "PROMOTION_REFUSED"
    assert error.metadata == {
        "decision": "decisions/refused-1",
        "failed_gates": "explanation_report,four_eyes",
    }
    assert gate.asked[-1] == ("models/churn", v1.name, "production", ANONYMOUS, "ship it")
    assert await all_aliases(registry) == {"models/churn/aliases/staging": v1.name}
    got = await version_of(registry, v1.name)
    assert (list(got.aliases), got.stage) == (["staging"], pb.STAGE_STAGING)
    # The refusal used no revision.
    canary = await set_alias(registry, "models/churn/aliases/canary", v1.name)
    assert canary.revision == allowed.revision + 1


async def test_the_promotion_gate_is_asked_before_an_alias_is_deleted(
    gated: tuple[Registry, ScriptedGate],
) -> None:
    registry, gate = gated
    await create_model(registry, "churn")
    v1 = await create_version(registry, "churn")
    await set_alias(registry, "models/churn/aliases/canary", v1.name)
    gate.refuse_everything = True

    error = await refused(
        registry.DeleteAlias(
            rpc.DeleteAliasRequest(name="models/churn/aliases/canary", reason="take down"),
            timeout=10,
        ),
        grpc.StatusCode.FAILED_PRECONDITION,
    )
    assert error.reason == "PROMOTION_REFUSED"
    assert await all_aliases(registry) == {"models/churn/aliases/canary": v1.name}
