"""The optimizer's side of the registry: reading sources, registering results.

Calls go over a channel made with the optimizer's service identity
(``service:optimizer``). A source's artifact comes through the shared
:class:`~conveyor.shared.artifacts.ArtifactCache`, so its signature is
verified before a byte of it is used. A result is registered with the
:class:`~conveyor.shared.registry_writer.RegistryWriter`, its report attached
as an ``OPTIMIZATION_REPORT``; both requests' ids derive from the job and the
result, so a retried or resumed job registers nothing twice.
"""

from __future__ import annotations

import asyncio
import uuid
from typing import Final

import grpc

from conveyor.optimizer.v1 import resources_pb2 as pb
from conveyor.registry.v1 import registry_messages_pb2 as registry_rpc
from conveyor.registry.v1 import registry_service_pb2_grpc
from conveyor.registry.v1 import resources_pb2 as registry_pb
from conveyor.services.optimizer.source import SourceModel
from conveyor.shared.artifacts import ArtifactCache
from conveyor.shared.errors import (
    InvalidArgumentError,
    NotFoundError,
    UnavailableError,
    from_rpc_error,
)
from conveyor.shared.registry_writer import RegistryWriter

REPORT_CONTENT_TYPE: Final = (
    "application/x-protobuf; messageType=conveyor.optimizer.v1.OptimizationReport"
)
_REQUEST_NAMESPACE: Final = uuid.UUID("3f0b8a47-21d6-4c38-9a7e-5b1d2c6e8f90")


def request_id(job: pb.OptimizationJob, result_id: str, purpose: str) -> str:
    """A stable idempotency key for one write of one result of one job."""
    created = job.create_time.ToNanoseconds()
    return str(uuid.uuid5(_REQUEST_NAMESPACE, f"{job.name}/{created}/{result_id}/{purpose}"))


class RegistryGateway:
    """Reads source versions and registers optimised ones."""

    def __init__(
        self,
        channel: grpc.aio.Channel,
        cache: ArtifactCache,
        *,
        attempts: int = 5,
        backoff_s: float = 0.5,
        call_timeout_s: float = 30.0,
    ) -> None:
        self._stub = registry_service_pb2_grpc.RegistryServiceStub(channel)
        self._cache = cache
        self._writer = RegistryWriter(self._stub, attempts=attempts, backoff_s=backoff_s)
        self._timeout = call_timeout_s

    async def model(self, name: str) -> registry_pb.Model:
        """The model ``name`` (its owner team and risk, for policy)."""
        try:
            reply = await self._stub.GetModel(
                registry_rpc.GetModelRequest(name=name), timeout=self._timeout
            )
        except grpc.aio.AioRpcError as error:
            raise from_rpc_error(error) from None
        return reply.model

    async def version(self, name: str) -> registry_pb.ModelVersion:
        """The version ``name`` (or ``models/m@alias``), whole; NOT_FOUND and
        INVALID_ARGUMENT as the registry says them, anything else UNAVAILABLE."""
        try:
            reply = await self._stub.GetModelVersion(
                registry_rpc.GetModelVersionRequest(
                    name=name, view=registry_pb.MODEL_VERSION_VIEW_FULL
                ),
                timeout=self._timeout,
            )
        except grpc.aio.AioRpcError as error:
            failure = from_rpc_error(error)
            if isinstance(failure, NotFoundError | InvalidArgumentError):
                raise failure from None
            raise UnavailableError(
                f"the registry could not be asked about {name} ({error.code().name})",
                reason="REGISTRY_UNAVAILABLE",
            ) from None
        return reply.model_version

    async def source(self, version: registry_pb.ModelVersion) -> SourceModel:
        """The version with its artifact's bytes, signature and digest verified."""
        path = await self._cache.fetch(self._stub, version.name)
        data = await asyncio.to_thread(path.read_bytes)
        return SourceModel(version, data)

    async def register(
        self,
        job: pb.OptimizationJob,
        result_id: str,
        version: registry_pb.ModelVersion,
        model: bytes,
        report: pb.OptimizationReport,
    ) -> str:
        """Register ``model`` as a new version of the source's model, then attach
        ``report`` (naming the new version) to it; the version's name. Raises
        :class:`~conveyor.shared.registry_writer.RegistryWriteError`."""
        parent = version.lineage.parent_version.split("/versions/")[0]
        registered = await self._writer.create_version(
            parent, version, model, request_id=request_id(job, result_id, "model-version")
        )
        attached = pb.OptimizationReport()
        attached.CopyFrom(report)
        attached.model_version = registered.name
        await self._writer.attach(
            registry_rpc.CreateAttachmentRequest(
                parent=registered.name,
                attachment_id=f"optimization-{result_id}"[:63],
                attachment=registry_pb.Attachment(
                    kind=registry_pb.ATTACHMENT_KIND_OPTIMIZATION_REPORT,
                    display_name=f"Optimisation report: {result_id}",
                    content_type=REPORT_CONTENT_TYPE,
                    content=attached.SerializeToString(deterministic=True),
                ),
                request_id=request_id(job, result_id, "report"),
            )
        )
        return registered.name
