"""The policy service's gRPC methods (``conveyor.policy.v1.PolicyService``)."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from datetime import datetime, timedelta
from typing import Any

from conveyor.policy.v1 import policy_messages_pb2 as rpc
from conveyor.policy.v1 import policy_service_pb2_grpc
from conveyor.policy.v1 import resources_pb2 as pb
from conveyor.registry.v1 import resources_pb2 as registry_pb
from conveyor.services.policy import approvals as approval_rules
from conveyor.services.policy.approvals import ApprovalStore
from conveyor.services.policy.audit import AuditRecord, VerificationResult
from conveyor.services.policy.audit_export import verification_keys
from conveyor.services.policy.decisions import DecisionRecorder, decision_proto
from conveyor.services.policy.policy_sets import PolicySetStore
from conveyor.services.policy.promotion import (
    PromotionFacts,
    evaluate_promotion,
    version_resource,
)
from conveyor.services.policy.registry_reader import RegistryReader
from conveyor.shared import names
from conveyor.shared.artifacts import verify_artifact_signature
from conveyor.shared.auth import caller, current_decision_id
from conveyor.shared.auth.principal import Principal, Resource
from conveyor.shared.errors import (
    ConveyorError,
    FailedPreconditionError,
    FieldViolation,
    InvalidArgumentError,
    PermissionDeniedError,
)
from conveyor.shared.filtering import FieldKind, FilterField, parse_filter
from conveyor.shared.pagination import page_size
from conveyor.shared.secrets import SecretStore
from conveyor.shared.wellknown import struct_to_dict
from conveyor.shared.workers import WorkerThreads

EXPORT_CHUNK = 200
DEFAULT_DECISIONS_PAGE = 100

_ACTION = re.compile(r"^[a-z][a-z0-9_]*\.[A-Z][A-Za-z0-9_]*\Z")
_RESOURCE_TYPE = re.compile(r"^[a-z][a-z0-9_]*\.conveyor\.dev/[A-Z][A-Za-z0-9_]*\Z")
_OUTCOMES = {"OUTCOME_ALLOW": "allow", "OUTCOME_DENY": "deny"}
_KINDS = {
    "DECISION_KIND_AUTHORIZATION": "authorization",
    "DECISION_KIND_PROMOTION": "promotion",
}
DECISION_FILTER_FIELDS = {
    "principal.id": FilterField(FieldKind.STRING),
    "action": FilterField(FieldKind.STRING),
    "resource.name": FilterField(FieldKind.STRING),
    "outcome": FilterField(FieldKind.ENUM, enum_values={*_OUTCOMES, "OUTCOME_UNSPECIFIED"}),
    "kind": FilterField(FieldKind.ENUM, enum_values=set(_KINDS)),
    "trace_id": FilterField(FieldKind.STRING),
    "create_time": FilterField(FieldKind.TIMESTAMP),
}
_LIST_ARGUMENTS = {
    "principal.id": "principal_id",
    "action": "action",
    "resource.name": "resource_name",
    "trace_id": "trace_id",
}
_DECISION_NAME = re.compile(
    r"^decisions/(?P<id>[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12})$"
)
_POLICY_SET_NAME = re.compile(r"^policySets/(?P<id>[0-9a-fA-F]{64}|current)\Z")
_ONE_MICROSECOND = timedelta(microseconds=1)
_BREAK_KINDS = {
    "changed": pb.CHAIN_BREAK_KIND_MODIFIED,
    "removed": pb.CHAIN_BREAK_KIND_MISSING,
    "reordered": pb.CHAIN_BREAK_KIND_REORDERED,
    "signature": pb.CHAIN_BREAK_KIND_SIGNATURE_INVALID,
    "truncated": pb.CHAIN_BREAK_KIND_TRUNCATED,
}


class PolicyServicer(policy_service_pb2_grpc.PolicyServiceServicer):
    """Authorization, promotion gates, approvals and the audit log."""

    def __init__(
        self,
        *,
        recorder: DecisionRecorder,
        approvals: ApprovalStore,
        policy_sets: PolicySetStore,
        registry: RegistryReader,
        secret_store: SecretStore,
        artifact_signing_key: str,
        decision_cache_ttl: timedelta,
    ) -> None:
        self._recorder = recorder
        self._approvals = approvals
        self._policy_sets = policy_sets
        self._registry = registry
        self._secret_store = secret_store
        self._artifact_signing_key = artifact_signing_key
        self._decision_cache_ttl = decision_cache_ttl

    @property
    def _workers(self) -> WorkerThreads:
        return self._recorder.workers

    # Decisions -----------------------------------------------------------------

    async def Authorize(self, request: rpc.AuthorizeRequest, context: Any) -> Any:
        principal = _principal(request.principal, "principal")
        if not _ACTION.match(request.action):
            raise _invalid("action", "expected {service}.{Method}, e.g. registry.SetAlias")
        if not _RESOURCE_TYPE.match(request.resource.type):
            raise _invalid(
                "resource.type",
                "expected {service}.conveyor.dev/{Kind}, e.g. registry.conveyor.dev/Model",
            )
        resource = Resource.from_proto(request.resource)
        facts = struct_to_dict(request.context, field="context")
        decision, record = await self._recorder.authorize(
            principal, request.action, resource, facts, caller=caller(context).text
        )
        response = rpc.AuthorizeResponse(
            outcome=pb.OUTCOME_ALLOW if decision.allowed else pb.OUTCOME_DENY,
            policy_ids=decision.policy_ids,
            decision_id=record.decision_id,
            policy_set_digest=decision.policy_set_digest,
            reasons=decision.reasons,
        )
        response.cache_ttl.FromTimedelta(self._decision_cache_ttl)
        return response

    async def EvaluatePromotion(self, request: rpc.EvaluatePromotionRequest, context: Any) -> Any:
        version_name = _exact_version(request.model_version, "model_version")
        alias = approval_rules.check_alias(request.alias, field="alias")
        asking = caller(context)
        requester = asking
        if request.HasField("requester"):
            named = _principal(request.requester, "requester")
            if asking.kind == "service":
                requester = named  # an enforcement point passes its caller's principal
            elif named.text != asking.text:
                raise PermissionDeniedError(
                    "only a service identity may evaluate a promotion on behalf of "
                    f"another principal ({named.text})",
                    reason="REQUESTER_NOT_ALLOWED",
                )
            # A person naming themself keeps the roles and team their credentials carry.
        facts = await self._facts(version_name, alias)
        evaluation = await self._workers.run(
            lambda: evaluate_promotion(
                self._recorder.engine,
                facts,
                alias=alias,
                requester=requester,
                check_signature=self._signature_problem,
            )
        )
        record = await self._recorder.record_promotion(
            evaluation,
            requester=requester,
            resource=version_resource(facts.model, facts.version),
            alias=alias,
            caller=asking.text,
        )
        return rpc.EvaluatePromotionResponse(
            allowed=evaluation.allowed,
            gates=evaluation.gates,
            decision_id=record.decision_id,
            policy_set_digest=record.policy_set_digest,
            risk_tier=facts.model.risk_tier,
            compliance_tags=facts.model.compliance_tags,
        )

    async def _facts(self, version_name: str, alias: str) -> PromotionFacts:
        version = await self._registry.get_version(version_name)
        model = await self._registry.get_model(version_name.split("/versions/")[0])
        attachments = await self._registry.list_attachments(version_name)
        model_id, number = _model_and_version(version_name)
        active = await self._workers.run(self._approvals.active, model_id, number, alias)
        return PromotionFacts(
            model=model, version=version, attachments=attachments, approvals=active
        )

    def _signature_problem(self, artifact: registry_pb.Artifact) -> str:
        """Runs in a worker thread: the secret store blocks."""
        try:
            verify_artifact_signature(self._secret_store, self._artifact_signing_key, artifact)
        except FailedPreconditionError as error:
            return error.message
        return ""

    # Approvals -----------------------------------------------------------------

    async def CreateApproval(self, request: rpc.CreateApprovalRequest, context: Any) -> Any:
        version_name = _exact_version(request.parent, "parent")
        alias = approval_rules.check_alias(request.approval.alias)
        comment = approval_rules.check_text(request.approval.comment, field="approval.comment")
        request_id = approval_rules.check_request_id(request.request_id)
        approver = caller(context)
        if "approver" not in approver.roles:
            raise PermissionDeniedError(
                f"{approver.text} does not hold the approver role", reason="NOT_AN_APPROVER"
            )
        version = await self._registry.get_version(version_name)
        creators = {version.created_by, *version.authors} - {""}
        if approver.text in creators:
            raise PermissionDeniedError(
                f"{approver.text} trained or registered {version_name} and may not approve it "
                "(four eyes)",
                reason="FOUR_EYES",
            )
        if version.state == registry_pb.MODEL_VERSION_STATE_ARCHIVED:
            raise FailedPreconditionError(
                f"{version_name} is archived; unarchive it before approving it",
                reason="VERSION_ARCHIVED",
            )
        model_id, number = _model_and_version(version_name)
        decision = current_decision_id.get()
        approval = await self._workers.run(
            lambda: self._approvals.create(
                model=model_id,
                version=number,
                alias=alias,
                approver=approver,
                comment=comment,
                decision=f"decisions/{decision}" if decision else "",
                request_id=request_id,
            )
        )
        return rpc.CreateApprovalResponse(approval=approval)

    async def GetApproval(self, request: rpc.GetApprovalRequest, context: Any) -> Any:
        approval_rules.parse_approval_name(request.name)
        approval = await self._workers.run(self._approvals.get, request.name)
        return rpc.GetApprovalResponse(approval=approval)

    async def ListApprovals(self, request: rpc.ListApprovalsRequest, context: Any) -> Any:
        parent = approval_rules.parse_parent(request.parent)
        if parent.model is not None and parent.version is not None:
            await self._registry.get_version(request.parent)  # NOT_FOUND for a missing one
        elif parent.model is not None:
            await self._registry.get_model(f"models/{parent.model}")
        found, token = await self._workers.run(
            lambda: self._approvals.list(
                parent,
                filter=request.filter,
                size=request.page_size,
                page_token=request.page_token,
            )
        )
        return rpc.ListApprovalsResponse(approvals=found, next_page_token=token)

    async def RevokeApproval(self, request: rpc.RevokeApprovalRequest, context: Any) -> Any:
        approval_rules.parse_approval_name(request.name)
        reason = approval_rules.check_text(request.reason, field="reason")
        revoker = caller(context)
        existing = await self._workers.run(self._approvals.get, request.name)
        if not approval_rules.may_revoke(existing, revoker):
            raise PermissionDeniedError(
                "only the approver or a security auditor may revoke an approval",
                reason="NOT_THE_APPROVER",
            )
        approval = await self._workers.run(
            lambda: self._approvals.revoke(request.name, revoker=revoker, reason=reason)
        )
        return rpc.RevokeApprovalResponse(approval=approval)

    # The audit log ------------------------------------------------------------

    async def GetDecision(self, request: rpc.GetDecisionRequest, context: Any) -> Any:
        decision_id = _decision_id(request.name)
        record = await self._workers.run(self._recorder.audit.get, decision_id)
        return rpc.GetDecisionResponse(decision=decision_proto(record))

    async def ListDecisions(self, request: rpc.ListDecisionsRequest, context: Any) -> Any:
        arguments = _decision_filter(request.filter)
        order = " ".join(request.order_by.split())
        if order not in ("", "sequence", "sequence asc", "sequence desc"):
            raise _invalid("order_by", "'sequence' (oldest first) or 'sequence desc'")
        if arguments is None:
            page_size(request.page_size)  # a negative size is refused all the same
            return rpc.ListDecisionsResponse()
        records, token = await self._workers.run(
            lambda: self._recorder.audit.list(
                **arguments,
                descending=order == "sequence desc",
                page_size=request.page_size or DEFAULT_DECISIONS_PAGE,
                page_token=request.page_token,
            )
        )
        return rpc.ListDecisionsResponse(
            decisions=[decision_proto(record) for record in records], next_page_token=token
        )

    async def VerifyAuditLog(self, request: rpc.VerifyAuditLogRequest, context: Any) -> Any:
        _check_range(request.start_sequence, request.end_sequence)
        result = await self._workers.run(
            lambda: self._recorder.audit.verify_range(request.start_sequence, request.end_sequence)
        )
        return verification_response(result)

    async def ExportAuditLog(
        self, request: rpc.ExportAuditLogRequest, context: Any
    ) -> AsyncIterator[rpc.ExportAuditLogResponse]:
        _check_range(request.start_sequence, request.end_sequence)
        audit = self._recorder.audit
        keys = await self._workers.run(
            lambda: verification_keys(audit.secret_store, audit.signing_key)
        )
        entries = audit.export(max(request.start_sequence, 1), request.end_sequence)
        first = True
        while True:
            chunk: list[AuditRecord] = await self._workers.run(
                lambda: [record for _, record in zip(range(EXPORT_CHUNK), entries, strict=False)]
            )
            if not chunk and not first:
                return
            response = rpc.ExportAuditLogResponse(
                entries=[decision_proto(record) for record in chunk]
            )
            if first:
                response.verification_keys.extend(keys)
                first = False
            yield response
            if not chunk:
                return

    async def GetPolicySet(self, request: rpc.GetPolicySetRequest, context: Any) -> Any:
        digest = _policy_set_id(request.name)
        policy_set = await self._workers.run(self._policy_sets.get, digest)
        return rpc.GetPolicySetResponse(policy_set=policy_set)


def verification_response(result: VerificationResult) -> rpc.VerifyAuditLogResponse:
    """The RPC's answer for a verification result."""
    response = rpc.VerifyAuditLogResponse(
        verified=result.verified,
        checked_count=result.checked_count,
        verified_count=result.verified_count,
        head_sequence=result.head_sequence,
        head_hash=result.head_hash,
        last_signed_sequence=result.last_signed_sequence,
    )
    if result.problem is not None and result.first_bad_sequence is not None:
        response.first_break.CopyFrom(
            pb.ChainBreak(
                sequence=result.first_bad_sequence,
                kind=_BREAK_KINDS[result.problem],
                expected_hash=result.expected_hash,
                actual_hash=result.actual_hash,
                detail=result.detail,
            )
        )
    return response


