"""One exception root for the whole suite, and its mapping to gRPC statuses.

Service code raises a :class:`ConveyorError` subclass; the server's error
interceptor (:mod:`conveyor.shared.interceptors`) turns it into the canonical
status code with a ``google.rpc.Status`` carrying one ``ErrorInfo`` and, for bad
input, ``BadRequest`` field violations (AIP-193). Clients turn a failed call back
into the same class with :func:`from_rpc_error`.

This module needs only grpcio, protobuf and googleapis-common-protos, so the
light client can use it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2

ERROR_DOMAIN = "conveyor.dev"
"""The ``ErrorInfo.domain`` of every error Conveyor raises."""

STATUS_DETAILS_METADATA_KEY = "grpc-status-details-bin"
"""Trailing metadata key that carries the serialized ``google.rpc.Status``."""


@dataclass(frozen=True)
class FieldViolation:
    """One bad field of a request: ``field`` is a dotted path (``spec.epochs``)."""

    field: str
    description: str


class ConveyorError(Exception):
    """Root of every error Conveyor raises on purpose.

    ``reason`` is a stable UPPER_SNAKE identifier clients may branch on;
    ``metadata`` holds small string facts about the failure (never secrets).
    """

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL
    default_reason: str = "INTERNAL"

    def __init__(
        self,
        message: str,
        *,
        reason: str | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.reason = reason or self.default_reason
        self.metadata: dict[str, str] = dict(metadata or {})

    def to_status(self) -> status_pb2.Status:
        """The ``google.rpc.Status`` a server sends for this error."""
        status = status_pb2.Status(code=self.code.value[0], message=self.message)
        info = error_details_pb2.ErrorInfo(
            reason=self.reason, domain=ERROR_DOMAIN, metadata=self.metadata
        )
        status.details.append(_pack(info))
        return status


class InvalidArgumentError(ConveyorError):
    """The request is malformed; ``violations`` names each bad field."""

    code = grpc.StatusCode.INVALID_ARGUMENT
    default_reason = "INVALID_ARGUMENT"

    def __init__(
        self,
        message: str,
        *,
        violations: Iterable[FieldViolation] = (),
        reason: str | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message, reason=reason, metadata=metadata)
        self.violations = tuple(violations)

    def to_status(self) -> status_pb2.Status:
        status = super().to_status()
        if self.violations:
            bad_request = error_details_pb2.BadRequest(
                field_violations=[
                    error_details_pb2.BadRequest.FieldViolation(
                        field=v.field, description=v.description
                    )
                    for v in self.violations
                ]
            )
            status.details.append(_pack(bad_request))
        return status


def raise_if_any(violations: Iterable[FieldViolation], message: str) -> None:
    """Raise one INVALID_ARGUMENT listing every violation, if there are any;
    its message is ``message`` and the first three violations."""
    found = list(violations)
    if found:
        summary = "; ".join(f"{v.field}: {v.description}" for v in found[:3])
        raise InvalidArgumentError(f"{message}: {summary}", violations=found)


def invalid_field(field: str, description: str) -> InvalidArgumentError:
    """INVALID_ARGUMENT naming one bad field."""
    return InvalidArgumentError(
        f"{field}: {description}", violations=[FieldViolation(field, description)]
    )


class NotFoundError(ConveyorError):
    """The named resource does not exist."""

    code = grpc.StatusCode.NOT_FOUND
    default_reason = "NOT_FOUND"


class AlreadyExistsError(ConveyorError):
    """A resource with that name already exists."""

    code = grpc.StatusCode.ALREADY_EXISTS
    default_reason = "ALREADY_EXISTS"


@dataclass(frozen=True)
class PreconditionViolation:
    """One unmet precondition (``google.rpc.PreconditionFailure.Violation``):
    ``type`` is a category such as ``PROMOTION_GATE``, ``subject`` what failed
    (``metric:accuracy``), ``description`` how."""

    type: str
    subject: str
    description: str


class FailedPreconditionError(ConveyorError):
    """The system is not in a state that allows the call (a gate refused it);
    ``violations`` lists each unmet precondition."""

    code = grpc.StatusCode.FAILED_PRECONDITION
    default_reason = "FAILED_PRECONDITION"

    def __init__(
        self,
        message: str,
        *,
        violations: Iterable[PreconditionViolation] = (),
        reason: str | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message, reason=reason, metadata=metadata)
        self.violations = tuple(violations)

    def to_status(self) -> status_pb2.Status:
        status = super().to_status()
        if self.violations:
            failure = error_details_pb2.PreconditionFailure(
                violations=[
                    error_details_pb2.PreconditionFailure.Violation(
                        type=v.type, subject=v.subject, description=v.description
                    )
                    for v in self.violations
                ]
            )
            status.details.append(_pack(failure))
        return status


class AbortedError(ConveyorError):
    """A concurrent change won; the caller may retry the whole read-modify-write."""

    code = grpc.StatusCode.ABORTED
    default_reason = "ABORTED"


class PermissionDeniedError(ConveyorError):
    """The caller is known but not allowed to do this."""

    code = grpc.StatusCode.PERMISSION_DENIED
    default_reason = "PERMISSION_DENIED"


class UnauthenticatedError(ConveyorError):
    """The caller presented no valid credentials."""

    code = grpc.StatusCode.UNAUTHENTICATED
    default_reason = "UNAUTHENTICATED"


class ResourceExhaustedError(ConveyorError):
    """A queue is full or a quota is spent; retry later."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    default_reason = "RESOURCE_EXHAUSTED"


