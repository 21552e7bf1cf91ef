"""Aliases: movable pointers to versions, and their ordered history.

Every change takes the next registry-wide revision under the counter row's
lock and appends an event, so the history commits in revision order and a
watch can resume from any revision it saw.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from sqlalchemy import func, insert, select, update
from sqlalchemy.engine import Engine

from conveyor.registry.v1 import resources_pb2 as pb
from conveyor.services.registry import records, schema
from conveyor.services.registry.records import ACTIVE
from conveyor.shared import names
from conveyor.shared.errors import FailedPreconditionError, NotFoundError
from conveyor.shared.storage import read_transaction, write_transaction


@dataclass(frozen=True)
class AliasEvent:
    """One change on the alias watch stream."""

    revision: int
    event_type: pb.AliasEventType.ValueType
    alias: pb.Alias


class AliasStore:
    """Alias changes and history on the registry's database."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def set(
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
            model = records.model_row(db, model_id, lock=True)
            if model.state != ACTIVE:
                raise FailedPreconditionError(
                    f"models/{model_id} is archived", reason="MODEL_ARCHIVED"
                )
            target = records.version_row(db, names.ModelVersionRef(model_id, version_number))
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
            current = records.alias_row(db, model.id, alias_id)
            current_version = pb.Alias.FromString(current.body).version if current else ""
            records.check_expected(expected_version, current_version, model_id, alias_id)
            if current is not None and current_version == version_name:
                return pb.Alias.FromString(current.body)
            revision = records.next_revision(db)
            alias = pb.Alias(
                name=f"models/{model_id}/aliases/{alias_id}",
                version=version_name,
                previous_version=current_version,
                revision=revision,
                updated_by=principal,
                reason=reason,
                decision=decision,
            )
            now = records.now()
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
            records.record_event(
                db, revision, model_id, alias_id, pb.ALIAS_EVENT_TYPE_SET, alias, now
            )
            return alias

    def delete(
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
            model = records.model_row(db, model_id, lock=True)
            current = records.alias_row(db, model.id, alias_id)
            if current is None:
                raise NotFoundError(
                    f"models/{model_id}/aliases/{alias_id} does not exist", reason="ALIAS_NOT_FOUND"
                )
            alias = pb.Alias.FromString(current.body)
            records.check_expected(expected_version, alias.version, model_id, alias_id)
            now = records.now()
            alias.revision, alias.updated_by, alias.reason = (
                records.next_revision(db),
                principal,
                reason,
            )
            alias.decision = decision
            alias.update_time.FromDatetime(now)
            db.execute(
                schema.aliases.delete().where(
                    schema.aliases.c.model_pk == model.id, schema.aliases.c.alias_id == alias_id
                )
            )
            records.record_event(
                db, alias.revision, model_id, alias_id, pb.ALIAS_EVENT_TYPE_DELETED, alias, now
            )
            return alias

    def snapshot(
        self, model_id: str | None, alias_ids: Iterable[str] = ()
    ) -> tuple[list[pb.Alias], int]:
        """Current aliases (ordered by name) and the revision they reflect."""
        wanted = set(alias_ids)
        with read_transaction(self.engine) as db:
            if model_id is not None:
                records.model_row(db, model_id)
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

    def events_after(
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
            AliasEvent(
                row.revision, records.EVENT_TYPES[row.event_type], pb.Alias.FromString(row.body)
            )
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
