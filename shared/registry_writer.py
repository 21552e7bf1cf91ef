"""Registering a model version and its reports, as services do it.

The trainer registers what it trained and the optimizer what it optimised:
both upload a version (``CreateModelVersion``, a client stream of metadata
then chunks) and attach a report to it, idempotently (the caller derives the
``request_id`` of each from its own job, so a retry or a restart creates
nothing twice), retrying with backoff while the registry is unavailable.
:class:`RegistryWriter` is that, once.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Final, TypeVar

import grpc

from conveyor.registry.v1 import registry_messages_pb2 as registry_rpc
from conveyor.registry.v1 import registry_service_pb2_grpc
from conveyor.registry.v1 import resources_pb2 as registry_pb
from conveyor.shared.errors import AlreadyExistsError, from_rpc_error

logger = logging.getLogger(__name__)

UPLOAD_CHUNK_BYTES: Final = 1024 * 1024
RETRYABLE: Final = (
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.ABORTED,
)
T = TypeVar("T")


class RegistryWriteError(Exception):
    """The registry refused a write, or stayed unavailable through every attempt."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class RegistryWriter:
    """Creates versions and attachments in the registry, retrying while it is away."""

    def __init__(
        self,
        stub: registry_service_pb2_grpc.RegistryServiceAsyncStub,
        *,
        attempts: int = 5,
        backoff_s: float = 0.5,
    ) -> None:
        self._stub = stub
        self._attempts = attempts
        self._backoff_s = backoff_s

    async def create_version(
        self, parent: str, version: registry_pb.ModelVersion, data: bytes, *, request_id: str
    ) -> registry_pb.ModelVersion:
        """Register ``version`` with the artifact ``data`` in model ``parent``."""
        metadata = registry_rpc.CreateModelVersionMetadata(
            parent=parent,
            model_version=version,
            sha256=hashlib.sha256(data).hexdigest(),
            size_bytes=len(data),
            request_id=request_id,
        )

        async def upload() -> registry_pb.ModelVersion:
            response = await self._stub.CreateModelVersion(_upload_requests(metadata, data))
            return response.model_version

        return await self.retrying(upload, f"registering in {parent}")

    async def attach(self, request: registry_rpc.CreateAttachmentRequest) -> None:
        """Create the attachment (one that already exists counts as created:
        an earlier attempt whose answer was lost made it)."""

        async def attach() -> None:
            try:
                await self._stub.CreateAttachment(request)
            except grpc.aio.AioRpcError as error:
                if not isinstance(from_rpc_error(error), AlreadyExistsError):
                    raise

        await self.retrying(attach, f"attaching {request.attachment_id} to {request.parent}")

    async def retrying(self, call: Callable[[], Awaitable[T]], what: str) -> T:
        """``call()``, tried again with doubling backoff while the registry is
        unavailable; :class:`RegistryWriteError` once it refuses or every
        attempt failed."""
        delay = self._backoff_s
        for attempt in range(1, self._attempts + 1):
            try:
                return await call()
            except grpc.aio.AioRpcError as error:
                failure = from_rpc_error(error)
                if error.code() not in RETRYABLE or attempt == self._attempts:
                    raise RegistryWriteError(
                        error.code(), f"{what} failed ({error.code().name}): {failure.message}"
                    ) from None
                logger.warning(
                    "registry write failed; retrying",
                    extra={"attempt": attempt, "code": error.code().name},
                )
            await asyncio.sleep(delay)
            delay *= 2
        raise AssertionError("unreachable")  # the loop returns or raises


async def _upload_requests(
    metadata: registry_rpc.CreateModelVersionMetadata, data: bytes
) -> AsyncIterator[registry_rpc.CreateModelVersionRequest]:
    yield registry_rpc.CreateModelVersionRequest(metadata=metadata)
    for start in range(0, len(data), UPLOAD_CHUNK_BYTES):
        yield registry_rpc.CreateModelVersionRequest(chunk=data[start : start + UPLOAD_CHUNK_BYTES])
