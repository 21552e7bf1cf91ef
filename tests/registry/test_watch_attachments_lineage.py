"""The alias watch stream, attachments on versions, and lineage between versions."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import grpc
import pytest

from conveyor.registry.v1 import registry_messages_pb2 as rpc
from conveyor.registry.v1 import registry_service_pb2_grpc
from conveyor.registry.v1 import resources_pb2 as pb
from conveyor.services.registry.server import build_server
from conveyor.services.registry.settings import RegistrySettings
from conveyor.shared.errors import ConveyorError, InvalidArgumentError, from_rpc_error
from conveyor.shared.server import ConveyorServer
from tests.support.registry import (
    a_version,
    create_model,
    create_version,
    refused,
    set_alias,
    upload_requests,
)

if TYPE_CHECKING:
    Registry = registry_service_pb2_grpc.RegistryServiceAsyncStub
    Watch = grpc.aio.UnaryStreamCall[rpc.WatchAliasesRequest, rpc.WatchAliasesResponse]

MIB = 1024 * 1024
EXISTING = pb.ALIAS_EVENT_TYPE_EXISTING
SYNCED = pb.ALIAS_EVENT_TYPE_SYNCED
SET = pb.ALIAS_EVENT_TYPE_SET
DELETED = pb.ALIAS_EVENT_TYPE_DELETED


def violated_fields(error: ConveyorError) -> set[str]:
    assert isinstance(error, InvalidArgumentError)
    return {v.field for v in error.violations}


@pytest.fixture
async def other_client(registry_server: ConveyorServer) -> AsyncIterator[Registry]:
    """A second client of the same registry (the one that moves aliases)."""
    async with grpc.aio.insecure_channel(f"127.0.0.1:{registry_server.port}") as channel:
        yield registry_service_pb2_grpc.RegistryServiceStub(channel)


async def delete_alias(registry: Registry, name: str) -> pb.Alias:
    request = rpc.DeleteAliasRequest(name=name, reason="test")
    return (await registry.DeleteAlias(request, timeout=10)).alias


# -- WatchAliases ------------------------------------------------------------


def watch(
    registry: Registry, parent: str, *, alias_ids: list[str] | None = None, start: int = 0
) -> Watch:
    request = rpc.WatchAliasesRequest(
        parent=parent, alias_ids=alias_ids or [], start_revision=start
    )
    return registry.WatchAliases(request, timeout=60)


async def next_event(call: Watch) -> rpc.WatchAliasesResponse:
    event = await asyncio.wait_for(call.read(), timeout=10)
    assert isinstance(event, rpc.WatchAliasesResponse), "the watch stream ended"
    return event


async def until_synced(call: Watch) -> tuple[list[rpc.WatchAliasesResponse], int]:
    """The events before SYNCED, and SYNCED's revision."""
    events: list[rpc.WatchAliasesResponse] = []
    while (event := await next_event(call)).type != SYNCED:
        events.append(event)
    assert not event.HasField("alias")
    return events, event.revision


def summary(event: rpc.WatchAliasesResponse) -> tuple[int, str, str, int]:
    """(type, alias name, version, revision): what a hot-swapping client acts on."""
    return event.type, event.alias.name, event.alias.version, event.revision


@pytest.fixture
async def churn(registry: Registry) -> list[str]:
    """Model `churn` with three versions; `fraud` with one."""
    await create_model(registry, "churn")
    versions = [(await create_version(registry, "churn", bytes([i]))).name for i in (1, 2, 3)]
    await create_model(registry, "fraud")
    await create_version(registry, "fraud")
    return versions


