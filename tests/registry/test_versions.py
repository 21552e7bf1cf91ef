"""Versions and artifacts: streamed uploads and downloads, numbering, metadata."""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
import pytest
from google.protobuf.field_mask_pb2 import FieldMask

from conveyor.registry.v1 import registry_messages_pb2 as rpc
from conveyor.registry.v1 import registry_service_pb2_grpc
from conveyor.registry.v1 import resources_pb2 as pb
from conveyor.services.registry.settings import RegistrySettings
from conveyor.shared.errors import from_rpc_error
from tests.support.registry import (
    a_version,
    create_model,
    create_version,
    download,
    expect_error,
    upload_requests,
)

if TYPE_CHECKING:
    Registry = registry_service_pb2_grpc.RegistryServiceAsyncStub

MIB = 1024 * 1024


def stored_blobs(settings: RegistrySettings) -> list[Path]:
    return sorted((settings.service_data_dir / "blobs" / "sha256").glob("*/*"))


def temporary_files(settings: RegistrySettings) -> list[Path]:
    return sorted((settings.service_data_dir / "blobs" / "tmp").iterdir())


async def versions_of(registry: Registry, model: str, **fields: object) -> list[str]:
    reply = await registry.ListModelVersions(
        rpc.ListModelVersionsRequest(parent=f"models/{model}", page_size=1000, **fields),  # type: ignore[arg-type]
        timeout=10,
    )
    return [v.name for v in reply.model_versions]


async def test_large_artifact_round_trips_and_resumes(
    registry: Registry, registry_settings: RegistrySettings
) -> None:
    data = os.urandom(64 * MIB + 123)
    await create_model(registry, "big")
    version = await create_version(registry, "big", data)
    assert version.artifact.size_bytes == len(data)
    assert version.artifact.sha256 == hashlib.sha256(data).hexdigest()

    messages, received = await download(registry, "models/big@latest")
    assert received == data
    assert messages[0].model_version == "models/big/versions/1"
    assert messages[0].artifact.sha256 == version.artifact.sha256
    assert [m.offset for m in messages] == list(range(0, len(data), MIB))
    assert all(not m.HasField("artifact") for m in messages[1:])

    # Resume a download cut off after 10 MiB + 5 bytes, by the resolved name.
    offset = 10 * MIB + 5
    resumed, rest = await download(registry, messages[0].model_version, offset=offset)
    assert resumed[0].offset == offset
    assert received[:offset] + rest == data
    _, nothing = await download(registry, version.name, offset=len(data))
    assert nothing == b""
    error = await expect_error(
        download(registry, version.name, offset=len(data) + 1), grpc.StatusCode.INVALID_ARGUMENT
    )
    assert from_rpc_error(error).violations[0].field == "offset"


