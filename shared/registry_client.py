"""Reading the registry, and moving its aliases, from another service.

Calls go over a channel with the calling service's identity. NOT_FOUND,
INVALID_ARGUMENT, FAILED_PRECONDITION and PERMISSION_DENIED reach the caller
as the registry said them (the name is wrong, or policy refused); any other
failure means the registry cannot be asked now and is UNAVAILABLE.
"""

from __future__ import annotations

from datetime import timedelta

import grpc

from conveyor.registry.v1 import registry_messages_pb2 as registry_rpc
from conveyor.registry.v1 import registry_service_pb2_grpc
from conveyor.registry.v1 import resources_pb2 as registry_pb
from conveyor.shared.errors import (
    AbortedError,
    ConveyorError,
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    PermissionDeniedError,
    UnavailableError,
    from_rpc_error,
)

_ALIAS_PAGE = 1_000
"""The registry's largest page (AIP-158): one call covers a model's aliases."""

_PASSED_THROUGH = (
    AbortedError,
    NotFoundError,
    InvalidArgumentError,
    FailedPreconditionError,
    PermissionDeniedError,
)


class RegistryClient:
    """Models, versions and aliases through the registry's gRPC API."""

    def __init__(
        self, channel: grpc.aio.Channel, *, call_timeout: timedelta = timedelta(seconds=10)
    ) -> None:
        self._stub = registry_service_pb2_grpc.RegistryServiceStub(channel)
        self._timeout = call_timeout.total_seconds()

    async def model(self, name: str) -> registry_pb.Model:
        """The model ``name`` (``models/m``)."""
        try:
            reply = await self._stub.GetModel(
                registry_rpc.GetModelRequest(name=name), timeout=self._timeout
            )
        except grpc.aio.AioRpcError as error:
            raise _failure(error, name) from None
        return reply.model

    async def version(self, reference: str) -> registry_pb.ModelVersion:
        """The version ``reference`` names (``models/m/versions/3`` or
        ``models/m@alias``), resolved, whole."""
        try:
            reply = await self._stub.GetModelVersion(
                registry_rpc.GetModelVersionRequest(
                    name=reference, view=registry_pb.MODEL_VERSION_VIEW_FULL
                ),
                timeout=self._timeout,
            )
        except grpc.aio.AioRpcError as error:
            raise _failure(error, reference) from None
        return reply.model_version

    async def alias(self, model: str, alias: str) -> registry_pb.Alias | None:
        """``model``'s alias ``alias`` (``models/m``, ``canary``): where it points,
        when and why it last moved; None when the model has no such alias."""
        name = f"{model}/aliases/{alias}"
        page_token = ""
        while True:
            try:
                reply = await self._stub.ListAliases(
                    registry_rpc.ListAliasesRequest(
                        parent=model, page_size=_ALIAS_PAGE, page_token=page_token
                    ),
                    timeout=self._timeout,
                )
            except grpc.aio.AioRpcError as error:
                raise _failure(error, f"{model}@{alias}") from None
            for found in reply.aliases:
                if found.name == name:
                    return found
            page_token = reply.next_page_token
            if not page_token:
                return None

    async def newest_attachment(
        self, parent: str, filter_expression: str
    ) -> registry_pb.Attachment | None:
        """The newest attachment of version ``parent`` that matches the AIP-160
        ``filter_expression``, with its content; None when there is none."""
        try:
            listed = await self._stub.ListAttachments(
                registry_rpc.ListAttachmentsRequest(
                    parent=parent, page_size=1, filter=filter_expression
                ),
                timeout=self._timeout,
            )
            if not listed.attachments:
                return None
            name = listed.attachments[0].name
            reply = await self._stub.GetAttachment(
                registry_rpc.GetAttachmentRequest(name=name), timeout=self._timeout
            )
        except grpc.aio.AioRpcError as error:
            raise _failure(error, parent) from None
        return reply.attachment

    async def set_alias(
        self, model: str, alias: str, version: str, *, reason: str, expected_version: str = ""
    ) -> registry_pb.Alias:
        """Point ``model``'s ``alias`` at ``version`` (compare-and-set against
        ``expected_version`` when given: ABORTED if it moved meanwhile): the
        registry asks policy, which records the decision in the audit log."""
        try:
            reply = await self._stub.SetAlias(
                registry_rpc.SetAliasRequest(
                    name=f"{model}/aliases/{alias}",
                    version=version,
                    reason=reason,
                    expected_version=expected_version,
                ),
                timeout=self._timeout,
            )
        except grpc.aio.AioRpcError as error:
            raise _failure(error, f"{model}@{alias}") from None
        return reply.alias


def _failure(error: grpc.aio.AioRpcError, subject: str) -> ConveyorError:
    failure = from_rpc_error(error)
    if isinstance(failure, _PASSED_THROUGH):
        return failure
    return UnavailableError(
        f"the registry could not be asked about {subject} ({error.code().name})",
        reason="REGISTRY_UNAVAILABLE",
    )
