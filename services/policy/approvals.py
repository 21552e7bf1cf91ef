"""Approvals: an approver's sign-off on a model version for an alias.

The approval gate of ``EvaluatePromotion`` counts the distinct approvers whose
approvals of a version for an alias are active. An approval is never deleted:
revoking it keeps it, revoked, for the record. Who may approve (the approver role,
four eyes) is decided by the servicer before :meth:`ApprovalStore.create`.
"""

from __future__ import annotations

import builtins
import json
import re
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine, Row

from conveyor.policy.v1 import resources_pb2 as pb
from conveyor.services.policy.schema import approvals
from conveyor.shared.auth.principal import Principal
from conveyor.shared.errors import (
    AlreadyExistsError,
    FailedPreconditionError,
    FieldViolation,
    InvalidArgumentError,
    NotFoundError,
)
from conveyor.shared.filtering import FieldKind, FilterField, Restriction, matches, parse_filter
from conveyor.shared.names import ID_PATTERN
from conveyor.shared.pagination import (
    PageCursor,
    decode_page_token,
    encode_page_token,
    fingerprint,
    page_size,
)
from conveyor.shared.storage import read_transaction, write_transaction

MAX_TEXT = 4096
MAX_PAGE_SIZE = 500
"""ListApprovals coerces larger page sizes to this (the contract's limit)."""
WILDCARD = "-"

_APPROVAL = re.compile(
    rf"^models/(?P<model>{ID_PATTERN})/versions/(?P<version>[1-9][0-9]{{0,9}})"
    r"/approvals/(?P<approval>[0-9a-f-]{36})$"
)
_PARENT = re.compile(
    rf"^models/(?P<model>{ID_PATTERN}|-)/versions/(?P<version>[1-9][0-9]{{0,9}}|-)$"
)
_ALIAS = re.compile(rf"^{ID_PATTERN}\Z")
_STATES = {"ACTIVE": pb.APPROVAL_STATE_ACTIVE, "REVOKED": pb.APPROVAL_STATE_REVOKED}
FILTER_FIELDS = {
    "alias": FilterField(FieldKind.STRING),
    "state": FilterField(
        FieldKind.ENUM, enum_values={f"APPROVAL_STATE_{state}" for state in _STATES}
    ),
    "approver.id": FilterField(FieldKind.STRING),
}


@dataclass(frozen=True)
class ApprovalParent:
    """The version whose approvals to list; None stands for the ``-`` wildcard."""

    model: str | None
    version: int | None


def parse_parent(parent: str, *, field: str = "parent") -> ApprovalParent:
    """``models/{model}/versions/{version}``, with ``-`` wildcards."""
    match = _PARENT.match(parent)
    if not match:
        raise _invalid(field, "expected models/{model}/versions/{version} ('-' lists across)")
    model = None if match["model"] == WILDCARD else match["model"]
    version = None if match["version"] == WILDCARD else int(match["version"])
    if model is None and version is not None:
        raise _invalid(field, "a version number needs a model: use models/-/versions/-")
    return ApprovalParent(model, version)


def parse_approval_name(name: str, *, field: str = "name") -> tuple[str, int, str]:
    """``(model, version, approval_id)`` of an approval's name."""
    match = _APPROVAL.match(name)
    if not match:
        raise _invalid(field, "expected models/{model}/versions/{version}/approvals/{approval}")
    return match["model"], int(match["version"]), match["approval"]


def check_alias(alias: str, *, field: str = "approval.alias") -> str:
    if not _ALIAS.match(alias):
        raise _invalid(field, "an alias id: lowercase letters, digits and hyphens, e.g. production")
    return alias


def check_text(text: str, *, field: str) -> str:
    if len(text) > MAX_TEXT:
        raise _invalid(field, f"at most {MAX_TEXT} characters, got {len(text)}")
    return text


