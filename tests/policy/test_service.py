"""The policy service's decision, promotion, approval and policy-set methods
through real servers (registry and policy, authentication on) and real stubs:
the good paths, every bad input the contract names, and failing closed when the
audit log cannot be written or policy cannot be reached. The audit-log methods
are in ``test_service_audit.py``."""

from __future__ import annotations

import asyncio
import re
import uuid
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path

import grpc
import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from conveyor.policy.v1 import policy_messages_pb2 as policy_rpc
from conveyor.policy.v1 import resources_pb2 as policy_pb
from conveyor.registry.v1 import registry_messages_pb2 as rpc
from conveyor.registry.v1 import resources_pb2 as pb
from conveyor.services.policy.decisions import AUDIT_APPEND_SPAN
from conveyor.shared.auth.principal import Principal
from conveyor.shared.errors import PermissionDeniedError
from tests.support.canary import CANARY
from tests.support.policy import (
    REGISTRY,
    TRAINER,
    assert_serving,
    authorize_request,
    invalid,
    policy_db,
    registry_db,
    service_stub,
    sqlite,
    team_a_model,
)
from tests.support.registry import create_version, expect_error, refused
from tests.support.suite import ALICE, BOB, CAROL, ERIN, MALLORY, SAM, Suite, running_suite

HEX64 = re.compile(r"^[0-9a-f]{64}$")


@pytest.fixture
async def suite(tmp_path: Path) -> AsyncIterator[Suite]:
    async with running_suite(tmp_path) as running:
        yield running


# Authorize ---------------------------------------------------------------------------


async def test_authorize_decides_for_a_service_and_records_each_decision(suite: Suite) -> None:
    tracer = trace.get_tracer(__name__)
    async with service_stub(suite, TRAINER) as trainer:
        with tracer.start_as_current_span("trainer-call") as span:
            allowed = await trainer.Authorize(
                authorize_request(
                    ALICE, alias="staging", token=CANARY, password=CANARY, authn_method="jwt"
                )
            )
        trace_id = format(span.get_span_context().trace_id, "032x")
        denied = await trainer.Authorize(authorize_request(MALLORY))

    assert allowed.outcome == policy_pb.OUTCOME_ALLOW
    assert list(allowed.policy_ids) == ["modelling-roles-alias-non-production"]
    assert uuid.UUID(allowed.decision_id).version == 4
    assert HEX64.match(allowed.policy_set_digest)
    assert allowed.cache_ttl.ToTimedelta() == timedelta(seconds=5)
    assert allowed.reasons
    assert denied.outcome == policy_pb.OUTCOME_DENY
    assert "forbid-cross-team-alias" in denied.policy_ids
    assert denied.reasons
    assert denied.decision_id != allowed.decision_id
    assert denied.policy_set_digest == allowed.policy_set_digest

    listed = await suite.policy(SAM).ListDecisions(
        policy_rpc.ListDecisionsRequest(filter='action = "registry.SetAlias"')
    )
    assert CANARY not in str(listed)
    by_id = {d.name: d for d in listed.decisions}
    assert set(by_id) == {f"decisions/{allowed.decision_id}", f"decisions/{denied.decision_id}"}
    recorded = by_id[f"decisions/{allowed.decision_id}"]
    assert recorded.caller == "service:trainer"
    assert recorded.kind == policy_pb.DECISION_KIND_AUTHORIZATION
    assert recorded.principal.id == "alice"
    assert recorded.principal.kind == policy_pb.PRINCIPAL_KIND_USER
    assert recorded.resource.name == "models/fraud"
    assert recorded.resource.owner_team == "team-a"
    assert recorded.outcome == policy_pb.OUTCOME_ALLOW
    assert list(recorded.policy_ids) == list(allowed.policy_ids)
    assert recorded.policy_set_digest == allowed.policy_set_digest
    context = dict(recorded.context.fields)
    assert context["token"].string_value == "***"
    assert context["password"].string_value == "***"
    assert context["alias"].string_value == "staging"
    assert recorded.trace_id == trace_id
    assert re.fullmatch(r"[0-9a-f]{16}", recorded.span_id)
    untraced = by_id[f"decisions/{denied.decision_id}"]
    assert untraced.outcome == policy_pb.OUTCOME_DENY
    assert untraced.trace_id != trace_id

    fetched = await suite.policy(SAM).GetDecision(policy_rpc.GetDecisionRequest(name=recorded.name))
    assert fetched.decision == recorded


