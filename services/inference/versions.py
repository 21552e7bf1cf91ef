"""One registry version loaded to serve: sessions, a batcher, its life cycle.

:func:`load_version` resolves a reference (``models/m/versions/3`` or
``models/m@production``) through the registry, fetches the artifact through
the verified :class:`~conveyor.shared.artifacts.ArtifactCache` (its
signature checked, cached on disk by digest), opens ``instance_count``
ONNX Runtime sessions on the chosen provider, warms them at every batch size
asked for, and puts a :class:`~.batching.DynamicBatcher` in front of them.
A :class:`LoadedVersion` counts the requests in flight so that a version
taken out of traffic can drain before it unloads.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Final

import numpy.typing as npt
import onnxruntime as ort

from conveyor.inference.v1 import resources_pb2 as pb
from conveyor.registry.v1 import resources_pb2 as registry_pb
from conveyor.services.inference.batching import BatchTiming, DynamicBatcher
from conveyor.services.inference.models import ServedModel
from conveyor.services.inference.tensors import TensorSpec
from conveyor.shared import onnx_runtime
from conveyor.shared.errors import FailedPreconditionError

logger = logging.getLogger(__name__)

ONNX_FORMATS: Final = frozenset(
    {
        registry_pb.MODEL_FORMAT_ONNX_FP32,
        registry_pb.MODEL_FORMAT_ONNX_FP16,
        registry_pb.MODEL_FORMAT_ONNX_INT8_DYNAMIC,
        registry_pb.MODEL_FORMAT_ONNX_INT8_STATIC,
    }
)
OPTIMIZATION_LEVELS: Final[Mapping[int, ort.GraphOptimizationLevel]] = {
    pb.GRAPH_OPTIMIZATION_LEVEL_UNSPECIFIED: ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    pb.GRAPH_OPTIMIZATION_LEVEL_DISABLE_ALL: ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    pb.GRAPH_OPTIMIZATION_LEVEL_BASIC: ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    pb.GRAPH_OPTIMIZATION_LEVEL_EXTENDED: ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    pb.GRAPH_OPTIMIZATION_LEVEL_ALL: ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}
INLINE_COMPUTE_S: Final = 0.0002
"""A model whose largest warmed batch computes faster than this runs on the
event loop: handing it to a thread and back costs more than the compute."""

Arrays = dict[str, npt.NDArray[Any]]
BatchObserver = Callable[[int, list[float], float], None]
"""Told of each batch a version computed: rows, each request's wait, compute seconds."""
ShadowListener = Callable[["LoadedVersion", Arrays, Arrays, str, bool], None]
"""Told of each shadow answer: its version, inputs, outputs, request id, and
whether it agreed with the served answer."""
ArtifactFetcher = Callable[[str], Awaitable[Path]]
"""The local path of a version's verified artifact, by resolved version name."""


@dataclass(frozen=True)
class Observers:
    """Who hears about the work versions do (metrics, the prediction log)."""

    on_batch: Callable[[LoadedVersion], BatchObserver] | None = None
    """Gives each version the observer of its batches."""
    on_shadow: ShadowListener | None = None


NO_OBSERVERS: Final = Observers()


@dataclass(frozen=True)
class ServingOptions:
    """How a version is loaded and batched: a deployment's settings with the
    server's defaults filled in."""

    provider: str
    gpu_device_id: int
    instance_count: int
    intra_op_threads: int
    inter_op_threads: int
    optimization_level: ort.GraphOptimizationLevel
    max_batch_size: int
    max_queue_delay: timedelta
    max_queue_size: int
    warmup_iterations: int
    warmup_batch_sizes: tuple[int, ...]


@dataclass
class RequestStatistics:
    """Per-request counts and durations of one version, as Triton reports them.

    Every part of an answered request is added in one step when its answer is
    ready, so a snapshot never shows a request's compute without its input
    and output parts (perf_analyzer refuses statistics whose counts differ).
    The batcher keeps the per-batch numbers."""

    success: int = 0
    success_ns: int = 0
    fail: int = 0
    fail_ns: int = 0
    rows: int = 0
    queue_ns: int = 0
    input_ns: int = 0
    compute_ns: int = 0
    output_ns: int = 0
    last_inference_ms: int = 0


