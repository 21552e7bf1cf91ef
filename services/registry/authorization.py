"""How the registry asks policy about its calls and its alias moves.

:func:`registry_resolver` names each call's resource for the authentication
interceptor with the governance facts the policies decide by: the owning team,
risk tier and compliance tags of the model the call is about (for a
``CreateModel``, of the model being created). :class:`PolicyPromotionGate` asks
the policy service's ``EvaluatePromotion`` before an alias moves and refuses the
move, listing every failed gate, unless it is allowed.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import grpc

from conveyor.policy.v1 import policy_messages_pb2 as policy_rpc
from conveyor.policy.v1 import policy_service_pb2_grpc
from conveyor.policy.v1 import resources_pb2 as policy_pb
from conveyor.registry.v1 import resources_pb2 as pb
from conveyor.services.registry.store import RegistryStore
from conveyor.shared.auth import current_principal
from conveyor.shared.auth.interceptor import ResourceResolver, default_resource
from conveyor.shared.auth.principal import Principal, Resource, model_attributes
from conveyor.shared.errors import (
    ConveyorError,
    FailedPreconditionError,
    NotFoundError,
    PreconditionViolation,
    UnavailableError,
    from_rpc_error,
)
from conveyor.shared.workers import WorkerThreads

GATE_VIOLATION = "PROMOTION_GATE"
"""``PreconditionFailure.Violation.type`` of a failed promotion gate."""


def registry_resolver(store: RegistryStore, workers: WorkerThreads) -> ResourceResolver:
    """Names a registry call's resource with its model's owner team, risk tier
    and compliance tags (unknown models: none, and ownership rules deny)."""

    async def resolve(method: str, request: Any) -> Resource:
        resource = default_resource("registry", method, request)
        if method == "CreateModel":
            model = request.model
            return replace(
                resource, owner_team=model.owner_team, attributes=model_attributes(model)
            )
        segments = resource.name.split("/")
        if len(segments) < 2 or segments[0] != "models" or segments[1] == "-":
            return resource
        model_id = segments[1].partition("@")[0]
        try:
            model = await workers.run(store.get_model, model_id)
        except ConveyorError:  # unknown or malformed: the servicer answers that
            return resource
        return replace(resource, owner_team=model.owner_team, attributes=model_attributes(model))

    return resolve


class PolicyPromotionGate:
    """Asks the policy service before an alias moves to a version.

    Deleting an alias moves no version into it, so no gate applies (the call's
    own authorization already decided who may). If the policy service cannot
    answer, the move is refused with UNAVAILABLE (fail closed).
    """

    def __init__(self, channel: grpc.aio.Channel) -> None:
        self._stub = policy_service_pb2_grpc.PolicyServiceStub(channel)

    async def evaluate(
        self,
        *,
        model: pb.Model,
        version: pb.ModelVersion,
        alias_id: str,
        change: str,
        principal: str,
        reason: str,
    ) -> str:
        if change != "set":
            return ""
        requester = current_principal.get() or _principal_of_text(principal)
        request = policy_rpc.EvaluatePromotionRequest(
            model_version=version.name, alias=alias_id, requester=requester.to_proto()
        )
        try:
            response = await self._stub.EvaluatePromotion(request)
        except grpc.aio.AioRpcError as error:
            failure = from_rpc_error(error)
            if isinstance(failure, NotFoundError):
                raise failure from None
            raise UnavailableError(
                f"the policy service could not evaluate the promotion ({error.code().name}); "
                "the alias was not changed",
                reason="POLICY_UNAVAILABLE",
            ) from None
        decision = f"decisions/{response.decision_id}"
        if response.allowed:
            return decision
        failed = [g for g in response.gates if g.outcome == policy_pb.GATE_OUTCOME_FAILED]
        raise FailedPreconditionError(
            f"moving {alias_id!r} to {version.name} was refused by "
            f"{len(failed)} promotion gate(s): " + "; ".join(g.message for g in failed),
            reason="PROMOTION_REFUSED",
            metadata={"decision": decision, "gates": ",".join(g.gate for g in failed)},
            violations=[PreconditionViolation(GATE_VIOLATION, g.gate, g.message) for g in failed],
        )


def _principal_of_text(text: str) -> Principal:
    kind, _, identifier = text.partition(":")
    return Principal(kind=kind, id=identifier)
