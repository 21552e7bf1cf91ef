"""The inference service's side of the registry: versions, artifacts, aliases.

Calls go over a channel with the inference service's identity
(``service:inference``). Artifacts come through the shared
:class:`~conveyor.shared.artifacts.ArtifactCache`: the registry's signature
over the digest is verified on every fetch (the policy/security hook) and the
bytes are cached on local disk by digest, so a restarted or second serving
process does not download them again.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path

import grpc

from conveyor.registry.v1 import registry_messages_pb2 as registry_rpc
from conveyor.registry.v1 import registry_service_pb2_grpc
from conveyor.registry.v1 import resources_pb2 as registry_pb
from conveyor.shared.artifacts import ArtifactCache
from conveyor.shared.errors import (
    ConveyorError,
    InvalidArgumentError,
    NotFoundError,
    UnavailableError,
    from_rpc_error,
)


class RegistrySource:
    """Reads the registry for inference."""

    def __init__(
        self,
        channel: grpc.aio.Channel,
        cache: ArtifactCache,
        *,
        call_timeout: timedelta = timedelta(seconds=10),
    ) -> None:
        self._stub = registry_service_pb2_grpc.RegistryServiceStub(channel)
        self._cache = cache
        self._timeout = call_timeout.total_seconds()

    async def version(self, reference: str) -> registry_pb.ModelVersion:
        """The version ``reference`` names (``models/m/versions/3`` or
        ``models/m@alias``), resolved, whole. NOT_FOUND and INVALID_ARGUMENT
        as the registry says them; anything else is UNAVAILABLE."""
        try:
            reply = await self._stub.GetModelVersion(
                registry_rpc.GetModelVersionRequest(
                    name=reference, view=registry_pb.MODEL_VERSION_VIEW_FULL
                ),
                timeout=self._timeout,
            )
        except grpc.aio.AioRpcError as error:
            raise _registry_failure(error, reference) from None
        return reply.model_version

    async def model(self, name: str) -> registry_pb.Model:
        """The model ``name`` (``models/m``)."""
        try:
            reply = await self._stub.GetModel(
                registry_rpc.GetModelRequest(name=name), timeout=self._timeout
            )
        except grpc.aio.AioRpcError as error:
            raise _registry_failure(error, name) from None
        return reply.model

    async def models(self, *, limit: int) -> list[registry_pb.Model]:
        """Up to ``limit`` models, in the registry's order."""
        found: list[registry_pb.Model] = []
        token = ""
        while len(found) < limit:
            try:
                reply = await self._stub.ListModels(
                    registry_rpc.ListModelsRequest(
                        page_size=min(100, limit - len(found)), page_token=token
                    ),
                    timeout=self._timeout,
                )
            except grpc.aio.AioRpcError as error:
                raise _registry_failure(error, "models") from None
            found.extend(reply.models)
            token = reply.next_page_token
            if not token:
                break
        return found

    async def artifact(self, version_name: str) -> Path:
        """The verified local file of a resolved version's artifact."""
        return await self._cache.fetch(self._stub, version_name)

    async def alias_events(
        self, start_revision: int
    ) -> AsyncIterator[registry_rpc.WatchAliasesResponse]:
        """Every alias change of every model after ``start_revision`` (0: the
        current state first), until the stream breaks."""
        call = self._stub.WatchAliases(
            registry_rpc.WatchAliasesRequest(parent="models/-", start_revision=start_revision)
        )
        try:
            async for event in call:
                yield event
        except grpc.aio.AioRpcError as error:
            raise _registry_failure(error, "the alias watch") from None
        finally:
            call.cancel()


def _registry_failure(error: grpc.aio.AioRpcError, subject: str) -> ConveyorError:
    failure = from_rpc_error(error)
    if isinstance(failure, NotFoundError | InvalidArgumentError):
        return failure
    return UnavailableError(
        f"the registry could not be asked about {subject} ({error.code().name})",
        reason="REGISTRY_UNAVAILABLE",
    )
