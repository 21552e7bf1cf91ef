"""What the explainer needs to know about a model version, read from its
registry entry: the input tensor one instance fills, the output explained,
the names of features and classes, and the reference sample.

A version qualifies when its signature has exactly one input whose first
dimension is the batch (``-1``) and the others fixed, of a numeric datatype,
and one output (or ``output_name`` picks one). Anything else is
FAILED_PRECONDITION naming what is missing: the version cannot be explained
as registered, whatever the caller sends.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Final

import numpy as np
import numpy.typing as npt

from conveyor.registry.v1 import resources_pb2 as registry_pb
from conveyor.shared.errors import (
    FailedPreconditionError,
    PreconditionViolation,
    invalid_field,
)
from conveyor.shared.names import parse_model_version_ref

FloatArray = npt.NDArray[np.float64]

DATATYPES: Final[dict[int, tuple[str, str]]] = {
    registry_pb.TENSOR_DATA_TYPE_BOOL: ("BOOL", "?"),
    registry_pb.TENSOR_DATA_TYPE_UINT8: ("UINT8", "<u1"),
    registry_pb.TENSOR_DATA_TYPE_UINT16: ("UINT16", "<u2"),
    registry_pb.TENSOR_DATA_TYPE_UINT32: ("UINT32", "<u4"),
    registry_pb.TENSOR_DATA_TYPE_UINT64: ("UINT64", "<u8"),
    registry_pb.TENSOR_DATA_TYPE_INT8: ("INT8", "<i1"),
    registry_pb.TENSOR_DATA_TYPE_INT16: ("INT16", "<i2"),
    registry_pb.TENSOR_DATA_TYPE_INT32: ("INT32", "<i4"),
    registry_pb.TENSOR_DATA_TYPE_INT64: ("INT64", "<i8"),
    registry_pb.TENSOR_DATA_TYPE_FP16: ("FP16", "<f2"),
    registry_pb.TENSOR_DATA_TYPE_FP32: ("FP32", "<f4"),
    registry_pb.TENSOR_DATA_TYPE_FP64: ("FP64", "<f8"),
}
"""Registry datatypes the explainer can send: the Open Inference Protocol's
name and the little-endian NumPy type of raw contents."""

IMAGE_CHANNELS: Final = (1, 3)


@dataclass(frozen=True)
class ImageLayout:
    """How one instance of an image model's input holds its pixels."""

    height: int
    width: int
    channels: int
    channels_first: bool
    """``[C, H, W]`` (PyTorch's layout) rather than ``[H, W, C]`` or ``[H, W]``."""


@dataclass(frozen=True)
class ExplainedModel:
    """A resolved model version as the explainer sees it."""

    version_name: str
    """``models/{model}/versions/{version}``."""
    model_id: str
    version: int
    archived: bool
    input_name: str
    input_datatype: str
    input_dtype: np.dtype[np.generic]
    instance_shape: tuple[int, ...]
    """One instance's dimensions (the input's shape without the batch)."""
    feature_names: tuple[str, ...]
    output_name: str
    output_width: int | None
    """Elements per output row, when the signature fixes it."""
    class_names: tuple[str, ...]
    reference_sample: FloatArray | None
    """Reference rows (the trainer's sample), one per row, one column per feature."""
    reference_weights: FloatArray | None
    """One weight per reference row, or None for equal weights."""

    @property
    def num_features(self) -> int:
        return math.prod(self.instance_shape)

    def feature_name(self, index: int) -> str:
        if index < len(self.feature_names):
            return self.feature_names[index]
        return f"feature {index}"

    def class_name(self, index: int) -> str:
        return self.class_names[index] if 0 <= index < len(self.class_names) else ""

    def image_layout(self) -> ImageLayout | None:
        """The layout of an image input (``[H, W]``, ``[C, H, W]`` or ``[H, W, C]``
        with 1 or 3 channels); None for a flat row."""
        shape = self.instance_shape
        if len(shape) == 2:
            return ImageLayout(shape[0], shape[1], 1, channels_first=False)
        if len(shape) == 3 and shape[0] in IMAGE_CHANNELS:
            return ImageLayout(shape[1], shape[2], shape[0], channels_first=True)
        if len(shape) == 3 and shape[2] in IMAGE_CHANNELS:
            return ImageLayout(shape[0], shape[1], shape[2], channels_first=False)
        return None


