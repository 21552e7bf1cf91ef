"""The model transformations: PyTorch to ONNX, and ONNX to optimised ONNX.

Every function takes and returns self-contained model bytes (weights embedded,
never an external ``.data`` file: a registry artifact is one file), so a
result can be registered, measured or transformed again as it is.

- :func:`export_onnx`: ``torch.onnx.export`` (the ``torch.export``-based
  exporter) of the model with class probabilities out and a dynamic batch
  dimension, at a chosen opset.
- :func:`optimize_graph`: ONNX Runtime's offline graph optimiser (a session
  that saves its optimised graph), on the CPU provider so the saved model
  suits any provider at BASIC and EXTENDED.
- :func:`quantize_dynamic_int8` / :func:`quantize_static_int8`: ONNX Runtime's
  quantisation tools; static int8 is QDQ, calibrated on samples the caller
  gives (the training split), after ONNX Runtime's pre-processing (shape
  inference and graph optimisation).
- :func:`convert_fp16`: float16 weights and arithmetic, inputs and outputs
  float32 unless asked otherwise.
"""

from __future__ import annotations

import contextlib
import io
import logging
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import numpy as np
import numpy.typing as npt
import onnx
import onnxruntime as ort
import torch
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quantize_dynamic,
    quantize_static,
)
from onnxruntime.quantization.shape_inference import quant_pre_process
from onnxruntime.transformers import float16
from torch import nn

from conveyor.optimizer.v1 import resources_pb2 as pb
from conveyor.services.optimizer import runtime
from conveyor.services.trainer.architectures import INPUT_NAME, OUTPUT_NAME
from conveyor.shared.errors import FailedPreconditionError, InvalidArgumentError

logger = logging.getLogger(__name__)

DEFAULT_OPSET: Final = 18
"""The exporter's own opset: lower ones are converted after export, which
can fail for some operators."""
MIN_OPSET: Final = 13
MAX_OPSET: Final = 23
CALIBRATION_BATCH: Final = 64

GRAPH_LEVELS: Final = {
    pb.GRAPH_OPTIMIZATION_LEVEL_UNSPECIFIED: ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    pb.GRAPH_OPTIMIZATION_LEVEL_BASIC: ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    pb.GRAPH_OPTIMIZATION_LEVEL_EXTENDED: ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    pb.GRAPH_OPTIMIZATION_LEVEL_ALL: ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}
WEIGHT_TYPES: Final = {
    pb.QUANTIZATION_WEIGHT_TYPE_UNSPECIFIED: QuantType.QInt8,
    pb.QUANTIZATION_WEIGHT_TYPE_INT8: QuantType.QInt8,
    pb.QUANTIZATION_WEIGHT_TYPE_UINT8: QuantType.QUInt8,
}
CALIBRATION_METHODS: Final = {
    pb.CALIBRATION_METHOD_UNSPECIFIED: CalibrationMethod.MinMax,
    pb.CALIBRATION_METHOD_MINMAX: CalibrationMethod.MinMax,
    pb.CALIBRATION_METHOD_ENTROPY: CalibrationMethod.Entropy,
    pb.CALIBRATION_METHOD_PERCENTILE: CalibrationMethod.Percentile,
}


@dataclass(frozen=True)
class ModelFacts:
    """What can be read off an ONNX model's bytes."""

    opset: int
    parameter_count: int
    sparsity: float
    """The fraction of weights (float, or int8 for quantised ones, whose zero
    point is 0) that are exactly zero."""
    input_name: str
    input_shape: tuple[int | str, ...]


def export_onnx(model: nn.Module, example_shape: tuple[int, ...], *, opset: int) -> bytes:
    """``model`` (in eval mode, on the CPU, returning probabilities) as ONNX
    with a dynamic batch dimension; input ``input``, output ``probabilities``."""
    model = model.eval().to("cpu")
    example = torch.zeros((2, *example_shape), dtype=torch.float32)
    batch = torch.export.Dim("batch", min=1, max=1 << 20)
    with _quiet_exporter():
        program = torch.onnx.export(
            model,
            (example,),
            dynamo=True,
            opset_version=opset,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_shapes=({0: batch},),
            optimize=True,
            verbose=False,
        )
    if program is None:  # only the TorchScript exporter returns nothing
        raise AssertionError("the ONNX exporter returned no program")
    proto = program.model_proto
    # The exporter's intermediate shape annotations can disagree with ONNX's own
    # shape inference (a transposed weight's), which the quantisers run; drop them.
    del proto.graph.value_info[:]
    onnx.checker.check_model(proto, full_check=True)
    return bytes(proto.SerializeToString())


def model_facts(model: bytes) -> ModelFacts:
    """The opset, weight count and sparsity, and the input of an ONNX model."""
    proto = onnx.load_from_string(model)
    opset = next(
        (entry.version for entry in proto.opset_import if entry.domain in ("", "ai.onnx")), 0
    )
    total = zeros = 0
    for initializer in proto.graph.initializer:
        values = onnx.numpy_helper.to_array(initializer)
        if values.ndim < 2 and values.dtype.kind != "f":
            continue  # shapes, axes and zero points, not weights
        total += values.size
        zeros += int(np.count_nonzero(values == 0))
    graph_input = proto.graph.input[0]
    shape = tuple(
        dim.dim_value if dim.HasField("dim_value") else dim.dim_param
        for dim in graph_input.type.tensor_type.shape.dim
    )
    return ModelFacts(
        opset=opset,
        parameter_count=total,
        sparsity=zeros / total if total else 0.0,
        input_name=graph_input.name,
        input_shape=shape,
    )


