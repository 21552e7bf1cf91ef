"""Row-level helpers of the registry store: lookups, conversions between rows
and protobuf resources, the revision counter and the idempotency records."""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from functools import partial
from typing import Any, TypeVar

from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp
from sqlalchemy import func, insert, select, update
from sqlalchemy.engine import Connection, Row
from sqlalchemy.exc import IntegrityError

from conveyor.registry.v1 import resources_pb2 as pb
from conveyor.services.registry import schema
from conveyor.shared import names
from conveyor.shared.artifacts import signature_proto
from conveyor.shared.errors import (
    AbortedError,
    AlreadyExistsError,
    ConveyorError,
    FailedPreconditionError,
    NotFoundError,
)
from conveyor.shared.filtering import Restriction, matches
from conveyor.shared.secrets import ArtifactSignatureValue, SignatureAlgorithm

T = TypeVar("T")

ACTIVE, ARCHIVED = "ACTIVE", "ARCHIVED"
LATEST = "latest"
STAGE_ALIASES = (
    ("production", pb.STAGE_PRODUCTION),
    ("canary", pb.STAGE_CANARY),
    ("staging", pb.STAGE_STAGING),
)


EVENT_TYPES: dict[str, pb.AliasEventType.ValueType] = {
    "SET": pb.ALIAS_EVENT_TYPE_SET,
    "DELETED": pb.ALIAS_EVENT_TYPE_DELETED,
}


@contextmanager
def conflict_means(error: ConveyorError) -> Iterator[None]:
    """A unique-constraint violation (a concurrent twin won the race) is ``error``."""
    try:
        yield
    except IntegrityError as conflict:
        raise error from conflict


def matching(
    items: list[T], restrictions: list[Restriction], resolve: Callable[[T, str], object]
) -> list[T]:
    return [item for item in items if matches(restrictions, partial(resolve, item))]


def now() -> datetime:
    return datetime.now(UTC)


def utc(value: datetime) -> datetime:
    # SQLite hands back naive datetimes; everything stored is UTC.
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def timestamp(value: datetime) -> Timestamp:
    stamp = Timestamp()
    stamp.FromDatetime(utc(value))
    return stamp


def etag() -> str:
    return uuid.uuid4().hex


def clear(message: Message, *fields: str) -> None:
    for field in fields:
        message.ClearField(field)


def copy_field(source: Message, target: Message, path: str) -> None:
    target.ClearField(path)
    field = source.DESCRIPTOR.fields_by_name[path]
    if field.is_repeated:  # lists and maps
        getattr(target, path).MergeFrom(getattr(source, path))
    elif field.message_type is not None:
        if source.HasField(path):
            getattr(target, path).CopyFrom(getattr(source, path))
    else:
        setattr(target, path, getattr(source, path))


def check_etag(given: str, stored: str, name: str) -> None:
    if given and given != stored:
        raise AbortedError(
            f"{name} changed since it was read (stale etag)",
            reason="ETAG_MISMATCH",
            metadata={"name": name},
        )


def check_expected(expected: str, current: str, model_id: str, alias_id: str) -> None:
    if not expected:
        return
    if (expected == "-" and current) or (expected != "-" and expected != current):
        raise AbortedError(
            f"models/{model_id}/aliases/{alias_id} points at {current or 'nothing'}, "
            f"not {expected}",
            reason="ALIAS_MOVED",
            metadata={"current_version": current, "expected_version": expected},
        )


def find_request(db: Connection, request_id: str, method: str, request_hash: str) -> str | None:
    if not request_id:
        return None
    row = db.execute(
        select(schema.request_ids).where(schema.request_ids.c.request_id == request_id)
    ).first()
    if row is None:
        return None
    if row.method != method or row.request_hash != request_hash:
        raise AlreadyExistsError(
            f"request_id {request_id} was used for a different request",
            reason="REQUEST_ID_CONFLICT",
            metadata={"request_id": request_id},
        )
    resource: str = row.resource_name
    return resource


def record_request(
    db: Connection, request_id: str, method: str, request_hash: str, name: str, now: datetime
) -> None:
    if request_id:
        db.execute(
            insert(schema.request_ids).values(
                request_id=request_id,
                method=method,
                request_hash=request_hash,
                resource_name=name,
                create_time=now,
            )
        )


def request_hash(message: Message) -> str:
    """The fingerprint of a request, for idempotency checks."""
    return hashlib.sha256(message.SerializeToString(deterministic=True)).hexdigest()


def model_row(db: Connection, model_id: str, *, lock: bool = False) -> Row[Any]:
    """The model's row; ``lock`` holds it until the transaction ends (PostgreSQL;
    SQLite's write transactions are serialised already)."""
    query = select(schema.models).where(schema.models.c.model_id == model_id)
    row = db.execute(query.with_for_update() if lock else query).first()
    if row is None:
        raise NotFoundError(
            f"models/{model_id} does not exist",
            reason="MODEL_NOT_FOUND",
            metadata={"name": f"models/{model_id}"},
        )
    return row


def versions_query() -> Any:
    versions, models = schema.model_versions, schema.models
    return select(versions, models.c.model_id, models.c.state.label("model_state")).join(
        models, models.c.id == versions.c.model_pk
    )


