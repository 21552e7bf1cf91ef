"""Model evaluations through the inference service's Open Inference Protocol.

:meth:`InferenceClient.evaluate` sends rows to ``ModelInfer`` (``model_name``
the registry model's id, ``model_version`` the version number: inference
serves a version outside its traffic split on demand) as raw little-endian
contents, cut into as few calls as the message size and the deployment's
max batch size (Triton's ``ModelConfig``) allow, a few in flight at once,
each with what is left of the caller's deadline. Failures become the
statuses the explainer's contract names.
"""

from __future__ import annotations

import asyncio
import math
import time
from dataclasses import dataclass
from typing import Final

import grpc
import numpy as np
import numpy.typing as npt

from conveyor.oip.v2 import grpc_service_pb2 as oip
from conveyor.oip.v2 import grpc_service_pb2_grpc
from conveyor.services.explainer.model_spec import ExplainedModel
from conveyor.shared.errors import (
    ConveyorError,
    DeadlineExceededError,
    FailedPreconditionError,
    PermissionDeniedError,
    ResourceExhaustedError,
    UnavailableError,
    from_rpc_error,
)

FloatArray = npt.NDArray[np.float64]

MESSAGE_OVERHEAD_BYTES: Final = 16 * 1024
"""Room left in each message for everything but the tensor's bytes."""
OUTPUT_DTYPES: Final = {
    "BOOL": "?",
    "UINT8": "<u1",
    "UINT16": "<u2",
    "UINT32": "<u4",
    "UINT64": "<u8",
    "INT8": "<i1",
    "INT16": "<i2",
    "INT32": "<i4",
    "INT64": "<i8",
    "FP16": "<f2",
    "FP32": "<f4",
    "FP64": "<f8",
}
_TYPED_CONTENTS: Final = (
    "fp32_contents",
    "fp64_contents",
    "int_contents",
    "int64_contents",
    "uint_contents",
    "uint64_contents",
    "bool_contents",
)


@dataclass
class EvaluationCount:
    """``ModelInfer`` calls made and rows evaluated for one explainer call
    (updated on the event loop only)."""

    calls: int = 0
    rows: int = 0


class InferenceClient:
    """Evaluates rows of a model version on the inference service."""

    def __init__(
        self, channel: grpc.aio.Channel, *, message_bytes: int, calls_in_flight: int
    ) -> None:
        self._stub = grpc_service_pb2_grpc.GRPCInferenceServiceStub(channel)
        self._message_bytes = message_bytes
        self._calls_in_flight = calls_in_flight

    async def max_batch_size(self, model: ExplainedModel, *, deadline: float | None) -> int:
        """The most rows one ``ModelInfer`` call may carry for ``model`` (its
        deployment's max batch size; 1 when it does not batch)."""
        try:
            reply = await self._stub.ModelConfig(
                oip.ModelConfigRequest(name=model.model_id, version=str(model.version)),
                timeout=_timeout(deadline),
            )
        except grpc.aio.AioRpcError as error:
            raise _failure(error, model) from None
        return max(1, reply.config.max_batch_size)

    def rows_per_call(self, model: ExplainedModel, max_batch_size: int) -> int:
        """Rows in each call: as many as the message size allows in the request
        and in the answer, within the deployment's max batch size."""
        input_bytes = model.num_features * model.input_dtype.itemsize
        output_bytes = (model.output_width or model.num_features) * 8
        fitting = (self._message_bytes - MESSAGE_OVERHEAD_BYTES) // max(input_bytes, output_bytes)
        return max(1, min(max_batch_size, fitting))

    async def evaluate(
        self,
        model: ExplainedModel,
        rows: FloatArray,
        *,
        rows_per_call: int,
        deadline: float | None,
        count: EvaluationCount,
    ) -> FloatArray:
        """The model's output rows (``[len(rows), width]``, float64) for
        ``rows`` (``[n, *instance_shape]``)."""
        inputs = np.ascontiguousarray(rows, dtype=model.input_dtype)
        bounds = [
            (start, min(start + rows_per_call, len(inputs)))
            for start in range(0, len(inputs), rows_per_call)
        ]
        gate = asyncio.Semaphore(self._calls_in_flight)

        async def call(start: int, stop: int) -> FloatArray:
            async with gate:
                return await self._infer(model, inputs[start:stop], deadline, count)

        outputs = await asyncio.gather(*(call(start, stop) for start, stop in bounds))
        widths = {o.shape[1] for o in outputs}
        if len(widths) != 1:
            raise FailedPreconditionError(
                f"{model.version_name} answered rows of different widths {sorted(widths)}",
                reason="INCONSISTENT_OUTPUT",
            )
        return np.concatenate(outputs)

    async def _infer(
        self,
        model: ExplainedModel,
        batch: npt.NDArray[np.generic],
        deadline: float | None,
        count: EvaluationCount,
    ) -> FloatArray:
        request = oip.ModelInferRequest(
            model_name=model.model_id,
            model_version=str(model.version),
            inputs=[
                oip.ModelInferRequest.InferInputTensor(
                    name=model.input_name, datatype=model.input_datatype, shape=list(batch.shape)
                )
            ],
            outputs=[oip.ModelInferRequest.InferRequestedOutputTensor(name=model.output_name)],
            raw_input_contents=[batch.tobytes()],
        )
        count.calls += 1
        count.rows += len(batch)
        try:
            reply = await self._stub.ModelInfer(request, timeout=_timeout(deadline))
        except grpc.aio.AioRpcError as error:
            raise _failure(error, model) from None
        return _output_rows(reply, model, len(batch))