class DeadlineExceededError(ConveyorError):
    """The caller's deadline passed before the work was done."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED
    default_reason = "DEADLINE_EXCEEDED"


class UnavailableError(ConveyorError):
    """A dependency is down or the server is shutting down; retry elsewhere or later."""

    code = grpc.StatusCode.UNAVAILABLE
    default_reason = "UNAVAILABLE"


class DataLossError(ConveyorError):
    """Stored data is damaged or cannot be authenticated (an altered, truncated or
    swapped encrypted blob). Retrying will not help; restore it from a backup."""

    code = grpc.StatusCode.DATA_LOSS
    default_reason = "DATA_LOSS"


class InternalError(ConveyorError):
    """A bug. Its message never leaves the server (see the error interceptor)."""


_BY_CODE: dict[grpc.StatusCode, type[ConveyorError]] = {
    cls.code: cls
    for cls in (
        InvalidArgumentError,
        NotFoundError,
        AlreadyExistsError,
        FailedPreconditionError,
        AbortedError,
        PermissionDeniedError,
        UnauthenticatedError,
        ResourceExhaustedError,
        DeadlineExceededError,
        UnavailableError,
        DataLossError,
        InternalError,
    )
}


# A failed sync call is a grpc.Call; a failed asyncio call is an AioRpcError.
_CALL_ERRORS = (grpc.Call, grpc.aio.AioRpcError)


def status_trailing_metadata(status: status_pb2.Status) -> tuple[tuple[str, bytes], ...]:
    """Trailing metadata that carries ``status`` as gRPC's rich error details."""
    return ((STATUS_DETAILS_METADATA_KEY, status.SerializeToString()),)


MAX_MESSAGE_BYTES = 512
"""Longest status message a server sends (UTF-8): gRPC sends it percent-encoded
in a header."""
MAX_STATUS_BYTES = 4096
"""Largest serialized ``google.rpc.Status`` a server sends (base64 in a header)."""
MAX_TEXT_BYTES = 256
"""Longest field path, description or metadata value in an oversized status."""


