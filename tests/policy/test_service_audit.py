"""The policy service's audit-log methods through real servers and stubs:
GetDecision, ListDecisions (filters, order, paging), VerifyAuditLog finding an
edited, deleted or swapped entry at that entry, and ExportAuditLog verified
offline from the exported file alone."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import pytest
from google.protobuf import json_format
from opentelemetry import trace

from conveyor.policy.v1 import policy_messages_pb2 as policy_rpc
from conveyor.policy.v1 import resources_pb2 as policy_pb
from conveyor.services.policy import audit_export, servicer
from conveyor.services.policy.audit import AuditLog
from conveyor.services.policy.settings import PolicySettings
from conveyor.shared.auth.principal import Principal
from conveyor.shared.errors import InvalidArgumentError
from conveyor.shared.storage import create_engine
from conveyor.shared.storage.database import sqlite_url
from tests.support.policy import (
    TRAINER,
    assert_serving,
    authorize_request,
    invalid,
    policy_db,
    service_stub,
    sqlite,
    team_a_model,
)
from tests.support.registry import expect_error
from tests.support.suite import ALICE, BOB, ERIN, MALLORY, SAM, Suite, running_suite

Decision = policy_pb.Decision


@pytest.fixture
async def suite(tmp_path: Path) -> AsyncIterator[Suite]:
    # Decisions about the auditor's own calls are cached for the whole test, so
    # listing and verifying do not add entries while the test inspects the log.
    async with running_suite(tmp_path, decision_cache_ttl=timedelta(minutes=5)) as running:
        yield running


async def some_decisions(suite: Suite) -> str:
    """Allowed and denied authorizations, one traced, and a promotion; returns
    the traced call's trace id."""
    await team_a_model(suite)
    await suite.policy(ERIN).EvaluatePromotion(
        policy_rpc.EvaluatePromotionRequest(model_version="models/fraud/versions/1", alias="prod")
    )
    async with service_stub(suite, TRAINER) as trainer:
        for principal, name in (
            (ALICE, "models/fraud"),
            (MALLORY, "models/fraud"),
            (ALICE, "models/fraudulent"),
            (MALLORY, "models/churn"),
        ):
            await trainer.Authorize(authorize_request(principal, resource_name=name))
        with trace.get_tracer(__name__).start_as_current_span("traced") as span:
            await trainer.Authorize(
                authorize_request(ALICE, "registry.GetModel", resource_name="models/fraud")
            )
    return format(span.get_span_context().trace_id, "032x")


async def all_decisions(suite: Suite) -> list[Decision]:
    reply = await suite.policy(SAM).ListDecisions(policy_rpc.ListDecisionsRequest(page_size=1000))
    assert not reply.next_page_token
    return list(reply.decisions)


async def listed(suite: Suite, filter: str, order_by: str = "") -> list[str]:
    reply = await suite.policy(SAM).ListDecisions(
        policy_rpc.ListDecisionsRequest(filter=filter, order_by=order_by, page_size=1000)
    )
    return [d.name for d in reply.decisions]


def at(decision: Decision) -> datetime:
    return decision.create_time.ToDatetime()


def rfc3339(decision: Decision) -> str:
    return decision.create_time.ToJsonString()


# GetDecision and ListDecisions ---------------------------------------------------------


async def test_get_decision(suite: Suite) -> None:
    await some_decisions(suite)
    decisions = await all_decisions(suite)
    auditor = suite.policy(SAM)
    for decision in decisions:  # whatever the UUID starts with
        got = await auditor.GetDecision(policy_rpc.GetDecisionRequest(name=decision.name))
        assert got.decision == decision
        assert got.decision.entry_hash
        assert got.decision.prev_hash
    for missing in ("decisions/01234567-89ab-4cde-8f01-23456789abcd", f"decisions/{uuid.uuid4()}"):
        await expect_error(
            auditor.GetDecision(policy_rpc.GetDecisionRequest(name=missing)),
            grpc.StatusCode.NOT_FOUND,
        )
    for name in ("decisions/xyz", "decision/" + str(uuid.uuid4()), "decisions/", ""):
        await invalid(auditor.GetDecision(policy_rpc.GetDecisionRequest(name=name)), "name")
    for person in (ALICE, ERIN, BOB):
        await expect_error(
            suite.policy(person).GetDecision(policy_rpc.GetDecisionRequest(name=decisions[0].name)),
            grpc.StatusCode.PERMISSION_DENIED,
        )
    await assert_serving(suite.policy_target)


