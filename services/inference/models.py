"""A model ready to serve: an ONNX Runtime session, its tensors, warmed up.

:meth:`ServedModel.load` opens a session on the chosen execution provider,
reads the model's inputs and outputs (names, Open Inference Protocol
datatypes, shapes with ``-1`` for dynamic dimensions), checks them against the
registered signature when there is one, and runs the model a few times on
zeros so the first real request does not pay for ONNX Runtime's lazy
initialisation. :meth:`ServedModel.run` computes a batch.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Final

import numpy as np
import numpy.typing as npt
import onnxruntime as ort

from conveyor.registry.v1 import resources_pb2 as registry_pb
from conveyor.services.inference.tensors import DTYPES, TensorSpec
from conveyor.shared import onnx_runtime
from conveyor.shared.errors import FailedPreconditionError

ORT_TYPES: Final[Mapping[str, str]] = {
    "tensor(bool)": "BOOL",
    "tensor(uint8)": "UINT8",
    "tensor(uint16)": "UINT16",
    "tensor(uint32)": "UINT32",
    "tensor(uint64)": "UINT64",
    "tensor(int8)": "INT8",
    "tensor(int16)": "INT16",
    "tensor(int32)": "INT32",
    "tensor(int64)": "INT64",
    "tensor(float16)": "FP16",
    "tensor(float)": "FP32",
    "tensor(double)": "FP64",
    "tensor(string)": "BYTES",
}
"""ONNX Runtime's tensor types and their Open Inference Protocol datatypes."""
DEFAULT_WARMUP_RUNS: Final = 3


@dataclass(frozen=True)
class ServedModel:
    """One loaded model version."""

    session: ort.InferenceSession
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    provider: str
    """The execution provider that runs it (``CPUExecutionProvider``, ...)."""

    @classmethod
    def load(
        cls,
        model: bytes,
        *,
        provider: str,
        signature: registry_pb.ModelSignature | None = None,
        threads: int = 0,
        inter_op_threads: int = 0,
        optimization_level: ort.GraphOptimizationLevel = ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
        gpu_device_id: int = 0,
        spin: bool = False,
        warmup_runs: int = DEFAULT_WARMUP_RUNS,
    ) -> ServedModel:
        """Open ``model`` on ``provider`` (CUDA only where a GPU is present:
        FAILED_PRECONDITION otherwise) and warm it up. Its threads do not
        spin between runs unless ``spin``: a server's gRPC threads need the
        cores more than a spinning pool waiting for the next batch."""
        if provider == onnx_runtime.CUDA and not onnx_runtime.gpu_present():
            raise FailedPreconditionError(
                "the CUDA execution provider was asked for and no GPU is present",
                reason="NO_GPU",
            )
        try:
            session = onnx_runtime.create_session(
                model,
                provider,
                threads=threads,
                inter_op_threads=inter_op_threads,
                optimization_level=optimization_level,
                gpu_device_id=gpu_device_id,
                spin=spin,
            )
        except Exception as error:  # ONNX Runtime's errors share no base class
            raise FailedPreconditionError(
                f"the model could not be loaded: {str(error)[:300]}", reason="MODEL_UNLOADABLE"
            ) from error
        served = cls(
            session=session,
            inputs=tuple(_spec(node) for node in session.get_inputs()),
            outputs=tuple(_spec(node) for node in session.get_outputs()),
            provider=provider,
        )
        if signature is not None:
            served.check_signature(signature)
        for _ in range(warmup_runs):
            served.run(served.zeros(batch_size=1))
        return served

    def check_signature(self, signature: registry_pb.ModelSignature) -> None:
        """FAILED_PRECONDITION unless the registered signature names the
        model's own inputs and outputs."""
        for kind, registered, actual in (
            ("input", signature.inputs, self.inputs),
            ("output", signature.outputs, self.outputs),
        ):
            names = sorted(spec.name for spec in registered)
            own = sorted(spec.name for spec in actual)
            if names and names != own:
                raise FailedPreconditionError(
                    f"the registered signature's {kind}s {names} are not the model's {own}",
                    reason="SIGNATURE_MISMATCH",
                )

    @property
    def max_batch_size(self) -> int:
        """0 when the first dimension of some input is fixed (no batching),
        else unbounded by the model (the server sets its own limit)."""
        dynamic = all(spec.shape and spec.shape[0] == -1 for spec in self.inputs)
        return 0 if not dynamic else 2**31 - 1

    def zeros(self, *, batch_size: int) -> dict[str, npt.NDArray[Any]]:
        """A batch of zeros (empty strings for BYTES) of every input."""
        batch: dict[str, npt.NDArray[Any]] = {}
        for spec in self.inputs:
            shape = tuple(batch_size if d == -1 else d for d in spec.shape)
            if spec.datatype == "BYTES":
                batch[spec.name] = np.full(shape, "", dtype=np.object_)
            else:
                batch[spec.name] = np.zeros(shape, dtype=DTYPES[spec.datatype])
        return batch

    @cached_property
    def _output_names(self) -> list[str]:
        return [spec.name for spec in self.outputs]

    def run(
        self, inputs: Mapping[str, npt.NDArray[Any]], outputs: Sequence[str] = ()
    ) -> dict[str, npt.NDArray[Any]]:
        """The named outputs (all when ``outputs`` is empty) for ``inputs``."""
        wanted = list(outputs) or self._output_names
        results = self.session.run(wanted, inputs)
        return dict(zip(wanted, results, strict=True))


def _spec(node: Any) -> TensorSpec:
    datatype = ORT_TYPES.get(node.type)
    if datatype is None:
        raise FailedPreconditionError(
            f"tensor {node.name} has type {node.type}, which the Open Inference Protocol "
            "cannot carry",
            reason="UNSUPPORTED_TENSOR_TYPE",
        )
    shape = tuple(d if isinstance(d, int) and d >= 0 else -1 for d in node.shape)
    return TensorSpec(node.name, datatype, shape)