def _output_rows(reply: oip.ModelInferResponse, model: ExplainedModel, rows: int) -> FloatArray:
    output = next((o for o in reply.outputs if o.name == model.output_name), None)
    if output is None or output.datatype not in OUTPUT_DTYPES:
        raise FailedPreconditionError(
            f"{model.version_name} answered without a numeric output {model.output_name!r}",
            reason="MISSING_OUTPUT",
        )
    index = list(reply.outputs).index(output)
    if reply.raw_output_contents:
        values = np.frombuffer(
            reply.raw_output_contents[index], dtype=OUTPUT_DTYPES[output.datatype]
        )
    else:
        field = next((f for f in _TYPED_CONTENTS if getattr(output.contents, f)), "fp32_contents")
        values = np.asarray(getattr(output.contents, field))
    shape = list(output.shape)
    if not shape or shape[0] != rows or values.size != math.prod(shape):
        raise FailedPreconditionError(
            f"{model.version_name} answered {values.size} values shaped {shape} for {rows} rows",
            reason="INCONSISTENT_OUTPUT",
        )
    return values.astype(np.float64).reshape(rows, -1)


def _timeout(deadline: float | None) -> float | None:
    if deadline is None:
        return None
    left = deadline - time.monotonic()
    if left <= 0:
        raise DeadlineExceededError(
            "the deadline passed while the model evaluated the perturbed samples"
        )
    return left


def _failure(error: grpc.aio.AioRpcError, model: ExplainedModel) -> ConveyorError:
    failure = from_rpc_error(error)
    code = error.code()
    subject = model.version_name
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return DeadlineExceededError(
            f"the deadline passed while the inference service evaluated {subject}"
        )
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        return ResourceExhaustedError(
            f"the inference service's queue for {subject} is full; retry later",
            reason="INFERENCE_QUEUE_FULL",
        )
    if code == grpc.StatusCode.PERMISSION_DENIED:
        return PermissionDeniedError(failure.message, reason=failure.reason)
    if code in (
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.INVALID_ARGUMENT,
    ):
        return FailedPreconditionError(
            f"the inference service will not evaluate {subject}: {failure.message}",
            reason="NOT_SERVED",
        )
    return UnavailableError(
        f"the inference service could not evaluate {subject} ({code.name})",
        reason="INFERENCE_UNAVAILABLE",
    )
