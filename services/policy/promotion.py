"""Promotion gates: which checks a version must pass before an alias may point
at it, and whether it passes them.

The Cedar policies decide which gates apply (``policies/promotion.cedar``): for
each gate, :func:`evaluate_promotion` asks the engine whether the action
``promotion.Require{Gate}`` is allowed for the requester on the version (a
``registry::ModelVersion`` carrying its model's owner team, risk tier and
compliance tags) with the alias in the context. An Allow means the gate is
required; the policy that allowed it is named on the gate. The facts the gates
check come from the registry (never from the caller): the version's metrics and
the model's thresholds, the artifact's signature, the version's attachments, the
active approvals and the model card.

An evaluation error on a gate question fails that gate: the engine could not say
it is not required, so the promotion is refused (fail closed).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from google.protobuf import json_format

from conveyor.policy.v1 import resources_pb2 as pb
from conveyor.registry.v1 import resources_pb2 as registry_pb
from conveyor.services.policy.engine import PolicyEngine
from conveyor.shared.auth.principal import Principal, Resource

MODEL_VERSION_TYPE = "registry.conveyor.dev/ModelVersion"
PRIVACY_TAGS = ("gdpr", "ccpa", "hipaa", "personal_data")
"""Compliance tags whose models must document data retention (see the policies)."""

_DATA_RETENTION_HEADING = re.compile(r"^\s{0,3}#{1,6}\s*data[ -]retention\b", re.I | re.M)


@dataclass(frozen=True)
class PromotionFacts:
    """What the registry says about the version (read by the policy service)."""

    model: registry_pb.Model
    version: registry_pb.ModelVersion
    attachments: Sequence[registry_pb.Attachment]
    approvals: Sequence[pb.Approval]
    """The version's active approvals for the alias in question."""


@dataclass(frozen=True)
class PromotionEvaluation:
    """Every gate with its result (failed ones first), and the overall answer."""

    allowed: bool
    gates: list[pb.GateResult]
    policy_ids: list[str]
    """The policies that required the gates."""
    reasons: list[str]
    errors: list[str]

    def gate_documents(self) -> list[dict[str, Any]]:
        """The gates as the audit log records them (proto3 JSON, proto names)."""
        return [
            json_format.MessageToDict(gate, preserving_proto_field_name=True) for gate in self.gates
        ]


SignatureCheck = Callable[[registry_pb.Artifact], str]
"""Checks an artifact's signature: "" when it verifies, else why not."""


def version_resource(model: registry_pb.Model, version: registry_pb.ModelVersion) -> Resource:
    """The version as the policies see it: its model's governance attributes."""
    return Resource(
        type=MODEL_VERSION_TYPE,
        name=version.name,
        owner_team=model.owner_team,
        attributes={
            "risk_tier": registry_pb.RiskTier.Name(model.risk_tier),
            "compliance_tags": list(model.compliance_tags),
        },
    )


def evaluate_promotion(
    engine: PolicyEngine,
    facts: PromotionFacts,
    *,
    alias: str,
    requester: Principal,
    check_signature: SignatureCheck,
) -> PromotionEvaluation:
    """Which gates the policies require for moving ``alias`` to the version, and
    whether the facts pass each."""
    resource = version_resource(facts.model, facts.version)
    context = {"alias": alias}
    errors: list[str] = []

    def required(action: str) -> tuple[bool, str, bool]:
        """(required, the policy requiring it, could not decide)."""
        decision = engine.authorize(requester, f"promotion.{action}", resource, context)
        errors.extend(decision.errors)
        policy_id = decision.policy_ids[0] if decision.allowed and decision.policy_ids else ""
        return decision.allowed, policy_id, bool(decision.errors)

    gates = [
        *_metric_gates(facts, required("RequireMetricThresholds")),
        _signature_gate(facts, required("RequireArtifactSignature"), check_signature),
        _explanation_gate(facts, required("RequireExplanationReport")),
        _approval_gate(facts, required("RequireApproval"), required("RequireSecondApprover")),
        *_compliance_gates(facts, required("RequireDataRetentionSection")),
    ]
    failed = [gate for gate in gates if gate.outcome == pb.GATE_OUTCOME_FAILED]
    ordered = failed + [gate for gate in gates if gate.outcome != pb.GATE_OUTCOME_FAILED]
    policy_ids = sorted({gate.policy_id for gate in gates if gate.policy_id})
    subject = f"{facts.version.name} to {alias!r}"
    if failed:
        reasons = [f"promotion of {subject} refused: {gate.message}" for gate in failed]
    else:
        required_count = sum(gate.outcome == pb.GATE_OUTCOME_PASSED for gate in gates)
        reasons = [f"promotion of {subject} allowed: {required_count} required gate(s) passed"]
    return PromotionEvaluation(
        allowed=not failed,
        gates=ordered,
        policy_ids=policy_ids,
        reasons=reasons,
        errors=errors,
    )


Requirement = tuple[bool, str, bool]


