"""A real registry and a real inference server, in-process on port 0, and small
ONNX models whose answers the tests compute themselves.

Each model version here is ``probabilities = softmax(input @ W)`` with its own
``W``, so which version answered a request is visible in the numbers.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import numpy.typing as npt
import pytest
from onnx import TensorProto, helper, numpy_helper

from conveyor.inference.v1 import inference_messages_pb2 as inference_rpc
from conveyor.inference.v1 import inference_service_pb2_grpc
from conveyor.inference.v1 import resources_pb2 as inference_pb
from conveyor.oip.v2 import grpc_service_pb2 as oip
from conveyor.oip.v2 import grpc_service_pb2_grpc
from conveyor.registry.v1 import registry_service_pb2_grpc
from conveyor.registry.v1 import resources_pb2 as registry_pb
from conveyor.services.inference.server import build_server as build_inference
from conveyor.services.inference.settings import InferenceSettings
from conveyor.services.registry.server import build_server as build_registry
from conveyor.services.registry.settings import RegistrySettings
from conveyor.shared.server import ConveyorServer
from tests.support.registry import a_version, create_model, set_alias, upload_requests
from tests.support.suite import free_port

FEATURES = 4
CLASSES = 2


def weights(seed: int) -> npt.NDArray[np.float32]:
    return np.random.default_rng(seed).normal(size=(FEATURES, CLASSES)).astype(np.float32)


def linear_classifier(w: npt.NDArray[np.float32], *, batch: str | int = "batch") -> bytes:
    """probabilities = softmax(input @ w), input [batch, 4] -> [batch, 2]."""
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["input", "w"], ["logits"]),
            helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1),
        ],
        "classifier",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [batch, FEATURES])],
        [
            helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, [batch, CLASSES]),
        ],
        initializer=[numpy_helper.from_array(w, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)
    return model.SerializeToString()


def slow_classifier(width: int = 1024, rows: int = 64, depth: int = 32) -> bytes:
    """A classifier that takes tens of milliseconds a request: each row is
    spread into a ``rows`` x ``width`` matrix multiplied ``depth`` times by one
    identity matrix (so the values stay as they are), then averaged back."""
    nodes = [
        helper.make_node("MatMul", ["input", "up"], ["spread"]),
        helper.make_node("Unsqueeze", ["spread", "axis1"], ["row"]),
        helper.make_node("Expand", ["row", "block"], ["h0"]),
    ]
    for index in range(depth):
        nodes.append(helper.make_node("MatMul", [f"h{index}", "square"], [f"h{index + 1}"]))
    nodes += [
        helper.make_node("ReduceMean", [f"h{depth}", "axis1"], ["mean"], keepdims=0),
        helper.make_node("MatMul", ["mean", "down"], ["logits"]),
        helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1),
    ]
    rng = np.random.default_rng(0)
    graph = helper.make_graph(
        nodes,
        "slow",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", FEATURES])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["batch", CLASSES])],
        initializer=[
            numpy_helper.from_array(rng.normal(size=(FEATURES, width)).astype(np.float32), "up"),
            numpy_helper.from_array(np.array([1], dtype=np.int64), "axis1"),
            numpy_helper.from_array(np.array([1, rows, width], dtype=np.int64), "block"),
            numpy_helper.from_array(np.eye(width, dtype=np.float32), "square"),
            numpy_helper.from_array(rng.normal(size=(width, CLASSES)).astype(np.float32), "down"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)
    return model.SerializeToString()


def expected(x: npt.NDArray[np.float32], w: npt.NDArray[np.float32]) -> npt.NDArray[np.float64]:
    logits = x.astype(np.float64) @ w
    exp = np.exp(logits - logits.max(axis=1, keepdims=True))
    return exp / exp.sum(axis=1, keepdims=True)


def signature() -> registry_pb.ModelSignature:
    return registry_pb.ModelSignature(
        inputs=[
            registry_pb.TensorSpec(
                name="input", dtype=registry_pb.TENSOR_DATA_TYPE_FP32, shape=[-1, FEATURES]
            )
        ],
        outputs=[
            registry_pb.TensorSpec(
                name="probabilities", dtype=registry_pb.TENSOR_DATA_TYPE_FP32, shape=[-1, CLASSES]
            )
        ],
    )


def infer_request(
    model: str, x: npt.NDArray[np.float32], *, raw: bool = True, **fields: Any
) -> oip.ModelInferRequest:
    request = oip.ModelInferRequest(model_name=model, **fields)
    tensor = request.inputs.add(name="input", datatype="FP32", shape=list(x.shape))
    if raw:
        request.raw_input_contents.append(x.astype("<f4").tobytes())
    else:
        tensor.contents.fp32_contents.extend(x.reshape(-1).tolist())
    return request


def probabilities(response: oip.ModelInferResponse) -> npt.NDArray[np.float32]:
    [output] = response.outputs
    if response.raw_output_contents:
        values = np.frombuffer(response.raw_output_contents[0], dtype="<f4")
    else:
        values = np.asarray(output.contents.fp32_contents, dtype=np.float32)
    return values.reshape(tuple(output.shape))


@dataclass
class Suite:
    """A registry and an inference server with stubs to both."""

    registry_server: ConveyorServer
    inference_server: ConveyorServer
    registry: Any
    oip: Any
    management: Any
    settings: InferenceSettings

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.inference_server.port}"

    async def register(
        self,
        model_id: str,
        w: npt.NDArray[np.float32] | None = None,
        *,
        data: bytes | None = None,
        alias: str = "production",
        create: bool = True,
        **fields: Any,
    ) -> str:
        """Register a version (the model created when ``create``), point
        ``alias`` at it (none when empty); the version's name."""
        if create:
            await create_model(self.registry, model_id)
        payload = (
            data if data is not None else linear_classifier(w if w is not None else weights(0))
        )
        fields.setdefault("signature", signature())
        version = a_version(**fields)
        reply = await self.registry.CreateModelVersion(
            upload_requests(f"models/{model_id}", payload, version=version), timeout=60
        )
        name = str(reply.model_version.name)
        if alias:
            await set_alias(self.registry, f"models/{model_id}/aliases/{alias}", name)
        return name

    async def deploy(self, deployment: inference_pb.Deployment) -> inference_pb.DeploymentStatus:
        """Create ``deployment`` and wait until it has loaded."""
        await self.management.CreateDeployment(
            inference_rpc.CreateDeploymentRequest(deployment=deployment), timeout=30
        )
        return await self.settled(deployment.model.removeprefix("models/"))

    async def settled(
        self,
        model_id: str,
        until: Callable[[inference_pb.DeploymentStatus], bool] | None = None,
        timeout_s: float = 60,
    ) -> inference_pb.DeploymentStatus:
        """The deployment's status once it is no longer loading or updating
        (and ``until`` holds)."""
        loop = asyncio.get_running_loop()
        give_up = loop.time() + timeout_s
        while True:
            reply = await self.management.GetDeploymentStatus(
                inference_rpc.GetDeploymentStatusRequest(name=f"deployments/{model_id}"),
                timeout=10,
            )
            status = reply.status
            busy = status.state in (
                inference_pb.DEPLOYMENT_STATE_LOADING,
                inference_pb.DEPLOYMENT_STATE_UPDATING,
            )
            if not busy and (until is None or until(status)):
                return status
            if loop.time() > give_up:
                raise AssertionError(f"deployment did not settle: {status}")
            await asyncio.sleep(0.05)