async def test_list_decisions_filters(suite: Suite) -> None:
    trace_id = await some_decisions(suite)
    decisions = await all_decisions(suite)
    assert [d.sequence for d in decisions] == list(range(1, len(decisions) + 1))

    def expect(keep: Callable[[Decision], bool]) -> list[str]:
        found = [d.name for d in decisions if keep(d)]
        assert found, "the filter should match something"
        return found

    assert await listed(suite, 'principal.id = "mallory"') == expect(
        lambda d: d.principal.id == "mallory"
    )
    assert await listed(suite, 'action = "registry.GetModel"') == expect(
        lambda d: d.action == "registry.GetModel"
    )
    assert await listed(suite, 'resource.name = "models/fraud"') == expect(
        lambda d: d.resource.name == "models/fraud"
    )
    assert await listed(suite, 'resource.name = "models/fraud*"') == expect(
        lambda d: d.resource.name.startswith("models/fraud")
    )
    assert await listed(suite, "outcome = OUTCOME_DENY") == expect(
        lambda d: d.outcome == policy_pb.OUTCOME_DENY
    )
    assert await listed(suite, "kind = DECISION_KIND_PROMOTION") == expect(
        lambda d: d.kind == policy_pb.DECISION_KIND_PROMOTION
    )
    assert await listed(suite, f'trace_id = "{trace_id}"') == expect(
        lambda d: d.trace_id == trace_id
    )
    assert await listed(
        suite, 'principal.id = "alice" AND outcome = OUTCOME_ALLOW AND resource.name = "models/*"'
    ) == expect(
        lambda d: (
            d.principal.id == "alice"
            and d.outcome == policy_pb.OUTCOME_ALLOW
            and d.resource.name.startswith("models/")
        )
    )
    # Restrictions that cannot all hold match nothing.
    assert await listed(suite, "outcome = OUTCOME_UNSPECIFIED") == []
    assert await listed(suite, 'principal.id = "alice" AND principal.id = "mallory"') == []

    middle, later = decisions[len(decisions) // 2], decisions[-2]
    assert await listed(suite, f'create_time >= "{rfc3339(middle)}"') == expect(
        lambda d: at(d) >= at(middle)
    )
    assert await listed(suite, f'create_time < "{rfc3339(middle)}"') == expect(
        lambda d: at(d) < at(middle)
    )
    assert await listed(
        suite, f'create_time > "{rfc3339(middle)}" AND create_time <= "{rfc3339(later)}"'
    ) == expect(lambda d: at(middle) < at(d) <= at(later))
    # Two lower bounds: the later one holds.
    assert await listed(
        suite, f'create_time >= "{rfc3339(later)}" AND create_time >= "{rfc3339(middle)}"'
    ) == expect(lambda d: at(d) >= at(later))

    names = [d.name for d in decisions]
    assert await listed(suite, "", "sequence desc") == names[::-1]
    assert await listed(suite, "", " sequence  desc ") == names[::-1]
    assert await listed(suite, "", "sequence asc") == names
    assert await listed(suite, "", "sequence") == names
    assert await listed(suite, "outcome = OUTCOME_DENY", "sequence desc") == [
        d.name for d in reversed(decisions) if d.outcome == policy_pb.OUTCOME_DENY
    ]


async def test_list_decisions_pages_and_refuses_bad_requests(suite: Suite) -> None:
    await some_decisions(suite)
    names = [d.name for d in await all_decisions(suite)]
    auditor = suite.policy(SAM)
    for order_by, expected in (("", names), ("sequence desc", names[::-1])):
        paged: list[str] = []
        token = ""
        while True:
            reply = await auditor.ListDecisions(
                policy_rpc.ListDecisionsRequest(page_size=3, page_token=token, order_by=order_by)
            )
            assert len(reply.decisions) <= 3
            paged.extend(d.name for d in reply.decisions)
            token = reply.next_page_token
            if not token:
                break
            other = policy_rpc.ListDecisionsRequest(
                page_size=3, page_token=token, order_by=order_by, filter='action = "x.Y"'
            )
            await invalid(auditor.ListDecisions(other), "page_token")
        assert paged == expected

    for bad_filter in (
        'principal = "alice"',
        'principal.id : "alice"',
        'action = "registry.*"',
        "outcome = ALLOWED",
        'create_time = "2026-01-01T00:00:00Z"',
        'create_time >= "yesterday"',
        'create_time >= "2026-01-01T00:00:00"',
        'principal.id = "a" OR principal.id = "b"',
    ):
        await invalid(
            auditor.ListDecisions(policy_rpc.ListDecisionsRequest(filter=bad_filter)), "filter"
        )
    for order_by in ("create_time", "sequence descending", "sequence desc, name", "-sequence"):
        await invalid(
            auditor.ListDecisions(policy_rpc.ListDecisionsRequest(order_by=order_by)), "order_by"
        )
    await invalid(auditor.ListDecisions(policy_rpc.ListDecisionsRequest(page_size=-1)), "page_size")
    await invalid(
        auditor.ListDecisions(policy_rpc.ListDecisionsRequest(page_token="garbage")), "page_token"
    )
    for person in (ALICE, BOB):
        await expect_error(
            suite.policy(person).ListDecisions(policy_rpc.ListDecisionsRequest()),
            grpc.StatusCode.PERMISSION_DENIED,
        )
    await assert_serving(suite.policy_target)


# VerifyAuditLog --------------------------------------------------------------------------


async def verify(suite: Suite, start: int = 0, end: int = 0) -> policy_rpc.VerifyAuditLogResponse:
    return await suite.policy(SAM).VerifyAuditLog(
        policy_rpc.VerifyAuditLogRequest(start_sequence=start, end_sequence=end)
    )


def body(suite: Suite, sequence: int) -> str:
    with sqlite(policy_db(suite)) as db:
        (text,) = db.execute(
            "SELECT body FROM audit_entries WHERE sequence = ?", (sequence,)
        ).fetchone()
    return str(text)


def set_body(suite: Suite, sequence: int, text: str) -> None:
    with sqlite(policy_db(suite)) as db:
        db.execute("UPDATE audit_entries SET body = ? WHERE sequence = ?", (text, sequence))


def edited(text: str) -> str:
    document = json.loads(text)
    document["principal"]["id"] = "someone-else"
    return json.dumps(document, separators=(",", ":"), sort_keys=True)


async def test_verify_audit_log_finds_each_tampering_at_its_entry(suite: Suite) -> None:
    await some_decisions(suite)
    clean = await verify(suite)
    head = clean.head_sequence
    assert head >= 8
    assert clean.verified
    assert not clean.HasField("first_break")
    assert clean.checked_count == clean.verified_count == head
    assert len(clean.head_hash) == 64

    # One entry's body edited: found at exactly that entry.
    target = 4
    original = body(suite, target)
    set_body(suite, target, edited(original))
    broken = await verify(suite)
    assert not broken.verified
    assert broken.first_break.sequence == target
    assert broken.first_break.kind == policy_pb.CHAIN_BREAK_KIND_MODIFIED
    assert broken.first_break.expected_hash != broken.first_break.actual_hash
    assert broken.verified_count == target - 1
    assert broken.checked_count == target
    assert broken.head_sequence == head
    # A range that leaves the edited entry out still verifies; one that covers it does not.
    after = await verify(suite, target + 1)
    assert after.verified
    assert after.checked_count == head - target
    around = await verify(suite, target - 1, target + 1)
    assert not around.verified
    assert around.first_break.sequence == target
    set_body(suite, target, original)
    assert (await verify(suite)).verified

    # A middle entry deleted: the next one reports the gap.
    with sqlite(policy_db(suite)) as db:
        row = db.execute("SELECT * FROM audit_entries WHERE sequence = ?", (target,)).fetchone()
        db.execute("DELETE FROM audit_entries WHERE sequence = ?", (target,))
    gap = await verify(suite)
    assert not gap.verified
    assert gap.first_break.sequence == target + 1
    assert gap.first_break.kind == policy_pb.CHAIN_BREAK_KIND_MISSING
    with sqlite(policy_db(suite)) as db:
        db.execute(f"INSERT INTO audit_entries VALUES ({', '.join('?' * len(row))})", row)
    assert (await verify(suite)).verified

    # Two entries' bodies swapped: found at the first of them.
    first, second = 3, 6
    one, other = body(suite, first), body(suite, second)
    set_body(suite, first, other)
    set_body(suite, second, one)
    swapped = await verify(suite)
    assert not swapped.verified
    assert swapped.first_break.sequence == first
    assert swapped.first_break.kind in (
        policy_pb.CHAIN_BREAK_KIND_MODIFIED,
        policy_pb.CHAIN_BREAK_KIND_REORDERED,
    )
    set_body(suite, first, one)
    set_body(suite, second, other)

    # A filter column changed without touching the body is found too.
    with sqlite(policy_db(suite)) as db:
        (principal_id,) = db.execute(
            "SELECT principal_id FROM audit_entries WHERE sequence = 5"
        ).fetchone()
        db.execute("UPDATE audit_entries SET principal_id = 'x' WHERE sequence = 5")
    column = await verify(suite)
    assert column.first_break.sequence == 5
    assert column.first_break.kind == policy_pb.CHAIN_BREAK_KIND_MODIFIED
    assert "principal_id" in column.first_break.detail

    # The newest entry removed: the log was cut short.
    with sqlite(policy_db(suite)) as db:
        db.execute("UPDATE audit_entries SET principal_id = ? WHERE sequence = 5", (principal_id,))
        db.execute("DELETE FROM audit_entries WHERE sequence = ?", (head,))
    cut = await verify(suite)
    assert not cut.verified
    assert cut.first_break.sequence == head
    assert cut.first_break.kind == policy_pb.CHAIN_BREAK_KIND_TRUNCATED
    await assert_serving(suite.policy_target)


async def test_verify_audit_log_ranges(suite: Suite) -> None:
    await some_decisions(suite)
    ranged = await verify(suite, 2, 4)
    assert ranged.verified
    assert ranged.checked_count == ranged.verified_count == 3
    assert ranged.head_sequence >= 8
    beyond = await verify(suite, 3, 10_000)
    assert beyond.verified
    assert beyond.checked_count == beyond.head_sequence - 2
    await invalid(verify(suite, -1), "start_sequence")
    await invalid(verify(suite, 0, -1), "end_sequence")
    await invalid(verify(suite, 5, 3), "end_sequence")
    await expect_error(
        suite.policy(ALICE).VerifyAuditLog(policy_rpc.VerifyAuditLogRequest()),
        grpc.StatusCode.PERMISSION_DENIED,
    )
    await assert_serving(suite.policy_target)


# ExportAuditLog ---------------------------------------------------------------------------


async def sign_head(suite: Suite) -> int:
    """Sign the chain head as the server does periodically (the suite signs only
    hourly), through a second AuditLog on the same database."""

    def sign() -> int:
        engine = create_engine(sqlite_url(policy_db(suite)))
        try:
            signed = AuditLog(engine, suite.secret_store, PolicySettings().audit_signing_key)
            signature = signed.sign_head()
            assert signature is not None
            return signature.sequence
        finally:
            engine.dispose()

    return await asyncio.to_thread(sign)


async def export(
    suite: Suite, start: int = 0, end: int = 0, who: Principal = SAM
) -> list[policy_rpc.ExportAuditLogResponse]:
    request = policy_rpc.ExportAuditLogRequest(start_sequence=start, end_sequence=end)
    return [message async for message in suite.policy(who).ExportAuditLog(request)]


async def export_fails(
    suite: Suite, code: grpc.StatusCode, start: int = 0, end: int = 0, who: Principal = SAM
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await export(suite, start, end, who)
    assert raised.value.code() == code


async def test_export_verifies_offline_and_names_an_edited_entry(
    suite: Suite, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(servicer, "EXPORT_CHUNK", 3)  # several messages
    await some_decisions(suite)
    signed_at = await sign_head(suite)
    async with service_stub(suite, TRAINER) as trainer:  # entries after the signed head
        await trainer.Authorize(authorize_request(ERIN))

    messages = await export(suite)
    assert len(messages) > 2
    assert all(len(m.entries) <= 3 for m in messages)
    keys = list(messages[0].verification_keys)
    assert keys
    assert keys[0].public_key_pem.startswith("-----BEGIN PUBLIC KEY-----")
    assert not any(m.verification_keys for m in messages[1:])
    entries = [entry for message in messages for entry in message.entries]
    assert [e.sequence for e in entries] == list(range(1, len(entries) + 1))
    # Exactly as stored (listing adds the decision about the auditor's own call).
    assert entries == (await all_decisions(suite))[: len(entries)]
    assert entries[signed_at - 1].HasField("signature")
    assert sum(e.HasField("signature") for e in entries) == 1

    path = tmp_path / "audit.jsonl"
    with path.open("w", encoding="utf-8") as output:
        assert audit_export.write_export(output, keys, entries) == len(entries)
    offline = audit_export.verify_export_file(path)
    assert offline.verified, offline.detail
    assert offline.checked_count == len(entries)
    assert offline.last_signed_sequence == signed_at
    online = await verify(suite)
    assert online.verified
    assert online.last_signed_sequence == signed_at

    # One line edited: the offline check names that entry.
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    target = 5
    document = json.loads(lines[target])  # line 0 holds the keys
    assert document["sequence"] == str(target)
    document["reasons"] = ["allowed, honest"]
    lines[target] = json.dumps(document) + "\n"
    tampered = tmp_path / "tampered.jsonl"
    tampered.write_text("".join(lines), encoding="utf-8")
    result = audit_export.verify_export_file(tampered)
    assert not result.verified
    assert result.first_bad_sequence == target
    assert result.problem == "changed"

    # A forged head signature is caught offline as well.
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    document = json.loads(lines[signed_at])
    document["entry_hash"] = "0" * 64
    lines[signed_at] = json.dumps(document) + "\n"
    tampered.write_text("".join(lines), encoding="utf-8")
    assert audit_export.verify_export_file(tampered).first_bad_sequence == signed_at

    # The signed entry reads back with its signing time, in UTC.
    signed_entry = entries[signed_at - 1]
    record = audit_export.record_from_json(
        json_format.MessageToDict(signed_entry, preserving_proto_field_name=True)
    )
    assert record.signature is not None
    assert record.signature.sign_time == signed_entry.signature.sign_time.ToDatetime(tzinfo=UTC)
    # A line that is not an entry is refused, not crashed on.
    tampered.write_text(lines[0] + "[]\n", encoding="utf-8")
    with pytest.raises(InvalidArgumentError):
        audit_export.verify_export_file(tampered)


async def test_export_ranges(suite: Suite) -> None:
    await some_decisions(suite)
    messages = await export(suite, 2, 4)
    assert [e.sequence for m in messages for e in m.entries] == [2, 3, 4]
    tail = await export(suite, 7)
    assert next(e.sequence for m in tail for e in m.entries) == 7
    await export_fails(suite, grpc.StatusCode.INVALID_ARGUMENT, -1)
    await export_fails(suite, grpc.StatusCode.INVALID_ARGUMENT, 0, -1)
    await export_fails(suite, grpc.StatusCode.INVALID_ARGUMENT, 4, 2)
    await export_fails(suite, grpc.StatusCode.PERMISSION_DENIED, who=ALICE)
    await assert_serving(suite.policy_target)