async def test_identical_content_is_stored_once(
    registry: Registry, registry_settings: RegistrySettings
) -> None:
    await create_model(registry, "a")
    await create_model(registry, "b")
    first = await create_version(registry, "a", b"same bytes")
    second = await create_version(registry, "b", b"same bytes")
    assert first.artifact.sha256 == second.artifact.sha256
    assert len(stored_blobs(registry_settings)) == 1


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"sha256": "0" * 64}, "metadata.sha256"),
        ({"sha256": "not-hex"}, "metadata.sha256"),
        ({"size_bytes": 3}, "metadata.size_bytes"),
        ({"size_bytes": 10**6}, "metadata.size_bytes"),
    ],
)
async def test_bad_digest_or_size_leaves_nothing(
    registry: Registry,
    registry_settings: RegistrySettings,
    change: dict[str, object],
    field: str,
) -> None:
    await create_model(registry, "m")
    data = b"x" * 100
    error = await expect_error(
        registry.CreateModelVersion(upload_requests("models/m", data, **change), timeout=30),  # type: ignore[arg-type]
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    found = from_rpc_error(error)
    assert [v.field for v in found.violations] == [field]
    assert await versions_of(registry, "m") == []
    assert stored_blobs(registry_settings) == []
    assert temporary_files(registry_settings) == []


async def test_empty_artifacts_and_streams_without_metadata_are_refused(
    registry: Registry,
) -> None:
    await create_model(registry, "m")
    error = await expect_error(
        registry.CreateModelVersion(upload_requests("models/m", b""), timeout=10),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert "metadata.size_bytes" in {v.field for v in from_rpc_error(error).violations}

    async def chunks_only() -> AsyncIterator[rpc.CreateModelVersionRequest]:
        yield rpc.CreateModelVersionRequest(chunk=b"abc")

    await expect_error(
        registry.CreateModelVersion(chunks_only(), timeout=10), grpc.StatusCode.INVALID_ARGUMENT
    )

    async def nothing() -> AsyncIterator[rpc.CreateModelVersionRequest]:
        return
        yield  # an empty stream

    await expect_error(
        registry.CreateModelVersion(nothing(), timeout=10), grpc.StatusCode.INVALID_ARGUMENT
    )
    assert await versions_of(registry, "m") == []


async def test_bad_metadata_names_each_field(registry: Registry) -> None:
    await create_model(registry, "m")
    version = pb.ModelVersion(
        format=pb.MODEL_FORMAT_TORCH_STATE_DICT,
        metrics={"accuracy": float("nan")},
        lineage=pb.Lineage(parent_version="models/m@production", training_job="jobs/x"),
        labels={"Bad": "x"},
    )
    error = await expect_error(
        registry.CreateModelVersion(upload_requests("models/m", b"w", version=version), timeout=10),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    fields = {v.field for v in from_rpc_error(error).violations}
    assert fields == {
        "metadata.model_version.architecture.name",
        "metadata.model_version.metrics[accuracy]",
        "metadata.model_version.lineage.parent_version",
        "metadata.model_version.lineage.training_job",
        "metadata.model_version.labels",
    }
    missing = await expect_error(
        registry.CreateModelVersion(upload_requests("models/nope", b"w"), timeout=10),
        grpc.StatusCode.NOT_FOUND,
    )
    assert from_rpc_error(missing).reason == "MODEL_NOT_FOUND"


async def test_cancelled_upload_leaves_nothing_visible(
    registry: Registry, registry_settings: RegistrySettings
) -> None:
    await create_model(registry, "m")
    sent = asyncio.Event()

    async def stalls_midway() -> AsyncIterator[rpc.CreateModelVersionRequest]:
        requests = upload_requests("models/m", os.urandom(8 * MIB))
        for _ in range(4):
            yield await anext(requests)
        sent.set()
        await asyncio.Event().wait()  # the client never finishes

    call = registry.CreateModelVersion(stalls_midway(), timeout=30)
    await asyncio.wait_for(sent.wait(), 10)
    await asyncio.sleep(0.2)  # let the server take in what was sent
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call
    for _ in range(50):  # the server notices the cancellation asynchronously
        if not temporary_files(registry_settings):
            break
        await asyncio.sleep(0.1)
    assert temporary_files(registry_settings) == []
    assert stored_blobs(registry_settings) == []
    assert await versions_of(registry, "m") == []
    assert (await create_version(registry, "m")).name == "models/m/versions/1"


async def test_concurrent_creates_number_versions_without_gaps(registry: Registry) -> None:
    await create_model(registry, "busy")

    async def client(index: int) -> list[str]:
        return [
            (await create_version(registry, "busy", f"{index}-{n}".encode())).name for n in range(5)
        ]

    created = await asyncio.gather(*(client(i) for i in range(8)))
    numbers = sorted(int(name.rsplit("/", 1)[1]) for names in created for name in names)
    assert numbers == list(range(1, 41))
    model = await registry.GetModel(rpc.GetModelRequest(name="models/busy"), timeout=10)
    assert model.model.latest_version == "models/busy/versions/40"


async def test_retried_upload_returns_the_same_version_without_the_bytes(
    registry: Registry,
) -> None:
    await create_model(registry, "m")
    data = os.urandom(3 * MIB)
    first = await registry.CreateModelVersion(
        upload_requests("models/m", data, request_id="upload-1"), timeout=30
    )

    async def metadata_only() -> AsyncIterator[rpc.CreateModelVersionRequest]:
        yield await anext(upload_requests("models/m", data, request_id="upload-1"))

    again = await registry.CreateModelVersion(metadata_only(), timeout=30)
    assert again.model_version == first.model_version
    assert await versions_of(registry, "m") == ["models/m/versions/1"]
    conflict = await expect_error(
        registry.CreateModelVersion(
            upload_requests("models/m", b"other", request_id="upload-1"), timeout=30
        ),
        grpc.StatusCode.ALREADY_EXISTS,
    )
    assert from_rpc_error(conflict).reason == "REQUEST_ID_CONFLICT"


async def test_get_resolves_latest_and_views(registry: Registry) -> None:
    await create_model(registry, "m")
    await create_version(registry, "m", b"1", model_card="# Card")
    await create_version(registry, "m", b"2", model_card="# Card 2")
    latest = await registry.GetModelVersion(
        rpc.GetModelVersionRequest(name="models/m@latest"), timeout=10
    )
    assert (latest.model_version.name, latest.model_version.model_card) == (
        "models/m/versions/2",
        "# Card 2",
    )
    basic = await registry.GetModelVersion(
        rpc.GetModelVersionRequest(name="models/m/versions/1", view=pb.MODEL_VERSION_VIEW_BASIC),
        timeout=10,
    )
    assert basic.model_version.model_card == ""
    for name, code in [
        ("models/m/versions/3", grpc.StatusCode.NOT_FOUND),
        ("models/m@production", grpc.StatusCode.NOT_FOUND),
        ("models/m/versions/0", grpc.StatusCode.INVALID_ARGUMENT),
        ("models/m/versions/x", grpc.StatusCode.INVALID_ARGUMENT),
    ]:
        await expect_error(
            registry.GetModelVersion(rpc.GetModelVersionRequest(name=name), timeout=10), code
        )


async def test_list_versions_filters_and_orders(registry: Registry) -> None:
    await create_model(registry, "m")
    await create_model(registry, "other")
    for accuracy, fmt in [
        (0.91, pb.MODEL_FORMAT_ONNX_FP32),
        (0.97, pb.MODEL_FORMAT_ONNX_INT8_STATIC),
        (0.95, pb.MODEL_FORMAT_ONNX_FP32),
    ]:
        await create_version(
            registry, "m", str(accuracy).encode(), metrics={"accuracy": accuracy}, format=fmt
        )
    await create_version(registry, "m", b"no metric", metrics={}, labels={"stage": "exp"})
    await create_version(
        registry,
        "other",
        b"x",
        lineage=pb.Lineage(parent_version="models/m/versions/1", transformation="int8_static"),
    )

    assert await versions_of(registry, "m") == [f"models/m/versions/{i}" for i in (4, 3, 2, 1)]
    by_metric = await versions_of(registry, "m", order_by="metrics.accuracy desc")
    assert by_metric == [f"models/m/versions/{i}" for i in (2, 3, 1, 4)]
    assert await versions_of(registry, "m", filter="metrics.accuracy>=0.95") == [
        "models/m/versions/3",
        "models/m/versions/2",
    ]
    assert await versions_of(registry, "m", filter="format=ONNX_INT8_STATIC") == [
        "models/m/versions/2"
    ]
    assert await versions_of(registry, "m", filter='labels.stage="exp"') == ["models/m/versions/4"]
    everything = await registry.ListModelVersions(
        rpc.ListModelVersionsRequest(
            parent="models/-", filter='lineage.parent_version="models/m/versions/1"'
        ),
        timeout=10,
    )
    assert [v.name for v in everything.model_versions] == ["models/other/versions/1"]
    for bad in (
        {"filter": "metrics.accuracy>=high"},
        {"order_by": "sha256"},
        {"filter": 'create_time>"yesterday"'},
    ):
        await expect_error(
            registry.ListModelVersions(
                rpc.ListModelVersionsRequest(parent="models/m", **bad),  # type: ignore[arg-type]
                timeout=10,
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
        )


async def test_update_version_changes_only_mutable_fields(registry: Registry) -> None:
    await create_model(registry, "m")
    created = await create_version(registry, "m")
    change = pb.ModelVersion(
        name=created.name, description="tuned", labels={"k": "v"}, metrics={"accuracy": 1.0}
    )
    reply = await registry.UpdateModelVersion(
        rpc.UpdateModelVersionRequest(
            model_version=change, update_mask=FieldMask(paths=["description", "labels"])
        ),
        timeout=10,
    )
    assert (reply.model_version.description, dict(reply.model_version.labels)) == (
        "tuned",
        {"k": "v"},
    )
    assert dict(reply.model_version.metrics) == dict(created.metrics)
    for path in ("metrics", "artifact", "lineage", "format"):
        await expect_error(
            registry.UpdateModelVersion(
                rpc.UpdateModelVersionRequest(
                    model_version=change, update_mask=FieldMask(paths=[path])
                ),
                timeout=10,
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
        )
    statistics = pb.ReferenceStatistics(row_count=10)
    with_reference = pb.ModelVersion(name=created.name, reference_statistics=statistics)
    mask = FieldMask(paths=["reference_statistics"])
    await registry.UpdateModelVersion(
        rpc.UpdateModelVersionRequest(model_version=with_reference, update_mask=mask), timeout=10
    )
    moved = await expect_error(
        registry.UpdateModelVersion(
            rpc.UpdateModelVersionRequest(model_version=with_reference, update_mask=mask),
            timeout=10,
        ),
        grpc.StatusCode.FAILED_PRECONDITION,
    )
    assert from_rpc_error(moved).reason == "REFERENCE_STATISTICS_SET"


async def test_archived_versions_are_hidden_but_readable(registry: Registry) -> None:
    await create_model(registry, "m")
    first = await create_version(registry, "m", b"1")
    await create_version(registry, "m", b"2")
    archived = await registry.ArchiveModelVersion(
        rpc.ArchiveModelVersionRequest(name=first.name), timeout=10
    )
    assert archived.model_version.stage == pb.STAGE_ARCHIVED
    assert await versions_of(registry, "m") == ["models/m/versions/2"]
    assert len(await versions_of(registry, "m", show_archived=True)) == 2
    _, data = await download(registry, first.name)
    assert data == b"1"
    await registry.UnarchiveModelVersion(
        rpc.UnarchiveModelVersionRequest(name=first.name), timeout=10
    )
    assert len(await versions_of(registry, "m")) == 2
    await expect_error(
        registry.ArchiveModelVersion(
            rpc.ArchiveModelVersionRequest(name="models/m@latest"), timeout=10
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
    )


async def test_oversized_metadata_is_refused(registry: Registry) -> None:
    await create_model(registry, "m")
    huge = a_version(model_card="x" * (5 * MIB))
    error = await expect_error(
        registry.CreateModelVersion(upload_requests("models/m", b"w", version=huge), timeout=30),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert [v.field for v in from_rpc_error(error).violations] == ["metadata"]
    card = a_version(model_card="x" * (300 * 1024))
    error = await expect_error(
        registry.CreateModelVersion(upload_requests("models/m", b"w", version=card), timeout=30),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert [v.field for v in from_rpc_error(error).violations] == [
        "metadata.model_version.model_card"
    ]
    assert await versions_of(registry, "m") == []
