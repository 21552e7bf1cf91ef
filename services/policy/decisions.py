"""Deciding and recording: every decision the policy service makes is appended to
the audit log before anyone acts on it.

:class:`DecisionRecorder` evaluates an authorization question with the policy
engine and appends the decision, allow or deny, in one step; if the append
fails, :class:`~conveyor.services.policy.audit.AuditLogUnavailableError`
(UNAVAILABLE) reaches the caller, who refuses the action. :class:`LocalAuthorizer`
is the policy service's own authorizer for its interceptor: the same decisions,
without a network hop to itself. Each append is a ``policy.audit.append`` span
in the call's trace, naming the decision, its sequence, kind and result.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import timedelta
from typing import Any

from google.protobuf import json_format
from opentelemetry import trace

from conveyor.policy.v1 import resources_pb2 as pb
from conveyor.registry.v1 import resources_pb2 as registry_pb
from conveyor.services.policy.audit import AuditLog, AuditRecord
from conveyor.services.policy.engine import AuthorizationDecision, PolicyEngine
from conveyor.services.policy.promotion import PromotionEvaluation
from conveyor.shared.auth.authorizer import AuthorizationResult, DecisionCache
from conveyor.shared.auth.principal import Principal, Resource
from conveyor.shared.workers import WorkerThreads

AUDIT_APPEND_SPAN = "policy.audit.append"
"""The span of one audit log append (the call's span is its parent)."""

tracer = trace.get_tracer(__name__)


def current_trace_ids() -> tuple[str, str]:
    """The W3C trace and span ids of the call being served ("" when untraced)."""
    span_context = trace.get_current_span().get_span_context()
    if not span_context.is_valid:
        return "", ""
    return format(span_context.trace_id, "032x"), format(span_context.span_id, "016x")


def decision_proto(record: AuditRecord) -> pb.Decision:
    """The audit entry as the API returns it: its hashed document, plus its hash
    and head signature."""
    decision = json_format.ParseDict(record.document(), pb.Decision())
    decision.entry_hash = record.hash
    if record.signature is not None:
        signature = record.signature
        decision.signature.algorithm = registry_pb.SignatureAlgorithm.Value(
            signature.algorithm.proto_name
        )
        decision.signature.key_id = signature.key_id
        decision.signature.signature = signature.signature
        decision.signature.sign_time.FromDatetime(signature.sign_time)
    return decision


class DecisionRecorder:
    """Evaluates with the engine and appends to the audit log (work runs in the
    worker threads: the engine and the database both block)."""

    def __init__(self, engine: PolicyEngine, audit: AuditLog, workers: WorkerThreads) -> None:
        self.engine = engine
        self.audit = audit
        self.workers = workers

    async def authorize(
        self,
        principal: Principal,
        action: str,
        resource: Resource,
        context: Mapping[str, Any],
        *,
        caller: str,
    ) -> tuple[AuthorizationDecision, AuditRecord]:
        trace_id, span_id = current_trace_ids()
        engine = self.engine

        def decide_and_record() -> tuple[AuthorizationDecision, AuditRecord]:
            decision = engine.authorize(principal, action, resource, context)
            with tracer.start_as_current_span(AUDIT_APPEND_SPAN) as span:
                record = self.audit.append(
                    principal=principal,
                    action=action,
                    resource=resource,
                    result="allow" if decision.allowed else "deny",
                    input=context,
                    policy_ids=decision.policy_ids,
                    reasons=decision.reasons,
                    errors=decision.errors,
                    policy_set_digest=decision.policy_set_digest,
                    caller=caller,
                    trace_id=trace_id,
                    span_id=span_id,
                )
                _describe(span, record)
            return decision, record

        return await self.workers.run(decide_and_record)

    async def record_promotion(
        self,
        evaluation: PromotionEvaluation,
        *,
        requester: Principal,
        resource: Resource,
        alias: str,
        caller: str,
    ) -> AuditRecord:
        trace_id, span_id = current_trace_ids()

        def record() -> AuditRecord:
            with tracer.start_as_current_span(AUDIT_APPEND_SPAN) as span:
                appended = self.audit.append(
                    principal=requester,
                    action="registry.SetAlias",
                    resource=resource,
                    result="allow" if evaluation.allowed else "deny",
                    input={"alias": alias},
                    policy_ids=evaluation.policy_ids,
                    reasons=evaluation.reasons,
                    errors=evaluation.errors,
                    policy_set_digest=self.engine.policy_set_digest,
                    kind="promotion",
                    gates=evaluation.gate_documents(),
                    caller=caller,
                    trace_id=trace_id,
                    span_id=span_id,
                )
                _describe(span, appended)
                return appended

        return await self.workers.run(record)


class LocalAuthorizer:
    """The policy service's own authorizer (its interceptor asks it about each
    call to the policy service), cached like a remote one."""

    def __init__(
        self, recorder: DecisionRecorder, cache: DecisionCache, cache_ttl: timedelta
    ) -> None:
        self._recorder = recorder
        self._cache = cache
        self._cache_ttl = cache_ttl

    async def authorize(
        self,
        principal: Principal,
        action: str,
        resource: Resource,
        context: Mapping[str, str],
    ) -> AuthorizationResult:
        key = self._cache.key(principal, action, resource, context)
        return await self._cache.get_or_fetch(
            key, lambda: self._decide(principal, action, resource, context)
        )

    async def _decide(
        self,
        principal: Principal,
        action: str,
        resource: Resource,
        context: Mapping[str, str],
    ) -> AuthorizationResult:
        decision, record = await self._recorder.authorize(
            principal, action, resource, context, caller="service:policy"
        )
        return AuthorizationResult(
            allowed=decision.allowed,
            decision_id=record.decision_id,
            policy_ids=tuple(decision.policy_ids),
            reasons=tuple(decision.reasons),
            cache_ttl=self._cache_ttl,
        )


def _describe(span: trace.Span, record: AuditRecord) -> None:
    """What an append span says about its entry (nothing of its input)."""
    if span.is_recording():
        span.set_attributes(
            {
                "conveyor.decision": record.name,
                "conveyor.audit.sequence": record.sequence,
                "conveyor.audit.kind": record.kind,
                "conveyor.audit.action": record.action,
                "conveyor.audit.result": record.result,
            }
        )
