"""The inference service over gRPC beside a real registry: the Open Inference
Protocol's calls answered from registered ONNX versions, every bad input
refused with the right status naming the tensor, and the server healthy
afterwards."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import numpy as np
import pytest

from conveyor.inference.v1 import resources_pb2 as inference_pb
from conveyor.oip.v2 import grpc_service_pb2 as oip
from conveyor.oip.v2 import model_config_pb2
from conveyor.shared.errors import InvalidArgumentError
from conveyor.shared.health import serving_status
from tests.inference.conftest import (
    CLASSES,
    FEATURES,
    Suite,
    expected,
    infer_request,
    linear_classifier,
    probabilities,
    running_suite,
    slow_classifier,
    weights,
)
from tests.support.registry import refused

pytestmark = pytest.mark.timeout(120)
X = np.random.default_rng(5).normal(size=(3, FEATURES)).astype(np.float32)


async def test_server_health_and_metadata(suite: Suite) -> None:
    assert (await suite.oip.ServerLive(oip.ServerLiveRequest())).live
    assert (await suite.oip.ServerReady(oip.ServerReadyRequest())).ready
    metadata = await suite.oip.ServerMetadata(oip.ServerMetadataRequest())
    assert metadata.name == "conveyor-inference"
    assert "model_configuration" in metadata.extensions
    assert "statistics" in metadata.extensions


async def test_a_registered_model_is_served_through_its_production_alias(suite: Suite) -> None:
    w = weights(1)
    version = await suite.register("fraud", w)
    await suite.oip.RepositoryModelLoad(oip.RepositoryModelLoadRequest(model_name="fraud"))
    assert (await suite.oip.ModelReady(oip.ModelReadyRequest(name="fraud"))).ready

    raw = await suite.oip.ModelInfer(infer_request("fraud", X, id="r-1"))
    assert raw.id == "r-1"
    assert raw.model_name == "fraud"
    assert raw.model_version == version.rsplit("/", 1)[1]
    assert raw.raw_output_contents  # raw in, raw out
    np.testing.assert_allclose(probabilities(raw), expected(X, w), rtol=1e-5)

    typed = await suite.oip.ModelInfer(infer_request("fraud", X, raw=False))
    assert not typed.raw_output_contents
    np.testing.assert_allclose(probabilities(typed), expected(X, w), rtol=1e-5)

    metadata = await suite.oip.ModelMetadata(oip.ModelMetadataRequest(name="fraud"))
    assert metadata.platform == "onnxruntime_onnx"
    assert list(metadata.versions) == ["1"]
    assert [(t.name, t.datatype, list(t.shape)) for t in metadata.inputs] == [
        ("input", "FP32", [-1, FEATURES])
    ]
    assert [(t.name, t.datatype, list(t.shape)) for t in metadata.outputs] == [
        ("probabilities", "FP32", [-1, CLASSES])
    ]

    config = (await suite.oip.ModelConfig(oip.ModelConfigRequest(name="fraud"))).config
    assert config.max_batch_size == suite.settings.max_batch_size
    assert [(i.name, i.data_type, list(i.dims)) for i in config.input] == [
        ("input", model_config_pb2.TYPE_FP32, [FEATURES])
    ]
    assert config.dynamic_batching.max_queue_delay_microseconds == 0
    assert config.parameters["traffic"].string_value == f"{version}=100"
    assert config.parameters["execution_provider"].string_value == "CPUExecutionProvider"


async def test_the_first_request_loads_a_model_without_a_deployment(suite: Suite) -> None:
    w = weights(2)
    await suite.register("churn", w)
    response = await suite.oip.ModelInfer(infer_request("churn", X[:1]))
    np.testing.assert_allclose(probabilities(response), expected(X[:1], w), rtol=1e-5)
    status = await suite.settled("churn")
    assert status.state == inference_pb.DEPLOYMENT_STATE_READY
    [loaded] = status.versions
    assert loaded.role == inference_pb.VERSION_ROLE_TRAFFIC
    assert loaded.target == "models/churn@production"
    assert loaded.execution_provider == inference_pb.EXECUTION_PROVIDER_CPU
    assert loaded.device == "cpu"
    assert len(loaded.artifact_sha256) == 64


async def test_requested_outputs_and_an_explicit_version(suite: Suite) -> None:
    w1, w2 = weights(3), weights(4)
    await suite.register("scoring", w1)
    await suite.register("scoring", w2, alias="", create=False)
    request = infer_request("scoring", X)
    request.outputs.add(name="probabilities")
    default = await suite.oip.ModelInfer(request)
    assert default.model_version == "1"
    np.testing.assert_allclose(probabilities(default), expected(X, w1), rtol=1e-5)
    pinned = await suite.oip.ModelInfer(infer_request("scoring", X, model_version="2"))
    assert pinned.model_version == "2"
    np.testing.assert_allclose(probabilities(pinned), expected(X, w2), rtol=1e-5)
    status = await suite.settled("scoring")
    roles = {v.model_version: v.role for v in status.versions}
    assert roles == {
        "models/scoring/versions/1": inference_pb.VERSION_ROLE_TRAFFIC,
        "models/scoring/versions/2": inference_pb.VERSION_ROLE_ON_DEMAND,
    }


async def test_statistics_count_requests_batches_and_durations(suite: Suite) -> None:
    await suite.register("stats", weights(5))
    await suite.oip.RepositoryModelLoad(oip.RepositoryModelLoadRequest(model_name="stats"))
    await asyncio.gather(*(suite.oip.ModelInfer(infer_request("stats", X[:2])) for _ in range(10)))
    reply = await suite.oip.ModelStatistics(oip.ModelStatisticsRequest(name="stats"))
    [stats] = reply.model_stats
    assert (stats.name, stats.version) == ("stats", "1")
    assert stats.inference_count == 20
    assert 1 <= stats.execution_count <= 10
    assert stats.inference_stats.success.count == 10
    assert stats.inference_stats.success.ns > 0
    assert stats.inference_stats.queue.count == 10
    assert stats.inference_stats.compute_infer.count == 10
    assert sum(b.compute_infer.count for b in stats.batch_stats) == stats.execution_count
    assert sum(b.batch_size * b.compute_infer.count for b in stats.batch_stats) == 20
    assert stats.last_inference > 0


async def test_repository_index_load_and_unload(suite: Suite) -> None:
    await suite.register("listed", weights(6))
    await suite.register("idle", weights(7))
    await suite.oip.RepositoryModelLoad(oip.RepositoryModelLoadRequest(model_name="listed"))
    index = await suite.oip.RepositoryIndex(oip.RepositoryIndexRequest())
    states = {(m.name, m.version): m.state for m in index.models}
    assert states[("listed", "1")] == "READY"
    assert states[("idle", "")] == "UNAVAILABLE"
    ready_only = await suite.oip.RepositoryIndex(oip.RepositoryIndexRequest(ready=True))
    assert [m.name for m in ready_only.models] == ["listed"]

    await suite.oip.RepositoryModelUnload(oip.RepositoryModelUnloadRequest(model_name="listed"))
    await refused(
        suite.oip.ModelReady(oip.ModelReadyRequest(name="listed")), grpc.StatusCode.NOT_FOUND
    )
    await refused(
        suite.oip.RepositoryModelUnload(oip.RepositoryModelUnloadRequest(model_name="listed")),
        grpc.StatusCode.NOT_FOUND,
    )
    await refused(
        suite.oip.RepositoryModelLoad(oip.RepositoryModelLoadRequest(model_name="nothing")),
        grpc.StatusCode.NOT_FOUND,
    )
    await refused(
        suite.oip.RepositoryIndex(oip.RepositoryIndexRequest(repository_name="elsewhere")),
        grpc.StatusCode.NOT_FOUND,
    )


async def test_streaming_answers_every_request_and_reports_failures_in_band(
    suite: Suite,
) -> None:
    w = weights(8)
    await suite.register("stream", w)
    await suite.oip.RepositoryModelLoad(oip.RepositoryModelLoadRequest(model_name="stream"))

    async def requests() -> object:
        for index in range(20):
            yield infer_request("stream", X[index % 3 : index % 3 + 1], id=f"s-{index}")
        bad = infer_request("stream", X, id="bad")
        bad.inputs[0].datatype = "FP64"
        yield bad

    answers = [answer async for answer in suite.oip.ModelStreamInfer(requests())]
    assert len(answers) == 21
    by_id = {a.infer_response.id: a for a in answers}
    assert "INVALID_ARGUMENT" in by_id["bad"].error_message
    for index in range(20):
        answer = by_id[f"s-{index}"]
        assert not answer.error_message
        row = X[index % 3 : index % 3 + 1]
        np.testing.assert_allclose(
            probabilities(answer.infer_response), expected(row, w), rtol=1e-5
        )


async def test_a_streams_requests_to_a_model_off_the_event_loop_batch_together(
    suite: Suite,
) -> None:
    # Too slow to compute on the event loop: each request waits for its batch in a
    # task of its own, so a stream's requests queue behind the first and batch.
    await suite.register("slow-stream", data=slow_classifier())
    await suite.deploy(inference_pb.Deployment(model="models/slow-stream"))

    async def requests() -> object:
        for index in range(12):
            yield infer_request("slow-stream", X[index % 3 : index % 3 + 1], id=f"q-{index}")

    answers = [answer async for answer in suite.oip.ModelStreamInfer(requests(), timeout=60)]
    assert sorted(a.infer_response.id for a in answers) == sorted(f"q-{i}" for i in range(12))
    assert not [a.error_message for a in answers if a.error_message]
    [stats] = (
        await suite.oip.ModelStatistics(oip.ModelStatisticsRequest(name="slow-stream"))
    ).model_stats
    assert stats.inference_count == 12
    assert stats.execution_count < 12


@pytest.mark.parametrize(
    ("mutate", "needle"),
    [
        (lambda r: setattr(r.inputs[0], "name", "features"), "features: the model has no such"),
        (lambda r: r.inputs[0].ClearField("shape") or r.inputs[0].shape.extend([3, 5]), "input"),
        (lambda r: setattr(r.inputs[0], "datatype", "INT32"), "datatype INT32"),
        (lambda r: r.raw_input_contents.__setitem__(0, b"\x00" * 7), "input"),
        (
            lambda r: r.inputs[0].contents.fp32_contents.extend([1.0]),
            "raw_input_contents and typed",
        ),
        (lambda r: r.outputs.add(name="logits"), "logits: the model has no such output"),
    ],
    ids=["name", "shape", "datatype", "raw-length", "raw-and-typed", "output"],
)
async def test_bad_tensors_are_invalid_argument_naming_the_tensor(
    suite: Suite, mutate: object, needle: str
) -> None:
    await suite.register("strict", weights(9))
    await suite.oip.RepositoryModelLoad(oip.RepositoryModelLoadRequest(model_name="strict"))
    request = infer_request("strict", X)
    mutate(request)  # type: ignore[operator]
    error = await refused(suite.oip.ModelInfer(request), grpc.StatusCode.INVALID_ARGUMENT)
    assert isinstance(error, InvalidArgumentError)
    assert any(needle in v.description for v in error.violations), error.violations
    # Still healthy and still serving.
    assert await asyncio.to_thread(serving_status, suite.target) == "SERVING"
    await suite.oip.ModelInfer(infer_request("strict", X))


async def test_nan_unknown_models_and_versions_are_refused(suite: Suite) -> None:
    await suite.register("guarded", weights(10))
    poisoned = X.copy()
    poisoned[1, 2] = np.nan
    error = await refused(
        suite.oip.ModelInfer(infer_request("guarded", poisoned)), grpc.StatusCode.INVALID_ARGUMENT
    )
    assert isinstance(error, InvalidArgumentError)
    assert "first at index [1, 2]" in error.violations[0].description
    await refused(suite.oip.ModelInfer(infer_request("ghost", X)), grpc.StatusCode.NOT_FOUND)
    await refused(
        suite.oip.ModelInfer(infer_request("guarded", X, model_version="9")),
        grpc.StatusCode.NOT_FOUND,
    )
    await refused(
        suite.oip.ModelInfer(infer_request("guarded", X, model_version="latest")),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    await refused(suite.oip.ModelInfer(infer_request("", X)), grpc.StatusCode.INVALID_ARGUMENT)
    await refused(
        suite.oip.ModelMetadata(oip.ModelMetadataRequest(name="ghost")), grpc.StatusCode.NOT_FOUND
    )
    await refused(
        suite.oip.ModelConfig(oip.ModelConfigRequest(name="")), grpc.StatusCode.INVALID_ARGUMENT
    )
    await refused(
        suite.oip.ModelStatistics(oip.ModelStatisticsRequest(name="guarded", version="7")),
        grpc.StatusCode.NOT_FOUND,
    )


async def test_an_oversized_message_is_resource_exhausted(tmp_path: Path) -> None:
    async for suite in running_suite(tmp_path, max_receive_message_bytes=64 * 1024):
        await suite.register("small", weights(11))
        big = np.zeros((5000, FEATURES), dtype=np.float32)
        await refused(
            suite.oip.ModelInfer(infer_request("small", big)), grpc.StatusCode.RESOURCE_EXHAUSTED
        )
        assert await asyncio.to_thread(serving_status, suite.target) == "SERVING"


async def test_a_version_that_is_not_onnx_or_does_not_load_is_refused(suite: Suite) -> None:
    await suite.register("broken", data=b"not an onnx model")
    error = await refused(
        suite.oip.RepositoryModelLoad(oip.RepositoryModelLoadRequest(model_name="broken")),
        grpc.StatusCode.UNAVAILABLE,
    )
    assert "did not load" in str(error)
    status = await suite.settled("broken")
    assert status.state == inference_pb.DEPLOYMENT_STATE_FAILED
    [failed] = status.versions
    assert failed.state == inference_pb.VERSION_STATE_FAILED
    assert failed.error_message
    await refused(suite.oip.ModelInfer(infer_request("broken", X)), grpc.StatusCode.UNAVAILABLE)
    assert await asyncio.to_thread(serving_status, suite.target) == "SERVING"


async def test_fixed_batch_models_are_served_without_batching(suite: Suite) -> None:
    w = weights(12)
    await suite.register("fixed", data=linear_classifier(w, batch=1))
    response = await suite.oip.ModelInfer(infer_request("fixed", X[:1]))
    np.testing.assert_allclose(probabilities(response), expected(X[:1], w), rtol=1e-5)
    config = (await suite.oip.ModelConfig(oip.ModelConfigRequest(name="fixed"))).config
    assert config.max_batch_size == 0
    assert list(config.input[0].dims) == [1, FEATURES]