@pytest.fixture(autouse=True)
def alone(monkeypatch: pytest.MonkeyPatch) -> None:
    """Inference and the registry by themselves: no authentication, no gates."""
    monkeypatch.setenv("CONVEYOR_AUTH_MODE", "off")
    monkeypatch.setenv("CONVEYOR_REGISTRY_PROMOTION_GATE", "off")


async def running_suite(tmp_path: Path, **settings: Any) -> AsyncIterator[Suite]:
    registry_server = await build_registry(
        RegistrySettings(data_dir=tmp_path, shutdown_grace=timedelta(seconds=1))
    )
    values: dict[str, Any] = {
        "data_dir": tmp_path,
        "shutdown_grace": timedelta(seconds=1),
        "registry_addr": f"127.0.0.1:{registry_server.port}",
        "monitor_addr": f"127.0.0.1:{free_port()}",
        "metrics_listen": "127.0.0.1:0",
        "config_poll_interval": timedelta(milliseconds=100),
        "drain_timeout": timedelta(seconds=5),
    }
    values.update(settings)
    inference_settings = InferenceSettings(**values)
    inference_server = await build_inference(inference_settings)
    channels = [
        grpc.aio.insecure_channel(f"127.0.0.1:{registry_server.port}"),
        grpc.aio.insecure_channel(f"127.0.0.1:{inference_server.port}"),
    ]
    try:
        yield Suite(
            registry_server,
            inference_server,
            registry_service_pb2_grpc.RegistryServiceStub(channels[0]),
            grpc_service_pb2_grpc.GRPCInferenceServiceStub(channels[1]),
            inference_service_pb2_grpc.InferenceManagementServiceStub(channels[1]),
            inference_settings,
        )
    finally:
        for channel in channels:
            await channel.close(None)
        await inference_server.shutdown()
        await registry_server.shutdown()


@pytest.fixture
async def suite(tmp_path: Path) -> AsyncIterator[Suite]:
    async for running in running_suite(tmp_path):
        yield running
