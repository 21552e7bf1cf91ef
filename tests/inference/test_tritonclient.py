"""Triton's own client (``tritonclient.grpc`` from PyPI), the one a backend
already has, against a Conveyor inference server: health, metadata,
ModelConfig, inference with requested outputs and an echoed id, every
datatype, streaming, statistics, the repository calls and errors. The client
runs in a separate process (see ``triton_client.py``)."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from onnx import TensorProto, helper

from conveyor.registry.v1 import resources_pb2 as registry_pb
from tests.inference.conftest import Suite, expected, weights

pytestmark = pytest.mark.timeout(180)
SCRIPT = Path(__file__).with_name("triton_client.py")
ONNX_TYPES = {
    "BOOL": TensorProto.BOOL,
    "UINT8": TensorProto.UINT8,
    "UINT16": TensorProto.UINT16,
    "UINT32": TensorProto.UINT32,
    "UINT64": TensorProto.UINT64,
    "INT8": TensorProto.INT8,
    "INT16": TensorProto.INT16,
    "INT32": TensorProto.INT32,
    "INT64": TensorProto.INT64,
    "FP16": TensorProto.FLOAT16,
    "FP32": TensorProto.FLOAT,
    "FP64": TensorProto.DOUBLE,
    "BYTES": TensorProto.STRING,
}


def identity_of_every_type() -> bytes:
    """``out_<type> = in_<type>`` for every datatype of the protocol."""
    names = [name.lower() for name in ONNX_TYPES]
    graph = helper.make_graph(
        [helper.make_node("Identity", [f"in_{n}"], [f"out_{n}"]) for n in names],
        "every_type",
        [
            helper.make_tensor_value_info(f"in_{n}", t, ["batch", 3])
            for n, t in zip(names, ONNX_TYPES.values(), strict=True)
        ],
        [
            helper.make_tensor_value_info(f"out_{n}", t, ["batch", 3])
            for n, t in zip(names, ONNX_TYPES.values(), strict=True)
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)
    return model.SerializeToString()


def every_type_signature() -> registry_pb.ModelSignature:
    def specs(prefix: str) -> list[registry_pb.TensorSpec]:
        return [
            registry_pb.TensorSpec(
                name=f"{prefix}_{name.lower()}",
                dtype=registry_pb.TensorDataType.Value(f"TENSOR_DATA_TYPE_{name}"),
                shape=[-1, 3],
            )
            for name in ONNX_TYPES
        ]

    return registry_pb.ModelSignature(inputs=specs("in"), outputs=specs("out"))


async def run_client(target: str) -> dict[str, Any]:
    # An asyncio subprocess: the server shares this event loop and must keep serving.
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        str(SCRIPT),
        target,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), 150)
    assert process.returncode == 0, err.decode()
    result: dict[str, Any] = json.loads(out)
    return result


async def test_tritonclient_calls_every_rpc(suite: Suite) -> None:
    w = weights(40)
    await suite.register("classifier", w)
    await suite.register(
        "every-type",
        data=identity_of_every_type(),
        signature=every_type_signature(),
    )
    seen = await run_client(suite.target)

    assert seen["live"] is True
    assert seen["ready"] is True
    assert seen["server"]["name"] == "conveyor-inference"
    assert "model_repository" in seen["server"]["extensions"]
    assert seen["model_ready"] is True

    metadata = seen["metadata"]
    assert metadata["platform"] == "onnxruntime_onnx"
    assert metadata["versions"] == ["1"]
    assert metadata["inputs"] == [{"name": "input", "datatype": "FP32", "shape": ["-1", "4"]}]
    config = seen["config"]["config"]
    assert config["max_batch_size"] == 32
    assert config["input"][0]["dims"] == ["4"]
    assert config["input"][0]["data_type"] == "TYPE_FP32"
    assert "dynamic_batching" in config

    x = np.arange(12, dtype=np.float32).reshape(3, 4) / 10
    assert seen["infer"]["id"] == "triton-1"
    assert seen["infer"]["model_version"] == "1"
    np.testing.assert_allclose(seen["infer"]["probabilities"], expected(x, w), rtol=1e-5)

    every = seen["every_type"]
    assert set(every) == set(ONNX_TYPES)
    assert every["BYTES"] == [["a", "", "\u00e9t\u00e9"], ["xyz", "q", "r"]]
    rng = np.random.default_rng(1)
    for datatype in ONNX_TYPES:
        if datatype == "BYTES":
            continue
        drawn = rng.integers(0, 2 if datatype == "BOOL" else 100, size=(2, 3))
        assert np.array_equal(np.asarray(every[datatype], dtype=np.float64), drawn), datatype

    assert sorted(seen["stream"]) == [f"stream-{i}" for i in range(5)]
    for index in range(5):
        row = x[index % 3 : index % 3 + 1]
        np.testing.assert_allclose(seen["stream"][f"stream-{index}"], expected(row, w), rtol=1e-5)

    [stats] = seen["statistics"]["model_stats"]
    assert stats["name"] == "classifier"
    assert int(stats["inference_stats"]["success"]["count"]) == 6  # 1 unary + 5 streamed
    assert int(stats["inference_count"]) == 3 + 5

    index = {(m["name"], m.get("version", "")): m.get("state") for m in seen["index"]["models"]}
    assert index[("classifier", "1")] == "READY"
    assert index[("every-type", "1")] == "READY"

    assert seen["errors"] == {
        "wrong_shape": "StatusCode.INVALID_ARGUMENT",
        "unknown_model": "StatusCode.NOT_FOUND",
        "unknown_version": "StatusCode.NOT_FOUND",
    }
    assert seen["not_utf8"].startswith("StatusCode.INVALID_ARGUMENT")
    assert "in_bytes: the model's string tensors take UTF-8 text" in seen["not_utf8"]
    assert seen["after_unload"] == "StatusCode.NOT_FOUND"
