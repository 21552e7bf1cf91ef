"""Helpers for registry tests: build requests the way a client would."""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator

import grpc
import pytest

from conveyor.registry.v1 import registry_messages_pb2 as rpc
from conveyor.registry.v1 import registry_service_pb2_grpc
from conveyor.registry.v1 import resources_pb2 as pb
from conveyor.shared.errors import ConveyorError, from_rpc_error

CHUNK = 1024 * 1024


def a_model(**fields: object) -> pb.Model:
    values: dict[str, object] = {"owner_team": "payments-ml", "risk_tier": pb.RISK_TIER_MEDIUM}
    values.update(fields)
    return pb.Model(**values)  # type: ignore[arg-type]


def a_version(**fields: object) -> pb.ModelVersion:
    values: dict[str, object] = {
        "format": pb.MODEL_FORMAT_ONNX_FP32,
        "task": pb.TASK_TYPE_BINARY_CLASSIFICATION,
        "signature": pb.ModelSignature(
            inputs=[pb.TensorSpec(name="input", dtype=pb.TENSOR_DATA_TYPE_FP32, shape=[-1, 30])],
            outputs=[
                pb.TensorSpec(name="probabilities", dtype=pb.TENSOR_DATA_TYPE_FP32, shape=[-1, 2])
            ],
        ),
        "metrics": {"accuracy": 0.97},
    }
    values.update(fields)
    return pb.ModelVersion(**values)  # type: ignore[arg-type]


async def upload_requests(
    parent: str,
    data: bytes,
    *,
    version: pb.ModelVersion | None = None,
    sha256: str | None = None,
    size_bytes: int | None = None,
    request_id: str = "",
) -> AsyncIterator[rpc.CreateModelVersionRequest]:
    yield rpc.CreateModelVersionRequest(
        metadata=rpc.CreateModelVersionMetadata(
            parent=parent,
            model_version=version or a_version(),
            sha256=sha256 or hashlib.sha256(data).hexdigest(),
            size_bytes=len(data) if size_bytes is None else size_bytes,
            request_id=request_id,
        )
    )
    for start in range(0, len(data), CHUNK):
        yield rpc.CreateModelVersionRequest(chunk=data[start : start + CHUNK])


async def create_model(
    registry: registry_service_pb2_grpc.RegistryServiceAsyncStub, model_id: str, **fields: object
) -> pb.Model:
    reply = await registry.CreateModel(
        rpc.CreateModelRequest(model_id=model_id, model=a_model(**fields)), timeout=10
    )
    return reply.model


async def create_version(
    registry: registry_service_pb2_grpc.RegistryServiceAsyncStub,
    model_id: str,
    data: bytes = b"onnx-bytes",
    **fields: object,
) -> pb.ModelVersion:
    reply = await registry.CreateModelVersion(
        upload_requests(f"models/{model_id}", data, version=a_version(**fields)), timeout=60
    )
    return reply.model_version


async def download(
    registry: registry_service_pb2_grpc.RegistryServiceAsyncStub, name: str, offset: int = 0
) -> tuple[list[rpc.DownloadArtifactResponse], bytes]:
    messages = [
        m
        async for m in registry.DownloadArtifact(
            rpc.DownloadArtifactRequest(name=name, offset=offset), timeout=60
        )
    ]
    return messages, b"".join(m.data for m in messages)


async def expect_error(call: object, code: grpc.StatusCode) -> grpc.aio.AioRpcError:
    """The failed call, after checking its status code."""
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await call  # type: ignore[misc]
    assert raised.value.code() == code, raised.value.details()
    return raised.value


async def refused(call: object, code: grpc.StatusCode) -> ConveyorError:
    """The error a call fails with (reason, violations), after checking its code."""
    return from_rpc_error(await expect_error(call, code))


async def set_alias(
    registry: registry_service_pb2_grpc.RegistryServiceAsyncStub,
    name: str,
    version: str,
    reason: str = "test",
    expected: str = "",
) -> pb.Alias:
    request = rpc.SetAliasRequest(
        name=name, version=version, reason=reason, expected_version=expected
    )
    return (await registry.SetAlias(request, timeout=10)).alias