async def test_only_service_identities_may_ask_for_decisions(suite: Suite) -> None:
    for person in (ERIN, SAM, BOB):
        error = await refused(
            suite.policy(person).Authorize(authorize_request()), grpc.StatusCode.PERMISSION_DENIED
        )
        assert isinstance(error, PermissionDeniedError)
        assert error.reason == "POLICY_DENIED"
    # A service token for another audience is not accepted by policy at all.
    async with service_stub(suite, TRAINER, ("registry",)) as elsewhere:
        await expect_error(
            elsewhere.Authorize(authorize_request()), grpc.StatusCode.UNAUTHENTICATED
        )


async def test_authorize_refuses_malformed_questions(suite: Suite) -> None:
    async with service_stub(suite, TRAINER) as trainer:
        no_kind = authorize_request()
        no_kind.principal.kind = policy_pb.PRINCIPAL_KIND_UNSPECIFIED
        await invalid(trainer.Authorize(no_kind), "principal.kind")
        no_id = authorize_request()
        no_id.principal.id = ""
        await invalid(trainer.Authorize(no_id), "principal.id")
        long_id = authorize_request()
        long_id.principal.id = "a" * 257
        await invalid(trainer.Authorize(long_id), "principal.id")
        nobody = authorize_request()
        nobody.ClearField("principal")
        await invalid(trainer.Authorize(nobody), "principal.id", "principal.kind")
        for action in ("", "SetAlias", "registry.setAlias", "registry/SetAlias"):
            await invalid(trainer.Authorize(authorize_request(action=action)), "action")
        for kind in ("", "Model", "registry/Model", "registry.example.com/Model"):
            await invalid(trainer.Authorize(authorize_request(resource_type=kind)), "resource.type")
    await assert_serving(suite.policy_target)


# EvaluatePromotion ----------------------------------------------------------------


def evaluate(
    model_version: str, alias: str = "production", requester: Principal | None = None
) -> policy_rpc.EvaluatePromotionRequest:
    request = policy_rpc.EvaluatePromotionRequest(model_version=model_version, alias=alias)
    if requester is not None:
        request.requester.CopyFrom(requester.to_proto())
    return request


async def test_evaluate_promotion_refuses_bad_names_and_unknown_versions(suite: Suite) -> None:
    version = await team_a_model(suite)
    # An approver may evaluate any version, so every answer comes from the method.
    approver = suite.policy(BOB)
    for name in ("fraud", "models/fraud", "models/fraud/versions/0", "models/Fraud/versions/1"):
        await invalid(approver.EvaluatePromotion(evaluate(name)), "model_version")
    await invalid(approver.EvaluatePromotion(evaluate("models/fraud@production")), "model_version")
    for alias in ("", "Production", "prod uction", "-production"):
        await invalid(approver.EvaluatePromotion(evaluate(version.name, alias)), "alias")
    await expect_error(
        approver.EvaluatePromotion(evaluate("models/fraud/versions/9")), grpc.StatusCode.NOT_FOUND
    )
    await expect_error(
        approver.EvaluatePromotion(evaluate("models/nope/versions/1")), grpc.StatusCode.NOT_FOUND
    )
    # The model's own team learns of a missing version too.
    await expect_error(
        suite.policy(ERIN).EvaluatePromotion(evaluate("models/fraud/versions/9")),
        grpc.StatusCode.NOT_FOUND,
    )
    await assert_serving(suite.policy_target)


