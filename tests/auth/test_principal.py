"""Principals and resources: their wire forms, and who the caller of a call is."""

from __future__ import annotations

from typing import Any

import pytest

from conveyor.policy.v1 import resources_pb2
from conveyor.services.policy import engine
from conveyor.shared.auth import (
    ANONYMOUS,
    ANONYMOUS_PRINCIPAL,
    Principal,
    Resource,
    caller,
    caller_principal,
    current_principal,
)
from conveyor.shared.errors import InvalidArgumentError
from tests.auth.support import ALICE


class FakeContext:
    """The part of a servicer context :func:`caller` reads."""

    def __init__(self, auth_context: dict[str, list[bytes]] | None = None) -> None:
        self._auth_context = auth_context or {}

    def auth_context(self) -> dict[str, list[bytes]]:
        return self._auth_context


def test_the_policy_engine_uses_the_shared_types() -> None:
    assert engine.Principal is Principal
    assert engine.Resource is Resource


def test_a_principal_round_trips_through_its_wire_form() -> None:
    message = ALICE.to_proto()
    assert message.kind == resources_pb2.PRINCIPAL_KIND_USER
    assert list(message.roles) == ["data_scientist"]
    assert Principal.from_proto(message) == ALICE
    service = Principal(kind="service", id="registry", roles=("service",))
    assert Principal.from_proto(service.to_proto()) == service
    assert service.text == "service:registry"


@pytest.mark.parametrize(
    ("message", "fields"),
    [
        (resources_pb2.Principal(id="alice"), ["approver.kind"]),
        (resources_pb2.Principal(kind=resources_pb2.PRINCIPAL_KIND_USER), ["approver.id"]),
        (
            resources_pb2.Principal(id="a" * 257, kind=resources_pb2.PRINCIPAL_KIND_SERVICE),
            ["approver.id"],
        ),
        (resources_pb2.Principal(), ["approver.kind", "approver.id"]),
    ],
)
def test_a_malformed_principal_is_invalid_argument(
    message: resources_pb2.Principal, fields: list[str]
) -> None:
    with pytest.raises(InvalidArgumentError) as raised:
        Principal.from_proto(message, field="approver")
    assert [v.field for v in raised.value.violations] == fields


def test_a_resource_round_trips_with_its_attributes() -> None:
    resource = Resource(
        type="registry.conveyor.dev/ModelVersion",
        name="models/fraud/versions/3",
        owner_team="team-a",
        attributes={"risk_tier": "RISK_TIER_HIGH", "compliance_tags": ["gdpr", "pci"]},
    )
    message = resource.to_proto()
    assert message.attributes["risk_tier"] == "RISK_TIER_HIGH"
    assert Resource.from_proto(message) == resource
    bare = Resource(type="registry.conveyor.dev/Model")
    assert not bare.to_proto().HasField("attributes")
    assert Resource.from_proto(bare.to_proto()) == bare


def test_the_caller_is_the_authenticated_principal_while_one_is_set() -> None:
    token = current_principal.set(ALICE)
    try:
        certificate = FakeContext({"x509_common_name": [b"trainer"]})
        assert caller(certificate) == ALICE
        assert caller_principal(certificate) == "user:alice"
    finally:
        current_principal.reset(token)


@pytest.mark.parametrize(
    ("auth_context", "expected"),
    [
        ({"x509_common_name": [b"trainer"]}, "service:trainer"),
        ({}, ANONYMOUS),
        ({"x509_common_name": [b"x" * 300]}, ANONYMOUS),
    ],
)
def test_without_one_a_certificate_or_else_anonymous(
    auth_context: dict[str, Any], expected: str
) -> None:
    assert caller_principal(FakeContext(auth_context)) == expected
    if expected == ANONYMOUS:
        assert caller(FakeContext(auth_context)) == ANONYMOUS_PRINCIPAL
    else:
        assert caller(FakeContext(auth_context)).roles == ("service",)