def _decision_filter(text: str) -> dict[str, Any] | None:
    """``AuditLog.list`` keyword arguments for an AIP-160 filter; None when the
    restrictions cannot all hold (``outcome = OUTCOME_UNSPECIFIED``, or one field
    equal to two different values), so nothing matches."""
    arguments: dict[str, Any] = {}
    for restriction in parse_filter(text, DECISION_FILTER_FIELDS):
        field, op, value = restriction.field, restriction.op, restriction.value
        if field == "create_time":
            assert isinstance(value, datetime)
            if op in (">=", ">"):
                start = value + (_ONE_MICROSECOND if op == ">" else timedelta(0))
                arguments["start_time"] = max(start, arguments.get("start_time", start))
            elif op in ("<", "<="):
                end = value + (_ONE_MICROSECOND if op == "<=" else timedelta(0))
                arguments["end_time"] = min(end, arguments.get("end_time", end))
            else:
                raise _invalid("filter", "create_time takes <, <=, > or >=")
            continue
        if op != "=":
            raise _invalid("filter", f"{field} takes '=' (a trailing * on resource.name: prefix)")
        if field == "outcome":
            if str(value) not in _OUTCOMES:
                return None  # OUTCOME_UNSPECIFIED: never recorded
            key, wanted = "result", _OUTCOMES[str(value)]
        elif field == "kind":
            key, wanted = "kind", _KINDS[str(value)]
        elif str(value).endswith("*") and field != "resource.name":
            raise _invalid("filter", f"only resource.name matches a prefix with '*', not {field}")
        else:
            key, wanted = _LIST_ARGUMENTS[field], str(value)
        if arguments.get(key, wanted) != wanted:
            return None
        arguments[key] = wanted
    return arguments