async def test_only_services_evaluate_promotions_for_someone_else(suite: Suite) -> None:
    version = await team_a_model(suite)
    error = await refused(
        suite.policy(ERIN).EvaluatePromotion(evaluate(version.name, requester=BOB)),
        grpc.StatusCode.PERMISSION_DENIED,
    )
    assert error.reason == "REQUESTER_NOT_ALLOWED"
    # Naming oneself with other roles and team changes nothing: the token's hold.
    disguised = Principal("user", "erin", ("security_auditor", "approver"), "team-z")
    itself = await suite.policy(ERIN).EvaluatePromotion(evaluate(version.name, requester=disguised))
    assert not itself.allowed
    recorded = (
        await suite.policy(SAM).GetDecision(
            policy_rpc.GetDecisionRequest(name=f"decisions/{itself.decision_id}")
        )
    ).decision
    assert list(recorded.principal.roles) == ["ml_engineer"]
    assert recorded.principal.team == "team-a"

    async with service_stub(suite, REGISTRY) as registry:
        on_behalf = await registry.EvaluatePromotion(evaluate(version.name, requester=ERIN))
        malformed = evaluate(version.name, requester=ERIN)
        malformed.requester.kind = policy_pb.PRINCIPAL_KIND_UNSPECIFIED
        await invalid(registry.EvaluatePromotion(malformed), "requester.kind")
    decision = (
        await suite.policy(SAM).GetDecision(
            policy_rpc.GetDecisionRequest(name=f"decisions/{on_behalf.decision_id}")
        )
    ).decision
    assert decision.principal.id == "erin"
    assert decision.caller == "service:registry"
    assert decision.kind == policy_pb.DECISION_KIND_PROMOTION
    assert decision.action == "registry.SetAlias"
    assert decision.resource.name == version.name


async def test_a_non_production_alias_of_a_medium_risk_model_needs_no_gate(suite: Suite) -> None:
    version = await team_a_model(suite)
    answer = await suite.policy(ERIN).EvaluatePromotion(evaluate(version.name, "staging"))
    assert answer.allowed
    assert answer.risk_tier == pb.RISK_TIER_MEDIUM
    assert list(answer.compliance_tags) == ["gdpr"]
    assert {g.gate for g in answer.gates} == {
        "metric:accuracy",
        "artifact-signature",
        "explanation-report",
        "approval",
        "compliance:gdpr",
    }
    assert all(g.outcome == policy_pb.GATE_OUTCOME_NOT_REQUIRED for g in answer.gates)
    assert HEX64.match(answer.policy_set_digest)
    decision = (
        await suite.policy(SAM).GetDecision(
            policy_rpc.GetDecisionRequest(name=f"decisions/{answer.decision_id}")
        )
    ).decision
    assert decision.outcome == policy_pb.OUTCOME_ALLOW
    assert decision.caller == "user:erin"
    assert len(decision.gates) == len(answer.gates)


async def test_each_decision_is_appended_in_a_span_of_the_calls_trace(
    suite: Suite, spans: InMemorySpanExporter
) -> None:
    version = await team_a_model(suite)
    spans.clear()
    answer = await suite.policy(ERIN).EvaluatePromotion(evaluate(version.name))
    finished = spans.get_finished_spans()
    [call] = [
        span
        for span in finished
        if span.name == "/conveyor.policy.v1.PolicyService/EvaluatePromotion"
        and span.kind == trace.SpanKind.SERVER
    ]
    appends = {
        (span.attributes or {}).get("conveyor.audit.kind"): span
        for span in finished
        if span.name == AUDIT_APPEND_SPAN
        and span.parent is not None
        and span.parent.span_id == call.context.span_id
    }
    # Erin's call itself (the service's own authorizer), then its promotion decision.
    assert set(appends) == {"authorization", "promotion"}
    assert dict(appends["authorization"].attributes or {})["conveyor.audit.action"] == (
        "policy.EvaluatePromotion"
    )
    decision = (
        await suite.policy(SAM).GetDecision(
            policy_rpc.GetDecisionRequest(name=f"decisions/{answer.decision_id}")
        )
    ).decision
    promotion = dict(appends["promotion"].attributes or {})
    assert promotion == {
        "conveyor.decision": decision.name,
        "conveyor.audit.sequence": decision.sequence,
        "conveyor.audit.kind": "promotion",
        "conveyor.audit.action": "registry.SetAlias",
        "conveyor.audit.result": "deny",
    }
    # The entry names the call's span: the append span's parent.
    assert decision.trace_id == format(call.context.trace_id, "032x")
    assert decision.span_id == format(call.context.span_id, "016x")


