"""Promotion to production through the real registry and policy service: refused
with every failed gate named, then allowed once each is fixed, every decision in
the audit log; four eyes, two approvers for high risk, team ownership."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from conveyor.policy.v1 import policy_messages_pb2 as policy_rpc
from conveyor.policy.v1 import resources_pb2 as policy_pb
from conveyor.registry.v1 import registry_messages_pb2 as rpc
from conveyor.registry.v1 import resources_pb2 as pb
from conveyor.shared.auth.principal import Principal
from conveyor.shared.errors import FailedPreconditionError
from tests.support.policy import governed_model
from tests.support.registry import create_version, expect_error, refused
from tests.support.suite import ALICE, BOB, CAROL, ERIN, MALLORY, SAM, Suite, running_suite

DAVE = Principal("user", "dave", ("ml_engineer", "approver"), "team-a")
"""An ML engineer who is also an approver: may not approve what he registered."""
RETENTION_CARD = "# Fraud model\n\n## Data retention\nInputs are kept 30 days.\n"


@pytest.fixture
async def suite(tmp_path: Path) -> AsyncIterator[Suite]:
    async with running_suite(tmp_path) as running:
        yield running


async def attach_explanation(suite: Suite, version: str) -> None:
    await suite.registry(ALICE).CreateAttachment(
        rpc.CreateAttachmentRequest(
            parent=version,
            attachment_id="lime",
            attachment=pb.Attachment(
                kind=pb.ATTACHMENT_KIND_EXPLANATION_REPORT,
                display_name="LIME",
                content_type="application/json",
                content=b'{"contributions": {}}',
            ),
        )
    )


async def approve(suite: Suite, approver: Principal, version: str) -> policy_pb.Approval:
    reply = await suite.policy(approver).CreateApproval(
        policy_rpc.CreateApprovalRequest(
            parent=version, approval=policy_pb.Approval(alias="production", comment="looks good")
        )
    )
    return reply.approval


def promote(suite: Suite, who: Principal, model: str, version: str) -> object:
    return suite.registry(who).SetAlias(
        rpc.SetAliasRequest(
            name=f"models/{model}/aliases/production", version=version, reason="promote"
        )
    )


async def promotion_decisions(suite: Suite) -> list[policy_pb.Decision]:
    reply = await suite.policy(SAM).ListDecisions(
        policy_rpc.ListDecisionsRequest(filter="kind = DECISION_KIND_PROMOTION")
    )
    return list(reply.decisions)


async def test_promotion_is_refused_naming_every_failed_gate_then_allowed(suite: Suite) -> None:
    await governed_model(suite)
    weak = await create_version(suite.registry(ALICE), "fraud", b"weak", metrics={"accuracy": 0.85})

    refusal = await refused(
        promote(suite, ERIN, "fraud", weak.name), grpc.StatusCode.FAILED_PRECONDITION
    )
    assert isinstance(refusal, FailedPreconditionError)
    assert refusal.reason == "PROMOTION_REFUSED"
    failed = {v.subject: v.description for v in refusal.violations}
    assert set(failed) == {"metric:accuracy", "explanation-report", "approval", "compliance:gdpr"}
    assert "0.85 does not meet the threshold >= 0.9" in failed["metric:accuracy"]
    assert "needs 1 approver(s)" in failed["approval"]
    assert all(v.type == "PROMOTION_GATE" for v in refusal.violations)
    model = (await suite.registry(ERIN).GetModel(rpc.GetModelRequest(name="models/fraud"))).model
    assert "production" not in model.aliases

    # Fix every gate on a new version: metrics, model card, explanation, approval.
    good = await create_version(
        suite.registry(ALICE),
        "fraud",
        b"good",
        metrics={"accuracy": 0.95},
        model_card=RETENTION_CARD,
    )
    await attach_explanation(suite, good.name)
    approval = await approve(suite, BOB, good.name)
    assert approval.state == policy_pb.APPROVAL_STATE_ACTIVE
    assert approval.approver.id == "bob"
    assert approval.decision.startswith("decisions/")

    evaluation = await suite.policy(ERIN).EvaluatePromotion(
        policy_rpc.EvaluatePromotionRequest(model_version=good.name, alias="production")
    )
    assert evaluation.allowed
    outcomes = {g.gate: g.outcome for g in evaluation.gates}
    assert outcomes == {
        "metric:accuracy": policy_pb.GATE_OUTCOME_PASSED,
        "artifact-signature": policy_pb.GATE_OUTCOME_PASSED,
        "explanation-report": policy_pb.GATE_OUTCOME_PASSED,
        "approval": policy_pb.GATE_OUTCOME_PASSED,
        "compliance:gdpr": policy_pb.GATE_OUTCOME_PASSED,
    }
    assert evaluation.risk_tier == pb.RISK_TIER_MEDIUM
    assert list(evaluation.compliance_tags) == ["gdpr"]

    moved = await promote(suite, ERIN, "fraud", good.name)
    assert moved.alias.version == good.name  # type: ignore[attr-defined]

    decisions = await promotion_decisions(suite)
    outcomes_in_log = [(d.resource.name, d.outcome) for d in decisions]
    assert outcomes_in_log == [
        (weak.name, policy_pb.OUTCOME_DENY),
        (good.name, policy_pb.OUTCOME_ALLOW),  # asked by erin through EvaluatePromotion
        (good.name, policy_pb.OUTCOME_ALLOW),  # asked by the registry for SetAlias
    ]
    denied = decisions[0]
    assert denied.principal.id == "erin"
    assert denied.caller == "service:registry"
    assert denied.action == "registry.SetAlias"
    assert {g.gate for g in denied.gates if g.outcome == policy_pb.GATE_OUTCOME_FAILED} == set(
        failed
    )
    assert "production-baseline-gates" in denied.policy_ids
    verified = await suite.policy(SAM).VerifyAuditLog(policy_rpc.VerifyAuditLogRequest())
    assert verified.verified
    assert verified.checked_count >= 3


async def test_the_creator_of_a_version_may_not_approve_it(suite: Suite) -> None:
    await governed_model(suite)
    version = await create_version(suite.registry(DAVE), "fraud", b"v", metrics={"accuracy": 0.95})
    error = await refused(approve(suite, DAVE, version.name), grpc.StatusCode.PERMISSION_DENIED)
    assert error.reason == "FOUR_EYES"

    # A data scientist holds no approver role: the policies refuse the call itself.
    await expect_error(approve(suite, ALICE, version.name), grpc.StatusCode.PERMISSION_DENIED)


async def test_approvals_by_creators_do_not_count(suite: Suite) -> None:
    """Even an approval recorded for someone listed as an author does not count."""
    await governed_model(suite)
    version = await create_version(
        suite.registry(ERIN),
        "fraud",
        b"v",
        metrics={"accuracy": 0.95},
        authors=["user:bob"],
        model_card=RETENTION_CARD,
    )
    await expect_error(approve(suite, BOB, version.name), grpc.StatusCode.PERMISSION_DENIED)
    await approve(suite, CAROL, version.name)
    evaluation = await suite.policy(ERIN).EvaluatePromotion(
        policy_rpc.EvaluatePromotionRequest(model_version=version.name, alias="production")
    )
    gate = next(g for g in evaluation.gates if g.gate == "approval")
    assert gate.outcome == policy_pb.GATE_OUTCOME_PASSED
    assert list(gate.approval.approvers) == ["user:carol"]


async def test_high_risk_needs_two_distinct_approvers(suite: Suite) -> None:
    await governed_model(suite, "credit", pb.RISK_TIER_HIGH)
    version = await create_version(
        suite.registry(ALICE),
        "credit",
        b"credit",
        metrics={"accuracy": 0.95},
        model_card=RETENTION_CARD,
    )
    await attach_explanation(suite, version.name)
    await approve(suite, BOB, version.name)
    await expect_error(approve(suite, BOB, version.name), grpc.StatusCode.ALREADY_EXISTS)

    refusal = await refused(
        promote(suite, ERIN, "credit", version.name), grpc.StatusCode.FAILED_PRECONDITION
    )
    assert [v.subject for v in refusal.violations] == ["approval"]  # type: ignore[attr-defined]
    assert "needs 2 approver(s)" in refusal.message

    await approve(suite, CAROL, version.name)
    evaluation = await suite.policy(ERIN).EvaluatePromotion(
        policy_rpc.EvaluatePromotionRequest(model_version=version.name, alias="production")
    )
    gate = next(g for g in evaluation.gates if g.gate == "approval")
    assert gate.approval.required_approvers == 2
    assert sorted(gate.approval.approvers) == ["user:bob", "user:carol"]
    assert gate.policy_id == "high-risk-two-approvers"
    await promote(suite, ERIN, "credit", version.name)


async def test_revoked_approvals_stop_counting(suite: Suite) -> None:
    await governed_model(suite)
    version = await create_version(
        suite.registry(ALICE), "fraud", b"v", metrics={"accuracy": 0.95}, model_card=RETENTION_CARD
    )
    await attach_explanation(suite, version.name)
    approval = await approve(suite, BOB, version.name)
    revoked = await suite.policy(BOB).RevokeApproval(
        policy_rpc.RevokeApprovalRequest(name=approval.name, reason="found a leak")
    )
    assert revoked.approval.state == policy_pb.APPROVAL_STATE_REVOKED
    assert revoked.approval.revoker.id == "bob"
    refusal = await refused(
        promote(suite, ERIN, "fraud", version.name), grpc.StatusCode.FAILED_PRECONDITION
    )
    assert [v.subject for v in refusal.violations] == ["approval"]  # type: ignore[attr-defined]


async def test_a_data_scientist_cannot_alias_another_teams_model(suite: Suite) -> None:
    await governed_model(suite)
    version = await create_version(suite.registry(ALICE), "fraud", b"v")
    staging = rpc.SetAliasRequest(
        name="models/fraud/aliases/staging", version=version.name, reason="try"
    )
    error = await refused(
        suite.registry(MALLORY).SetAlias(staging), grpc.StatusCode.PERMISSION_DENIED
    )
    assert error.reason == "POLICY_DENIED"
    assert "forbid-cross-team-alias" in error.message
    # Team A's own data scientist may move a non-production alias.
    moved = await suite.registry(ALICE).SetAlias(staging)
    assert moved.alias.version == version.name
    # ...but not production, which only ML engineers of the team may move.
    await expect_error(
        promote(suite, ALICE, "fraud", version.name), grpc.StatusCode.PERMISSION_DENIED
    )
    denied = await suite.policy(SAM).ListDecisions(
        policy_rpc.ListDecisionsRequest(
            filter='principal.id = "mallory" AND outcome = OUTCOME_DENY'
        )
    )
    assert [d.action for d in denied.decisions] == ["registry.SetAlias"]
    assert denied.decisions[0].resource.owner_team == "team-a"