def version_row(db: Connection, ref: names.ModelVersionRef) -> Row[Any]:
    versions = schema.model_versions
    query = versions_query().where(schema.models.c.model_id == ref.model)
    if ref.version is not None:
        query = query.where(versions.c.version == ref.version)
    elif ref.alias == LATEST:
        query = query.where(versions.c.state == ACTIVE).order_by(versions.c.version.desc()).limit(1)
    else:
        query = query.join(schema.aliases, schema.aliases.c.version_pk == versions.c.id).where(
            schema.aliases.c.alias_id == ref.alias
        )
    row = db.execute(query).first()
    if row is None:
        model_row(db, ref.model)  # a missing model says so
        raise NotFoundError(
            f"{ref} does not exist", reason="VERSION_NOT_FOUND", metadata={"name": str(ref)}
        )
    return row


def existing_parent(db: Connection, parent: str) -> None:
    try:
        version_row(db, names.parse_model_version_ref(parent))
    except NotFoundError as missing:
        raise FailedPreconditionError(
            f"lineage.parent_version {parent} is not in this registry",
            reason="PARENT_VERSION_NOT_FOUND",
            metadata={"parent_version": parent},
        ) from missing


def alias_row(db: Connection, model_pk: int, alias_id: str) -> Row[Any] | None:
    return db.execute(
        select(schema.aliases).where(
            schema.aliases.c.model_pk == model_pk, schema.aliases.c.alias_id == alias_id
        )
    ).first()


def next_revision(db: Connection) -> int:
    """The next alias revision. The counter row (seeded by migration 0002) is
    locked until the transaction ends, so revisions commit in order."""
    counters = schema.counters
    bumped = db.execute(
        update(counters)
        .where(counters.c.name == schema.ALIAS_REVISION_COUNTER)
        .values(value=counters.c.value + 1)
        .returning(counters.c.value)
    ).scalar_one()
    return int(bumped)


def record_event(
    db: Connection,
    revision: int,
    model_id: str,
    alias_id: str,
    event_type: pb.AliasEventType.ValueType,
    alias: pb.Alias,
    now: datetime,
) -> None:
    db.execute(
        insert(schema.alias_events).values(
            revision=revision,
            model_id=model_id,
            alias_id=alias_id,
            event_type="SET" if event_type == pb.ALIAS_EVENT_TYPE_SET else "DELETED",
            create_time=now,
            body=alias.SerializeToString(),
        )
    )


def aliases_by_model(db: Connection, model_pks: list[int]) -> dict[int, dict[str, str]]:
    if not model_pks:
        return {}
    rows = db.execute(
        select(schema.aliases.c.model_pk, schema.aliases.c.alias_id, schema.aliases.c.body).where(
            schema.aliases.c.model_pk.in_(model_pks)
        )
    ).all()
    found: dict[int, dict[str, str]] = {}
    for row in rows:
        found.setdefault(row.model_pk, {})[row.alias_id] = pb.Alias.FromString(row.body).version
    return found


def aliases_by_version(db: Connection, version_pks: list[int]) -> dict[int, list[str]]:
    if not version_pks:
        return {}
    rows = db.execute(
        select(schema.aliases.c.version_pk, schema.aliases.c.alias_id)
        .where(schema.aliases.c.version_pk.in_(version_pks))
        .order_by(schema.aliases.c.alias_id)
    ).all()
    found: dict[int, list[str]] = {}
    for row in rows:
        found.setdefault(row.version_pk, []).append(row.alias_id)
    return found


def latest_versions(db: Connection, model_pk: int | None = None) -> dict[int, int]:
    versions = schema.model_versions
    query = select(versions.c.model_pk, func.max(versions.c.version)).group_by(versions.c.model_pk)
    if model_pk is not None:
        query = query.where(versions.c.model_pk == model_pk)
    return {row[0]: row[1] for row in db.execute(query).all()}


def model_from_row(row: Row[Any], aliases: dict[str, str], latest: int | None) -> pb.Model:
    model = pb.Model.FromString(row.body)
    model.name = f"models/{row.model_id}"
    model.state = pb.MODEL_STATE_ACTIVE if row.state == ACTIVE else pb.MODEL_STATE_ARCHIVED
    model.aliases.update(aliases)
    if latest is not None:
        model.latest_version = names.model_version_name(row.model_id, latest)
    model.create_time.CopyFrom(timestamp(row.create_time))
    model.update_time.CopyFrom(timestamp(row.update_time))
    model.etag = row.etag
    return model


def version_from_row(row: Row[Any], aliases: list[str], view: int) -> pb.ModelVersion:
    version = pb.ModelVersion.FromString(row.body)
    version.name = names.model_version_name(row.model_id, row.version)
    archived = row.state != ACTIVE or row.model_state != ACTIVE
    version.state = (
        pb.MODEL_VERSION_STATE_ARCHIVED if row.state != ACTIVE else pb.MODEL_VERSION_STATE_ACTIVE
    )
    version.aliases.extend(aliases)
    version.stage = (
        pb.STAGE_ARCHIVED
        if archived
        else next((stage for alias, stage in STAGE_ALIASES if alias in aliases), pb.STAGE_NONE)
    )
    version.create_time.CopyFrom(timestamp(row.create_time))
    version.update_time.CopyFrom(timestamp(row.update_time))
    version.etag = row.etag
    if row.signature is not None:  # NULL: registered before the registry signed
        value = ArtifactSignatureValue(
            algorithm=SignatureAlgorithm(row.signature_algorithm),
            key_id=row.signature_key_id,
            signature=row.signature,
        )
        version.artifact.signature.CopyFrom(signature_proto(value, row.sign_time))
    if view == pb.MODEL_VERSION_VIEW_BASIC:
        version.ClearField("model_card")
        version.ClearField("reference_statistics")
    return version