async def test_a_high_risk_models_tampered_signature_fails_for_any_alias(suite: Suite) -> None:
    version = await team_a_model(suite, "credit", pb.RISK_TIER_HIGH)
    signed = await suite.policy(ERIN).EvaluatePromotion(evaluate(version.name, "staging"))
    gate = next(g for g in signed.gates if g.gate == "artifact-signature")
    assert gate.outcome == policy_pb.GATE_OUTCOME_PASSED
    assert gate.policy_id == "high-risk-signed-everywhere"
    assert signed.allowed

    with sqlite(registry_db(suite)) as db:
        (signature,) = db.execute(
            "SELECT signature FROM model_versions WHERE version = 1 AND model_pk = "
            "(SELECT id FROM models WHERE model_id = 'credit')"
        ).fetchone()
        forged = bytes([signature[0] ^ 0xFF]) + bytes(signature[1:])
        db.execute("UPDATE model_versions SET signature = ?", (forged,))

    for alias in ("staging", "canary", "production"):
        answer = await suite.policy(ERIN).EvaluatePromotion(evaluate(version.name, alias))
        assert not answer.allowed, alias
        gate = next(g for g in answer.gates if g.gate == "artifact-signature")
        assert gate.outcome == policy_pb.GATE_OUTCOME_FAILED
        assert gate.kind == policy_pb.GATE_KIND_ARTIFACT_SIGNATURE
        assert gate.message == (
            f"the signature of artifact {version.artifact.sha256} does not verify "
            "with key 'artifact-signing'"
        )
        assert answer.gates[0].outcome == policy_pb.GATE_OUTCOME_FAILED  # failed gates first
    assert answer.risk_tier == pb.RISK_TIER_HIGH


# Approvals -------------------------------------------------------------------------


def approval_request(
    parent: str, alias: str = "production", comment: str = "ok", request_id: str = ""
) -> policy_rpc.CreateApprovalRequest:
    return policy_rpc.CreateApprovalRequest(
        parent=parent,
        approval=policy_pb.Approval(alias=alias, comment=comment),
        request_id=request_id,
    )


async def test_create_and_get_approvals(suite: Suite) -> None:
    version = await team_a_model(suite)
    bob = suite.policy(BOB)
    for parent in ("fraud/versions/1", "models/fraud/versions/-", "models/fraud/versions/0", ""):
        await invalid(bob.CreateApproval(approval_request(parent)), "parent")
    await invalid(bob.CreateApproval(approval_request(version.name, alias="")), "approval.alias")
    await invalid(
        bob.CreateApproval(approval_request(version.name, comment="x" * 4097)), "approval.comment"
    )
    await invalid(
        bob.CreateApproval(approval_request(version.name, request_id="not-a-uuid")), "request_id"
    )
    await expect_error(
        bob.CreateApproval(approval_request("models/fraud/versions/7")), grpc.StatusCode.NOT_FOUND
    )

    request_id = str(uuid.uuid4())
    first = (
        await bob.CreateApproval(
            approval_request(version.name, comment="x" * 4096, request_id=request_id)
        )
    ).approval
    retried = await bob.CreateApproval(approval_request(version.name, request_id=request_id))
    assert retried.approval == first
    assert first.name.startswith(f"{version.name}/approvals/")
    assert first.approver.id == "bob"
    assert first.approver.kind == policy_pb.PRINCIPAL_KIND_USER
    assert first.state == policy_pb.APPROVAL_STATE_ACTIVE
    assert first.decision.startswith("decisions/")
    assert not first.HasField("revoke_time")
    await expect_error(
        bob.CreateApproval(approval_request(version.name)), grpc.StatusCode.ALREADY_EXISTS
    )
    # Someone else's request id is not a way to read their approval.
    await invalid(
        suite.policy(CAROL).CreateApproval(approval_request(version.name, request_id=request_id)),
        "request_id",
    )

    got = await suite.policy(SAM).GetApproval(policy_rpc.GetApprovalRequest(name=first.name))
    assert got.approval == first
    missing = f"{version.name}/approvals/{uuid.uuid4()}"
    await expect_error(
        bob.GetApproval(policy_rpc.GetApprovalRequest(name=missing)), grpc.StatusCode.NOT_FOUND
    )
    for name in (f"{version.name}/approvals/xyz", "approvals/1", first.name + "/x"):
        await invalid(bob.GetApproval(policy_rpc.GetApprovalRequest(name=name)), "name")

    # An archived version cannot be approved.
    await suite.registry(ALICE).ArchiveModelVersion(
        rpc.ArchiveModelVersionRequest(name=version.name)
    )
    await expect_error(
        suite.policy(CAROL).CreateApproval(approval_request(version.name)),
        grpc.StatusCode.FAILED_PRECONDITION,
    )
    await assert_serving(suite.policy_target)


