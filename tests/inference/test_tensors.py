"""Open Inference Protocol tensors: every datatype decoded raw and typed to the
same arrays, outputs encoded back and decoded again unchanged, and every way a
request can be malformed refused with the tensor named."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from conveyor.oip.v2 import grpc_service_pb2 as oip
from conveyor.services.inference import tensors
from conveyor.services.inference.tensors import TensorSpec
from conveyor.shared.errors import InvalidArgumentError

SAMPLES: dict[str, np.ndarray[Any, Any]] = {
    "BOOL": np.array([[True, False, True]]),
    "UINT8": np.array([[0, 7, 255]], dtype=np.uint8),
    "UINT16": np.array([[0, 7, 65535]], dtype=np.uint16),
    "UINT32": np.array([[0, 7, 2**32 - 1]], dtype=np.uint32),
    "UINT64": np.array([[0, 7, 2**64 - 1]], dtype=np.uint64),
    "INT8": np.array([[-128, 0, 127]], dtype=np.int8),
    "INT16": np.array([[-32768, 0, 32767]], dtype=np.int16),
    "INT32": np.array([[-(2**31), 0, 2**31 - 1]], dtype=np.int32),
    "INT64": np.array([[-(2**63), 0, 2**63 - 1]], dtype=np.int64),
    "FP16": np.array([[-1.5, 0.0, 65504.0]], dtype=np.float16),
    "FP32": np.array([[-1.5, 0.0, 3.25]], dtype=np.float32),
    "FP64": np.array([[-1.5, 0.0, 1e300]], dtype=np.float64),
    "BYTES": np.array([[b"", b"abc", "é".encode()]], dtype=np.object_),
}


def request_of(arrays: dict[str, np.ndarray[Any, Any]], *, raw: bool) -> oip.ModelInferRequest:
    """The request whose inputs are ``arrays``, written as outputs are."""
    encoded = oip.ModelInferResponse()
    tensors.encode_outputs(encoded, list(arrays.items()), raw=raw)
    request = oip.ModelInferRequest(model_name="m")
    for output in encoded.outputs:
        entry = request.inputs.add(name=output.name, datatype=output.datatype, shape=output.shape)
        if output.HasField("contents"):
            entry.contents.CopyFrom(output.contents)
    request.raw_input_contents.extend(encoded.raw_output_contents)
    return request


def violations(request: oip.ModelInferRequest) -> list[tuple[str, str]]:
    with pytest.raises(InvalidArgumentError) as refused:
        tensors.decode_inputs(request)
    return [(v.field, v.description) for v in refused.value.violations]


@pytest.mark.parametrize(
    ("datatype", "raw"),
    # FP16 has no typed field: raw only.
    [(d, raw) for d in SAMPLES for raw in (True, False) if raw or d != "FP16"],
)
def test_every_datatype_round_trips(datatype: str, raw: bool) -> None:
    sample = SAMPLES[datatype]
    decoded = tensors.decode_inputs(request_of({"x": sample}, raw=raw))["x"]
    assert decoded.shape == sample.shape
    assert tensors.datatype_of(decoded.dtype) == datatype
    assert decoded.tolist() == sample.tolist()


def test_raw_bytes_are_little_endian_and_bytes_are_length_prefixed() -> None:
    response = oip.ModelInferResponse()
    tensors.encode_outputs(response, [("x", np.array([1], dtype=np.int32))], raw=True)
    tensors.encode_outputs(response, [("s", np.array([b"ab"], dtype=np.object_))], raw=True)
    assert list(response.raw_output_contents) == [b"\x01\x00\x00\x00", b"\x02\x00\x00\x00ab"]
    assert [(o.name, o.datatype, list(o.shape)) for o in response.outputs] == [
        ("x", "INT32", [1]),
        ("s", "BYTES", [1]),
    ]


def test_fp16_outputs_need_raw() -> None:
    response = oip.ModelInferResponse()
    with pytest.raises(ValueError, match="raw_output_contents only"):
        tensors.encode_outputs(response, [("y", np.zeros(2, dtype=np.float16))], raw=False)
    assert not response.outputs


MODEL_INPUTS = [TensorSpec("a", "FP32", (-1, 3)), TensorSpec("b", "INT64", (-1,))]


def two_inputs(*, raw: bool = True) -> oip.ModelInferRequest:
    return request_of(
        {
            "a": np.array([[1.5, -2.0, 3.25], [0.0, 1.0, 2.0]], dtype=np.float32),
            "b": np.array([7, -9], dtype=np.int64),
        },
        raw=raw,
    )


@pytest.mark.parametrize("raw", [True, False])
def test_decode_request_gives_the_arrays_the_separate_steps_give(raw: bool) -> None:
    request = two_inputs(raw=raw)
    decoded = tensors.decode_request(request, MODEL_INPUTS)
    stepwise = tensors.decode_inputs(request)
    assert decoded.keys() == stepwise.keys() == {"a", "b"}
    for name, array in decoded.items():
        assert array.dtype == stepwise[name].dtype
        assert array.tolist() == stepwise[name].tolist()
    # Inputs in another order than the model's take the long way, to the same arrays.
    swapped = oip.ModelInferRequest(model_name="m")
    swapped.inputs.extend([request.inputs[1], request.inputs[0]])
    swapped.raw_input_contents.extend(reversed(request.raw_input_contents))
    assert tensors.decode_request(swapped, MODEL_INPUTS)["b"].tolist() == [7, -9]


def refusal(request: oip.ModelInferRequest) -> list[str]:
    with pytest.raises(InvalidArgumentError) as refused:
        tensors.decode_request(request, MODEL_INPUTS)
    return [v.description for v in refused.value.violations]


def test_decode_request_refuses_what_the_separate_checks_refuse() -> None:
    wrong_type = two_inputs()
    wrong_type.inputs[1].datatype = "INT32"
    wrong_type.raw_input_contents[1] = np.array([7, -9], dtype=np.int32).tobytes()
    assert refusal(wrong_type) == ["b: datatype INT32, the model takes INT64"]
    wrong_shape = two_inputs()
    wrong_shape.inputs[0].shape[:] = [3, 2]
    assert refusal(wrong_shape) == ["a: shape [3, 2], the model takes [-1, 3] (-1: any size)"]
    negative = two_inputs()
    negative.inputs[1].shape[:] = [-1]
    assert refusal(negative) == ["b: dimensions are sizes, at least 0"]
    short = two_inputs()
    short.raw_input_contents[0] = short.raw_input_contents[0][:-4]
    assert "raw contents are 20 bytes; shape [2, 3] of FP32 needs 24" in refusal(short)[0]
    renamed = two_inputs()
    renamed.inputs[1].name = "c"
    assert refusal(renamed) == [
        "c: the model has no such input (it takes a, b)",
        "b: required by the model",
    ]
    for bad in (np.nan, np.inf, -np.inf):
        values = np.array([[1.0, bad, 0.0], [0.0, 0.0, 0.0]], dtype=np.float32)
        poisoned = two_inputs()
        poisoned.raw_input_contents[0] = values.tobytes()
        assert refusal(poisoned) == [
            "a: 1 NaN or infinite values (first at index [0, 1]); "
            "the model takes finite numbers only"
        ]


def test_malformed_requests_name_each_tensor() -> None:
    request = oip.ModelInferRequest()
    request.inputs.add(name="a", datatype="FP32", shape=[2, 2])
    request.inputs.add(name="b", datatype="FLOAT", shape=[1])
    request.inputs.add(name="c", datatype="INT8", shape=[-1])
    request.inputs.add(name="a", datatype="FP32", shape=[1])
    request.raw_input_contents.extend([b"\x00" * 12, b"", b"", b"\x00" * 4])
    found = violations(request)
    assert [field for field, _ in found] == [
        "inputs[0]",
        "inputs[1].datatype",
        "inputs[2].shape",
        "inputs[3].name",
    ]
    assert "raw contents are 12 bytes; shape [2, 2] of FP32 needs 16" in found[0][1]


def test_raw_and_typed_cannot_mix_and_raw_needs_one_entry_per_input() -> None:
    request = request_of({"x": SAMPLES["FP32"]}, raw=True)
    request.inputs[0].contents.fp32_contents.extend([1.0, 2.0, 3.0])
    [(field, description)] = violations(request)
    assert field == "inputs[0].contents"
    assert "raw_input_contents and typed contents" in description
    two = request_of({"x": SAMPLES["FP32"], "y": SAMPLES["FP32"]}, raw=True)
    del two.raw_input_contents[1]
    assert violations(two) == [
        ("raw_input_contents", "1 entries for 2 inputs: one per input, in order")
    ]


def test_typed_values_must_fit_their_field_count_and_range() -> None:
    wrong_count = oip.ModelInferRequest()
    wrong_count.inputs.add(name="x", datatype="FP32", shape=[2, 3]).contents.fp32_contents.extend(
        [1.0, 2.0]
    )
    assert (
        "2 values in contents.fp32_contents; shape [2, 3] needs 6" in violations(wrong_count)[0][1]
    )
    wrong_field = oip.ModelInferRequest()
    wrong_field.inputs.add(name="x", datatype="FP32", shape=[1]).contents.int_contents.append(1)
    assert "belong in contents.fp32_contents, not int_contents" in violations(wrong_field)[0][1]
    out_of_range = oip.ModelInferRequest()
    out_of_range.inputs.add(name="x", datatype="INT8", shape=[1]).contents.int_contents.append(300)
    assert "outside INT8's range [-128, 127]" in violations(out_of_range)[0][1]
    fp16 = oip.ModelInferRequest()
    fp16.inputs.add(name="x", datatype="FP16", shape=[1])
    assert "FP16 travels in raw_input_contents only" in violations(fp16)[0][1]
    bad_bytes = oip.ModelInferRequest(raw_input_contents=[b"\x05\x00\x00\x00ab"])
    bad_bytes.inputs.add(name="s", datatype="BYTES", shape=[1])
    assert "runs past the end" in violations(bad_bytes)[0][1]


def test_inputs_are_checked_against_the_signature() -> None:
    expected = [TensorSpec("input", "FP32", (-1, 30))]
    good = {"input": np.zeros((4, 30), dtype=np.float32)}
    tensors.check_signature(good, {"input": "FP32"}, expected)
    with pytest.raises(InvalidArgumentError) as refused:
        tensors.check_signature(
            {"input": np.zeros((4, 29), dtype=np.float64), "extra": np.zeros(1)},
            {"input": "FP64", "extra": "FP64"},
            expected,
        )
    described = [v.description for v in refused.value.violations]
    assert described == [
        "extra: the model has no such input (it takes input)",
        "input: datatype FP64, the model takes FP32",
        "input: shape [4, 29], the model takes [-1, 30] (-1: any size)",
    ]
    with pytest.raises(InvalidArgumentError) as missing:
        tensors.check_signature({}, {}, expected)
    assert [v.description for v in missing.value.violations] == ["input: required by the model"]
    assert tensors.shape_fits((1, 3), (-1, 3))
    assert not tensors.shape_fits((3,), (-1, 3))
