"""The Open Inference Protocol (``inference.GRPCInferenceService``), Triton-compatible.

Every RPC of the protocol and of Triton's extensions that clients and
perf_analyzer call: health, metadata, ``ModelConfig``, inference (unary and
bidirectional streaming), ``ModelStatistics`` and the repository calls. A
model name is a registry model id; a request without ``model_version``
follows the deployment's split (``@production`` by default), one with it is
answered by that exact version, loaded on demand.

The inference path is kept short: decode and check the tensors, queue in the
version's batcher, encode. Everything else a served prediction feeds — the
shadow copy, the prediction log, metrics, statistics — is recorded without
waiting on anything.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from typing import Any, Final, NamedTuple

import grpc
import numpy.typing as npt
from opentelemetry import trace

from conveyor.oip.v2 import grpc_service_pb2 as oip
from conveyor.oip.v2 import grpc_service_pb2_grpc
from conveyor.services.inference.batching import BatchTiming
from conveyor.services.inference.deployments import DeploymentRuntime
from conveyor.services.inference.group_statistics import StatisticsBoard, merged
from conveyor.services.inference.metadata import (
    PLATFORM,
    index_state,
    model_config,
    model_statistics,
    tensor_metadata,
)
from conveyor.services.inference.metrics import InferenceMetrics
from conveyor.services.inference.prediction_log import PredictionLog, records_for
from conveyor.services.inference.repository import ModelRepository
from conveyor.services.inference.routing import Route
from conveyor.services.inference.tensors import decode_request, encode_outputs
from conveyor.services.inference.versions import LoadedVersion, requested
from conveyor.shared.auth import current_principal
from conveyor.shared.auth.principal import caller_principal
from conveyor.shared.errors import (
    ConveyorError,
    FieldViolation,
    NotFoundError,
    UnavailableError,
    invalid_field,
    raise_if_any,
)
from conveyor.shared.names import check_id

logger = logging.getLogger(__name__)
tracer = trace.get_tracer("conveyor.inference")

EXTENSIONS: Final = (
    "model_repository",
    "model_repository(unload_dependents)",
    "model_configuration",
    "statistics",
    "parameters",
)
MAX_INDEXED_MODELS: Final = 1000
UNLOGGED_SERVICES: Final = frozenset({"explainer"})
"""Callers whose predictions stay out of the prediction log: the explainer's
are perturbed samples around one instance, not traffic, and would read as drift."""


class _Served(NamedTuple):
    """One answered request, for the bookkeeping after the response."""

    runtime: DeploymentRuntime
    route: Route | None
    version: LoadedVersion
    request_id: str
    inputs: dict[str, npt.NDArray[Any]]
    outputs: dict[str, npt.NDArray[Any]]
    timing: BatchTiming
    received_ns: int


class InferenceServicer(grpc_service_pb2_grpc.GRPCInferenceServiceServicer):
    """The data plane."""

    def __init__(
        self,
        repository: ModelRepository,
        *,
        metrics: InferenceMetrics,
        prediction_log: PredictionLog,
        default_sample_rate: float,
        server_version: str,
        draining: Callable[[], bool],
        statistics_board: StatisticsBoard | None = None,
    ) -> None:
        """``statistics_board``: where the other serving processes of this port
        publish their statistics (none when this process serves alone)."""
        self._repository = repository
        self._metrics = metrics
        self._log = prediction_log
        self._default_sample_rate = default_sample_rate
        self._server_version = server_version
        self._draining = draining
        self._statistics_board = statistics_board

    # -- health and metadata ----------------------------------------------------------

    async def ServerLive(
        self, request: oip.ServerLiveRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> oip.ServerLiveResponse:
        return oip.ServerLiveResponse(live=True)

    async def ServerReady(
        self, request: oip.ServerReadyRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> oip.ServerReadyResponse:
        return oip.ServerReadyResponse(ready=self._repository.ready and not self._draining())

    async def ServerMetadata(
        self, request: oip.ServerMetadataRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> oip.ServerMetadataResponse:
        return oip.ServerMetadataResponse(
            name="conveyor-inference", version=self._server_version, extensions=EXTENSIONS
        )

    async def ModelReady(
        self, request: oip.ModelReadyRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> oip.ModelReadyResponse:
        runtime = self._runtime(request.name, field="name")
        if request.version:
            version = _held_version(runtime, request.version)
            return oip.ModelReadyResponse(ready=version.ready)
        return oip.ModelReadyResponse(ready=runtime.route is not None)

    async def ModelMetadata(
        self, request: oip.ModelMetadataRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> oip.ModelMetadataResponse:
        runtime = self._runtime(request.name, field="name")
        version = await _metadata_version(runtime, request.version)
        signature = {spec.name: spec for spec in version.registered.signature.inputs}
        signature.update({spec.name: spec for spec in version.registered.signature.outputs})
        return oip.ModelMetadataResponse(
            name=runtime.model_id,
            versions=_serving_numbers(runtime),
            platform=PLATFORM,
            inputs=[tensor_metadata(spec) for spec in version.inputs],
            outputs=[tensor_metadata(spec) for spec in version.outputs],
        )

    async def ModelConfig(
        self, request: oip.ModelConfigRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> oip.ModelConfigResponse:
        runtime = self._runtime(request.name, field="name")
        version = await _metadata_version(runtime, request.version)
        return oip.ModelConfigResponse(config=model_config(runtime, version))

    async def ModelStatistics(
        self, request: oip.ModelStatisticsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> oip.ModelStatisticsResponse:
        """Triton's statistics; with several serving processes, all of theirs."""
        if request.name:
            self._runtime(request.name, field="name")
        if request.version:
            _version_number(request.version)
        counts = self.local_statistics()
        if self._statistics_board is not None:
            counts = merged(counts, await asyncio.to_thread(self._statistics_board.others))
        response = oip.ModelStatisticsResponse(
            model_stats=[
                stats
                for stats in counts.model_stats
                if request.name in ("", stats.name) and request.version in ("", stats.version)
            ]
        )
        if request.version and not response.model_stats:
            raise NotFoundError(
                f"version {request.version} of {request.name or 'any model'} is not loaded",
                reason="VERSION_NOT_LOADED",
            )
        return response

    def local_statistics(self) -> oip.ModelStatisticsResponse:
        """The statistics of every version this process serves."""
        return oip.ModelStatisticsResponse(
            model_stats=[
                model_statistics(runtime.model_id, version)
                for runtime in list(self._repository.runtimes.values())
                for version in runtime.loaded_versions()
                if version.batcher is not None
            ]
        )

    # -- repository -------------------------------------------------------------------

    async def RepositoryIndex(
        self, request: oip.RepositoryIndexRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> oip.RepositoryIndexResponse:
        _check_repository(request.repository_name)
        response = oip.RepositoryIndexResponse()
        listed: set[str] = set()
        for model_id, runtime in sorted(self._repository.runtimes.items()):
            listed.add(model_id)
            versions = runtime.loaded_versions() or []
            if not versions:
                response.models.append(
                    oip.RepositoryIndexResponse.ModelIndex(
                        name=model_id, state="UNAVAILABLE", reason="no version loaded"
                    )
                )
            for version in versions:
                response.models.append(
                    oip.RepositoryIndexResponse.ModelIndex(
                        name=model_id,
                        version=version.number,
                        state=index_state(version),
                        reason=version.error_message,
                    )
                )
        if not request.ready:
            for model in await self._repository_models():
                model_id = model.name.removeprefix("models/")
                if model_id not in listed:
                    response.models.append(
                        oip.RepositoryIndexResponse.ModelIndex(
                            name=model_id, state="UNAVAILABLE", reason="not loaded"
                        )
                    )
        return response

    async def RepositoryModelLoad(
        self,
        request: oip.RepositoryModelLoadRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> oip.RepositoryModelLoadResponse:
        _check_repository(request.repository_name)
        for key in request.parameters:
            raise invalid_field(
                f"parameters[{key!r}]",
                "no load parameters are taken; configure a deployment through "
                "conveyor.inference.v1.InferenceManagementService",
            )
        model_id = _model_id(request.model_name, field="model_name")
        runtime = self._repository.runtimes.get(model_id)
        if runtime is None:
            runtime = await self._repository.ensure(model_id, created_by=caller_principal(context))
        else:
            await runtime.apply(runtime.config)
        if runtime.route is None:
            raise UnavailableError(
                f"models/{model_id} did not load: {runtime.status().versions[0].error_message}"
                if runtime.failed
                else f"models/{model_id} has no version to load",
                reason="MODEL_LOAD_FAILED",
            )
        return oip.RepositoryModelLoadResponse()

    async def RepositoryModelUnload(
        self,
        request: oip.RepositoryModelUnloadRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> oip.RepositoryModelUnloadResponse:
        _check_repository(request.repository_name)
        model_id = _model_id(request.model_name, field="model_name")
        self._runtime(request.model_name, field="model_name")
        await self._repository.delete(f"deployments/{model_id}")
        return oip.RepositoryModelUnloadResponse()

    # -- inference --------------------------------------------------------------------

    async def ModelInfer(
        self, request: oip.ModelInferRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> oip.ModelInferResponse:
        response = oip.ModelInferResponse()
        await self._infer(request, context, response)
        return response

    async def ModelStreamInfer(
        self,
        request_iterator: AsyncIterator[oip.ModelInferRequest],
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> AsyncIterator[oip.ModelStreamInferResponse]:
        """Requests of one stream run concurrently (they batch together);
        answers go back as they finish, each naming its request id."""
        answers: asyncio.Queue[oip.ModelStreamInferResponse | None] = asyncio.Queue()
        running: set[asyncio.Task[None]] = set()

        async def answer(request: oip.ModelInferRequest) -> None:
            try:
                answered = oip.ModelStreamInferResponse()
                await self._infer(request, context, answered.infer_response)
                answers.put_nowait(answered)
            except ConveyorError as error:
                answers.put_nowait(_stream_error(request, error.code, error.message))
            except Exception:
                logger.exception("stream inference failed")
                answers.put_nowait(
                    _stream_error(request, grpc.StatusCode.INTERNAL, "internal error")
                )

        async def read() -> None:
            async for request in request_iterator:
                if self._answers_at_once(request):
                    # Nothing to wait for: a task would only add event-loop hops.
                    await answer(request)
                    continue
                task = asyncio.ensure_future(answer(request))
                running.add(task)
                task.add_done_callback(running.discard)
            if running:
                await asyncio.wait(set(running))
            answers.put_nowait(None)

        reader = asyncio.ensure_future(read())
        try:
            while (response := await answers.get()) is not None:
                yield response
            await reader
        finally:
            reader.cancel()
            for task in list(running):
                task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await reader

    def _answers_at_once(self, request: oip.ModelInferRequest) -> bool:
        """Whether ``request`` is answered without waiting: every version of its
        model's split computes on the event loop, unbatched."""
        runtime = self._repository.runtimes.get(request.model_name)
        route = runtime.route if runtime is not None and not request.model_version else None
        return route is not None and all(v.answers_at_once for v, _ in route.targets)

    async def _infer(
        self,
        request: oip.ModelInferRequest,
        context: grpc.aio.ServicerContext[Any, Any],
        response: oip.ModelInferResponse,
    ) -> None:
        """Answers ``request`` into ``response``."""
        received_ns = time.perf_counter_ns()
        if not request.model_name:
            raise invalid_field("model_name", "required")
        model_id = request.model_name
        runtime = self._repository.runtimes.get(model_id)
        if runtime is None:
            runtime = await self._repository.ensure(
                _model_id(model_id, field="model_name"), created_by=caller_principal(context)
            )
        if not runtime.first_load.is_set():
            # A deployment's first load: wait for it (within the call's deadline)
            # rather than refuse a request that is only early.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(runtime.first_load.wait(), context.time_remaining())
        # Requests that name their version are not part of the split: no shadow copy.
        route = None if request.model_version else runtime.route
        if request.model_version:
            version = await runtime.version(_version_number(request.model_version))
        else:
            version = runtime.pick(request.id)
        try:
            inputs = decode_request(request, version.inputs)
            wanted = _requested_outputs(request, version) if request.outputs else ()
            deadline = _deadline(request, context.time_remaining())
            decoded_ns = time.perf_counter_ns()
            outputs, timing = await version.infer(inputs, deadline=deadline)
            encoded_started = time.perf_counter_ns()
            selected = requested(outputs, wanted)
            raw = bool(request.raw_input_contents) or any(
                array.dtype.kind == "f" and array.dtype.itemsize == 2 for _, array in selected
            )
            response.model_name = model_id
            response.model_version = version.number
            response.id = request.id
            encode_outputs(response, selected, raw=raw)
        except ConveyorError as error:
            self._failed(runtime, version, request.id, error, received_ns)
            raise
        finished_ns = time.perf_counter_ns()
        stats = version.statistics
        stats.success += 1
        stats.success_ns += finished_ns - received_ns
        stats.rows += _rows_of(inputs)
        stats.input_ns += decoded_ns - received_ns
        stats.queue_ns += int((timing.started - timing.arrived) * 1e9)
        stats.compute_ns += int((timing.finished - timing.started) * 1e9)
        stats.output_ns += finished_ns - encoded_started
        stats.last_inference_ms = time.time_ns() // 1_000_000
        self._record(
            _Served(runtime, route, version, request.id, inputs, outputs, timing, received_ns),
            finished_ns,
        )

    def _failed(
        self,
        runtime: DeploymentRuntime,
        version: LoadedVersion,
        request_id: str,
        error: ConveyorError,
        received_ns: int,
    ) -> None:
        """Statistics, metrics and the prediction log of a refused request (the
        monitor's error rates count it)."""
        elapsed = time.perf_counter_ns() - received_ns
        version.statistics.fail += 1
        version.statistics.fail_ns += elapsed
        self._metrics.observe_request(
            runtime.model_id, version.number, error.code.name, elapsed / 1e9
        )
        rate = self._sample_rate(runtime)
        if rate > 0:
            self._log.offer(
                lambda: records_for(
                    version.name,
                    request_id,
                    {},
                    {},
                    latency=timedelta(seconds=elapsed / 1e9),
                    time=datetime.now(UTC),
                    status_code=error.code.value[0],
                ),
                sample_rate=rate,
            )

    def _sample_rate(self, runtime: DeploymentRuntime) -> float:
        caller = current_principal.get()
        if caller is not None and caller.kind == "service" and caller.id in UNLOGGED_SERVICES:
            return 0.0
        if runtime.config.HasField("prediction_log_sample_rate"):
            return runtime.config.prediction_log_sample_rate
        return self._default_sample_rate

    def _record(self, served: _Served, finished_ns: int) -> None:
        """Spans, metrics, the shadow copy and the prediction log of one answer."""
        version = served.version
        model_id = served.runtime.model_id
        latency_s = (finished_ns - served.received_ns) / 1e9
        timing = served.timing
        self._metrics.observe_request(model_id, version.number, "OK", latency_s)
        _spans(version, timing)
        route = served.route
        if (
            route is not None
            and route.shadow is not None
            and not served.runtime.mirror(
                route, served.inputs, served.outputs, served.request_id, latency_s
            )
        ):
            self._metrics.count_shadow(model_id, dropped=1)
        rate = self._sample_rate(served.runtime)
        if rate > 0:
            self._log.offer(
                lambda: records_for(
                    version.name,
                    served.request_id,
                    served.inputs,
                    served.outputs,
                    latency=timedelta(seconds=latency_s),
                    time=datetime.now(UTC),
                ),
                sample_rate=rate,
            )

    # -- helpers ----------------------------------------------------------------------

    def _runtime(self, name: str, *, field: str) -> DeploymentRuntime:
        if not name:
            raise invalid_field(field, "required")
        return self._repository.runtime(name)

    async def _repository_models(self) -> list[Any]:
        try:
            return await self._repository.registry_models(MAX_INDEXED_MODELS)
        except ConveyorError as error:
            logger.warning("registry models not listed", extra={"error": error.message})
            return []


def _rows_of(inputs: dict[str, npt.NDArray[Any]]) -> int:
    """The rows of a request (its inputs' first dimension)."""
    for array in inputs.values():
        return int(array.shape[0]) if array.ndim else 1
    return 0


def _spans(version: LoadedVersion, timing: BatchTiming) -> None:
    """Child spans of the call's span for the wait in the queue and the compute."""
    parent = trace.get_current_span()
    if not parent.is_recording():
        return
    offset_ns = time.time_ns() - int(time.monotonic() * 1e9)
    attributes: dict[str, str | int] = {
        "conveyor.model_version": version.name,
        "conveyor.execution_provider": version.options.provider,
        "conveyor.device": version.device,
        "conveyor.batch_size": timing.batch_rows,
    }
    for name, start, end in (
        ("inference.queue", timing.arrived, timing.started),
        ("inference.compute", timing.started, timing.finished),
    ):
        span = tracer.start_span(
            name, start_time=offset_ns + int(start * 1e9), attributes=attributes
        )
        span.end(end_time=offset_ns + int(end * 1e9))


def _stream_error(
    request: oip.ModelInferRequest, code: grpc.StatusCode, message: str
) -> oip.ModelStreamInferResponse:
    return oip.ModelStreamInferResponse(
        error_message=f"{code.name}: {message}",
        infer_response=oip.ModelInferResponse(
            model_name=request.model_name, model_version=request.model_version, id=request.id
        ),
    )


def _requested_outputs(request: oip.ModelInferRequest, version: LoadedVersion) -> list[str]:
    names = [output.name for output in request.outputs]
    known = {spec.name for spec in version.outputs}
    violations = [
        FieldViolation(
            f"outputs[{index}].name",
            f"{name}: the model has no such output (it has {', '.join(sorted(known))})",
        )
        for index, name in enumerate(names)
        if name not in known
    ]
    if len(set(names)) != len(names):
        violations.append(FieldViolation("outputs", "an output is requested twice"))
    raise_if_any(violations, "unknown outputs requested")
    return names


def _deadline(request: oip.ModelInferRequest, time_remaining: float | None) -> float | None:
    """The monotonic time after which the request is not worth computing: the
    call's deadline, or Triton's ``timeout`` parameter (microseconds) if sooner."""
    deadline = None if time_remaining is None else time.monotonic() + time_remaining
    if "timeout" in request.parameters:
        parameter = request.parameters["timeout"]
        if parameter.WhichOneof("parameter_choice") != "int64_param" or parameter.int64_param < 0:
            raise invalid_field("parameters['timeout']", "microseconds, as a non-negative int64")
        if parameter.int64_param:
            timeout = time.monotonic() + parameter.int64_param / 1_000_000
            deadline = timeout if deadline is None else min(deadline, timeout)
    return deadline


def _model_id(name: str, *, field: str) -> str:
    if not name:
        raise invalid_field(field, "required")
    return check_id(name, field=field)


def _version_number(version: str) -> str:
    if not version.isdigit() or version.startswith("0") or len(version) > 10:
        raise invalid_field("model_version", f"a version number (1, 2, ...), got {version!r}")
    return version


def _held_version(runtime: DeploymentRuntime, number: str) -> LoadedVersion:
    _version_number(number)
    for version in runtime.loaded_versions():
        if version.number == number:
            return version
    raise NotFoundError(
        f"version {number} of {runtime.model_id} is not loaded (loaded: "
        f"{', '.join(v.number for v in runtime.loaded_versions()) or 'none'})",
        reason="VERSION_NOT_LOADED",
    )


async def _metadata_version(runtime: DeploymentRuntime, number: str) -> LoadedVersion:
    """The version described: an explicit one is loaded on demand as ``ModelInfer``
    would (a candidate is explained before it is promoted), else the default route's."""
    if number:
        return await runtime.version(_version_number(number))
    route = runtime.route
    if route is not None:
        return route.targets[0][0]
    raise UnavailableError(
        f"{runtime.model_id} has no ready version to describe", reason="MODEL_NOT_READY"
    )


def _serving_numbers(runtime: DeploymentRuntime) -> list[str]:
    route = runtime.route
    if route is None:
        return []
    return list(dict.fromkeys(version.number for version, _ in route.targets))


def _check_repository(name: str) -> None:
    if name not in ("", "registry"):
        raise NotFoundError(
            f"no repository named {name!r}; the one repository is 'registry' (or empty)",
            reason="REPOSITORY_NOT_FOUND",
        )