async def test_a_model_name_is_not_an_approval_parent(suite: Suite) -> None:
    await team_a_model(suite)
    await invalid(suite.policy(BOB).CreateApproval(approval_request("models/fraud")), "parent")
    await invalid(
        suite.policy(BOB).ListApprovals(policy_rpc.ListApprovalsRequest(parent="models/fraud")),
        "parent",
    )


async def test_list_approvals_across_versions_and_models(suite: Suite) -> None:
    first = await team_a_model(suite)
    second = await create_version(suite.registry(ALICE), "fraud", b"v2")
    other = await team_a_model(suite, "churn")
    bob, carol = suite.policy(BOB), suite.policy(CAROL)
    made = [
        (await bob.CreateApproval(approval_request(first.name))).approval,
        (await bob.CreateApproval(approval_request(first.name, "staging"))).approval,
        (await carol.CreateApproval(approval_request(first.name))).approval,
        (await bob.CreateApproval(approval_request(second.name))).approval,
        (await carol.CreateApproval(approval_request(other.name))).approval,
    ]
    revoked = (
        await bob.RevokeApproval(policy_rpc.RevokeApprovalRequest(name=made[1].name))
    ).approval

    async def names(parent: str, filter: str = "") -> list[str]:
        reply = await suite.policy(SAM).ListApprovals(
            policy_rpc.ListApprovalsRequest(parent=parent, filter=filter)
        )
        assert not reply.next_page_token
        return [a.name for a in reply.approvals]

    everything = [a.name for a in made]
    assert await names("models/-/versions/-") == everything
    assert await names("models/fraud/versions/-") == everything[:4]
    assert await names(first.name) == everything[:3]
    assert await names(second.name) == [made[3].name]
    assert await names("models/churn/versions/-") == [made[4].name]
    assert await names("models/-/versions/-", 'alias = "staging"') == [revoked.name]
    assert await names("models/-/versions/-", "state = APPROVAL_STATE_REVOKED") == [revoked.name]
    assert await names(
        "models/fraud/versions/-", 'approver.id = "carol" AND state = APPROVAL_STATE_ACTIVE'
    ) == [made[2].name]
    assert await names("models/-/versions/-", 'approver.id != "bob"') == [
        made[2].name,
        made[4].name,
    ]

    # Paging: two at a time, the token tied to its query.
    paged: list[str] = []
    token = ""
    while True:
        reply = await bob.ListApprovals(
            policy_rpc.ListApprovalsRequest(
                parent="models/-/versions/-", page_size=2, page_token=token
            )
        )
        assert len(reply.approvals) <= 2
        paged.extend(a.name for a in reply.approvals)
        token = reply.next_page_token
        if not token:
            break
        with_other_filter = policy_rpc.ListApprovalsRequest(
            parent="models/-/versions/-", page_size=2, page_token=token, filter='alias = "x"'
        )
        await invalid(bob.ListApprovals(with_other_filter), "page_token")
    assert paged == everything

    for parent in ("models/-/versions/1", "fraud", "models/fraud/versions/x", ""):
        await invalid(bob.ListApprovals(policy_rpc.ListApprovalsRequest(parent=parent)), "parent")
    for bad_filter in ("approver = bob", 'alias = "a" OR alias = "b"', "state = DONE", "alias"):
        await invalid(
            bob.ListApprovals(
                policy_rpc.ListApprovalsRequest(parent="models/-/versions/-", filter=bad_filter)
            ),
            "filter",
        )
    await invalid(
        bob.ListApprovals(
            policy_rpc.ListApprovalsRequest(parent="models/-/versions/-", page_size=-1)
        ),
        "page_size",
    )
    await invalid(
        bob.ListApprovals(
            policy_rpc.ListApprovalsRequest(parent="models/-/versions/-", page_token="garbage")
        ),
        "page_token",
    )
    for unknown in ("models/nope/versions/-", "models/nope/versions/1", "models/fraud/versions/9"):
        await expect_error(
            bob.ListApprovals(policy_rpc.ListApprovalsRequest(parent=unknown)),
            grpc.StatusCode.NOT_FOUND,
        )
    await assert_serving(suite.policy_target)


