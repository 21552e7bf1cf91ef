"""Error mapping as pure logic: ConveyorError <-> google.rpc.Status."""

from __future__ import annotations

import grpc
from google.rpc import error_details_pb2

from conveyor.shared import errors


def test_status_carries_error_info_and_field_violations() -> None:
    error = errors.InvalidArgumentError(
        "two bad fields",
        violations=[
            errors.FieldViolation("page_size", "must not be negative"),
            errors.FieldViolation("filter", "unknown field 'colour'"),
        ],
        metadata={"request": "ListModels"},
    )
    status = error.to_status()
    assert status.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert status.message == "two bad fields"
    info = error_details_pb2.ErrorInfo()
    bad_request = error_details_pb2.BadRequest()
    assert status.details[0].Unpack(info)
    assert (info.reason, info.domain) == ("INVALID_ARGUMENT", errors.ERROR_DOMAIN)
    assert dict(info.metadata) == {"request": "ListModels"}
    assert status.details[1].Unpack(bad_request)
    assert [v.field for v in bad_request.field_violations] == ["page_size", "filter"]


def test_every_family_has_its_canonical_code() -> None:
    expected = {
        errors.NotFoundError: grpc.StatusCode.NOT_FOUND,
        errors.AlreadyExistsError: grpc.StatusCode.ALREADY_EXISTS,
        errors.FailedPreconditionError: grpc.StatusCode.FAILED_PRECONDITION,
        errors.AbortedError: grpc.StatusCode.ABORTED,
        errors.PermissionDeniedError: grpc.StatusCode.PERMISSION_DENIED,
        errors.UnauthenticatedError: grpc.StatusCode.UNAUTHENTICATED,
        errors.ResourceExhaustedError: grpc.StatusCode.RESOURCE_EXHAUSTED,
        errors.DeadlineExceededError: grpc.StatusCode.DEADLINE_EXCEEDED,
        errors.UnavailableError: grpc.StatusCode.UNAVAILABLE,
        errors.DataLossError: grpc.StatusCode.DATA_LOSS,
        errors.InternalError: grpc.StatusCode.INTERNAL,
    }
    for cls, code in expected.items():
        error = cls("boom")
        assert error.code == code
        assert error.to_status().code == code.value[0]
        assert issubclass(cls, errors.ConveyorError)
