"""The inference service's store: deployments, shared by its serving processes.

Synchronous SQLAlchemy Core over SQLite or PostgreSQL, called from worker
threads. Every write is one transaction and gives the row a new ``etag``;
:meth:`DeploymentStore.etags` is what each serving process polls to notice
changes made through the others.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import partial
from typing import Any

from google.protobuf.timestamp_pb2 import Timestamp
from sqlalchemy import delete, insert, select, update
from sqlalchemy.engine import Engine, Row
from sqlalchemy.exc import IntegrityError

from conveyor.inference.v1 import resources_pb2 as pb
from conveyor.services.inference import schema
from conveyor.shared.errors import (
    AbortedError,
    AlreadyExistsError,
    FieldViolation,
    InvalidArgumentError,
    NotFoundError,
)
from conveyor.shared.filtering import Restriction, matches
from conveyor.shared.storage import read_transaction, write_transaction

table = schema.deployments


def deployment_name(deployment_id: str) -> str:
    return f"deployments/{deployment_id}"


@dataclass(frozen=True)
class Page:
    """One page of a listing and whether more follow."""

    items: list[pb.Deployment]
    has_more: bool


class DeploymentStore:
    """Deployments on one database."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def create(
        self, deployment: pb.Deployment, *, request_id: str = "", request_hash: str = ""
    ) -> pb.Deployment:
        """Insert ``deployment`` (its ``name`` set); ALREADY_EXISTS when its model
        has one. A repeated ``request_id`` returns the deployment it created,
        INVALID_ARGUMENT when the request differs."""
        if request_id:
            found = self._by_request(request_id, request_hash)
            if found is not None:
                return found
        stamped = _stamped(deployment)
        stamped.create_time.CopyFrom(stamped.update_time)
        try:
            with write_transaction(self.engine) as connection:
                connection.execute(
                    insert(table).values(
                        deployment_id=_id(stamped.name),
                        etag=stamped.etag,
                        request_id=request_id or None,
                        request_hash=request_hash or None,
                        create_time=stamped.create_time.ToDatetime(tzinfo=UTC),
                        update_time=stamped.update_time.ToDatetime(tzinfo=UTC),
                        body=stamped.SerializeToString(),
                    )
                )
        except IntegrityError:
            if request_id:
                found = self._by_request(request_id, request_hash)
                if found is not None:
                    return found
            raise AlreadyExistsError(
                f"{stamped.model} already has a deployment, {stamped.name}",
                reason="DEPLOYMENT_EXISTS",
            ) from None
        return stamped

    def get(self, name: str) -> pb.Deployment:
        with read_transaction(self.engine) as connection:
            row = connection.execute(
                select(table.c.body).where(table.c.deployment_id == _id(name))
            ).first()
        if row is None:
            raise NotFoundError(f"{name} does not exist", reason="DEPLOYMENT_NOT_FOUND")
        return _body(row)

    def list(
        self,
        restrictions: list[Restriction],
        resolve: Callable[[pb.Deployment, str], object],
        *,
        offset: int,
        limit: int,
    ) -> Page:
        """Deployments by name that match ``restrictions``, from ``offset``."""
        with read_transaction(self.engine) as connection:
            rows = connection.execute(select(table.c.body).order_by(table.c.deployment_id)).all()
        found = [_body(row) for row in rows]
        found = [d for d in found if matches(restrictions, partial(resolve, d))]
        return Page(found[offset : offset + limit], has_more=len(found) > offset + limit)

    def etags(self) -> dict[str, str]:
        """Every deployment's name and current etag."""
        with read_transaction(self.engine) as connection:
            rows = connection.execute(select(table.c.deployment_id, table.c.etag)).all()
        return {deployment_name(row.deployment_id): row.etag for row in rows}

    def replace(self, deployment: pb.Deployment, *, expected_etag: str) -> pb.Deployment:
        """Write ``deployment`` over the stored one; ABORTED when the stored
        etag is not ``expected_etag`` (empty: any)."""
        stamped = _stamped(deployment)
        with write_transaction(self.engine) as connection:
            condition = table.c.deployment_id == _id(stamped.name)
            current = connection.execute(select(table.c.etag).where(condition)).first()
            if current is None:
                raise NotFoundError(f"{stamped.name} does not exist", reason="DEPLOYMENT_NOT_FOUND")
            _check_etag(stamped.name, current.etag, expected_etag)
            connection.execute(
                update(table)
                .where(condition)
                .values(
                    etag=stamped.etag,
                    update_time=stamped.update_time.ToDatetime(tzinfo=UTC),
                    body=stamped.SerializeToString(),
                )
            )
        return stamped

    def delete(self, name: str, *, expected_etag: str) -> None:
        with write_transaction(self.engine) as connection:
            condition = table.c.deployment_id == _id(name)
            current = connection.execute(select(table.c.etag).where(condition)).first()
            if current is None:
                raise NotFoundError(f"{name} does not exist", reason="DEPLOYMENT_NOT_FOUND")
            _check_etag(name, current.etag, expected_etag)
            connection.execute(delete(table).where(condition))

    def _by_request(self, request_id: str, request_hash: str) -> pb.Deployment | None:
        with read_transaction(self.engine) as connection:
            row = connection.execute(
                select(table.c.body, table.c.request_hash).where(table.c.request_id == request_id)
            ).first()
        if row is None:
            return None
        if row.request_hash != request_hash:
            raise InvalidArgumentError(
                "request_id was already used for a different request",
                violations=[FieldViolation("request_id", "reused with different content")],
                reason="REQUEST_ID_REUSED",
            )
        return _body(row)


def _id(name: str) -> str:
    return name.removeprefix("deployments/")


def _stamped(deployment: pb.Deployment) -> pb.Deployment:
    stamped = pb.Deployment()
    stamped.CopyFrom(deployment)
    now = Timestamp()
    now.FromDatetime(datetime.now(UTC))
    stamped.update_time.CopyFrom(now)
    stamped.etag = uuid.uuid4().hex
    return stamped


def _check_etag(name: str, current: str, expected: str) -> None:
    if expected and expected != current:
        raise AbortedError(
            f"{name} changed since it was read (etag {expected} is stale); read it again",
            reason="ETAG_MISMATCH",
        )


def _body(row: Row[Any, Any]) -> pb.Deployment:
    deployment = pb.Deployment()
    deployment.ParseFromString(row.body)
    return deployment