def _principal(message: pb.Principal, field: str) -> Principal:
    """The principal in the request's ``field``; INVALID_ARGUMENT naming
    ``{field}.kind`` / ``{field}.id`` when it is malformed."""
    try:
        return Principal.from_proto(message, field=field)
    except InvalidArgumentError as error:
        raise InvalidArgumentError(
            f"invalid {field}: {error.message}",
            violations=list(error.violations) or [FieldViolation(field, error.message)],
            reason=error.reason,
        ) from None


def _decision_id(name: str) -> str:
    """The UUID in ``decisions/{decision_id}`` (a resource id pattern would refuse
    the many UUIDs that start with a digit)."""
    match = _DECISION_NAME.match(name)
    if not match:
        raise _invalid("name", f"expected decisions/{{uuid}}, got {name[:100]!r}")
    return match["id"]


def _policy_set_id(name: str) -> str:
    """The digest (or ``current``) in ``policySets/{policy_set}``."""
    match = _POLICY_SET_NAME.match(name)
    if not match:
        raise _invalid(
            "name",
            f"expected policySets/{{sha256 digest}} or policySets/current, got {name[:100]!r}",
        )
    return match["id"]


def _exact_version(name: str, field: str) -> str:
    reference = names.parse_model_version_ref(name, field=field)
    if reference.version is None:
        raise _invalid(field, "name a version number, not an alias: models/{model}/versions/{n}")
    return str(reference)


def _model_and_version(version_name: str) -> tuple[str, int]:
    reference = names.parse_model_version_ref(version_name)
    assert reference.version is not None
    return reference.model, reference.version


def _check_range(start: int, end: int) -> None:
    if start < 0:
        raise _invalid("start_sequence", "sequence numbers are not negative")
    if end < 0:
        raise _invalid("end_sequence", "sequence numbers are not negative")
    if end and start > end:
        raise _invalid("end_sequence", f"ends ({end}) before it starts ({start})")


def _invalid(field: str, description: str) -> ConveyorError:
    return InvalidArgumentError(
        f"invalid {field}: {description}", violations=[FieldViolation(field, description)]
    )