def explained_model(version: registry_pb.ModelVersion, output_name: str) -> ExplainedModel:
    """The explainer's view of ``version``; ``output_name`` picks one of several
    outputs (INVALID_ARGUMENT when it names none of them)."""
    ref = parse_model_version_ref(version.name)
    if ref.version is None:  # the registry always answers with the version's own name
        raise ValueError(f"unresolved version name {version.name!r}")
    signature = version.signature
    problems: list[str] = []
    if len(signature.inputs) != 1:
        problems.append(
            f"has {len(signature.inputs)} inputs in its signature; the explainer needs exactly one"
        )
    else:
        tensor = signature.inputs[0]
        shape = list(tensor.shape)
        if len(shape) < 2 or shape[0] != -1 or any(d <= 0 for d in shape[1:]):
            problems.append(
                f"input {tensor.name!r} has shape {shape}; the explainer needs a batch "
                "dimension (-1) first and fixed dimensions after it"
            )
        if tensor.dtype not in DATATYPES:
            problems.append(
                f"input {tensor.name!r} is {registry_pb.TensorDataType.Name(tensor.dtype)}, "
                "not a numeric datatype"
            )
    output = _output(signature, output_name, problems)
    if problems:
        raise FailedPreconditionError(
            f"{version.name} cannot be explained: " + "; ".join(problems),
            violations=[PreconditionViolation("SIGNATURE", version.name, p) for p in problems],
            reason="UNEXPLAINABLE_SIGNATURE",
        )
    assert output is not None  # no problem reported means one was found
    tensor = signature.inputs[0]
    instance_shape = tuple(int(d) for d in tensor.shape[1:])
    datatype, dtype = DATATYPES[tensor.dtype]
    out_dims = list(output.shape)[1:]
    sample, weights = _reference_sample(version, math.prod(instance_shape))
    return ExplainedModel(
        version_name=version.name,
        model_id=ref.model,
        version=ref.version,
        archived=version.state == registry_pb.MODEL_VERSION_STATE_ARCHIVED,
        input_name=tensor.name,
        input_datatype=datatype,
        input_dtype=np.dtype(dtype),
        instance_shape=instance_shape,
        feature_names=tuple(tensor.feature_names),
        output_name=output.name,
        output_width=math.prod(out_dims) if all(d > 0 for d in out_dims) else None,
        class_names=tuple(output.class_names),
        reference_sample=sample,
        reference_weights=weights,
    )


def _output(
    signature: registry_pb.ModelSignature, output_name: str, problems: list[str]
) -> registry_pb.TensorSpec | None:
    if output_name:
        for output in signature.outputs:
            if output.name == output_name:
                return output
        names = ", ".join(o.name for o in signature.outputs) or "none"
        raise invalid_field(
            "config.output_name", f"the version has no output {output_name!r} (outputs: {names})"
        )
    if len(signature.outputs) != 1:
        problems.append(
            f"has {len(signature.outputs)} outputs in its signature; name the one to explain "
            "in config.output_name"
            if signature.outputs
            else "has no output in its signature"
        )
        return None
    return signature.outputs[0]


def _reference_sample(
    version: registry_pb.ModelVersion, num_features: int
) -> tuple[FloatArray | None, FloatArray | None]:
    sample = version.reference_statistics.sample
    if sample.column_count != num_features or not sample.values:
        return None, None
    values = np.asarray(sample.values, dtype=np.float64)
    if values.size % num_features:
        return None, None
    rows = values.reshape(-1, num_features)
    weights = np.asarray(sample.weights, dtype=np.float64) if sample.weights else None
    if weights is not None and weights.shape != (len(rows),):
        weights = None
    return rows, weights
