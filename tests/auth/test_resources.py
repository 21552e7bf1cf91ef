"""What a request acts on, as the interceptor names it for the policies."""

from __future__ import annotations

import re
from typing import Any

import pytest
from google.protobuf import message_factory

from conveyor.policy.v1 import policy_messages_pb2 as policy
from conveyor.policy.v1 import resources_pb2 as policy_pb
from conveyor.registry.v1 import registry_messages_pb2 as registry
from conveyor.services.policy.engine import PolicyEngine
from conveyor.shared.auth import Principal, default_resource, request_alias
from conveyor.shared.client import SERVICE_DESCRIPTORS
from conveyor.trainer.v1 import trainer_messages_pb2 as trainer
from tests.auth.support import POLICY_DIR

REGISTRY = "registry.conveyor.dev"


@pytest.mark.parametrize(
    ("service", "method", "request_message", "expected_type", "expected_name"),
    [
        ("registry", "GetModel", registry.GetModelRequest(name="models/fraud"), "Model", None),
        ("registry", "ListModels", registry.ListModelsRequest(), "Model", ""),
        ("registry", "CreateModel", registry.CreateModelRequest(model_id="fraud"), "Model", ""),
        (
            "registry",
            "GetModelVersion",
            registry.GetModelVersionRequest(name="models/fraud/versions/3"),
            "ModelVersion",
            None,
        ),
        (
            "registry",
            "GetModelVersion",
            registry.GetModelVersionRequest(name="models/fraud@production"),
            "ModelVersion",
            None,
        ),
        (
            "registry",
            "GetAttachment",
            registry.GetAttachmentRequest(name="models/fraud/versions/3/attachments/card"),
            "Attachment",
            None,
        ),
        (
            "registry",
            "ListAttachments",
            registry.ListAttachmentsRequest(parent="models/fraud/versions/3"),
            "ModelVersion",
            None,
        ),
        (
            "registry",
            "SetAlias",
            registry.SetAliasRequest(name="models/fraud/aliases/production"),
            "Model",
            None,
        ),
        (
            "registry",
            "CreateModelVersion",
            registry.CreateModelVersionRequest(
                metadata=registry.CreateModelVersionMetadata(parent="models/fraud")
            ),
            "Model",
            "models/fraud",
        ),
    ],
)
def test_registry_names_map_to_registry_types(
    service: str,
    method: str,
    request_message: Any,
    expected_type: str,
    expected_name: str | None,
) -> None:
    resource = default_resource(service, method, request_message)
    assert resource.type == f"{REGISTRY}/{expected_type}"
    if expected_name is None:
        expected_name = getattr(request_message, "name", "") or request_message.parent
    assert resource.name == expected_name
    assert resource.owner_team == ""


@pytest.mark.parametrize(
    ("method", "request_message", "expected_type", "alias"),
    [
        ("GetDecision", policy.GetDecisionRequest(name="decisions/1"), "policy/Decision", ""),
        ("ListDecisions", policy.ListDecisionsRequest(), "policy/Decision", ""),
        ("Authorize", policy.AuthorizeRequest(), "policy/Decision", ""),
        ("VerifyAuditLog", policy.VerifyAuditLogRequest(), "policy/AuditLog", ""),
        ("ExportAuditLog", policy.ExportAuditLogRequest(), "policy/AuditLog", ""),
        (
            "GetPolicySet",
            policy.GetPolicySetRequest(name="policySets/abc"),
            "policy/PolicySet",
            "",
        ),
        (
            "GetApproval",
            policy.GetApprovalRequest(name="models/f/versions/1/approvals/a1"),
            "policy/Approval",
            "",
        ),
        (
            "CreateApproval",
            policy.CreateApprovalRequest(
                parent="models/f/versions/1", approval=policy_pb.Approval(alias="production")
            ),
            "registry/ModelVersion",
            "production",
        ),
        (
            "EvaluatePromotion",
            policy.EvaluatePromotionRequest(model_version="models/f/versions/1", alias="staging"),
            "registry/ModelVersion",
            "staging",
        ),
    ],
)
def test_policy_names_map_to_policy_or_registry_types(
    method: str, request_message: Any, expected_type: str, alias: str
) -> None:
    namespace, kind = expected_type.split("/")
    resource = default_resource("policy", method, request_message)
    assert resource.type == f"{namespace}.conveyor.dev/{kind}"
    assert request_alias(request_message) == alias


def test_other_services_name_their_own_kinds() -> None:
    listed = default_resource("trainer", "ListTrainingJobs", trainer.ListTrainingJobsRequest())
    assert listed.type == "trainer.conveyor.dev/TrainingJob"
    dataset = default_resource(
        "trainer", "GetDataset", trainer.GetDatasetRequest(name="datasets/x")
    )
    assert (dataset.type, dataset.name) == ("trainer.conveyor.dev/Dataset", "datasets/x")


def test_the_alias_of_an_alias_name_is_context() -> None:
    assert request_alias(registry.SetAliasRequest(name="models/fraud/aliases/canary")) == "canary"
    assert request_alias(registry.GetModelRequest(name="models/fraud")) == ""
    assert request_alias(registry.CreateModelVersionRequest()) == ""


SCHEMA_ACTIONS = set(
    re.findall(r'"([a-z]+\.[A-Z]\w+)"', (POLICY_DIR / "schema.cedarschema").read_text())
)


def every_checked_method() -> list[tuple[str, str, Any]]:
    methods = []
    for service, descriptors in SERVICE_DESCRIPTORS.items():
        for descriptor in descriptors:
            for method in descriptor.methods:
                if f"{service}.{method.name}" in SCHEMA_ACTIONS:
                    request_class = message_factory.GetMessageClass(method.input_type)
                    methods.append((service, method.name, request_class()))
    return methods


@pytest.mark.parametrize(
    ("service", "method", "request_message"),
    every_checked_method(),
    ids=lambda value: value if isinstance(value, str) else "",
)
def test_every_method_names_a_resource_type_its_action_applies_to(
    policy_engine: PolicyEngine, service: str, method: str, request_message: Any
) -> None:
    resource = default_resource(service, method, request_message)
    decision = policy_engine.authorize(
        Principal(kind="user", id="someone"), f"{service}.{method}", resource, {}
    )
    assert decision.errors == [], (resource.type, decision.errors)