def bounded_status(status: status_pb2.Status) -> status_pb2.Status:
    """``status`` as a server sends it: unchanged when small; otherwise with its
    texts shortened (they quote request values, which may be megabytes) and, if
    still too large, its last violations left out. Clients refuse headers past
    8 to 16 KiB: an error quoting a huge value would reach the caller as a
    RESOURCE_EXHAUSTED about metadata size instead of this status."""
    if status.ByteSize() <= MAX_STATUS_BYTES and len(status.message.encode()) <= MAX_MESSAGE_BYTES:
        return status
    info = error_details_pb2.ErrorInfo()
    bad_request = error_details_pb2.BadRequest()
    failure = error_details_pb2.PreconditionFailure()
    kept: list[Any] = []
    for detail in status.details:
        if detail.Unpack(info):
            for key in info.metadata:
                info.metadata[key] = _clip(info.metadata[key], MAX_TEXT_BYTES)
            kept.append(info)
        elif detail.Unpack(bad_request):
            for field_violation in bad_request.field_violations:
                field_violation.field = _clip(field_violation.field, MAX_TEXT_BYTES)
                field_violation.description = _clip(field_violation.description, MAX_TEXT_BYTES)
            kept.append(bad_request)
        elif detail.Unpack(failure):
            for violation in failure.violations:
                violation.subject = _clip(violation.subject, MAX_TEXT_BYTES)
                violation.description = _clip(violation.description, MAX_TEXT_BYTES)
            kept.append(failure)

    def packed() -> status_pb2.Status:
        message = _clip(status.message, MAX_MESSAGE_BYTES)
        return status_pb2.Status(code=status.code, message=message, details=map(_pack, kept))

    bounded = packed()
    while bounded.ByteSize() > MAX_STATUS_BYTES:
        if len(bad_request.field_violations) > 1:
            del bad_request.field_violations[-1]
        elif len(failure.violations) > 1:
            del failure.violations[-1]
        else:
            break
        bounded = packed()
    return bounded


def _clip(text: str, limit: int) -> str:
    """``text`` cut to ``limit`` UTF-8 bytes, ending in an ellipsis when cut."""
    data = text.encode()
    if len(data) <= limit:
        return text
    return data[: limit - 3].decode(errors="ignore") + "\u2026"


def rich_status(error: grpc.aio.AioRpcError | grpc.RpcError) -> status_pb2.Status | None:
    """The ``google.rpc.Status`` a server attached to a failed call, if any."""
    if not isinstance(error, _CALL_ERRORS):
        return None
    # grpc's sync and asyncio calls type their metadata differently; both hold pairs.
    trailing: Iterable[Any] = error.trailing_metadata() or ()
    for key, value in trailing:
        if key == STATUS_DETAILS_METADATA_KEY and isinstance(value, bytes):
            status = status_pb2.Status()
            status.ParseFromString(value)
            return status
    return None


def from_rpc_error(error: grpc.RpcError) -> ConveyorError:
    """The :class:`ConveyorError` equivalent of a failed call, details included."""
    if isinstance(error, _CALL_ERRORS):
        code, details = error.code(), error.details()
    else:
        code, details = grpc.StatusCode.UNKNOWN, str(error)
    status = rich_status(error)
    cls = _BY_CODE.get(code, ConveyorError)
    reason: str | None = None
    metadata: dict[str, str] = {}
    violations: list[FieldViolation] = []
    preconditions: list[PreconditionViolation] = []
    for detail in status.details if status else ():
        info = error_details_pb2.ErrorInfo()
        bad_request = error_details_pb2.BadRequest()
        failure = error_details_pb2.PreconditionFailure()
        if detail.Unpack(info):
            reason, metadata = info.reason, dict(info.metadata)
        elif detail.Unpack(bad_request):
            violations.extend(
                FieldViolation(v.field, v.description) for v in bad_request.field_violations
            )
        elif detail.Unpack(failure):
            preconditions.extend(
                PreconditionViolation(v.type, v.subject, v.description) for v in failure.violations
            )
    message = details or ""
    if cls is InvalidArgumentError:
        return InvalidArgumentError(
            message, violations=violations, reason=reason, metadata=metadata
        )
    if cls is FailedPreconditionError:
        return FailedPreconditionError(
            message, violations=preconditions, reason=reason, metadata=metadata
        )
    result = cls(message, reason=reason or code.name, metadata=metadata)
    result.code = code
    return result


def _pack(
    message: error_details_pb2.ErrorInfo
    | error_details_pb2.BadRequest
    | error_details_pb2.PreconditionFailure,
) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)
    return packed


__all__ = [
    "ERROR_DOMAIN",
    "AbortedError",
    "AlreadyExistsError",
    "ConveyorError",
    "DataLossError",
    "DeadlineExceededError",
    "FailedPreconditionError",
    "FieldViolation",
    "InternalError",
    "InvalidArgumentError",
    "NotFoundError",
    "PermissionDeniedError",
    "PreconditionViolation",
    "ResourceExhaustedError",
    "UnauthenticatedError",
    "UnavailableError",
    "bounded_status",
    "from_rpc_error",
    "rich_status",
    "status_trailing_metadata",
]