async def test_watch_sends_the_current_state_then_every_change_in_order(
    registry: Registry, other_client: Registry, churn: list[str]
) -> None:
    v1, v2, v3 = churn
    production = await set_alias(registry, "models/churn/aliases/production", v1)
    canary = await set_alias(registry, "models/churn/aliases/canary", v2)
    await set_alias(registry, "models/fraud/aliases/production", "models/fraud/versions/1")

    call = watch(registry, "models/churn")
    try:
        initial, synced = await until_synced(call)
        assert synced == 3  # the registry-wide revision, fraud's change included
        assert all(e.type == EXISTING for e in initial)
        assert {e.alias.name: (e.alias, e.revision) for e in initial} == {
            production.name: (production, 1),
            canary.name: (canary, 2),
        }

        await set_alias(other_client, "models/churn/aliases/production", v2)  # 4
        await set_alias(other_client, "models/fraud/aliases/canary", "models/fraud/versions/1")
        await delete_alias(other_client, "models/churn/aliases/canary")  # 6
        await set_alias(other_client, "models/churn/aliases/staging", v3)  # 7
        live = [await next_event(call) for _ in range(3)]
        assert [summary(e) for e in live] == [
            (SET, "models/churn/aliases/production", v2, 4),
            (DELETED, "models/churn/aliases/canary", v2, 6),
            (SET, "models/churn/aliases/staging", v3, 7),
        ]
        assert live[0].alias.previous_version == v1
        assert live[1].alias.reason == "test"
        assert live[1].alias.revision == 6  # the deletion's revision, not the last set's
        assert [e.alias.revision for e in live] == [e.revision for e in live]
    finally:
        call.cancel()


async def test_a_watch_resumes_after_a_revision(
    registry: Registry, other_client: Registry, churn: list[str]
) -> None:
    v1, v2, v3 = churn
    await set_alias(registry, "models/churn/aliases/production", v1)  # 1
    await set_alias(registry, "models/churn/aliases/canary", v2)  # 2
    await set_alias(registry, "models/churn/aliases/production", v2)  # 3
    await delete_alias(registry, "models/churn/aliases/canary")  # 4

    call = watch(registry, "models/churn", start=2)
    try:
        replayed, synced = await until_synced(call)
        assert [summary(e) for e in replayed] == [
            (SET, "models/churn/aliases/production", v2, 3),
            (DELETED, "models/churn/aliases/canary", v2, 4),
        ]
        assert synced == 4
        await set_alias(other_client, "models/churn/aliases/canary", v3)
        assert summary(await next_event(call)) == (SET, "models/churn/aliases/canary", v3, 5)
    finally:
        call.cancel()

    # Resuming from the newest revision replays nothing.
    call = watch(registry, "models/churn", start=5)
    try:
        assert await until_synced(call) == ([], 5)
    finally:
        call.cancel()


async def test_a_watch_can_follow_only_some_aliases(
    registry: Registry, other_client: Registry, churn: list[str]
) -> None:
    v1, v2, _ = churn
    await set_alias(registry, "models/churn/aliases/production", v1)  # 1
    await set_alias(registry, "models/churn/aliases/canary", v2)  # 2

    call = watch(registry, "models/churn", alias_ids=["production"])
    try:
        initial, synced = await until_synced(call)
        assert [summary(e) for e in initial] == [
            (EXISTING, "models/churn/aliases/production", v1, 1)
        ]
        assert synced == 2
        await set_alias(other_client, "models/churn/aliases/canary", v1)  # 3: filtered out
        await set_alias(other_client, "models/fraud/aliases/production", "models/fraud/versions/1")
        await set_alias(other_client, "models/churn/aliases/production", v2)  # 5
        assert summary(await next_event(call)) == (SET, "models/churn/aliases/production", v2, 5)
    finally:
        call.cancel()


