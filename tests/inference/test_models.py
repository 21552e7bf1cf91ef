"""A model ready to serve: ONNX Runtime sessions of small models built here,
their tensors read in Open Inference Protocol terms, warmed up, checked
against a registered signature, computing batches; unloadable models and a
GPU that is not there are refused."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from conveyor.registry.v1 import resources_pb2 as registry_pb
from conveyor.services.inference.models import ServedModel
from conveyor.services.inference.tensors import TensorSpec
from conveyor.shared import onnx_runtime
from conveyor.shared.errors import FailedPreconditionError

WEIGHTS = np.arange(8, dtype=np.float32).reshape(4, 2) / 10


def classifier(batch: str | int = "batch", element: int = TensorProto.FLOAT) -> bytes:
    """probabilities = softmax(input @ W), input [batch, 4] -> [batch, 2]."""
    nodes = [
        helper.make_node("MatMul", ["input", "w"], ["logits"]),
        helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1),
    ]
    graph = helper.make_graph(
        nodes,
        "classifier",
        [helper.make_tensor_value_info("input", element, [batch, 4])],
        [helper.make_tensor_value_info("probabilities", element, [batch, 2])],
        initializer=[
            numpy_helper.from_array(WEIGHTS.astype(helper.tensor_dtype_to_np_dtype(element)), "w")
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)
    return model.SerializeToString()


def test_a_model_is_loaded_warmed_up_and_computes_batches() -> None:
    served = ServedModel.load(classifier(), provider=onnx_runtime.CPU)
    assert served.inputs == (TensorSpec("input", "FP32", (-1, 4)),)
    assert served.outputs == (TensorSpec("probabilities", "FP32", (-1, 2)),)
    assert served.provider == "CPUExecutionProvider"
    assert served.max_batch_size > 1
    x = np.random.default_rng(0).normal(size=(5, 4)).astype(np.float32)
    [(name, y)] = served.run({"input": x}).items()
    logits = x @ WEIGHTS
    expected = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    assert name == "probabilities"
    np.testing.assert_allclose(y, expected, rtol=1e-5)
    assert served.zeros(batch_size=3)["input"].shape == (3, 4)


def test_fp16_models_and_fixed_batches() -> None:
    half = ServedModel.load(classifier(element=TensorProto.FLOAT16), provider=onnx_runtime.CPU)
    assert half.inputs[0].datatype == "FP16"
    assert half.run(half.zeros(batch_size=2))["probabilities"].dtype == np.float16
    fixed = ServedModel.load(classifier(batch=1), provider=onnx_runtime.CPU)
    assert fixed.inputs[0].shape == (1, 4)
    assert fixed.max_batch_size == 0


def test_the_registered_signature_must_name_the_models_tensors() -> None:
    matching = registry_pb.ModelSignature(
        inputs=[registry_pb.TensorSpec(name="input")],
        outputs=[registry_pb.TensorSpec(name="probabilities")],
    )
    ServedModel.load(classifier(), provider=onnx_runtime.CPU, signature=matching)
    other = registry_pb.ModelSignature(inputs=[registry_pb.TensorSpec(name="features")])
    with pytest.raises(FailedPreconditionError) as refused:
        ServedModel.load(classifier(), provider=onnx_runtime.CPU, signature=other)
    assert refused.value.reason == "SIGNATURE_MISMATCH"


def test_unloadable_models_and_missing_gpus_are_refused() -> None:
    with pytest.raises(FailedPreconditionError) as broken:
        ServedModel.load(b"not a model", provider=onnx_runtime.CPU)
    assert broken.value.reason == "MODEL_UNLOADABLE"
    if not onnx_runtime.gpu_present():
        with pytest.raises(FailedPreconditionError) as no_gpu:
            ServedModel.load(classifier(), provider=onnx_runtime.CUDA)
        assert no_gpu.value.reason == "NO_GPU"
