"""The registry's store: models, versions, attachments, aliases and lineage.

Synchronous SQLAlchemy Core over SQLite or PostgreSQL; the servicer calls it
from worker threads. Every write is one transaction, so a refused or failed
call changes nothing. Artifacts and attachment contents live in the
content-addressed :class:`~conveyor.shared.storage.BlobStore`; a row only ever
points at a blob that was fully written first.
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import partial
from typing import Any, Generic, TypeVar

from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp
from sqlalchemy import func, insert, select, update
from sqlalchemy.engine import Connection, Engine, Row
from sqlalchemy.exc import IntegrityError

from conveyor.registry.v1 import resources_pb2 as pb
from conveyor.services.registry import schema
from conveyor.shared import names
from conveyor.shared.errors import (
    AbortedError,
    AlreadyExistsError,
    ConveyorError,
    FailedPreconditionError,
    NotFoundError,
)
from conveyor.shared.filtering import Restriction, matches
from conveyor.shared.storage import BlobStore, read_transaction, write_transaction
from conveyor.shared.storage.blobs import BlobInfo

ACTIVE, ARCHIVED = "ACTIVE", "ARCHIVED"
ORPHAN_GRACE_S = 600.0
LATEST = "latest"
_STAGE_ALIASES = (
    ("production", pb.STAGE_PRODUCTION),
    ("canary", pb.STAGE_CANARY),
    ("staging", pb.STAGE_STAGING),
)


T = TypeVar("T")


@dataclass(frozen=True)
class Page(Generic[T]):
    """One page of a listing and whether more follow."""

    items: list[T]
    has_more: bool


@dataclass(frozen=True)
class AliasEvent:
    """One change on the alias watch stream."""

    revision: int
    event_type: pb.AliasEventType.ValueType
    alias: pb.Alias


class RegistryStore:
    """Registry state on one database and one blob store."""

    def __init__(self, engine: Engine, blobs: BlobStore) -> None:
        self.engine = engine
        self.blobs = blobs

    # -- idempotency ---------------------------------------------------------

    def find_request(self, request_id: str, method: str, request_hash: str) -> str | None:
        """The resource a completed request created, if ``request_id`` was seen."""
        if not request_id:
            return None
        with read_transaction(self.engine) as db:
            return _find_request(db, request_id, method, request_hash)

    # -- models --------------------------------------------------------------

    def create_model(
        self, model_id: str, model: pb.Model, *, principal: str, request_id: str, request_hash: str
    ) -> pb.Model:
        now = _now()
        body = pb.Model()
        body.CopyFrom(model)
        _clear(
            body, "name", "state", "aliases", "latest_version", "create_time", "update_time", "etag"
        )
        body.created_by = principal
        exists = AlreadyExistsError(
            f"model models/{model_id} already exists",
            reason="MODEL_EXISTS",
            metadata={"name": f"models/{model_id}"},
        )
        with _conflict_means(exists), write_transaction(self.engine) as db:
            if (done := _find_request(db, request_id, "CreateModel", request_hash)) is not None:
                return self._model(db, names.parse_model_name(done))
            if db.execute(
                select(schema.models.c.id).where(schema.models.c.model_id == model_id)
            ).first():
                raise exists
            db.execute(
                insert(schema.models).values(
                    model_id=model_id,
                    state=ACTIVE,
                    next_version=1,
                    create_time=now,
                    update_time=now,
                    etag=_etag(),
                    body=body.SerializeToString(),
                )
            )
            _record_request(db, request_id, "CreateModel", request_hash, f"models/{model_id}", now)
            return self._model(db, model_id)

    def get_model(self, model_id: str) -> pb.Model:
        with read_transaction(self.engine) as db:
            return self._model(db, model_id)

    def list_models(
        self,
        restrictions: list[Restriction],
        resolve: Callable[[pb.Model, str], object],
        *,
        order_by: str,
        descending: bool,
        show_archived: bool,
        offset: int,
        limit: int,
    ) -> Page[pb.Model]:
        column = {
            "name": schema.models.c.model_id,
            "create_time": schema.models.c.create_time,
            "update_time": schema.models.c.update_time,
        }[order_by]
        query = select(schema.models).order_by(
            column.desc() if descending else column.asc(), schema.models.c.model_id
        )
        if not show_archived:
            query = query.where(schema.models.c.state == ACTIVE)
        with read_transaction(self.engine) as db:
            rows = db.execute(query).all()
            aliases = _aliases_by_model(db, [row.id for row in rows])
            latest = _latest_versions(db)
            found = [
                _model_from_row(row, aliases.get(row.id, {}), latest.get(row.id)) for row in rows
            ]
        selected = _matching(found, restrictions, resolve)
        return Page(selected[offset : offset + limit], has_more=len(selected) > offset + limit)

    def update_model(
        self, model_id: str, changes: pb.Model, paths: Sequence[str], *, etag: str
    ) -> pb.Model:
        with write_transaction(self.engine) as db:
            row = _model_row(db, model_id, lock=True)
            _check_etag(etag, row.etag, f"models/{model_id}")
            body = pb.Model.FromString(row.body)
            for path in paths:
                _copy_field(changes, body, path)
            db.execute(
                update(schema.models)
                .where(schema.models.c.id == row.id)
                .values(body=body.SerializeToString(), update_time=_now(), etag=_etag())
            )
            return self._model(db, model_id)

    def set_model_state(self, model_id: str, state: str, *, etag: str = "") -> pb.Model:
        with write_transaction(self.engine) as db:
            row = _model_row(db, model_id, lock=True)
            _check_etag(etag, row.etag, f"models/{model_id}")
            if state == ARCHIVED and _aliases_by_model(db, [row.id]):
                raise FailedPreconditionError(
                    f"models/{model_id} still has aliases; delete them before archiving",
                    reason="MODEL_HAS_ALIASES",
                    metadata={"name": f"models/{model_id}"},
                )
            if row.state != state:
                db.execute(
                    update(schema.models)
                    .where(schema.models.c.id == row.id)
                    .values(state=state, update_time=_now(), etag=_etag())
                )
            return self._model(db, model_id)

    # -- versions ------------------------------------------------------------

    def create_version(
        self,
        model_id: str,
        version: pb.ModelVersion,
        artifact: BlobInfo,
        *,
        principal: str,
        request_id: str,
        request_hash: str,
    ) -> pb.ModelVersion:
        """Add a version whose artifact is already stored; numbers it next."""
        now = _now()
        body = pb.ModelVersion()
        body.CopyFrom(version)
        _clear(
            body,
            "name",
            "artifact",
            "state",
            "stage",
            "aliases",
            "create_time",
            "update_time",
            "etag",
            "created_by",
        )
        body.created_by = principal
        body.artifact.sha256 = artifact.sha256
        body.artifact.size_bytes = artifact.size_bytes
        with write_transaction(self.engine) as db:
            if (
                done := _find_request(db, request_id, "CreateModelVersion", request_hash)
            ) is not None:
                return self._version(
                    db, names.parse_model_version_ref(done), pb.MODEL_VERSION_VIEW_FULL
                )
            model = _model_row(db, model_id)
            if body.lineage.parent_version:
                # The parent must already exist: lineage can then never loop.
                _existing_parent(db, body.lineage.parent_version)
            if model.state != ACTIVE:
                raise FailedPreconditionError(
                    f"models/{model_id} is archived: it takes no new versions",
                    reason="MODEL_ARCHIVED",
                    metadata={"name": f"models/{model_id}"},
                )
            # The row lock on the model serialises numbering: no gaps, no duplicates.
            number = (
                db.execute(
                    update(schema.models)
                    .where(schema.models.c.id == model.id)
                    .values(next_version=schema.models.c.next_version + 1)
                    .returning(schema.models.c.next_version)
                ).scalar_one()
                - 1
            )
            db.execute(
                insert(schema.model_versions).values(
                    model_pk=model.id,
                    version=number,
                    state=ACTIVE,
                    sha256=artifact.sha256,
                    size_bytes=artifact.size_bytes,
                    parent_version=body.lineage.parent_version,
                    create_time=now,
                    update_time=now,
                    etag=_etag(),
                    body=body.SerializeToString(),
                )
            )
            name = names.model_version_name(model_id, number)
            _record_request(db, request_id, "CreateModelVersion", request_hash, name, now)
            return self._version(
                db, names.ModelVersionRef(model_id, number), pb.MODEL_VERSION_VIEW_FULL
            )

    def get_version(self, ref: names.ModelVersionRef, view: int) -> pb.ModelVersion:
        with read_transaction(self.engine) as db:
            return self._version(db, ref, view)

    def list_versions(
        self,
        model_id: str | None,
        restrictions: list[Restriction],
        resolve: Callable[[pb.ModelVersion, str], object],
        *,
        sort_key: Callable[[pb.ModelVersion], Any],
        show_archived: bool,
        view: int,
        offset: int,
        limit: int,
    ) -> Page[pb.ModelVersion]:
        with read_transaction(self.engine) as db:
            query = _versions_query()
            if model_id is not None:
                query = query.where(schema.models.c.id == _model_row(db, model_id).id)
            if not show_archived:
                query = query.where(
                    schema.model_versions.c.state == ACTIVE, schema.models.c.state == ACTIVE
                )
            rows = db.execute(query).all()
            aliases = _aliases_by_version(db, [row.id for row in rows])
        found = [_version_from_row(row, aliases.get(row.id, []), view) for row in rows]
        selected = sorted(_matching(found, restrictions, resolve), key=sort_key)
        return Page(selected[offset : offset + limit], has_more=len(selected) > offset + limit)

    def update_version(
        self,
        ref: names.ModelVersionRef,
        changes: pb.ModelVersion,
        paths: Sequence[str],
        *,
        etag: str,
        principal: str,
    ) -> pb.ModelVersion:
        with write_transaction(self.engine) as db:
            _model_row(db, ref.model, lock=True)  # serialise changes to its versions
            row = _version_row(db, ref)
            _check_etag(etag, row.etag, str(ref))
            body = pb.ModelVersion.FromString(row.body)
            if "reference_statistics" in paths and body.HasField("reference_statistics"):
                raise FailedPreconditionError(
                    f"{ref} already has reference statistics; they never move once set",
                    reason="REFERENCE_STATISTICS_SET",
                )
            for path in paths:
                _copy_field(changes, body, path)
            if "deployment_block" in paths and body.HasField("deployment_block"):
                body.deployment_block.created_by = principal
                body.deployment_block.create_time.FromDatetime(_now())
                if _aliases_by_version(db, [row.id]):
                    raise FailedPreconditionError(
                        f"{ref} holds aliases; move them before blocking its deployment",
                        reason="VERSION_HAS_ALIASES",
                    )
            db.execute(
                update(schema.model_versions)
                .where(schema.model_versions.c.id == row.id)
                .values(body=body.SerializeToString(), update_time=_now(), etag=_etag())
            )
            return self._version(db, ref, pb.MODEL_VERSION_VIEW_FULL)

    def set_version_state(
        self, ref: names.ModelVersionRef, state: str, *, etag: str = ""
    ) -> pb.ModelVersion:
        with write_transaction(self.engine) as db:
            _model_row(db, ref.model, lock=True)  # serialise changes to its versions
            row = _version_row(db, ref)
            _check_etag(etag, row.etag, str(ref))
            if state == ARCHIVED and (held := _aliases_by_version(db, [row.id]).get(row.id)):
                raise FailedPreconditionError(
                    f"{ref} holds the aliases {', '.join(held)}; move them first",
                    reason="VERSION_HAS_ALIASES",
                    metadata={"aliases": ",".join(held)},
                )
            if row.state != state:
                db.execute(
                    update(schema.model_versions)
                    .where(schema.model_versions.c.id == row.id)
                    .values(state=state, update_time=_now(), etag=_etag())
                )
            return self._version(db, ref, pb.MODEL_VERSION_VIEW_FULL)

    # -- attachments ---------------------------------------------------------

    def create_attachment(
        self,
        ref: names.ModelVersionRef,
        attachment_id: str,
        attachment: pb.Attachment,
        *,
        principal: str,
        request_id: str,
        request_hash: str,
    ) -> pb.Attachment:
        content = self.blobs.put(attachment.content)
        now = _now()
        body = pb.Attachment()
        body.CopyFrom(attachment)
        body.ClearField("content")
        body.size_bytes, body.sha256, body.created_by = (
            content.size_bytes,
            content.sha256,
            principal,
        )
        body.create_time.FromDatetime(now)
        name = f"{ref}/attachments/{attachment_id}"
        duplicate = AlreadyExistsError(
            f"{name} already exists", reason="ATTACHMENT_EXISTS", metadata={"name": name}
        )
        with _conflict_means(duplicate), write_transaction(self.engine) as db:
            if (
                done := _find_request(db, request_id, "CreateAttachment", request_hash)
            ) is not None:
                return self._attachment(db, done, with_content=False)
            version = _version_row(db, ref)
            if version.state != ACTIVE or version.model_state != ACTIVE:
                raise FailedPreconditionError(
                    f"{ref} is archived: it takes no new attachments", reason="VERSION_ARCHIVED"
                )
            body.name = f"{ref}/attachments/{attachment_id}"
            exists = db.execute(
                select(schema.attachments.c.id).where(
                    schema.attachments.c.version_pk == version.id,
                    schema.attachments.c.attachment_id == attachment_id,
                )
            ).first()
            if exists:
                raise duplicate
            db.execute(
                insert(schema.attachments).values(
                    version_pk=version.id,
                    attachment_id=attachment_id,
                    kind=str(body.kind),
                    sha256=content.sha256,
                    create_time=now,
                    body=body.SerializeToString(),
                )
            )
            _record_request(db, request_id, "CreateAttachment", request_hash, body.name, now)
            return body

    def get_attachment(self, name: str) -> pb.Attachment:
        with read_transaction(self.engine) as db:
            return self._attachment(db, name, with_content=True)

    def list_attachments(
        self,
        ref: names.ModelVersionRef,
        restrictions: list[Restriction],
        resolve: Callable[[pb.Attachment, str], object],
        *,
        newest_first: bool,
        offset: int,
        limit: int,
    ) -> tuple[str, Page[pb.Attachment]]:
        """The resolved version name and one page of its attachments."""
        with read_transaction(self.engine) as db:
            version = _version_row(db, ref)
            order = schema.attachments.c.id.desc() if newest_first else schema.attachments.c.id
            rows = db.execute(
                select(schema.attachments.c.body)
                .where(schema.attachments.c.version_pk == version.id)
                .order_by(order)
            ).all()
        found = [pb.Attachment.FromString(row.body) for row in rows]
        selected = _matching(found, restrictions, resolve)
        page = Page(selected[offset : offset + limit], has_more=len(selected) > offset + limit)
        return names.model_version_name(version.model_id, version.version), page

    # -- lineage -------------------------------------------------------------

    def lineage(
        self, ref: names.ModelVersionRef, *, ancestors: bool, descendants: bool, max_depth: int
    ) -> tuple[pb.ModelVersion, list[pb.ModelVersion], list[pb.ModelVersion]]:
        basic = pb.MODEL_VERSION_VIEW_BASIC
        with read_transaction(self.engine) as db:
            start = self._version(db, ref, basic)
            up: list[pb.ModelVersion] = []
            parent = start.lineage.parent_version
            while ancestors and parent and len(up) < max_depth:
                try:
                    found = self._version(db, names.parse_model_version_ref(parent), basic)
                except NotFoundError:
                    break  # a parent outside this registry ends the walk
                up.append(found)
                parent = found.lineage.parent_version
            down: list[pb.ModelVersion] = []
            frontier, depth = [start.name], 0
            while descendants and frontier and depth < max_depth:
                rows = db.execute(
                    _versions_query()
                    .where(schema.model_versions.c.parent_version.in_(frontier))
                    .order_by(schema.model_versions.c.id)
                ).all()
                aliases = _aliases_by_version(db, [row.id for row in rows])
                children = [_version_from_row(row, aliases.get(row.id, []), basic) for row in rows]
                down.extend(children)
                frontier, depth = [child.name for child in children], depth + 1
        return start, up, down

    # -- aliases -------------------------------------------------------------

    def set_alias(
        self,
        model_id: str,
        alias_id: str,
        version_number: int,
        *,
        principal: str,
        reason: str,
        decision: str,
        expected_version: str,
    ) -> pb.Alias:
        with write_transaction(self.engine) as db:
            model = _model_row(db, model_id, lock=True)  # one alias change per model at a time
            if model.state != ACTIVE:
                raise FailedPreconditionError(
                    f"models/{model_id} is archived", reason="MODEL_ARCHIVED"
                )
            target = _version_row(db, names.ModelVersionRef(model_id, version_number))
            target_body = pb.ModelVersion.FromString(target.body)
            version_name = names.model_version_name(model_id, version_number)
            if target.state != ACTIVE:
                raise FailedPreconditionError(
                    f"{version_name} is archived: no alias may point at it",
                    reason="VERSION_ARCHIVED",
                )
            if target_body.HasField("deployment_block"):
                raise FailedPreconditionError(
                    f"{version_name} is blocked from deployment: "
                    f"{target_body.deployment_block.reason}",
                    reason="DEPLOYMENT_BLOCKED",
                    metadata={"version": version_name},
                )
            current = _alias_row(db, model.id, alias_id)
            current_version = pb.Alias.FromString(current.body).version if current else ""
            _check_expected(expected_version, current_version, model_id, alias_id)
            if current is not None and current_version == version_name:
                return pb.Alias.FromString(current.body)
            revision = _next_revision(db)
            alias = pb.Alias(
                name=f"models/{model_id}/aliases/{alias_id}",
                version=version_name,
                previous_version=current_version,
                revision=revision,
                updated_by=principal,
                reason=reason,
                decision=decision,
            )
            now = _now()
            alias.update_time.FromDatetime(now)
            values = {
                "version_pk": target.id,
                "revision": revision,
                "body": alias.SerializeToString(),
            }
            if current is None:
                db.execute(
                    insert(schema.aliases).values(model_pk=model.id, alias_id=alias_id, **values)
                )
            else:
                db.execute(
                    update(schema.aliases)
                    .where(
                        schema.aliases.c.model_pk == model.id, schema.aliases.c.alias_id == alias_id
                    )
                    .values(**values)
                )
            _record_event(db, revision, model_id, alias_id, pb.ALIAS_EVENT_TYPE_SET, alias, now)
            return alias

    def delete_alias(
        self,
        model_id: str,
        alias_id: str,
        *,
        principal: str,
        reason: str,
        decision: str,
        expected_version: str,
    ) -> pb.Alias:
        with write_transaction(self.engine) as db:
            model = _model_row(db, model_id, lock=True)  # one alias change per model at a time
            current = _alias_row(db, model.id, alias_id)
            if current is None:
                raise NotFoundError(
                    f"models/{model_id}/aliases/{alias_id} does not exist", reason="ALIAS_NOT_FOUND"
                )
            alias = pb.Alias.FromString(current.body)
            _check_expected(expected_version, alias.version, model_id, alias_id)
            now = _now()
            alias.revision, alias.updated_by, alias.reason = _next_revision(db), principal, reason
            alias.decision = decision
            alias.update_time.FromDatetime(now)
            db.execute(
                schema.aliases.delete().where(
                    schema.aliases.c.model_pk == model.id, schema.aliases.c.alias_id == alias_id
                )
            )
            _record_event(
                db, alias.revision, model_id, alias_id, pb.ALIAS_EVENT_TYPE_DELETED, alias, now
            )
            return alias

    def alias_snapshot(
        self, model_id: str | None, alias_ids: Iterable[str] = ()
    ) -> tuple[list[pb.Alias], int]:
        """Current aliases (ordered by name) and the revision they reflect."""
        wanted = set(alias_ids)
        with read_transaction(self.engine) as db:
            if model_id is not None:
                _model_row(db, model_id)
            revision = (
                db.execute(
                    select(schema.counters.c.value).where(
                        schema.counters.c.name == schema.ALIAS_REVISION_COUNTER
                    )
                ).scalar()
                or 0
            )
            query = (
                select(schema.aliases.c.body, schema.aliases.c.alias_id)
                .join(schema.models, schema.models.c.id == schema.aliases.c.model_pk)
                .order_by(schema.models.c.model_id, schema.aliases.c.alias_id)
            )
            if model_id is not None:
                query = query.where(schema.models.c.model_id == model_id)
            rows = db.execute(query).all()
        found = [
            pb.Alias.FromString(row.body) for row in rows if not wanted or row.alias_id in wanted
        ]
        return found, revision

    def alias_events_after(
        self, revision: int, model_id: str | None, alias_ids: Iterable[str] = ()
    ) -> tuple[list[AliasEvent], int] | None:
        """Changes after ``revision``, in order, and the newest revision looked at
        (filtered-out changes included); None when that history is gone."""
        wanted = set(alias_ids)
        events = schema.alias_events
        with read_transaction(self.engine) as db:
            oldest = db.execute(select(func.min(events.c.revision))).scalar()
            if oldest is not None and revision < oldest - 1:
                return None
            query = select(events).where(events.c.revision > revision).order_by(events.c.revision)
            rows = db.execute(query).all()
        newest = rows[-1].revision if rows else revision
        found = [
            AliasEvent(row.revision, _EVENT_TYPES[row.event_type], pb.Alias.FromString(row.body))
            for row in rows
            if (model_id is None or row.model_id == model_id)
            and (not wanted or row.alias_id in wanted)
        ]
        return found, newest

    def current_revision(self) -> int:
        with read_transaction(self.engine) as db:
            return (
                db.execute(
                    select(schema.counters.c.value).where(
                        schema.counters.c.name == schema.ALIAS_REVISION_COUNTER
                    )
                ).scalar()
                or 0
            )

    # -- maintenance ---------------------------------------------------------

    def referenced_blobs(self) -> set[str]:
        with read_transaction(self.engine) as db:
            versions = db.execute(select(schema.model_versions.c.sha256)).scalars()
            attached = db.execute(select(schema.attachments.c.sha256)).scalars()
            return set(versions) | set(attached)

    def collect_garbage(self, *, grace_s: float = ORPHAN_GRACE_S) -> int:
        """Delete blobs no row refers to (left by uploads cut off after their
        bytes were stored but before their row was written); returns how many.
        Blobs younger than ``grace_s`` are spared: another replica may be about
        to write the row that refers to one."""
        referenced = self.referenced_blobs()
        orphans = [
            digest for digest in self.blobs.digests(older_than=grace_s) if digest not in referenced
        ]
        for digest in orphans:
            self.blobs.delete(digest)
        return len(orphans)

    # -- reads shared by the methods above -----------------------------------

    def _model(self, db: Connection, model_id: str) -> pb.Model:
        row = _model_row(db, model_id)
        return _model_from_row(
            row,
            _aliases_by_model(db, [row.id]).get(row.id, {}),
            _latest_versions(db, row.id).get(row.id),
        )

    def _version(self, db: Connection, ref: names.ModelVersionRef, view: int) -> pb.ModelVersion:
        row = _version_row(db, ref)
        return _version_from_row(row, _aliases_by_version(db, [row.id]).get(row.id, []), view)

    def _attachment(self, db: Connection, name: str, *, with_content: bool) -> pb.Attachment:
        parent, _, attachment_id = name.rpartition("/attachments/")
        version = _version_row(db, names.parse_model_version_ref(parent))
        row = db.execute(
            select(schema.attachments.c.body).where(
                schema.attachments.c.version_pk == version.id,
                schema.attachments.c.attachment_id == attachment_id,
            )
        ).first()
        if row is None:
            raise NotFoundError(
                f"{name} does not exist", reason="ATTACHMENT_NOT_FOUND", metadata={"name": name}
            )
        attachment = pb.Attachment.FromString(row.body)
        if with_content:
            attachment.content = self.blobs.read(attachment.sha256)
        return attachment


# -- row helpers ------------------------------------------------------------

_EVENT_TYPES: dict[str, pb.AliasEventType.ValueType] = {
    "SET": pb.ALIAS_EVENT_TYPE_SET,
    "DELETED": pb.ALIAS_EVENT_TYPE_DELETED,
}


@contextmanager
def _conflict_means(error: ConveyorError) -> Iterator[None]:
    """A unique-constraint violation (a concurrent twin won the race) is ``error``."""
    try:
        yield
    except IntegrityError as conflict:
        raise error from conflict


def _matching(
    items: list[T], restrictions: list[Restriction], resolve: Callable[[T, str], object]
) -> list[T]:
    return [item for item in items if matches(restrictions, partial(resolve, item))]


def _now() -> datetime:
    return datetime.now(UTC)


def _utc(value: datetime) -> datetime:
    # SQLite hands back naive datetimes; everything stored is UTC.
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def _timestamp(value: datetime) -> Timestamp:
    stamp = Timestamp()
    stamp.FromDatetime(_utc(value))
    return stamp


def _etag() -> str:
    return uuid.uuid4().hex


def _clear(message: Message, *fields: str) -> None:
    for field in fields:
        message.ClearField(field)


def _copy_field(source: Message, target: Message, path: str) -> None:
    target.ClearField(path)
    field = source.DESCRIPTOR.fields_by_name[path]
    if field.is_repeated:  # lists and maps
        getattr(target, path).MergeFrom(getattr(source, path))
    elif field.message_type is not None:
        if source.HasField(path):
            getattr(target, path).CopyFrom(getattr(source, path))
    else:
        setattr(target, path, getattr(source, path))


def _check_etag(given: str, stored: str, name: str) -> None:
    if given and given != stored:
        raise AbortedError(
            f"{name} changed since it was read (stale etag)",
            reason="ETAG_MISMATCH",
            metadata={"name": name},
        )


def _check_expected(expected: str, current: str, model_id: str, alias_id: str) -> None:
    if not expected:
        return
    if (expected == "-" and current) or (expected != "-" and expected != current):
        raise AbortedError(
            f"models/{model_id}/aliases/{alias_id} points at {current or 'nothing'}, "
            f"not {expected}",
            reason="ALIAS_MOVED",
            metadata={"current_version": current, "expected_version": expected},
        )


def _find_request(db: Connection, request_id: str, method: str, request_hash: str) -> str | None:
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


def _record_request(
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


def _model_row(db: Connection, model_id: str, *, lock: bool = False) -> Row[Any]:
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


def _versions_query() -> Any:
    versions, models = schema.model_versions, schema.models
    return select(versions, models.c.model_id, models.c.state.label("model_state")).join(
        models, models.c.id == versions.c.model_pk
    )


def _version_row(db: Connection, ref: names.ModelVersionRef) -> Row[Any]:
    versions = schema.model_versions
    query = _versions_query().where(schema.models.c.model_id == ref.model)
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
        _model_row(db, ref.model)  # a missing model says so
        raise NotFoundError(
            f"{ref} does not exist", reason="VERSION_NOT_FOUND", metadata={"name": str(ref)}
        )
    return row


def _existing_parent(db: Connection, parent: str) -> None:
    try:
        _version_row(db, names.parse_model_version_ref(parent))
    except NotFoundError as missing:
        raise FailedPreconditionError(
            f"lineage.parent_version {parent} is not in this registry",
            reason="PARENT_VERSION_NOT_FOUND",
            metadata={"parent_version": parent},
        ) from missing


def _alias_row(db: Connection, model_pk: int, alias_id: str) -> Row[Any] | None:
    return db.execute(
        select(schema.aliases).where(
            schema.aliases.c.model_pk == model_pk, schema.aliases.c.alias_id == alias_id
        )
    ).first()


def _next_revision(db: Connection) -> int:
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


def _record_event(
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


def _aliases_by_model(db: Connection, model_pks: list[int]) -> dict[int, dict[str, str]]:
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


def _aliases_by_version(db: Connection, version_pks: list[int]) -> dict[int, list[str]]:
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


def _latest_versions(db: Connection, model_pk: int | None = None) -> dict[int, int]:
    versions = schema.model_versions
    query = select(versions.c.model_pk, func.max(versions.c.version)).group_by(versions.c.model_pk)
    if model_pk is not None:
        query = query.where(versions.c.model_pk == model_pk)
    return {row[0]: row[1] for row in db.execute(query).all()}


def _model_from_row(row: Row[Any], aliases: dict[str, str], latest: int | None) -> pb.Model:
    model = pb.Model.FromString(row.body)
    model.name = f"models/{row.model_id}"
    model.state = pb.MODEL_STATE_ACTIVE if row.state == ACTIVE else pb.MODEL_STATE_ARCHIVED
    model.aliases.update(aliases)
    if latest is not None:
        model.latest_version = names.model_version_name(row.model_id, latest)
    model.create_time.CopyFrom(_timestamp(row.create_time))
    model.update_time.CopyFrom(_timestamp(row.update_time))
    model.etag = row.etag
    return model


def _version_from_row(row: Row[Any], aliases: list[str], view: int) -> pb.ModelVersion:
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
        else next((stage for alias, stage in _STAGE_ALIASES if alias in aliases), pb.STAGE_NONE)
    )
    version.create_time.CopyFrom(_timestamp(row.create_time))
    version.update_time.CopyFrom(_timestamp(row.update_time))
    version.etag = row.etag
    if view == pb.MODEL_VERSION_VIEW_BASIC:
        version.ClearField("model_card")
        version.ClearField("reference_statistics")
    return version