async def test_a_watch_on_every_model(
    registry: Registry, other_client: Registry, churn: list[str]
) -> None:
    v1, _, _ = churn
    await set_alias(registry, "models/churn/aliases/production", v1)  # 1
    await set_alias(registry, "models/fraud/aliases/staging", "models/fraud/versions/1")  # 2

    call = watch(registry, "models/-")
    try:
        initial, synced = await until_synced(call)
        assert sorted(summary(e) for e in initial) == [
            (EXISTING, "models/churn/aliases/production", v1, 1),
            (EXISTING, "models/fraud/aliases/staging", "models/fraud/versions/1", 2),
        ]
        assert synced == 2
        await delete_alias(other_client, "models/fraud/aliases/staging")
        await set_alias(other_client, "models/churn/aliases/canary", v1)
        assert [summary(await next_event(call)) for _ in range(2)] == [
            (DELETED, "models/fraud/aliases/staging", "models/fraud/versions/1", 3),
            (SET, "models/churn/aliases/canary", v1, 4),
        ]
    finally:
        call.cancel()


async def test_bad_watches_are_refused(registry: Registry, churn: list[str]) -> None:
    cases: list[tuple[rpc.WatchAliasesRequest, grpc.StatusCode, str]] = [
        (rpc.WatchAliasesRequest(parent="models/nobody"), grpc.StatusCode.NOT_FOUND, ""),
        (
            rpc.WatchAliasesRequest(parent="models/churn", start_revision=-1),
            grpc.StatusCode.INVALID_ARGUMENT,
            "start_revision",
        ),
        (
            rpc.WatchAliasesRequest(parent="models/churn", alias_ids=["production", "Bad!"]),
            grpc.StatusCode.INVALID_ARGUMENT,
            "alias_ids[1]",
        ),
        (rpc.WatchAliasesRequest(parent="churn"), grpc.StatusCode.INVALID_ARGUMENT, "parent"),
    ]
    for request, code, field in cases:
        call = registry.WatchAliases(request, timeout=10)
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await asyncio.wait_for(call.read(), timeout=10)
        assert raised.value.code() == code, request
        if field:
            assert field in violated_fields(from_rpc_error(raised.value)), request


async def test_a_watch_from_a_future_revision_is_refused(
    registry: Registry, churn: list[str]
) -> None:
    await set_alias(registry, "models/churn/aliases/production", churn[0])  # 1
    call = watch(registry, "models/churn", start=50)
    try:
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await asyncio.wait_for(call.read(), timeout=10)
        assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    finally:
        call.cancel()


async def test_resuming_a_watch_on_an_unknown_model_is_not_found(
    registry: Registry, churn: list[str]
) -> None:
    await set_alias(registry, "models/churn/aliases/production", churn[0])  # 1
    call = watch(registry, "models/nobody", start=1)
    try:
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await asyncio.wait_for(call.read(), timeout=10)
        assert raised.value.code() == grpc.StatusCode.NOT_FOUND
    finally:
        call.cancel()


async def test_revisions_never_go_down_along_the_stream(
    registry: Registry, churn: list[str]
) -> None:
    v1, v2, _ = churn
    await set_alias(registry, "models/churn/aliases/production", v1)  # 1
    await set_alias(registry, "models/churn/aliases/canary", v2)  # 2
    call = watch(registry, "models/churn")
    try:
        initial, synced = await until_synced(call)
        revisions = [e.revision for e in initial] + [synced]
        assert revisions == sorted(revisions)
    finally:
        call.cancel()


async def test_a_draining_server_ends_watches_with_unavailable(
    registry_settings: RegistrySettings,
) -> None:
    server = await build_server(registry_settings)
    drain: asyncio.Task[None] | None = None
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            registry = registry_service_pb2_grpc.RegistryServiceStub(channel)
            await create_model(registry, "churn")
            call = watch(registry, "models/churn")
            assert await until_synced(call) == ([], 0)
            drain = asyncio.create_task(server.shutdown())
            # The stream ends: with an error status (read raises) or with OK (EOF).
            with contextlib.suppress(grpc.aio.AioRpcError):
                ended = await asyncio.wait_for(call.read(), timeout=10)
                assert not isinstance(ended, rpc.WatchAliasesResponse), ended  # EOF
            assert await call.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        await (drain or server.shutdown())


