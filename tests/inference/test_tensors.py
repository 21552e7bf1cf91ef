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
    request = oip.ModelInferRequest(model_name="m")
    described, blobs = tensors.encode_outputs(list(arrays.items()), raw=raw)
    for tensor in described:
        entry = request.inputs.add(
            name=tensor["name"], datatype=tensor["datatype"], shape=tensor["shape"]
        )
        if "contents" in tensor:
            for field, values in tensor["contents"].items():
                getattr(entry.contents, field).extend(values)
    request.raw_input_contents.extend(blobs)
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
    _, [blob] = tensors.encode_outputs([("x", np.array([1], dtype=np.int32))], raw=True)
    assert blob == b"\x01\x00\x00\x00"
    _, [text] = tensors.encode_outputs([("s", np.array([b"ab"], dtype=np.object_))], raw=True)
    assert text == b"\x02\x00\x00\x00ab"


def test_fp16_outputs_need_raw() -> None:
    with pytest.raises(ValueError, match="raw_output_contents only"):
        tensors.encode_outputs([("y", np.zeros(2, dtype=np.float16))], raw=False)


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
