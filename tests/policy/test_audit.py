"""The hash-chained audit log: canonical JSON, appends, tamper detection, signatures."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from google.protobuf import json_format

from conveyor.policy.v1 import resources_pb2
from conveyor.services.policy.audit import (
    AuditLog,
    AuditLogUnavailableError,
    AuditRecord,
    HeadSignature,
    canonical_json,
    entry_hash,
    mask_secrets,
    store_verifier,
    verify_records,
)
from conveyor.services.policy.audit_schema import GENESIS_HASH, audit_entries, metadata
from conveyor.services.policy.engine import Principal, Resource
from conveyor.services.policy.migrate import VERSION_TABLE, upgrade_to_head
from conveyor.shared.errors import InvalidArgumentError, NotFoundError
from conveyor.shared.secrets import LocalSecretStore, SignatureAlgorithm
from conveyor.shared.storage import create_engine
from tests.support.postgres import ThrowawayPostgres

ALICE = Principal(kind="user", id="alice", roles=("data_scientist",), team="a")
BOB = Principal(kind="user", id="bob", roles=("approver",), team="b")
FRAUD = Resource(type="registry.conveyor.dev/Model", name="models/fraud", owner_team="a")
CHURN = Resource(type="registry.conveyor.dev/Model", name="models/churn", owner_team="b")


# Canonical JSON -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ({"b": 1, "a": [True, "x"]}, '{"a":[true,"x"],"b":1}'),
        (
            {"z": {"y": None, "x": [1, {"d": False, "c": "é"}]}},
            '{"z":{"x":[1,{"c":"é","d":false}],"y":null}}',
        ),
        # RFC 8785 section 3.2.3: sorted by UTF-16 code units, not code points.
        (
            {"\u20ac": "Euro", "\r": "CR", "\ufb33": "Hebrew", "1": "One",
             "\U0001f600": "Emoji", "\x80": "Control", "\xf6": "Latin"},
            '{"\\r":"CR","1":"One","\x80":"Control","\xf6":"Latin","\u20ac":"Euro",'
            '"\U0001f600":"Emoji","\ufb33":"Hebrew"}',
        ),
        ("\u0000\b\t\n\f\r\"\\/\x1f\x7f", '"\\u0000\\b\\t\\n\\f\\r\\"\\\\/\\u001f\x7f"'),
        ([], "[]"),
        ({}, "{}"),
        (-0.0, "0"),
        (1e21, "1e+21"),
        (1e-7, "1e-7"),
        (0.000001, "0.000001"),
        (333333333.33333329, "333333333.3333333"),
        (1e30, "1e+30"),
        (4.50, "4.5"),
        (2e-3, "0.002"),
        (0.1 + 0.2, "0.30000000000000004"),
        (100.0, "100"),
        (5e-324, "5e-324"),
        (1.7976931348623157e308, "1.7976931348623157e+308"),
        (295147905179352830000.0, "295147905179352830000"),
        (-1.5, "-1.5"),
        (9007199254740991, "9007199254740991"),
    ],
)  # fmt: skip
def test_canonical_json_known_answers(value: object, expected: str) -> None:
    assert canonical_json(value) == expected.encode("utf-8")


@pytest.mark.parametrize(
    "value", [float("nan"), float("inf"), 2**53, {1: "x"}, {"a": b"x"}, "\ud800"]
)
def test_canonical_json_refuses_what_has_no_canonical_form(value: object) -> None:
    with pytest.raises(InvalidArgumentError):
        canonical_json(value)


def test_secrets_are_masked_at_any_depth() -> None:
    masked = mask_secrets(
        {
            "password": "p",
            "nested": {"apiKey": "k", "list": [{"Authorization": "Bearer x"}], "ok": 1},
            "client_secret": "s",
            "refresh-token": "t",
            "private_key": "pk",
            "key": "k2",
            "key_id": "local/abc",
            "alias": "production",
        }
    )
    assert masked == {
        "password": "***",
        "nested": {"apiKey": "***", "list": [{"Authorization": "***"}], "ok": 1},
        "client_secret": "***",
        "refresh-token": "***",
        "private_key": "***",
        "key": "***",
        "key_id": "local/abc",
        "alias": "production",
    }


# Fixtures -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def postgres() -> Iterator[ThrowawayPostgres]:
    cluster = ThrowawayPostgres()
    cluster.start()
    yield cluster
    cluster.stop()


@pytest.fixture(params=["sqlite", "postgresql"])
def engine(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[sa.Engine]:
    if request.param == "postgresql":
        url = request.getfixturevalue("postgres").create_database()
    else:
        url = f"sqlite:///{tmp_path / 'policy.db'}"
    engine = create_engine(url, pool_size=10)
    upgrade_to_head(engine)
    yield engine
    engine.dispose()


@pytest.fixture
def store(tmp_path: Path) -> LocalSecretStore:
    return LocalSecretStore(tmp_path / "secrets")


@pytest.fixture
def log(engine: sa.Engine, store: LocalSecretStore) -> AuditLog:
    return AuditLog(engine, store, "audit-chain")


def _append(log: AuditLog, number: int, **overrides: object) -> AuditRecord:
    arguments: dict[str, object] = {
        "principal": ALICE if number % 2 else BOB,
        "action": "registry.SetAlias",
        "resource": FRAUD if number % 3 else CHURN,
        "result": "allow" if number % 2 else "deny",
        "input": {"alias": "production", "n": number},
        "policy_ids": ["team-owns-model"],
        "reasons": [f"reason {number}"],
        "policy_set_digest": "ab" * 32,
        "trace_id": "0af7651916cd43dd8448eb211c80319c",
        "span_id": "b7ad6b7169203331",
    }
    arguments.update(overrides)
    return log.append(**arguments)  # type: ignore[arg-type]


def _tamper(engine: sa.Engine, statement: str, **parameters: object) -> None:
    with engine.begin() as connection:
        connection.execute(sa.text(statement), parameters)


# Schema ---------------------------------------------------------------------------


def test_migrations_match_the_schema_module(engine: sa.Engine) -> None:
    with engine.connect() as connection:
        context = MigrationContext.configure(connection, opts={"version_table": VERSION_TABLE})
        differences = compare_metadata(context, metadata)
    assert [diff for diff in differences if diff[1].name != VERSION_TABLE] == []
    upgrade_to_head(engine)  # a second run changes nothing


# Appending and reading ------------------------------------------------------------


def test_append_allow_and_deny_form_a_chain(log: AuditLog) -> None:
    allowed = _append(log, 1)
    denied = _append(log, 2, errors=["no policy applied"])
    assert (allowed.sequence, allowed.result, allowed.previous_hash) == (1, "allow", GENESIS_HASH)
    assert (denied.sequence, denied.result, denied.previous_hash) == (2, "deny", allowed.hash)
    assert allowed.hash == entry_hash(GENESIS_HASH, allowed.document())
    assert log.get(denied.decision_id) == denied
    assert log.get(allowed.decision_id).input == {"alias": "production", "n": 1}
    with pytest.raises(NotFoundError):
        log.get("00000000-0000-4000-8000-000000000000")
    result = log.verify()
    assert result.verified
    assert result.verified_count == 2
    assert (result.head_sequence, result.head_hash) == (2, denied.hash)


def test_secrets_are_masked_in_the_stored_input(log: AuditLog, engine: sa.Engine) -> None:
    canary = "canary-5f1c0e"
    record = _append(
        log,
        1,
        input={"alias": "production", "headers": {"authorization": f"Bearer {canary}"}},
        resource=Resource(type="t", name="models/x", attributes={"db_password": canary}),
    )
    assert record.input == {"alias": "production", "headers": {"authorization": "***"}}
    with engine.connect() as connection:
        bodies = connection.execute(sa.select(audit_entries.c.body)).scalars().all()
    assert bodies
    assert all(canary not in body for body in bodies)
    assert log.get(record.decision_id).resource.attributes == {"db_password": "***"}


def test_document_is_the_decision_messages_json_mapping(log: AuditLog) -> None:
    record = _append(
        log,
        1,
        kind="promotion",
        caller="service:registry",
        gates=[{"gate": "metric:accuracy", "kind": "GATE_KIND_METRIC_THRESHOLD"}],
        input={"ratio": 0.25, "tags": ["gdpr"], "count": 3},
        timestamp=datetime(2026, 11, 28, 12, 0, 0, 123000, tzinfo=UTC),
    )
    decision = json_format.ParseDict(record.document(), resources_pb2.Decision())
    mapped = json_format.MessageToDict(decision, preserving_proto_field_name=True)
    assert canonical_json(mapped) == canonical_json(record.document())
    assert mapped["create_time"] == "2026-11-28T12:00:00.123Z"
    assert AuditRecord.from_document(record.document(), hash=record.hash) == record


def test_refused_content_and_unwritable_log_fail_closed(
    log: AuditLog, store: LocalSecretStore, tmp_path: Path
) -> None:
    with pytest.raises(InvalidArgumentError):
        _append(log, 1, input={"x": float("nan")})
    broken = AuditLog(create_engine(f"sqlite:///{tmp_path / 'unmigrated.db'}"), store, "k")
    with pytest.raises(AuditLogUnavailableError):
        _append(broken, 1)


def test_concurrent_appends_have_no_gaps(log: AuditLog) -> None:
    errors: list[BaseException] = []

    def worker(index: int) -> None:
        try:
            for number in range(5):
                _append(log, index * 10 + number)
        except Exception as error:  # noqa: BLE001 - surfaced below
            errors.append(error)

    threads = [threading.Thread(target=worker, args=(index,)) for index in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    records = list(log.export())
    assert [record.sequence for record in records] == list(range(1, 41))
    result = log.verify()
    assert result.verified
    assert result.verified_count == 40


def test_list_filters_and_pages(log: AuditLog) -> None:
    start = datetime(2026, 1, 1, tzinfo=UTC)
    for number in range(1, 13):
        _append(log, number, timestamp=start + timedelta(minutes=number))
    alice, _ = log.list(principal_id="alice", page_size=100)
    assert [record.sequence for record in alice] == [1, 3, 5, 7, 9, 11]
    denied, _ = log.list(result="deny", resource_name="models/churn")
    assert [record.sequence for record in denied] == [6, 12]
    prefixed, _ = log.list(resource_name="models/f*")
    assert len(prefixed) == 8
    window, _ = log.list(
        start_time=start + timedelta(minutes=3), end_time=start + timedelta(minutes=6)
    )
    assert [record.sequence for record in window] == [3, 4, 5]

    seen: list[int] = []
    token = ""
    while True:
        page, token = log.list(page_size=5, page_token=token)
        seen += [record.sequence for record in page]
        if not token:
            break
    assert seen == list(range(1, 13))
    newest, token = log.list(page_size=4, descending=True)
    assert [record.sequence for record in newest] == [12, 11, 10, 9]
    _append(log, 13)  # a new entry does not shift the next page
    following, _ = log.list(page_size=4, descending=True, page_token=token)
    assert [record.sequence for record in following] == [8, 7, 6, 5]
    with pytest.raises(InvalidArgumentError):
        log.list(principal_id="bob", page_token=token)


# Tampering ------------------------------------------------------------------------


def _ten(log: AuditLog) -> list[AuditRecord]:
    return [_append(log, number) for number in range(1, 11)]


def test_an_edited_body_is_found_at_that_record(log: AuditLog, engine: sa.Engine) -> None:
    _ten(log)
    with engine.connect() as connection:
        body = connection.execute(
            sa.select(audit_entries.c.body).where(audit_entries.c.sequence == 4)
        ).scalar_one()
    edited = json.loads(body)
    edited["outcome"] = "OUTCOME_ALLOW"
    _tamper(engine, "UPDATE audit_entries SET body = :b WHERE sequence = 4", b=json.dumps(edited))
    result = log.verify()
    assert (result.first_bad_sequence, result.problem, result.verified_count) == (4, "changed", 3)


def test_an_edited_column_is_found_at_that_record(log: AuditLog, engine: sa.Engine) -> None:
    _ten(log)
    _tamper(engine, "UPDATE audit_entries SET principal_id = 'mallory' WHERE sequence = 6")
    result = log.verify()
    assert (result.first_bad_sequence, result.problem, result.verified_count) == (6, "changed", 5)


def test_a_deleted_record_is_found_at_the_gap(log: AuditLog, engine: sa.Engine) -> None:
    _ten(log)
    _tamper(engine, "DELETE FROM audit_entries WHERE sequence = 5")
    result = log.verify()
    assert (result.first_bad_sequence, result.problem, result.verified_count) == (6, "removed", 4)


def test_deleting_the_newest_records_is_found(log: AuditLog, engine: sa.Engine) -> None:
    _ten(log)
    _tamper(engine, "DELETE FROM audit_entries WHERE sequence > 8")
    result = log.verify()
    assert (result.first_bad_sequence, result.problem) == (9, "truncated")


def test_swapped_records_are_found(log: AuditLog, engine: sa.Engine) -> None:
    _ten(log)
    _tamper(engine, "UPDATE audit_entries SET sequence = -1 WHERE sequence = 3")
    _tamper(engine, "UPDATE audit_entries SET sequence = 3 WHERE sequence = 7")
    _tamper(engine, "UPDATE audit_entries SET sequence = 7 WHERE sequence = -1")
    result = log.verify()
    assert (result.first_bad_sequence, result.problem, result.verified_count) == (3, "reordered", 2)


def test_head_signatures_verify_across_key_rotation(log: AuditLog, store: LocalSecretStore) -> None:
    for number in range(1, 4):
        _append(log, number)
    first = log.sign_head()
    assert first is not None
    assert first.sequence == 3
    assert log.sign_head() == first  # an already signed head keeps its signature
    store.rotate_key("audit-chain")
    for number in range(4, 7):
        _append(log, number)
    second = log.sign_head()
    assert second is not None
    assert second.sequence == 6
    assert second.key_id != first.key_id
    result = log.verify()
    assert result.verified
    assert result.last_signed_sequence == 6
    exported = list(log.export())
    assert exported[2].signature == first
    offline = verify_records(exported, store_verifier(store, "audit-chain"))
    assert offline.verified
    assert offline.verified_count == 6


def test_a_tampered_head_signature_is_found(log: AuditLog, engine: sa.Engine) -> None:
    _ten(log)
    log.sign_head()
    _tamper(engine, "UPDATE audit_signatures SET signature = :s", s=b"\x00" * 64)
    result = log.verify()
    assert (result.first_bad_sequence, result.problem, result.verified_count) == (
        10,
        "signature",
        9,
    )


def test_a_signed_head_shows_a_cut_off_log(log: AuditLog, engine: sa.Engine) -> None:
    _ten(log)
    log.sign_head()
    # Cut the log and rewind the head row too: the signature still names entry 10.
    _tamper(engine, "DELETE FROM audit_entries WHERE sequence > 7")
    _tamper(engine, "UPDATE audit_head SET sequence = 7, entry_hash = 'x'")
    result = log.verify()
    assert (result.first_bad_sequence, result.problem) == (8, "truncated")


# Offline verification -------------------------------------------------------------


def test_offline_verification_with_public_keys(log: AuditLog) -> None:
    records = _ten(log)
    private = Ed25519PrivateKey.generate()
    head = records[-1]
    signature = HeadSignature(
        sequence=head.sequence,
        entry_hash=head.hash,
        algorithm=SignatureAlgorithm.ED25519,
        key_id="local/offline",
        signature=private.sign(bytes.fromhex(head.hash)),
        sign_time=datetime.now(UTC),
    )
    signed = [*records[:-1], AuditRecord(**{**head.__dict__, "signature": signature})]
    keys = {"local/offline": private.public_key()}
    assert verify_records(signed, keys).verified
    assert verify_records(signed, {}).problem == "signature"

    edited = list(signed)
    edited[2] = AuditRecord(**{**edited[2].__dict__, "reasons": ("rewritten",)})
    assert (verify_records(edited, keys).first_bad_sequence, verify_records(edited).problem) == (
        3,
        "changed",
    )
    removed = signed[:4] + signed[5:]
    result = verify_records(removed, keys)
    assert (result.first_bad_sequence, result.problem, result.verified_count) == (6, "removed", 4)
    swapped = list(signed)
    swapped[3], swapped[6] = swapped[6], swapped[3]
    result = verify_records(swapped, keys)
    assert (result.first_bad_sequence, result.problem, result.verified_count) == (4, "reordered", 3)