# -- attachments -------------------------------------------------------------


def a_report(content: bytes = b'{"contributions": [0.4, 0.1]}', **fields: Any) -> pb.Attachment:
    values: dict[str, Any] = {
        "kind": pb.ATTACHMENT_KIND_EXPLANATION_REPORT,
        "content_type": "application/json",
        "content": content,
    }
    values.update(fields)
    return pb.Attachment(**values)


async def attach(
    registry: Registry, parent: str, attachment: pb.Attachment, attachment_id: str = ""
) -> pb.Attachment:
    request = rpc.CreateAttachmentRequest(
        parent=parent, attachment_id=attachment_id, attachment=attachment
    )
    return (await registry.CreateAttachment(request, timeout=10)).attachment


async def attachment_names(registry: Registry, parent: str, **fields: Any) -> list[str]:
    reply = await registry.ListAttachments(
        rpc.ListAttachmentsRequest(parent=parent, **fields), timeout=10
    )
    return [a.name for a in reply.attachments]


async def test_an_attachment_is_stored_and_read_back(registry: Registry, churn: list[str]) -> None:
    v1 = churn[0]
    content = b'{"method": "kernel_shap", "contributions": [0.4, -0.1, 0.05]}'
    created = await attach(
        registry,
        v1,
        a_report(content, display_name="SHAP report", source="trainingJobs/j-1"),
        "shap-1",
    )
    assert created.name == f"{v1}/attachments/shap-1"
    assert created.content == b""  # not echoed back
    assert created.size_bytes == len(content)
    assert created.sha256 == hashlib.sha256(content).hexdigest()
    assert created.kind == pb.ATTACHMENT_KIND_EXPLANATION_REPORT
    assert (created.display_name, created.source) == ("SHAP report", "trainingJobs/j-1")
    assert created.content_type == "application/json"
    assert created.created_by == "user:anonymous"
    assert created.create_time.seconds > 0

    got = await registry.GetAttachment(rpc.GetAttachmentRequest(name=created.name), timeout=10)
    assert got.attachment.content == content
    expected = pb.Attachment()
    expected.CopyFrom(created)
    expected.content = content
    assert got.attachment == expected

    generated = await attach(registry, v1, a_report())
    assert generated.name.startswith(f"{v1}/attachments/")
    assert generated.name != created.name
    error = await refused(
        registry.GetAttachment(
            rpc.GetAttachmentRequest(name=f"{v1}/attachments/missing"), timeout=10
        ),
        grpc.StatusCode.NOT_FOUND,
    )
    assert error.reason == "ATTACHMENT_NOT_FOUND"