def optimize_graph(model: bytes, level: pb.GraphOptimizationLevel.ValueType) -> bytes:
    """ONNX Runtime's graph optimiser applied offline at ``level``, saved."""
    with tempfile.TemporaryDirectory(prefix="conveyor-graph-") as directory:
        target = Path(directory) / "optimized.onnx"
        runtime.session(
            model,
            pb.EXECUTION_PROVIDER_CPU,
            optimization_level=GRAPH_LEVELS[level],
            optimized_model_path=str(target),
        )
        return _self_contained(target)


def quantize_dynamic_int8(model: bytes, options: pb.DynamicInt8Options) -> bytes:
    """Dynamic int8: weights quantised ahead, activations at run time."""
    with tempfile.TemporaryDirectory(prefix="conveyor-int8-") as directory:
        source, target = Path(directory) / "fp32.onnx", Path(directory) / "int8.onnx"
        source.write_bytes(model)
        with _quantizer_errors("dynamic int8"):
            quantize_dynamic(
                source,
                target,
                op_types_to_quantize=list(options.op_types) or None,
                per_channel=options.per_channel,
                weight_type=WEIGHT_TYPES[options.weight_type],
            )
        return _self_contained(target)


def quantize_static_int8(
    model: bytes, options: pb.StaticInt8Options, calibration: npt.NDArray[np.float32]
) -> bytes:
    """Static int8 in QDQ format, activation ranges calibrated on ``calibration``."""
    facts = model_facts(model)
    expected = facts.input_shape[1:]
    if tuple(calibration.shape[1:]) != expected or len(calibration) == 0:
        raise InvalidArgumentError(
            f"calibration samples of shape {list(calibration.shape[1:])} do not fit the "
            f"model's input {list(expected)}",
            reason="CALIBRATION_SHAPE_MISMATCH",
        )
    with tempfile.TemporaryDirectory(prefix="conveyor-int8-") as directory:
        source = Path(directory) / "fp32.onnx"
        prepared = Path(directory) / "prepared.onnx"
        target = Path(directory) / "int8.onnx"
        source.write_bytes(model)
        with _quantizer_errors("static int8 pre-processing"):
            quant_pre_process(str(source), str(prepared), skip_symbolic_shape=True)
        with _quantizer_errors("static int8"):
            quantize_static(
                prepared,
                target,
                _Calibration(facts.input_name, calibration),
                quant_format=QuantFormat.QDQ,
                op_types_to_quantize=list(options.op_types) or None,
                per_channel=options.per_channel,
                activation_type=WEIGHT_TYPES[options.activation_type],
                weight_type=QuantType.QInt8,
                calibrate_method=CALIBRATION_METHODS[options.calibration_method],
            )
        return _self_contained(target)


def convert_fp16(model: bytes, options: pb.Fp16Options) -> bytes:
    """float16 weights and arithmetic (except ``op_block_list``); inputs and
    outputs stay float32 unless ``fp16_io``."""
    proto = onnx.load_from_string(model)
    with _quantizer_errors("fp16 conversion"):
        converted = float16.convert_float_to_float16(
            proto,
            keep_io_types=not options.fp16_io,
            op_block_list=list(options.op_block_list) or None,
        )
    return bytes(converted.SerializeToString())


class _Calibration(CalibrationDataReader):  # type: ignore[misc]
    """Feeds the calibration samples to the quantiser in batches."""

    def __init__(self, input_name: str, samples: npt.NDArray[np.float32]) -> None:
        self._batches: Iterator[npt.NDArray[np.float32]] = iter(
            np.ascontiguousarray(samples[start : start + CALIBRATION_BATCH], dtype=np.float32)
            for start in range(0, len(samples), CALIBRATION_BATCH)
        )
        self._input_name = input_name

    def get_next(self) -> dict[str, npt.NDArray[np.float32]] | None:
        batch = next(self._batches, None)
        return None if batch is None else {self._input_name: batch}


def _self_contained(path: Path) -> bytes:
    """The model at ``path`` with any external weight files folded in."""
    proto = onnx.load(str(path), load_external_data=True)
    return bytes(proto.SerializeToString())


@contextlib.contextmanager
def _quantizer_errors(what: str) -> Iterator[None]:
    """An operator or graph a tool cannot handle: FAILED_PRECONDITION naming it."""
    try:
        yield
    except (
        RuntimeError,
        ValueError,
        KeyError,
        NotImplementedError,
        onnx.checker.ValidationError,
    ) as error:
        logger.warning("transformation failed", extra={"transformation": what}, exc_info=True)
        raise FailedPreconditionError(
            f"{what} could not be applied to this model: {type(error).__name__}: "
            f"{str(error)[:300]}",
            reason="TRANSFORMATION_FAILED",
            metadata={"transformation": what},
        ) from error


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """The exporter prints its progress to stdout; keep it out of the service's output."""
    with contextlib.redirect_stdout(io.StringIO()):
        yield