def _gate(
    gate: str,
    kind: pb.GateKind.ValueType,
    requirement: Requirement,
    passed: bool,
    message: str,
) -> pb.GateResult:
    is_required, policy_id, undecided = requirement
    if undecided:
        outcome = pb.GATE_OUTCOME_FAILED
        message = f"{gate}: the policies could not decide whether it applies, so it fails"
    elif not is_required:
        outcome = pb.GATE_OUTCOME_NOT_REQUIRED
        message = f"{gate}: not required ({message})"
    else:
        outcome = pb.GATE_OUTCOME_PASSED if passed else pb.GATE_OUTCOME_FAILED
    return pb.GateResult(
        gate=gate, kind=kind, outcome=outcome, message=message, policy_id=policy_id
    )


def _metric_gates(facts: PromotionFacts, requirement: Requirement) -> list[pb.GateResult]:
    thresholds = list(facts.model.promotion_thresholds)
    if not thresholds:
        return [
            _gate(
                "metric-thresholds",
                pb.GATE_KIND_METRIC_THRESHOLD,
                requirement,
                True,
                f"{facts.model.name} declares no metric thresholds",
            )
        ]
    gates = []
    for threshold in thresholds:
        observed = facts.version.metrics.get(threshold.metric)
        at_least = threshold.comparison == registry_pb.THRESHOLD_COMPARISON_GREATER_OR_EQUAL
        sign = ">=" if at_least else "<="
        if observed is None:
            passed = False
            message = (
                f"{threshold.metric} is missing from the version's metrics "
                f"(needs {sign} {threshold.value:g})"
            )
        else:
            passed = observed >= threshold.value if at_least else observed <= threshold.value
            verdict = "meets" if passed else "does not meet"
            message = (
                f"{threshold.metric} {observed:g} {verdict} the threshold "
                f"{sign} {threshold.value:g}"
            )
        gate = _gate(
            f"metric:{threshold.metric}",
            pb.GATE_KIND_METRIC_THRESHOLD,
            requirement,
            passed,
            message,
        )
        check = pb.MetricCheck(threshold=threshold)
        if observed is not None:
            check.observed = observed
        gate.metric.CopyFrom(check)
        gates.append(gate)
    return gates


def _signature_gate(
    facts: PromotionFacts, requirement: Requirement, check_signature: SignatureCheck
) -> pb.GateResult:
    artifact = facts.version.artifact
    if not requirement[0] or requirement[2]:
        problem = ""  # not consulted: no key access is needed for a gate that does not apply
    elif not artifact.sha256:
        problem = "the version has no artifact"
    else:
        problem = check_signature(artifact)
    message = (
        problem
        or f"the artifact sha256:{artifact.sha256[:12]}… is signed and the signature verifies"
    )
    return _gate(
        "artifact-signature", pb.GATE_KIND_ARTIFACT_SIGNATURE, requirement, not problem, message
    )


def _explanation_gate(facts: PromotionFacts, requirement: Requirement) -> pb.GateResult:
    reports = [
        a for a in facts.attachments if a.kind == registry_pb.ATTACHMENT_KIND_EXPLANATION_REPORT
    ]
    message = (
        f"explanation report {reports[0].name} is attached"
        if reports
        else "no explanation report is attached to the version"
    )
    return _gate(
        "explanation-report", pb.GATE_KIND_EXPLANATION_REPORT, requirement, bool(reports), message
    )


def _approval_gate(facts: PromotionFacts, first: Requirement, second: Requirement) -> pb.GateResult:
    required_approvers = 2 if second[0] else 1 if first[0] else 0
    creators = {facts.version.created_by, *facts.version.authors} - {""}
    approvers: list[str] = []
    ineligible: list[str] = []
    for approval in facts.approvals:
        principal = Principal.from_proto(approval.approver).text
        bucket = ineligible if principal in creators else approvers
        if principal not in bucket:
            bucket.append(principal)
    passed = len(approvers) >= required_approvers
    if passed:
        message = f"approved by {', '.join(approvers)}" if approvers else "no approval is needed"
    else:
        message = (
            f"needs {required_approvers} approver(s) other than the version's creators "
            f"({', '.join(sorted(creators)) or 'none recorded'}), has {len(approvers)}"
        )
        if ineligible:
            message += f"; not counted (four eyes): {', '.join(ineligible)}"
    # The gate is required when either question says so; the second names its policy.
    policy = second[1] if second[0] else first[1]
    requirement = (first[0] or second[0], policy, first[2] or second[2])
    gate = _gate("approval", pb.GATE_KIND_APPROVAL, requirement, passed, message)
    gate.approval.CopyFrom(
        pb.ApprovalCheck(
            required_approvers=required_approvers,
            approvers=approvers,
            ineligible_approvers=ineligible,
        )
    )
    return gate


def _compliance_gates(facts: PromotionFacts, requirement: Requirement) -> list[pb.GateResult]:
    tags = [tag for tag in facts.model.compliance_tags if tag in PRIVACY_TAGS]
    has_section = bool(_DATA_RETENTION_HEADING.search(facts.version.model_card))
    message = (
        "the model card has a data retention section"
        if has_section
        else "the model card lacks a '## Data retention' section"
    )
    return [
        _gate(f"compliance:{tag}", pb.GATE_KIND_COMPLIANCE, requirement, has_section, message)
        for tag in tags
    ]