def check_request_id(request_id: str) -> str:
    if request_id:
        try:
            uuid.UUID(request_id)
        except ValueError:
            raise _invalid("request_id", "a UUID, e.g. 8b2c4f1e-...") from None
    return request_id


class ApprovalStore:
    """Approvals in the policy service's database (blocking: call from workers)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def create(
        self,
        *,
        model: str,
        version: int,
        alias: str,
        approver: Principal,
        comment: str,
        decision: str,
        request_id: str = "",
    ) -> pb.Approval:
        """Record an active approval; a retry with the same ``request_id`` returns
        the first one. ALREADY_EXISTS when the approver already has an active
        approval of the version for the alias."""
        with write_transaction(self.engine) as connection:
            if request_id:
                earlier = connection.execute(
                    sa.select(approvals).where(approvals.c.request_id == request_id)
                ).first()
                if earlier is not None:
                    same_request = (
                        earlier.model_id == model
                        and earlier.version == version
                        and earlier.alias == alias
                        and earlier.approver_text == approver.text
                    )
                    if not same_request:
                        # Never hand someone else's approval (or another version's) back.
                        raise _invalid(
                            "request_id", "already used for a different approval; use a new UUID"
                        )
                    return _approval(earlier)
            duplicate = connection.execute(
                sa.select(approvals.c.approval_id).where(
                    approvals.c.model_id == model,
                    approvals.c.version == version,
                    approvals.c.alias == alias,
                    approvals.c.approver_text == approver.text,
                    approvals.c.state == "ACTIVE",
                )
            ).first()
            if duplicate is not None:
                raise AlreadyExistsError(
                    f"{approver.text} already approved models/{model}/versions/{version} "
                    f"for {alias!r}",
                    reason="APPROVAL_EXISTS",
                    metadata={"approval": _name(model, version, str(duplicate.approval_id))},
                )
            values: dict[str, Any] = {
                "approval_id": str(uuid.uuid4()),
                "model_id": model,
                "version": version,
                "alias": alias,
                "approver": _principal_json(approver),
                "approver_text": approver.text,
                "comment": comment,
                "state": "ACTIVE",
                "create_time": datetime.now(UTC),
                "revoke_time": None,
                "revoker": None,
                "revoke_reason": "",
                "decision": decision,
                "request_id": request_id or None,
            }
            connection.execute(sa.insert(approvals).values(**values))
            row = connection.execute(
                sa.select(approvals).where(approvals.c.approval_id == values["approval_id"])
            ).one()
            return _approval(row)

    def get(self, name: str) -> pb.Approval:
        model, version, approval_id = parse_approval_name(name)
        with read_transaction(self.engine) as connection:
            return _approval(_row(connection, model, version, approval_id, name))

    def revoke(self, name: str, *, revoker: Principal, reason: str) -> pb.Approval:
        """Revoke an active approval; FAILED_PRECONDITION when already revoked.
        Whether ``revoker`` may is the caller's check (see :func:`may_revoke`)."""
        model, version, approval_id = parse_approval_name(name)
        with write_transaction(self.engine) as connection:
            row = _row(connection, model, version, approval_id, name)
            if row.state != "ACTIVE":
                raise FailedPreconditionError(
                    f"{name} is already revoked", reason="APPROVAL_REVOKED"
                )
            connection.execute(
                sa.update(approvals)
                .where(approvals.c.approval_id == approval_id)
                .values(
                    state="REVOKED",
                    revoke_time=datetime.now(UTC),
                    revoker=_principal_json(revoker),
                    revoke_reason=reason,
                )
            )
            return _approval(_row(connection, model, version, approval_id, name))

    def list(
        self, parent: ApprovalParent, *, filter: str = "", size: int = 0, page_token: str = ""
    ) -> tuple[builtins.list[pb.Approval], str]:
        """One page of the approvals under ``parent``, oldest first."""
        restrictions = parse_filter(filter, FILTER_FIELDS)
        limit = min(page_size(size), MAX_PAGE_SIZE)
        request = fingerprint(parent.model, parent.version, filter)
        cursor = decode_page_token(page_token, request)
        query = sa.select(approvals).order_by(approvals.c.create_time, approvals.c.approval_id)
        if parent.model is not None:
            query = query.where(approvals.c.model_id == parent.model)
        if parent.version is not None:
            query = query.where(approvals.c.version == parent.version)
        with read_transaction(self.engine) as connection:
            found = [_approval(row) for row in connection.execute(query)]
        selected = [a for a in found if _matches(restrictions, a)]
        page = selected[cursor.offset : cursor.offset + limit]
        token = ""
        if len(selected) > cursor.offset + limit:
            token = encode_page_token(PageCursor(cursor.offset + limit), request)
        return page, token

    def active(self, model: str, version: int, alias: str) -> builtins.list[pb.Approval]:
        """The active approvals of a version for an alias, oldest first."""
        query = (
            sa.select(approvals)
            .where(
                approvals.c.model_id == model,
                approvals.c.version == version,
                approvals.c.alias == alias,
                approvals.c.state == "ACTIVE",
            )
            .order_by(approvals.c.create_time, approvals.c.approval_id)
        )
        with read_transaction(self.engine) as connection:
            return [_approval(row) for row in connection.execute(query)]