async def test_revoke_approval(suite: Suite) -> None:
    version = await team_a_model(suite)
    by_bob = (await suite.policy(BOB).CreateApproval(approval_request(version.name))).approval
    by_carol = (await suite.policy(CAROL).CreateApproval(approval_request(version.name))).approval

    error = await refused(
        suite.policy(CAROL).RevokeApproval(policy_rpc.RevokeApprovalRequest(name=by_bob.name)),
        grpc.StatusCode.PERMISSION_DENIED,
    )
    assert error.reason == "NOT_THE_APPROVER"
    # A data scientist is not even allowed the call.
    await expect_error(
        suite.policy(ALICE).RevokeApproval(policy_rpc.RevokeApprovalRequest(name=by_bob.name)),
        grpc.StatusCode.PERMISSION_DENIED,
    )
    await invalid(
        suite.policy(SAM).RevokeApproval(
            policy_rpc.RevokeApprovalRequest(name=by_bob.name, reason="r" * 4097)
        ),
        "reason",
    )
    await invalid(
        suite.policy(SAM).RevokeApproval(policy_rpc.RevokeApprovalRequest(name="approvals/x")),
        "name",
    )
    await expect_error(
        suite.policy(SAM).RevokeApproval(
            policy_rpc.RevokeApprovalRequest(name=f"{version.name}/approvals/{uuid.uuid4()}")
        ),
        grpc.StatusCode.NOT_FOUND,
    )

    revoked = (
        await suite.policy(SAM).RevokeApproval(
            policy_rpc.RevokeApprovalRequest(name=by_bob.name, reason="conflict of interest")
        )
    ).approval
    assert revoked.state == policy_pb.APPROVAL_STATE_REVOKED
    assert revoked.revoker.id == "sam"
    assert revoked.revoke_reason == "conflict of interest"
    assert revoked.HasField("revoke_time")
    assert revoked.create_time == by_bob.create_time
    again = await refused(
        suite.policy(SAM).RevokeApproval(policy_rpc.RevokeApprovalRequest(name=by_bob.name)),
        grpc.StatusCode.FAILED_PRECONDITION,
    )
    assert again.reason == "APPROVAL_REVOKED"
    own = (
        await suite.policy(CAROL).RevokeApproval(
            policy_rpc.RevokeApprovalRequest(name=by_carol.name)
        )
    ).approval
    assert own.revoker.id == "carol"
    # Revoked approvals no longer count; a fresh approval may be made.
    renewed = (await suite.policy(BOB).CreateApproval(approval_request(version.name))).approval
    assert renewed.name != by_bob.name
    await assert_serving(suite.policy_target)


# GetPolicySet ---------------------------------------------------------------------------