@dataclass(eq=False)
class LoadedVersion:
    """A version in a deployment, from loading to unloaded."""

    name: str
    """``models/{model}/versions/{version}``."""
    number: str = field(init=False)
    """The version number, as the Open Inference Protocol names versions."""
    target: str
    """The reference that selected it; empty for on-demand versions."""
    role: pb.VersionRole.ValueType
    options: ServingOptions
    state: pb.VersionState.ValueType = pb.VERSION_STATE_LOADING
    registered: registry_pb.ModelVersion = field(default_factory=registry_pb.ModelVersion)
    instances: tuple[ServedModel, ...] = ()
    batcher: DynamicBatcher | None = None
    max_batch_size: int = 0
    error_message: str = ""
    ready_time: datetime | None = None
    load_duration: timedelta = timedelta(0)
    warmup_duration: timedelta = timedelta(0)
    in_flight: int = 0
    last_used: float = field(default_factory=time.monotonic)
    inline: bool = False
    statistics: RequestStatistics = field(default_factory=RequestStatistics)
    _free: asyncio.Queue[ServedModel] | None = None
    _executor: ThreadPoolExecutor | None = None
    _drained: asyncio.Event = field(default_factory=asyncio.Event)

    def __post_init__(self) -> None:
        self.number = self.name.rsplit("/", 1)[1]

    @property
    def inputs(self) -> tuple[TensorSpec, ...]:
        return self.instances[0].inputs if self.instances else ()

    @property
    def outputs(self) -> tuple[TensorSpec, ...]:
        return self.instances[0].outputs if self.instances else ()

    @property
    def device(self) -> str:
        if self.options.provider == onnx_runtime.CUDA:
            return f"cuda:{self.options.gpu_device_id}"
        return "cpu"

    @property
    def execution_provider(self) -> pb.ExecutionProvider.ValueType:
        if self.options.provider == onnx_runtime.CUDA:
            return pb.EXECUTION_PROVIDER_CUDA
        return pb.EXECUTION_PROVIDER_CPU

    @property
    def answers_at_once(self) -> bool:
        """Whether a request computes as soon as it arrives, on the event loop,
        never waiting (a model small enough to run inline, unbatched)."""
        return self.inline and self.options.max_queue_delay <= timedelta(0)

    @property
    def ready(self) -> bool:
        return self.state == pb.VERSION_STATE_READY

    async def infer(self, inputs: Arrays, *, deadline: float | None) -> tuple[Arrays, BatchTiming]:
        """The outputs for ``inputs``, computed in some batch, and when;
        ``deadline`` on the monotonic clock."""
        assert self.batcher is not None
        self.in_flight += 1
        self.last_used = time.monotonic()
        try:
            return await self.batcher.infer_timed(inputs, deadline=deadline)
        finally:
            self.in_flight -= 1
            if self.in_flight == 0:
                self._drained.set()

    async def drain_and_unload(self, grace: timedelta) -> None:
        """Wait for the requests in flight (at most ``grace``), then unload."""
        self.state = pb.VERSION_STATE_DRAINING
        if self.in_flight:
            self._drained.clear()
            try:
                await asyncio.wait_for(self._drained.wait(), grace.total_seconds())
            except TimeoutError:
                logger.warning(
                    "version unloaded with requests in flight",
                    extra={"model_version": self.name, "in_flight": self.in_flight},
                )
        await self.unload()

    async def unload(self) -> None:
        if self.batcher is not None:
            await self.batcher.close()
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
        self.instances = ()
        self.batcher = None

    async def _compute(self, inputs: Arrays) -> Arrays:
        if self.inline:
            # On the event loop nothing else runs meanwhile: no instance to wait for.
            return self.instances[0].run(inputs)
        assert self._free is not None
        instance = await self._free.get()
        try:
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(self._executor, instance.run, inputs)
        finally:
            self._free.put_nowait(instance)


