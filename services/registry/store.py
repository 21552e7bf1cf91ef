"""The registry's store: models, versions, attachments, aliases and lineage.

Synchronous SQLAlchemy Core over SQLite or PostgreSQL; the servicer calls it
from worker threads. Every write is one transaction, so a refused or failed
call changes nothing. Artifacts and attachment contents live in the
content-addressed :class:`~conveyor.shared.storage.BlobStore`; a row only ever
points at a blob that was fully written first.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from sqlalchemy import insert, select, update
from sqlalchemy.engine import Connection, Engine

from conveyor.registry.v1 import resources_pb2 as pb
from conveyor.services.registry import records, schema
from conveyor.services.registry.aliases import AliasStore
from conveyor.services.registry.records import ACTIVE, ARCHIVED
from conveyor.services.registry.signing import SignedDigest
from conveyor.shared import names
from conveyor.shared.errors import (
    AlreadyExistsError,
    FailedPreconditionError,
    NotFoundError,
)
from conveyor.shared.filtering import Restriction
from conveyor.shared.storage import BlobStore, read_transaction, write_transaction
from conveyor.shared.storage.blobs import BlobInfo

ORPHAN_GRACE_S = 600.0


T = TypeVar("T")


@dataclass(frozen=True)
class Page(Generic[T]):
    """One page of a listing and whether more follow."""

    items: list[T]
    has_more: bool


class RegistryStore:
    """Registry state on one database and one blob store."""

    def __init__(self, engine: Engine, blobs: BlobStore) -> None:
        self.engine = engine
        self.blobs = blobs
        self.aliases = AliasStore(engine)

    # -- idempotency ---------------------------------------------------------

    def find_request(self, request_id: str, method: str, request_hash: str) -> str | None:
        """The resource a completed request created, if ``request_id`` was seen."""
        if not request_id:
            return None
        with read_transaction(self.engine) as db:
            return records.find_request(db, request_id, method, request_hash)

    # -- models --------------------------------------------------------------

    def create_model(
        self, model_id: str, model: pb.Model, *, principal: str, request_id: str, request_hash: str
    ) -> pb.Model:
        now = records.now()
        body = pb.Model()
        body.CopyFrom(model)
        records.clear(
            body, "name", "state", "aliases", "latest_version", "create_time", "update_time", "etag"
        )
        body.created_by = principal
        exists = AlreadyExistsError(
            f"model models/{model_id} already exists",
            reason="MODEL_EXISTS",
            metadata={"name": f"models/{model_id}"},
        )
        with records.conflict_means(exists), write_transaction(self.engine) as db:
            if (
                done := records.find_request(db, request_id, "CreateModel", request_hash)
            ) is not None:
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
                    etag=records.etag(),
                    body=body.SerializeToString(),
                )
            )
            records.record_request(
                db, request_id, "CreateModel", request_hash, f"models/{model_id}", now
            )
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
            aliases = records.aliases_by_model(db, [row.id for row in rows])
            latest = records.latest_versions(db)
            found = [
                records.model_from_row(row, aliases.get(row.id, {}), latest.get(row.id))
                for row in rows
            ]
        selected = records.matching(found, restrictions, resolve)
        return Page(selected[offset : offset + limit], has_more=len(selected) > offset + limit)

    def update_model(
        self, model_id: str, changes: pb.Model, paths: Sequence[str], *, etag: str
    ) -> pb.Model:
        with write_transaction(self.engine) as db:
            row = records.model_row(db, model_id, lock=True)
            records.check_etag(etag, row.etag, f"models/{model_id}")
            body = pb.Model.FromString(row.body)
            for path in paths:
                records.copy_field(changes, body, path)
            db.execute(
                update(schema.models)
                .where(schema.models.c.id == row.id)
                .values(
                    body=body.SerializeToString(), update_time=records.now(), etag=records.etag()
                )
            )
            return self._model(db, model_id)

    def set_model_state(self, model_id: str, state: str, *, etag: str = "") -> pb.Model:
        with write_transaction(self.engine) as db:
            row = records.model_row(db, model_id, lock=True)
            records.check_etag(etag, row.etag, f"models/{model_id}")
            if state == ARCHIVED and records.aliases_by_model(db, [row.id]):
                raise FailedPreconditionError(
                    f"models/{model_id} still has aliases; delete them before archiving",
                    reason="MODEL_HAS_ALIASES",
                    metadata={"name": f"models/{model_id}"},
                )
            if row.state != state:
                db.execute(
                    update(schema.models)
                    .where(schema.models.c.id == row.id)
                    .values(state=state, update_time=records.now(), etag=records.etag())
                )
            return self._model(db, model_id)

    # -- versions ------------------------------------------------------------

    def create_version(
        self,
        model_id: str,
        version: pb.ModelVersion,
        artifact: BlobInfo,
        *,
        signature: SignedDigest,
        principal: str,
        request_id: str,
        request_hash: str,
    ) -> pb.ModelVersion:
        """Add a version whose artifact is already stored and signed; numbers it
        next. The signature is part of the row's insert, so the version is never
        visible unsigned."""
        now = records.now()
        body = pb.ModelVersion()
        body.CopyFrom(version)
        records.clear(
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
                done := records.find_request(db, request_id, "CreateModelVersion", request_hash)
            ) is not None:
                return self._version(
                    db, names.parse_model_version_ref(done), pb.MODEL_VERSION_VIEW_FULL
                )
            model = records.model_row(db, model_id)
            if body.lineage.parent_version:
                # The parent must already exist: lineage can then never loop.
                records.existing_parent(db, body.lineage.parent_version)
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
                    etag=records.etag(),
                    body=body.SerializeToString(),
                    signature_algorithm=signature.value.algorithm.value,
                    signature_key_id=signature.value.key_id,
                    signature=signature.value.signature,
                    sign_time=signature.sign_time,
                )
            )
            name = names.model_version_name(model_id, number)
            records.record_request(db, request_id, "CreateModelVersion", request_hash, name, now)
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
            query = records.versions_query()
            if model_id is not None:
                query = query.where(schema.models.c.id == records.model_row(db, model_id).id)
            if not show_archived:
                query = query.where(
                    schema.model_versions.c.state == ACTIVE, schema.models.c.state == ACTIVE
                )
            rows = db.execute(query).all()
            aliases = records.aliases_by_version(db, [row.id for row in rows])
        found = [records.version_from_row(row, aliases.get(row.id, []), view) for row in rows]
        selected = sorted(records.matching(found, restrictions, resolve), key=sort_key)
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
            records.model_row(db, ref.model, lock=True)  # serialise changes to its versions
            row = records.version_row(db, ref)
            records.check_etag(etag, row.etag, str(ref))
            body = pb.ModelVersion.FromString(row.body)
            if "reference_statistics" in paths and body.HasField("reference_statistics"):
                raise FailedPreconditionError(
                    f"{ref} already has reference statistics; they never move once set",
                    reason="REFERENCE_STATISTICS_SET",
                )
            for path in paths:
                records.copy_field(changes, body, path)
            if "deployment_block" in paths and body.HasField("deployment_block"):
                body.deployment_block.created_by = principal
                body.deployment_block.create_time.FromDatetime(records.now())
                if records.aliases_by_version(db, [row.id]):
                    raise FailedPreconditionError(
                        f"{ref} holds aliases; move them before blocking its deployment",
                        reason="VERSION_HAS_ALIASES",
                    )
            db.execute(
                update(schema.model_versions)
                .where(schema.model_versions.c.id == row.id)
                .values(
                    body=body.SerializeToString(), update_time=records.now(), etag=records.etag()
                )
            )
            return self._version(db, ref, pb.MODEL_VERSION_VIEW_FULL)

    def set_version_state(
        self, ref: names.ModelVersionRef, state: str, *, etag: str = ""
    ) -> pb.ModelVersion:
        with write_transaction(self.engine) as db:
            records.model_row(db, ref.model, lock=True)  # serialise changes to its versions
            row = records.version_row(db, ref)
            records.check_etag(etag, row.etag, str(ref))
            if state == ARCHIVED and (held := records.aliases_by_version(db, [row.id]).get(row.id)):
                raise FailedPreconditionError(
                    f"{ref} holds the aliases {', '.join(held)}; move them first",
                    reason="VERSION_HAS_ALIASES",
                    metadata={"aliases": ",".join(held)},
                )
            if row.state != state:
                db.execute(
                    update(schema.model_versions)
                    .where(schema.model_versions.c.id == row.id)
                    .values(state=state, update_time=records.now(), etag=records.etag())
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
        now = records.now()
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
        with records.conflict_means(duplicate), write_transaction(self.engine) as db:
            if (
                done := records.find_request(db, request_id, "CreateAttachment", request_hash)
            ) is not None:
                return self._attachment(db, done, with_content=False)
            version = records.version_row(db, ref)
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
            records.record_request(db, request_id, "CreateAttachment", request_hash, body.name, now)
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
            version = records.version_row(db, ref)
            order = schema.attachments.c.id.desc() if newest_first else schema.attachments.c.id
            rows = db.execute(
                select(schema.attachments.c.body)
                .where(schema.attachments.c.version_pk == version.id)
                .order_by(order)
            ).all()
        found = [pb.Attachment.FromString(row.body) for row in rows]
        selected = records.matching(found, restrictions, resolve)
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
                    records.versions_query()
                    .where(schema.model_versions.c.parent_version.in_(frontier))
                    .order_by(schema.model_versions.c.id)
                ).all()
                aliases = records.aliases_by_version(db, [row.id for row in rows])
                children = [
                    records.version_from_row(row, aliases.get(row.id, []), basic) for row in rows
                ]
                down.extend(children)
                frontier, depth = [child.name for child in children], depth + 1
        return start, up, down

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
        row = records.model_row(db, model_id)
        return records.model_from_row(
            row,
            records.aliases_by_model(db, [row.id]).get(row.id, {}),
            records.latest_versions(db, row.id).get(row.id),
        )

    def _version(self, db: Connection, ref: names.ModelVersionRef, view: int) -> pb.ModelVersion:
        row = records.version_row(db, ref)
        return records.version_from_row(
            row, records.aliases_by_version(db, [row.id]).get(row.id, []), view
        )

    def _attachment(self, db: Connection, name: str, *, with_content: bool) -> pb.Attachment:
        parent, _, attachment_id = name.rpartition("/attachments/")
        version = records.version_row(db, names.parse_model_version_ref(parent))
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