async def test_attachments_are_listed_newest_first_filtered_and_paged(
    registry: Registry, churn: list[str]
) -> None:
    v1, v2, _ = churn
    await set_alias(registry, "models/churn/aliases/production", v1)
    first = await attach(registry, v1, a_report(b"first"), "first")
    optimisation = await attach(
        registry, v1, a_report(b"o", kind=pb.ATTACHMENT_KIND_OPTIMIZATION_REPORT), "opt"
    )
    second = await attach(registry, v1, a_report(b"second"), "second")
    await attach(registry, v2, a_report(b"elsewhere"), "first")  # another version's

    newest_first = [second.name, optimisation.name, first.name]
    assert await attachment_names(registry, v1) == newest_first
    assert await attachment_names(registry, "models/churn@production") == newest_first
    assert await attachment_names(registry, v1, order_by="create_time") == newest_first[::-1]
    assert await attachment_names(registry, v1, filter="kind=EXPLANATION_REPORT") == [
        second.name,
        first.name,
    ]
    listed = await registry.ListAttachments(rpc.ListAttachmentsRequest(parent=v1), timeout=10)
    assert all(a.content == b"" and a.size_bytes > 0 for a in listed.attachments)

    pages: list[list[str]] = []
    token = ""
    while True:
        reply = await registry.ListAttachments(
            rpc.ListAttachmentsRequest(parent=v1, page_size=1, page_token=token), timeout=10
        )
        pages.append([a.name for a in reply.attachments])
        if not (token := reply.next_page_token):
            break
    assert pages == [[name] for name in newest_first]

    await refused(
        registry.ListAttachments(
            rpc.ListAttachmentsRequest(parent=v1, filter="colour=blue"), timeout=10
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    await refused(
        registry.ListAttachments(rpc.ListAttachmentsRequest(parent=v1, page_size=-1), timeout=10),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    await refused(
        registry.ListAttachments(
            rpc.ListAttachmentsRequest(parent="models/churn/versions/9"), timeout=10
        ),
        grpc.StatusCode.NOT_FOUND,
    )


async def test_request_id_makes_attaching_idempotent(registry: Registry, churn: list[str]) -> None:
    v1 = churn[0]
    request = rpc.CreateAttachmentRequest(parent=v1, attachment=a_report(), request_id="req-1")
    first = await registry.CreateAttachment(request, timeout=10)
    again = await registry.CreateAttachment(request, timeout=10)
    assert again.attachment == first.attachment  # the same generated id, not a second one
    assert await attachment_names(registry, v1) == [first.attachment.name]

    different = rpc.CreateAttachmentRequest(
        parent=v1, attachment=a_report(b"other content"), request_id="req-1"
    )
    error = await refused(
        registry.CreateAttachment(different, timeout=10), grpc.StatusCode.ALREADY_EXISTS
    )
    assert error.reason == "REQUEST_ID_CONFLICT"

    await attach(registry, v1, a_report(), "report")
    error = await refused(
        registry.CreateAttachment(
            rpc.CreateAttachmentRequest(
                parent=v1, attachment_id="report", attachment=a_report(b"newer")
            ),
            timeout=10,
        ),
        grpc.StatusCode.ALREADY_EXISTS,
    )
    assert error.reason == "ATTACHMENT_EXISTS"
    got = await registry.GetAttachment(
        rpc.GetAttachmentRequest(name=f"{v1}/attachments/report"), timeout=10
    )
    assert got.attachment.content == a_report().content  # the first one stays
    assert await attachment_names(registry, v1) == [
        f"{v1}/attachments/report",
        first.attachment.name,
    ]


async def test_bad_attachments_are_refused_and_store_nothing(
    registry: Registry, churn: list[str]
) -> None:
    v1 = churn[0]
    await set_alias(registry, "models/churn/aliases/production", v1)
    cases: list[tuple[str, str, pb.Attachment, grpc.StatusCode, set[str]]] = [
        (
            v1,
            "",
            pb.Attachment(content_type="application/json"),
            grpc.StatusCode.INVALID_ARGUMENT,
            {"attachment.kind", "attachment.content"},
        ),
        (
            v1,
            "",
            a_report(content_type=""),
            grpc.StatusCode.INVALID_ARGUMENT,
            {"attachment.content_type"},
        ),
        (
            v1,
            "",
            a_report(display_name="x" * 129),
            grpc.StatusCode.INVALID_ARGUMENT,
            {"attachment.display_name"},
        ),
        (v1, "Not_An_Id", a_report(), grpc.StatusCode.INVALID_ARGUMENT, {"attachment_id"}),
        # An attachment belongs to one exact version, never to whatever an alias names.
        ("models/churn@production", "", a_report(), grpc.StatusCode.INVALID_ARGUMENT, {"parent"}),
        ("models/churn/versions/9", "", a_report(), grpc.StatusCode.NOT_FOUND, set()),
        ("models/nobody/versions/1", "", a_report(), grpc.StatusCode.NOT_FOUND, set()),
    ]
    for parent, attachment_id, attachment, code, fields in cases:
        request = rpc.CreateAttachmentRequest(
            parent=parent, attachment_id=attachment_id, attachment=attachment
        )
        error = await refused(registry.CreateAttachment(request, timeout=10), code)
        if fields:
            assert violated_fields(error) == fields, (parent, attachment)
    assert await attachment_names(registry, v1) == []


async def test_attachment_content_is_at_most_8_mib(
    registry_server: ConveyorServer, churn: list[str]
) -> None:
    v1 = churn[0]
    # A default channel sends and receives at most 4 MiB per message.
    options = [
        ("grpc.max_send_message_length", 16 * MIB),
        ("grpc.max_receive_message_length", 16 * MIB),
    ]
    async with grpc.aio.insecure_channel(
        f"127.0.0.1:{registry_server.port}", options=options
    ) as channel:
        registry = registry_service_pb2_grpc.RegistryServiceStub(channel)
        error = await refused(
            registry.CreateAttachment(
                rpc.CreateAttachmentRequest(parent=v1, attachment=a_report(b"x" * (8 * MIB + 1))),
                timeout=30,
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
        )
        assert violated_fields(error) == {"attachment.content"}
        assert await attachment_names(registry, v1) == []

        largest = bytes(range(256)) * (8 * MIB // 256)
        created = await attach(registry, v1, a_report(largest), "largest")
        assert created.size_bytes == 8 * MIB
        got = await registry.GetAttachment(rpc.GetAttachmentRequest(name=created.name), timeout=30)
        assert got.attachment.content == largest


async def test_attaching_to_an_archived_version_is_refused(
    registry: Registry, churn: list[str]
) -> None:
    v1 = churn[0]
    await registry.ArchiveModelVersion(rpc.ArchiveModelVersionRequest(name=v1), timeout=10)
    await refused(
        registry.CreateAttachment(
            rpc.CreateAttachmentRequest(parent=v1, attachment=a_report()), timeout=10
        ),
        grpc.StatusCode.FAILED_PRECONDITION,
    )
    assert await attachment_names(registry, v1) == []


# -- lineage -----------------------------------------------------------------


def derived(parent: str, transformation: str) -> dict[str, Any]:
    return {"lineage": pb.Lineage(parent_version=parent, transformation=transformation)}


@pytest.fixture
async def family(registry: Registry) -> list[str]:
    """exported/1 <- exported/2 <- exported/3, and exported/1 <- tuned/1 (made last)."""
    await create_model(registry, "exported")
    await create_model(registry, "tuned")
    v1 = (await create_version(registry, "exported", b"1", model_card="# v1")).name
    v2 = (await create_version(registry, "exported", b"2", **derived(v1, "onnx_export"))).name
    v3 = (await create_version(registry, "exported", b"3", **derived(v2, "int8_dynamic"))).name
    v4 = (await create_version(registry, "tuned", b"4", **derived(v1, "fine_tuning"))).name
    return [v1, v2, v3, v4]


async def lineage(registry: Registry, name: str, **fields: Any) -> rpc.GetLineageResponse:
    return await registry.GetLineage(rpc.GetLineageRequest(name=name, **fields), timeout=10)


def edges(reply: rpc.GetLineageResponse) -> set[tuple[str, str, str]]:
    found = [(e.parent_version, e.child_version, e.transformation) for e in reply.edges]
    assert len(found) == len(set(found)), "an edge is listed twice"
    return set(found)


def names_of(versions: Any) -> list[str]:
    return [v.name for v in versions]


async def test_lineage_walks_both_ways_from_a_version(
    registry: Registry, family: list[str]
) -> None:
    v1, v2, v3, _ = family
    reply = await lineage(registry, v2)
    assert reply.model_version.name == v2
    assert names_of(reply.ancestors) == [v1]
    assert names_of(reply.descendants) == [v3]
    assert edges(reply) == {(v1, v2, "onnx_export"), (v2, v3, "int8_dynamic")}
    # BASIC view: the model card is left out.
    assert reply.ancestors[0].model_card == ""
    full = await registry.GetModelVersion(rpc.GetModelVersionRequest(name=v1), timeout=10)
    assert full.model_version.model_card == "# v1"


async def test_lineage_descendants_are_breadth_first_across_models(
    registry: Registry, family: list[str]
) -> None:
    v1, v2, v3, v4 = family
    reply = await lineage(registry, v1, direction=pb.LINEAGE_DIRECTION_DESCENDANTS)
    assert names_of(reply.ancestors) == []
    assert names_of(reply.descendants) == [v2, v4, v3]  # v4 was created after v3
    assert edges(reply) == {
        (v1, v2, "onnx_export"),
        (v1, v4, "fine_tuning"),
        (v2, v3, "int8_dynamic"),
    }

    one_level = await lineage(registry, v1, direction=pb.LINEAGE_DIRECTION_DESCENDANTS, max_depth=1)
    assert names_of(one_level.descendants) == [v2, v4]
    assert edges(one_level) == {(v1, v2, "onnx_export"), (v1, v4, "fine_tuning")}

    up = await lineage(registry, v3, direction=pb.LINEAGE_DIRECTION_ANCESTORS)
    assert (names_of(up.ancestors), names_of(up.descendants)) == ([v2, v1], [])  # nearest first
    up_one = await lineage(registry, v3, direction=pb.LINEAGE_DIRECTION_ANCESTORS, max_depth=1)
    assert names_of(up_one.ancestors) == [v2]
    assert edges(up_one) == {(v2, v3, "int8_dynamic")}

    sibling = await lineage(registry, v4)  # both ways: its parent, but not its cousins
    assert (names_of(sibling.ancestors), names_of(sibling.descendants)) == ([v1], [])


async def test_lineage_resolves_an_alias_and_refuses_bad_requests(
    registry: Registry, family: list[str]
) -> None:
    v1, v2, v3, _ = family
    await set_alias(registry, "models/exported/aliases/production", v2)
    reply = await lineage(registry, "models/exported@production")
    assert reply.model_version.name == v2
    assert (names_of(reply.ancestors), names_of(reply.descendants)) == ([v1], [v3])

    error = await refused(
        registry.GetLineage(rpc.GetLineageRequest(name=v2, max_depth=-1), timeout=10),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert violated_fields(error) == {"max_depth"}
    for missing in ("models/exported/versions/9", "models/exported@canary", "models/no/versions/1"):
        await refused(
            registry.GetLineage(rpc.GetLineageRequest(name=missing), timeout=10),
            grpc.StatusCode.NOT_FOUND,
        )


async def test_a_lineage_parent_must_be_a_version_name(
    registry: Registry, family: list[str]
) -> None:
    v2 = family[1]
    await set_alias(registry, "models/exported/aliases/production", v2)
    for parent in ("models/exported@production", "models/exported"):
        version = a_version(**derived(parent, "int8_static"))
        error = await refused(
            registry.CreateModelVersion(
                upload_requests("models/exported", b"child", version=version), timeout=10
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
        )
        assert violated_fields(error) == {"metadata.model_version.lineage.parent_version"}
    model = await registry.GetModel(rpc.GetModelRequest(name="models/exported"), timeout=10)
    assert model.model.latest_version == "models/exported/versions/3"  # nothing was created


async def test_a_lineage_parent_must_already_exist(registry: Registry) -> None:
    await create_model(registry, "loop")
    error = await refused(
        create_version(registry, "loop", b"1", **derived("models/loop/versions/2", "x")),
        grpc.StatusCode.FAILED_PRECONDITION,
    )
    assert error.reason == "PARENT_VERSION_NOT_FOUND"
    model = await registry.GetModel(rpc.GetModelRequest(name="models/loop"), timeout=10)
    assert model.model.latest_version == ""  # nothing was created