async def load_version(
    registered: registry_pb.ModelVersion,
    *,
    fetch: ArtifactFetcher,
    target: str,
    role: pb.VersionRole.ValueType,
    options: ServingOptions,
    observers: Observers = NO_OBSERVERS,
) -> LoadedVersion:
    """``registered`` loaded and warmed; a failure is recorded in the returned
    version (state FAILED, ``error_message``) rather than raised, so the
    versions already serving keep serving."""
    version = LoadedVersion(
        name=registered.name, target=target, role=role, options=options, registered=registered
    )
    started = time.monotonic()
    try:
        check_servable(registered)
        path = await fetch(registered.name)
        model = await asyncio.to_thread(path.read_bytes)
        instances = await asyncio.to_thread(_open_sessions, model, registered, options)
        version.instances = instances
        version.max_batch_size = (
            min(options.max_batch_size, instances[0].max_batch_size)
            if instances[0].max_batch_size
            else 1
        )
        version.load_duration = timedelta(seconds=time.monotonic() - started)
        version.state = pb.VERSION_STATE_WARMING
        warm_started = time.monotonic()
        slowest = await asyncio.to_thread(_warm_up, instances[0], version.max_batch_size, options)
        version.warmup_duration = timedelta(seconds=time.monotonic() - warm_started)
        version.inline = slowest < INLINE_COMPUTE_S and options.provider == onnx_runtime.CPU
        if version.inline and options.intra_op_threads != 1:
            # On the event loop a thread pool only adds hand-offs to a model
            # this small: one thread computes it at least as fast.
            single = replace(options, intra_op_threads=1)
            version.instances = await asyncio.to_thread(_open_sessions, model, registered, single)
            await asyncio.to_thread(_warm_up, version.instances[0], version.max_batch_size, single)
    except Exception as error:  # noqa: BLE001 - any failure leaves the old versions serving
        version.state = pb.VERSION_STATE_FAILED
        version.error_message = _describe(error)
        version.load_duration = timedelta(seconds=time.monotonic() - started)
        logger.warning(
            "version failed to load",
            extra={"model_version": registered.name, "error": version.error_message},
        )
        return version
    version._free = asyncio.Queue()
    for instance in version.instances:
        version._free.put_nowait(instance)
    version._executor = ThreadPoolExecutor(
        max_workers=len(version.instances), thread_name_prefix=f"infer-{version.number}"
    )
    version.batcher = DynamicBatcher(
        version._compute,
        max_batch_size=version.max_batch_size,
        max_queue_delay=options.max_queue_delay,
        max_queue_size=options.max_queue_size,
        max_concurrent_batches=len(version.instances),
        on_batch=observers.on_batch(version) if observers.on_batch is not None else None,
    )
    version.state = pb.VERSION_STATE_READY
    version.ready_time = datetime.now(UTC)
    logger.info(
        "version ready",
        extra={
            "model_version": registered.name,
            "provider": options.provider,
            "max_batch_size": version.max_batch_size,
            "load_s": round(version.load_duration.total_seconds(), 3),
            "warmup_s": round(version.warmup_duration.total_seconds(), 3),
        },
    )
    return version


def check_servable(registered: registry_pb.ModelVersion) -> None:
    """FAILED_PRECONDITION for a version inference cannot or must not serve."""
    if registered.format not in ONNX_FORMATS:
        raise FailedPreconditionError(
            f"{registered.name} is {registry_pb.ModelFormat.Name(registered.format)}; "
            "inference serves ONNX versions (the optimizer exports one)",
            reason="NOT_ONNX",
        )
    if registered.state == registry_pb.MODEL_VERSION_STATE_ARCHIVED:
        raise FailedPreconditionError(f"{registered.name} is archived", reason="VERSION_ARCHIVED")
    if registered.HasField("deployment_block"):
        raise FailedPreconditionError(
            f"{registered.name} is blocked from deployment: {registered.deployment_block.reason}",
            reason="DEPLOYMENT_BLOCKED",
        )


def _open_sessions(
    model: bytes, registered: registry_pb.ModelVersion, options: ServingOptions
) -> tuple[ServedModel, ...]:
    signature = registered.signature if registered.HasField("signature") else None
    return tuple(
        ServedModel.load(
            model,
            provider=options.provider,
            signature=signature,
            threads=options.intra_op_threads,
            inter_op_threads=options.inter_op_threads,
            optimization_level=options.optimization_level,
            gpu_device_id=options.gpu_device_id,
            warmup_runs=0,
        )
        for _ in range(options.instance_count)
    )


def _warm_up(instance: ServedModel, max_batch_size: int, options: ServingOptions) -> float:
    """Run every warm-up batch size; the median seconds of the largest."""
    sizes = options.warmup_batch_sizes or tuple(sorted({1, max_batch_size}))
    timings: list[float] = []
    for size in sizes:
        if size > max_batch_size:
            continue
        batch = instance.zeros(batch_size=size)
        timings = []
        for _ in range(max(options.warmup_iterations, 1)):
            started = time.perf_counter()
            instance.run(batch)
            timings.append(time.perf_counter() - started)
    timings.sort()
    return timings[len(timings) // 2] if timings else 0.0


def _describe(error: Exception) -> str:
    text = str(error) or type(error).__name__
    return text[:500]


def requested(outputs: Arrays, names: Sequence[str]) -> list[tuple[str, npt.NDArray[Any]]]:
    """The outputs asked for, in the order asked (all, in the model's order,
    when none are named)."""
    if not names:
        return list(outputs.items())
    return [(name, outputs[name]) for name in names]
