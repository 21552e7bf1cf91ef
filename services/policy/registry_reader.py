"""What the policy service reads from the registry: the facts promotion gates
check, never taken from the caller."""

from __future__ import annotations

from typing import Protocol

import grpc

from conveyor.registry.v1 import registry_messages_pb2 as rpc
from conveyor.registry.v1 import registry_service_pb2_grpc
from conveyor.registry.v1 import resources_pb2 as registry_pb
from conveyor.shared.errors import (
    ConveyorError,
    InvalidArgumentError,
    NotFoundError,
    UnavailableError,
    from_rpc_error,
)

_PASSED_THROUGH = (NotFoundError, InvalidArgumentError)


class RegistryReader(Protocol):
    """Reads models, versions and attachments."""

    async def get_model(self, name: str) -> registry_pb.Model: ...

    async def get_version(self, name: str) -> registry_pb.ModelVersion: ...

    async def list_attachments(self, version_name: str) -> list[registry_pb.Attachment]: ...


class GrpcRegistryReader:
    """Reads through the registry's gRPC API with the policy service's identity.

    NOT_FOUND and INVALID_ARGUMENT reach the caller as they are (the model or
    version named does not exist, or the name is bad); any other failure means
    the facts cannot be read and is UNAVAILABLE, so the caller refuses.
    """

    def __init__(self, channel: grpc.aio.Channel) -> None:
        self._stub = registry_service_pb2_grpc.RegistryServiceStub(channel)

    async def get_model(self, name: str) -> registry_pb.Model:
        try:
            response = await self._stub.GetModel(rpc.GetModelRequest(name=name))
        except grpc.aio.AioRpcError as error:
            raise _translated(error) from None
        return response.model

    async def get_version(self, name: str) -> registry_pb.ModelVersion:
        request = rpc.GetModelVersionRequest(name=name, view=registry_pb.MODEL_VERSION_VIEW_FULL)
        try:
            response = await self._stub.GetModelVersion(request)
        except grpc.aio.AioRpcError as error:
            raise _translated(error) from None
        return response.model_version

    async def list_attachments(self, version_name: str) -> list[registry_pb.Attachment]:
        found: list[registry_pb.Attachment] = []
        token = ""
        while True:
            request = rpc.ListAttachmentsRequest(
                parent=version_name, page_size=500, page_token=token
            )
            try:
                response = await self._stub.ListAttachments(request)
            except grpc.aio.AioRpcError as error:
                raise _translated(error) from None
            found.extend(response.attachments)
            token = response.next_page_token
            if not token:
                return found


def _translated(error: grpc.aio.AioRpcError) -> ConveyorError:
    converted = from_rpc_error(error)
    if isinstance(converted, _PASSED_THROUGH):
        return converted
    return UnavailableError(
        f"the registry could not be read ({error.code().name}); the decision is refused",
        reason="REGISTRY_UNAVAILABLE",
    )