def may_revoke(approval: pb.Approval, principal: Principal) -> bool:
    """The approver themself, or a security auditor."""
    approver = Principal.from_proto(approval.approver)
    return approver.text == principal.text or "security_auditor" in principal.roles


def _matches(restrictions: list[Restriction], approval: pb.Approval) -> bool:
    values: dict[str, object] = {
        "alias": approval.alias,
        "state": pb.ApprovalState.Name(approval.state),
        "approver.id": approval.approver.id,
    }
    return matches(restrictions, values.get)


def _row(
    connection: sa.Connection, model: str, version: int, approval_id: str, name: str
) -> Row[Any]:
    row = connection.execute(
        sa.select(approvals).where(
            approvals.c.approval_id == approval_id,
            approvals.c.model_id == model,
            approvals.c.version == version,
        )
    ).first()
    if row is None:
        raise NotFoundError(f"no approval {name}", reason="APPROVAL_NOT_FOUND")
    return row


def _name(model: str, version: int, approval_id: str) -> str:
    return f"models/{model}/versions/{version}/approvals/{approval_id}"


def _principal_json(principal: Principal) -> str:
    return json.dumps(
        {
            "kind": principal.kind,
            "id": principal.id,
            "roles": list(principal.roles),
            "team": principal.team,
        }
    )


def _principal_from_json(text: str) -> Principal:
    data = json.loads(text)
    return Principal(
        kind=str(data["kind"]),
        id=str(data["id"]),
        roles=tuple(str(role) for role in data.get("roles", ())),
        team=str(data.get("team", "")),
    )


def _approval(row: Row[Any]) -> pb.Approval:
    approval = pb.Approval(
        name=_name(row.model_id, row.version, row.approval_id),
        alias=row.alias,
        approver=_principal_from_json(row.approver).to_proto(),
        comment=row.comment,
        state=_STATES[row.state],
        revoke_reason=row.revoke_reason,
        decision=row.decision,
    )
    approval.create_time.FromDatetime(_utc(row.create_time))
    if row.revoke_time is not None:
        approval.revoke_time.FromDatetime(_utc(row.revoke_time))
    if row.revoker:
        approval.revoker.CopyFrom(_principal_from_json(row.revoker).to_proto())
    return approval


def _utc(moment: datetime) -> datetime:
    # SQLite hands back naive datetimes; they were stored in UTC.
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


def _invalid(field: str, description: str) -> InvalidArgumentError:
    return InvalidArgumentError(
        f"invalid {field}: {description}", violations=[FieldViolation(field, description)]
    )
