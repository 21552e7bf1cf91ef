"""Open Inference Protocol tensors to NumPy arrays and back.

A ``ModelInferRequest`` carries each input either in ``raw_input_contents``
(little-endian bytes, one entry per input, in input order; ``BYTES`` elements
each prefixed with their 4-byte little-endian length) or in the input's typed
``contents`` (the repeated field of its datatype) — never both in one request.
FP16 travels raw only, as the protocol has no typed field for it.

:func:`decode_inputs` checks everything a request can get wrong on its own
(unknown datatypes, negative dimensions, raw byte lengths that do not match
the shape, typed values of the wrong count or out of the datatype's range,
duplicate names, raw and typed mixed) and raises one INVALID_ARGUMENT whose
field violations name each bad tensor. :func:`check_signature` then checks the
arrays against what the model takes, :func:`check_finite` their values.
:func:`decode_request` is what serving calls: all of that, with a short path
for the usual request (raw numeric inputs that fit, in the model's order).
:func:`encode_outputs` writes results raw or typed.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

import numpy as np
import numpy.typing as npt

from conveyor.shared.errors import FieldViolation, raise_if_any

DTYPES: Final[Mapping[str, np.dtype[Any]]] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype("<u1"),
    "UINT16": np.dtype("<u2"),
    "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"),
    "INT8": np.dtype("<i1"),
    "INT16": np.dtype("<i2"),
    "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"),
    "FP16": np.dtype("<f2"),
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
    "BYTES": np.dtype(np.object_),
}
"""Each OIP datatype and the NumPy dtype of its arrays (little-endian on the wire)."""

TYPED_FIELDS: Final[Mapping[str, str]] = {
    "BOOL": "bool_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}
"""The ``InferTensorContents`` field of each datatype; FP16 has none (raw only)."""

_NUMERIC: Final[Mapping[str, np.dtype[Any]]] = {
    name: dtype for name, dtype in DTYPES.items() if name != "BYTES"
}

_LENGTH_PREFIX: Final = struct.Struct("<I")


_DATATYPES_BY_DTYPE: Final[Mapping[np.dtype[Any], str]] = {
    dtype: name for name, dtype in DTYPES.items() if name != "BYTES"
}


def datatype_of(dtype: np.dtype[Any]) -> str:
    """The OIP datatype of arrays of ``dtype``."""
    exact = _DATATYPES_BY_DTYPE.get(dtype)
    if exact is not None:
        return exact
    if dtype.kind in ("O", "S", "U"):
        return "BYTES"
    for name, known in DTYPES.items():
        if known.kind == dtype.kind and known.itemsize == dtype.itemsize:
            return name
    raise ValueError(f"no Open Inference Protocol datatype holds {dtype}")


@dataclass(frozen=True)
class TensorSpec:
    """What a model takes or returns: a name, a datatype and a shape whose
    ``-1`` dimensions take any size (the batch dimension, usually)."""

    name: str
    datatype: str
    shape: tuple[int, ...]


def decode_request(request: Any, expected: Sequence[TensorSpec]) -> dict[str, npt.NDArray[Any]]:
    """The request's inputs as arrays the model ``expected`` takes, checked as
    :func:`decode_inputs`, :func:`check_signature` and :func:`check_finite`
    check them (BYTES turned to text as :func:`as_text` does).

    Most requests carry raw numeric inputs that fit, in the model's order:
    those are taken in one pass. Anything else, and anything wrong, goes
    through the separate checks, which name every violation."""
    raw = request.raw_input_contents
    tensors = request.inputs
    if raw and len(raw) == len(tensors) == len(expected):
        arrays: dict[str, npt.NDArray[Any]] = {}
        for tensor, data, spec in zip(tensors, raw, expected, strict=True):
            dtype = _NUMERIC.get(tensor.datatype)
            shape = tuple(tensor.shape)
            if (
                dtype is None
                or tensor.name != spec.name
                or tensor.datatype != spec.datatype
                or tensor.HasField("contents")
                or not shape_fits(shape, spec.shape)
                or min(shape, default=0) < 0
                or len(data) != math.prod(shape) * dtype.itemsize
            ):
                break
            array = np.frombuffer(data, dtype=dtype).reshape(shape)
            if dtype.kind == "f" and not np.isfinite(array).all():
                break
            arrays[spec.name] = array
        else:
            return arrays
    arrays = decode_inputs(request)
    check_signature(arrays, {t.name: t.datatype for t in tensors}, expected)
    check_finite(arrays)
    as_text(arrays)
    return arrays


def decode_inputs(request: Any) -> dict[str, npt.NDArray[Any]]:
    """The request's inputs as arrays, by name (``request`` is a
    ``ModelInferRequest``); INVALID_ARGUMENT naming every bad tensor."""
    violations: list[FieldViolation] = []
    raw = list(request.raw_input_contents)
    if raw and len(raw) != len(request.inputs):
        violations.append(
            FieldViolation(
                "raw_input_contents",
                f"{len(raw)} entries for {len(request.inputs)} inputs: one per input, in order",
            )
        )
        raise_if_any(violations, "invalid inputs")
    arrays: dict[str, npt.NDArray[Any]] = {}
    seen: set[str] = set()
    for index, tensor in enumerate(request.inputs):
        field = f"inputs[{index}]"
        if tensor.name in seen:
            violations.append(FieldViolation(f"{field}.name", f"{tensor.name!r} given twice"))
            continue
        seen.add(tensor.name)
        shape = tuple(int(d) for d in tensor.shape)
        found = _shape_and_type(tensor.name, tensor.datatype, shape, field)
        if found:
            violations += found
            continue
        typed = tensor.HasField("contents")
        if raw and typed:
            violations.append(
                FieldViolation(
                    f"{field}.contents",
                    f"{tensor.name}: raw_input_contents and typed contents in one request; "
                    "send one or the other",
                )
            )
            continue
        try:
            if raw:
                arrays[tensor.name] = _from_raw(raw[index], tensor.datatype, shape)
            else:
                arrays[tensor.name] = _from_typed(tensor.contents, tensor.datatype, shape)
        except ValueError as error:
            violations.append(FieldViolation(field, f"{tensor.name}: {error}"))
    raise_if_any(violations, "invalid inputs")
    return arrays


def check_signature(
    arrays: Mapping[str, npt.NDArray[Any]],
    datatypes: Mapping[str, str],
    expected: Sequence[TensorSpec],
) -> None:
    """INVALID_ARGUMENT unless the inputs are exactly the model's, each of its
    datatype and of a shape its signature allows (``datatypes`` are the
    requested datatypes by input name)."""
    violations = []
    wanted = {spec.name: spec for spec in expected}
    for name in arrays:
        if name not in wanted:
            known = ", ".join(sorted(wanted)) or "none"
            violations.append(
                FieldViolation("inputs", f"{name}: the model has no such input (it takes {known})")
            )
    for spec in expected:
        array = arrays.get(spec.name)
        if array is None:
            violations.append(FieldViolation("inputs", f"{spec.name}: required by the model"))
            continue
        if datatypes.get(spec.name) != spec.datatype:
            violations.append(
                FieldViolation(
                    "inputs",
                    f"{spec.name}: datatype {datatypes.get(spec.name)}, the model takes "
                    f"{spec.datatype}",
                )
            )
        if not shape_fits(array.shape, spec.shape):
            violations.append(
                FieldViolation(
                    "inputs",
                    f"{spec.name}: shape {list(array.shape)}, the model takes "
                    f"{list(spec.shape)} (-1: any size)",
                )
            )
    raise_if_any(violations, "the inputs do not fit the model")


def check_finite(arrays: Mapping[str, npt.NDArray[Any]]) -> None:
    """INVALID_ARGUMENT naming each floating-point input that holds NaN or an
    infinity (and where the first one is): the models served take neither."""
    violations = []
    for name, array in arrays.items():
        if array.dtype.kind != "f" or array.size == 0:
            continue
        bad = ~np.isfinite(array)
        if bad.any():
            where = [int(i) for i in np.argwhere(bad)[0]]
            violations.append(
                FieldViolation(
                    "inputs",
                    f"{name}: {int(bad.sum())} NaN or infinite values (first at index {where}); "
                    "the model takes finite numbers only",
                )
            )
    raise_if_any(violations, "the inputs hold values the model forbids")


def as_text(arrays: dict[str, npt.NDArray[Any]]) -> None:
    """Turn BYTES inputs into the ``str`` arrays ONNX Runtime's string tensors
    take (in place); INVALID_ARGUMENT naming an input that is not UTF-8."""
    violations = []
    for name, array in arrays.items():
        if array.dtype != np.object_:
            continue
        try:
            arrays[name] = np.vectorize(_utf8, otypes=[np.object_])(array)
        except UnicodeDecodeError as error:
            violations.append(
                FieldViolation(
                    "inputs", f"{name}: the model's string tensors take UTF-8 text ({error.reason})"
                )
            )
    raise_if_any(violations, "the inputs hold bytes the model cannot take")


def _utf8(value: Any) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def shape_fits(shape: Sequence[int], allowed: Sequence[int]) -> bool:
    """Whether ``shape`` matches ``allowed``, where -1 matches any size."""
    return len(shape) == len(allowed) and all(
        want in (-1, got) for got, want in zip(shape, allowed, strict=True)
    )


def encode_outputs(
    response: Any, outputs: Sequence[tuple[str, npt.NDArray[Any]]], *, raw: bool
) -> None:
    """Append ``outputs`` to ``response`` (a ``ModelInferResponse``): per
    tensor its name, datatype and shape, and its values in
    ``raw_output_contents`` when ``raw``, else in its typed contents. FP16
    outputs need ``raw``."""
    for name, array in outputs:
        datatype = datatype_of(array.dtype)
        if not raw and datatype == "FP16":
            raise ValueError(f"{name}: FP16 outputs travel in raw_output_contents only")
        tensor = response.outputs.add(name=name, datatype=datatype, shape=array.shape)
        if raw:
            response.raw_output_contents.append(_to_raw(array, datatype))
            continue
        values = array.reshape(-1)
        typed = getattr(tensor.contents, TYPED_FIELDS[datatype])
        typed.extend([_as_bytes(v) for v in values] if datatype == "BYTES" else values.tolist())


# -- decoding -------------------------------------------------------------------------


def _shape_and_type(
    name: str, datatype: str, shape: tuple[int, ...], field: str
) -> list[FieldViolation]:
    found = []
    if not name:
        found.append(FieldViolation(f"{field}.name", "required"))
    if datatype not in DTYPES:
        known = ", ".join(DTYPES)
        found.append(
            FieldViolation(f"{field}.datatype", f"{name}: {datatype!r} is not one of {known}")
        )
    if any(d < 0 for d in shape):
        found.append(FieldViolation(f"{field}.shape", f"{name}: dimensions are sizes, at least 0"))
    return found


def _from_raw(data: bytes, datatype: str, shape: tuple[int, ...]) -> npt.NDArray[Any]:
    count = math.prod(shape)
    if datatype == "BYTES":
        return np.array(_split_bytes(data, count), dtype=np.object_).reshape(shape)
    dtype = DTYPES[datatype]
    if len(data) != count * dtype.itemsize:
        raise ValueError(
            f"raw contents are {len(data)} bytes; shape {list(shape)} of {datatype} needs "
            f"{count * dtype.itemsize}"
        )
    return np.frombuffer(data, dtype=dtype).reshape(shape)


def _split_bytes(data: bytes, count: int) -> list[bytes]:
    elements, offset = [], 0
    while offset < len(data):
        if offset + _LENGTH_PREFIX.size > len(data):
            raise ValueError("BYTES raw contents end inside a length prefix")
        (length,) = _LENGTH_PREFIX.unpack_from(data, offset)
        offset += _LENGTH_PREFIX.size
        if offset + length > len(data):
            raise ValueError("a BYTES element runs past the end of the raw contents")
        elements.append(data[offset : offset + length])
        offset += length
    if len(elements) != count:
        raise ValueError(
            f"raw contents hold {len(elements)} BYTES elements; the shape needs {count}"
        )
    return elements


def _from_typed(contents: Any, datatype: str, shape: tuple[int, ...]) -> npt.NDArray[Any]:
    if datatype == "FP16":
        raise ValueError("FP16 travels in raw_input_contents only (no typed field holds it)")
    field = TYPED_FIELDS[datatype]
    values = list(getattr(contents, field))
    others = [
        name
        for name in set(TYPED_FIELDS.values())
        if name != field and len(getattr(contents, name))
    ]
    if others:
        raise ValueError(
            f"{datatype} values belong in contents.{field}, not {', '.join(sorted(others))}"
        )
    count = math.prod(shape)
    if len(values) != count:
        raise ValueError(
            f"{len(values)} values in contents.{field}; shape {list(shape)} needs {count}"
        )
    if datatype == "BYTES":
        return np.array(values, dtype=np.object_).reshape(shape)
    dtype = DTYPES[datatype]
    if dtype.kind in ("i", "u"):
        info = np.iinfo(dtype)
        if values and (min(values) < info.min or max(values) > info.max):
            raise ValueError(f"a value is outside {datatype}'s range [{info.min}, {info.max}]")
    return np.asarray(values, dtype=dtype).reshape(shape)


# -- encoding -------------------------------------------------------------------------


def _to_raw(array: npt.NDArray[Any], datatype: str) -> bytes:
    if datatype == "BYTES":
        parts = []
        for value in array.reshape(-1):
            data = _as_bytes(value)
            parts.append(_LENGTH_PREFIX.pack(len(data)))
            parts.append(data)
        return b"".join(parts)
    return np.ascontiguousarray(array, dtype=DTYPES[datatype]).tobytes()


def _as_bytes(value: Any) -> bytes:
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return value.encode()
    return str(value).encode()
