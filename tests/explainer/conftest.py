"""A real registry, inference service and explainer in this process on port 0,
and the trained breast-cancer MLP and digits CNN exported to ONNX, served by
inference and also run here by ONNX Runtime (the local prediction function
the libraries are called with directly, to compare)."""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import numpy.typing as npt
import onnxruntime
import pytest
from onnx import TensorProto, helper, numpy_helper

from conveyor.explainer.v1 import explainer_service_pb2_grpc
from conveyor.inference.v1 import resources_pb2 as inference_pb
from conveyor.oip.v2 import grpc_service_pb2 as oip
from conveyor.registry.v1 import resources_pb2 as registry_pb
from conveyor.services.explainer.server import build_server as build_explainer
from conveyor.services.explainer.settings import ExplainerSettings
from conveyor.services.optimizer.transforms import export_onnx
from conveyor.services.trainer.architectures import ProbabilityOutput
from conveyor.shared.server import ConveyorServer
from tests.inference.conftest import Suite as InferenceSuite
from tests.inference.conftest import running_suite
from tests.support.trained import Trained, breast_cancer_mlp, digits_cnn

FloatArray = npt.NDArray[np.float64]
MAX_BATCH = 4096


@dataclass(frozen=True)
class ServedModel:
    """An ONNX model as registered (signature, reference statistics) and as
    run locally."""

    version: registry_pb.ModelVersion
    onnx: bytes

    @functools.cached_property
    def session(self) -> onnxruntime.InferenceSession:
        return onnxruntime.InferenceSession(self.onnx, providers=["CPUExecutionProvider"])

    def predict(self, rows: FloatArray) -> FloatArray:
        """The model's output rows, computed here (``rows``: ``[n, *instance]``)."""
        shape = tuple(self.version.signature.inputs[0].shape[1:])
        batch = np.asarray(rows, dtype=np.float32).reshape(len(rows), *shape)
        [outputs] = self.session.run(None, {"input": batch})
        return np.asarray(outputs, dtype=np.float64).reshape(len(rows), -1)


def served(trained: Trained) -> ServedModel:
    source = trained.source
    # As the optimizer's ONNX export: the classifier with its softmax, so the
    # output is the signature's class probabilities.
    data = export_onnx(ProbabilityOutput(source.pytorch_model()), source.input_shape, opset=18)
    version = registry_pb.ModelVersion(
        format=registry_pb.MODEL_FORMAT_ONNX_FP32,
        task=source.version.task,
        signature=source.version.signature,
        reference_statistics=source.version.reference_statistics,
        metrics=dict(source.version.metrics),
    )
    return ServedModel(version, data)


@pytest.fixture(scope="session")
def mlp_model() -> ServedModel:
    return served(breast_cancer_mlp())


@pytest.fixture(scope="session")
def cnn_model() -> ServedModel:
    return served(digits_cnn())


def synthetic_model() -> ServedModel:
    """``p = sigmoid(3*x0 - 2*x3)`` over 6 features, two outputs ``[1 - p, p]``:
    only features 0 and 3 matter. Its reference sample is standard normal."""
    coefficients = np.zeros((6, 1), dtype=np.float32)
    coefficients[0, 0], coefficients[3, 0] = 3.0, -2.0
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["input", "w"], ["z"]),
            helper.make_node("Sigmoid", ["z"], ["p"]),
            helper.make_node("Sub", ["one", "p"], ["q"]),
            helper.make_node("Concat", ["q", "p"], ["probabilities"], axis=1),
        ],
        "synthetic",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 6])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["batch", 2])],
        initializer=[
            numpy_helper.from_array(coefficients, "w"),
            numpy_helper.from_array(np.ones((1, 1), dtype=np.float32), "one"),
        ],
    )
    onnx_model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10
    )
    sample = np.random.default_rng(0).normal(size=(300, 6))
    version = registry_pb.ModelVersion(
        format=registry_pb.MODEL_FORMAT_ONNX_FP32,
        task=registry_pb.TASK_TYPE_BINARY_CLASSIFICATION,
        signature=registry_pb.ModelSignature(
            inputs=[
                registry_pb.TensorSpec(
                    name="input",
                    dtype=registry_pb.TENSOR_DATA_TYPE_FP32,
                    shape=[-1, 6],
                    feature_names=[f"x{i}" for i in range(6)],
                )
            ],
            outputs=[
                registry_pb.TensorSpec(
                    name="probabilities",
                    dtype=registry_pb.TENSOR_DATA_TYPE_FP32,
                    shape=[-1, 2],
                    class_names=["no", "yes"],
                )
            ],
        ),
        reference_statistics=registry_pb.ReferenceStatistics(
            row_count=300,
            sample=registry_pb.ReferenceSample(column_count=6, values=sample.reshape(-1).tolist()),
        ),
    )
    return ServedModel(version, onnx_model.SerializeToString())


@dataclass
class Suite:
    """The registry, inference and the explainer, with stubs."""

    inference: InferenceSuite
    explainer_server: ConveyorServer
    explainer: Any
    registry: Any
    channel: grpc.aio.Channel
    """The channel to the explainer."""

    async def serve(self, model_id: str, model: ServedModel, **deployment: Any) -> str:
        """Register ``model`` as ``model_id`` (production alias) and deploy it
        with batches of up to 4,096 rows; the version's name."""
        name = await self.inference.register(
            model_id,
            data=model.onnx,
            signature=model.version.signature,
            reference_statistics=model.version.reference_statistics,
            task=model.version.task,
        )
        deployment.setdefault("batching", inference_pb.BatchingConfig(max_batch_size=MAX_BATCH))
        await self.inference.deploy(
            inference_pb.Deployment(model=f"models/{model_id}", **deployment)
        )
        return name

    async def infer_requests(self, model_id: str, version: str) -> int:
        """``ModelInfer`` requests the inference service has answered for the version."""
        try:
            reply = await self.inference.oip.ModelStatistics(
                oip.ModelStatisticsRequest(name=model_id, version=version)
            )
        except grpc.aio.AioRpcError as error:
            if error.code() == grpc.StatusCode.NOT_FOUND:
                return 0
            raise
        return sum(s.inference_stats.success.count for s in reply.model_stats)


@pytest.fixture(autouse=True)
def alone(monkeypatch: pytest.MonkeyPatch) -> None:
    """The services by themselves: no authentication, no promotion gates."""
    monkeypatch.setenv("CONVEYOR_AUTH_MODE", "off")
    monkeypatch.setenv("CONVEYOR_REGISTRY_PROMOTION_GATE", "off")


async def running(tmp_path: Path, **settings: Any) -> AsyncIterator[Suite]:
    async for inference in running_suite(tmp_path):
        explainer_server = await build_explainer(
            ExplainerSettings(
                data_dir=tmp_path,
                shutdown_grace=timedelta(seconds=1),
                registry_addr=f"127.0.0.1:{inference.registry_server.port}",
                inference_addr=inference.target,
                **settings,
            )
        )
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{explainer_server.port}")
        try:
            yield Suite(
                inference,
                explainer_server,
                explainer_service_pb2_grpc.ExplainerServiceStub(channel),
                inference.registry,
                channel,
            )
        finally:
            await channel.close(None)
            await explainer_server.shutdown()


@pytest.fixture
async def suite(tmp_path: Path) -> AsyncIterator[Suite]:
    async for started in running(tmp_path):
        yield started