async def test_get_policy_set_current_and_by_digest(suite: Suite) -> None:
    async with service_stub(suite, TRAINER) as trainer:
        decided = await trainer.Authorize(authorize_request())
    auditor = suite.policy(SAM)
    current = (
        await auditor.GetPolicySet(policy_rpc.GetPolicySetRequest(name="policySets/current"))
    ).policy_set
    assert current.digest == decided.policy_set_digest
    assert current.name == f"policySets/{current.digest}"
    assert current.engine == "cedar"
    assert current.active
    paths = [f.path for f in current.files]
    assert paths == sorted(paths)
    assert {"promotion.cedar", "people.cedar", "services.cedar"} <= set(paths)
    promotion = next(f for f in current.files if f.path == "promotion.cedar")
    assert '@id("high-risk-signed-everywhere")' in promotion.content
    assert HEX64.match(promotion.sha256)
    assert {"high-risk-signed-everywhere", "services-authorize"} <= set(current.policy_ids)

    by_digest = (
        await auditor.GetPolicySet(policy_rpc.GetPolicySetRequest(name=current.name))
    ).policy_set
    assert by_digest == current
    upper = await auditor.GetPolicySet(
        policy_rpc.GetPolicySetRequest(name=f"policySets/{current.digest.upper()}")
    )
    assert upper.policy_set.digest == current.digest

    await expect_error(
        auditor.GetPolicySet(policy_rpc.GetPolicySetRequest(name=f"policySets/{'0' * 64}")),
        grpc.StatusCode.NOT_FOUND,
    )
    for name in ("policySets/abc", "policySets/", "current", "policySet/current", ""):
        await invalid(auditor.GetPolicySet(policy_rpc.GetPolicySetRequest(name=name)), "name")
    await assert_serving(suite.policy_target)


# Failing closed ----------------------------------------------------------------------------


async def test_an_unwritable_audit_log_refuses_every_decision(tmp_path: Path) -> None:
    async with running_suite(tmp_path, decision_cache_ttl=timedelta(0)) as suite:
        await team_a_model(suite)
        await suite.registry(ALICE).GetModel(rpc.GetModelRequest(name="models/fraud"))

        with sqlite(policy_db(suite)) as db:
            db.execute("ALTER TABLE audit_entries RENAME TO audit_entries_gone")
        async with service_stub(suite, TRAINER) as trainer:
            error = await refused(
                trainer.Authorize(authorize_request()), grpc.StatusCode.UNAVAILABLE
            )
        assert error.reason == "AUDIT_LOG_UNAVAILABLE"
        # The registry must ask for a fresh decision (nothing is cached) and refuses.
        await expect_error(
            suite.registry(ALICE).GetModel(rpc.GetModelRequest(name="models/fraud")),
            grpc.StatusCode.UNAVAILABLE,
        )
        await expect_error(
            suite.policy(SAM).GetPolicySet(
                policy_rpc.GetPolicySetRequest(name="policySets/current")
            ),
            grpc.StatusCode.UNAVAILABLE,
        )
        await assert_serving(suite.policy_target)
        await assert_serving(suite.registry_target)

        with sqlite(policy_db(suite)) as db:
            db.execute("ALTER TABLE audit_entries_gone RENAME TO audit_entries")
        current = await suite.policy(SAM).GetPolicySet(
            policy_rpc.GetPolicySetRequest(name="policySets/current")
        )
        assert current.policy_set.active
        model = await suite.registry(ALICE).GetModel(rpc.GetModelRequest(name="models/fraud"))
        assert model.model.owner_team == "team-a"
        verified = await suite.policy(SAM).VerifyAuditLog(policy_rpc.VerifyAuditLogRequest())
        assert verified.verified, verified.first_break


async def test_calls_are_refused_while_policy_is_down(suite: Suite) -> None:
    await team_a_model(suite)
    await suite.policy_server.shutdown()
    error = await refused(
        suite.registry(ALICE).ListModels(rpc.ListModelsRequest()), grpc.StatusCode.UNAVAILABLE
    )
    assert error.reason == "POLICY_UNAVAILABLE"
    await expect_error(
        suite.registry(MALLORY).GetModel(rpc.GetModelRequest(name="models/fraud")),
        grpc.StatusCode.UNAVAILABLE,
    )
    await assert_serving(suite.registry_target)


async def test_concurrent_decisions_get_consecutive_sequence_numbers(suite: Suite) -> None:
    async with service_stub(suite, TRAINER) as trainer:
        answers = await asyncio.gather(
            *(
                trainer.Authorize(authorize_request(Principal("user", f"u{i}", (), "team-a")))
                for i in range(20)
            )
        )
    assert len({a.decision_id for a in answers}) == 20
    verified = await suite.policy(SAM).VerifyAuditLog(policy_rpc.VerifyAuditLogRequest())
    assert verified.verified
    assert verified.checked_count == verified.head_sequence >= 20
