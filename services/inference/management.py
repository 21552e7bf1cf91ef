"""The control plane (``conveyor.inference.v1.InferenceManagementService``).

Deployments are stored (so every serving process and a restarted server
serve the same configuration) and applied at once in the process that took
the call; the others pick the change up from the store. Create, update and
delete return once the change is accepted; ``GetDeploymentStatus`` follows
the loading, the swap and the shadow comparison.
"""

from __future__ import annotations

from datetime import UTC
from typing import Any, Final

from conveyor.inference.v1 import inference_messages_pb2 as rpc
from conveyor.inference.v1 import inference_service_pb2_grpc
from conveyor.inference.v1 import resources_pb2 as pb
from conveyor.services.inference.deployment_config import check_deployment
from conveyor.services.inference.registry_source import RegistrySource
from conveyor.services.inference.repository import ModelRepository
from conveyor.services.inference.store import DeploymentStore, deployment_name
from conveyor.services.inference.versions import check_servable
from conveyor.shared import names, pagination
from conveyor.shared.auth.principal import caller_principal
from conveyor.shared.errors import FieldViolation, invalid_field, raise_if_any
from conveyor.shared.filtering import FieldKind, FilterField, parse_filter
from conveyor.shared.workers import WorkerThreads

DEPLOYMENT_FILTERS: Final = {
    "model": FilterField(FieldKind.STRING),
    "created_by": FilterField(FieldKind.STRING),
    "labels.": FilterField(FieldKind.MAP),
}
UPDATABLE: Final = frozenset(
    {
        "traffic",
        "shadow",
        "batching",
        "runtime",
        "warmup",
        "max_on_demand_versions",
        "on_demand_idle_timeout",
        "prediction_log_sample_rate",
        "labels",
    }
)
OUTPUT_ONLY: Final = ("name", "state", "create_time", "update_time", "created_by", "etag")


class ManagementServicer(inference_service_pb2_grpc.InferenceManagementServiceServicer):
    """Deployments: their configuration and live status."""

    def __init__(
        self,
        store: DeploymentStore,
        repository: ModelRepository,
        source: RegistrySource,
        workers: WorkerThreads,
    ) -> None:
        self._store = store
        self._repository = repository
        self._source = source
        self._workers = workers

    async def CreateDeployment(self, request: rpc.CreateDeploymentRequest, context: Any) -> Any:
        if not request.HasField("deployment"):
            raise invalid_field("deployment", "required")
        if request.request_id and len(request.request_id) > 64:
            raise invalid_field("request_id", "at most 64 characters")
        deployment = pb.Deployment()
        deployment.CopyFrom(request.deployment)
        for field in OUTPUT_ONLY:
            deployment.ClearField(field)
        model_id = check_deployment(deployment)
        await self._check_references(deployment)
        deployment.name = deployment_name(model_id)
        deployment.created_by = caller_principal(context)
        stored = await self._workers.run(
            self._store.create,
            deployment,
            request_id=request.request_id,
            request_hash=pagination.fingerprint(
                request.deployment.SerializeToString(deterministic=True)
            ),
        )
        await self._repository.applied(stored, wait=False)
        return rpc.CreateDeploymentResponse(deployment=self._overlay(stored))

    async def GetDeployment(self, request: rpc.GetDeploymentRequest, context: Any) -> Any:
        name = _name(request.name)
        stored = await self._workers.run(self._store.get, name)
        return rpc.GetDeploymentResponse(deployment=self._overlay(stored))

    async def ListDeployments(self, request: rpc.ListDeploymentsRequest, context: Any) -> Any:
        size = pagination.page_size(request.page_size)
        restrictions = parse_filter(request.filter, DEPLOYMENT_FILTERS)
        fingerprint = pagination.fingerprint(request.filter)
        cursor = pagination.decode_page_token(request.page_token, fingerprint)
        page = await self._workers.run(
            self._store.list, restrictions, _field, offset=cursor.offset, limit=size
        )
        return rpc.ListDeploymentsResponse(
            deployments=[self._overlay(d) for d in page.items],
            next_page_token=pagination.next_page_token(page.has_more, cursor, size, fingerprint),
        )

    async def UpdateDeployment(self, request: rpc.UpdateDeploymentRequest, context: Any) -> Any:
        given = request.deployment
        name = _name(given.name, field="deployment.name")
        paths = list(request.update_mask.paths)
        violations = []
        if not paths:
            violations.append(FieldViolation("update_mask", "required: name the fields to change"))
        for index, path in enumerate(paths):
            if path == "model":
                violations.append(
                    FieldViolation(f"update_mask.paths[{index}]", "model is immutable")
                )
            elif path.split(".")[0] not in UPDATABLE:
                violations.append(
                    FieldViolation(
                        f"update_mask.paths[{index}]",
                        f"{path!r} cannot be updated; updatable: {', '.join(sorted(UPDATABLE))}",
                    )
                )
        raise_if_any(violations, "invalid update mask")
        current = await self._workers.run(self._store.get, name)
        updated = pb.Deployment()
        updated.CopyFrom(current)
        request.update_mask.MergeMessage(
            given, updated, replace_message_field=True, replace_repeated_field=True
        )
        check_deployment(updated)
        await self._check_references(updated)
        stored = await self._workers.run(self._store.replace, updated, expected_etag=given.etag)
        await self._repository.applied(stored, wait=False)
        return rpc.UpdateDeploymentResponse(deployment=self._overlay(stored))

    async def DeleteDeployment(self, request: rpc.DeleteDeploymentRequest, context: Any) -> Any:
        name = _name(request.name)
        await self._repository.delete(name, expected_etag=request.etag)
        return rpc.DeleteDeploymentResponse()

    async def GetDeploymentStatus(
        self, request: rpc.GetDeploymentStatusRequest, context: Any
    ) -> Any:
        name = request.name.removesuffix("/status")
        name = _name(name)
        await self._workers.run(self._store.get, name)
        runtime = self._repository.runtimes.get(name.removeprefix("deployments/"))
        if runtime is None:
            # Stored by another process a moment ago: this one loads it now.
            await self._repository.sync()
            runtime = self._repository.runtime(name.removeprefix("deployments/"))
        return rpc.GetDeploymentStatusResponse(status=runtime.status())

    async def _check_references(self, deployment: pb.Deployment) -> None:
        """NOT_FOUND for a model, version or alias the registry lacks;
        FAILED_PRECONDITION for pinned versions inference must not serve."""
        await self._source.model(deployment.model)
        references = [t.model_version for t in deployment.traffic.targets]
        if deployment.HasField("shadow"):
            references.append(deployment.shadow.model_version)
        for reference in references:
            version = await self._source.version(reference)
            if names.parse_model_version_ref(reference).version is not None:
                check_servable(version)

    def _overlay(self, deployment: pb.Deployment) -> pb.Deployment:
        """The stored deployment with this process's view of its state."""
        runtime = self._repository.runtimes.get(deployment.model.removeprefix("models/"))
        deployment.state = runtime.state if runtime is not None else pb.DEPLOYMENT_STATE_LOADING
        return deployment


def _name(name: str, *, field: str = "name") -> str:
    deployment_id = names.parse_resource_name(name, "deployments", field=field)
    return deployment_name(deployment_id)


def _field(deployment: pb.Deployment, field: str) -> object:
    if field.startswith("labels."):
        return deployment.labels.get(field.removeprefix("labels."))
    if field == "create_time":
        return deployment.create_time.ToDatetime(tzinfo=UTC)
    value: str = getattr(deployment, field)
    return value
