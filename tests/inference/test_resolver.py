"""What policy sees of an inference call: the model's owner team and governance
attributes, read from the registry, for every kind of request naming a model."""

from __future__ import annotations

import pytest

from conveyor.inference.v1 import inference_messages_pb2 as rpc
from conveyor.inference.v1 import resources_pb2 as pb
from conveyor.oip.v2 import grpc_service_pb2 as oip
from conveyor.registry.v1 import resources_pb2 as registry_pb
from conveyor.services.inference.server import inference_resolver
from conveyor.shared.errors import NotFoundError


class Registry:
    """The registry as the resolver reads it: models by name."""

    def __init__(self) -> None:
        self.asked: list[str] = []

    async def model(self, name: str) -> registry_pb.Model:
        self.asked.append(name)
        if name != "models/churn":
            raise NotFoundError(f"{name} does not exist")
        return registry_pb.Model(name=name, owner_team="team-a")


@pytest.mark.parametrize(
    ("method", "request_message"),
    [
        # A create names no resource yet: the model inside the deployment decides.
        (
            "CreateDeployment",
            rpc.CreateDeploymentRequest(deployment=pb.Deployment(model="models/churn")),
        ),
        ("GetDeployment", rpc.GetDeploymentRequest(name="deployments/churn")),
        (
            "UpdateDeployment",
            rpc.UpdateDeploymentRequest(
                deployment=pb.Deployment(name="deployments/churn", model="models/churn")
            ),
        ),
        ("ModelInfer", oip.ModelInferRequest(model_name="churn")),
    ],
)
async def test_a_call_on_a_model_carries_its_owner_team(
    method: str, request_message: object
) -> None:
    registry = Registry()
    resource = await inference_resolver(registry)(method, request_message)  # type: ignore[arg-type]
    assert resource.owner_team == "team-a", (method, registry.asked)
    assert registry.asked == ["models/churn"]


async def test_an_unknown_model_has_no_owner_so_ownership_rules_deny() -> None:
    registry = Registry()
    request = rpc.CreateDeploymentRequest(deployment=pb.Deployment(model="models/nope"))
    resource = await inference_resolver(registry)("CreateDeployment", request)  # type: ignore[arg-type]
    assert resource.owner_team == ""
