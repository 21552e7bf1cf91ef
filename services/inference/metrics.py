"""Prometheus metrics of the inference service, served over HTTP at ``/metrics``.

Prometheus scrapes HTTP in its text exposition format, so the metrics are not
a gRPC method: :func:`start_metrics_server` serves :class:`InferenceMetrics`
on their own port (9104 by default, see :mod:`conveyor.shared.ports`). Every
name starts with ``conveyor_inference_``; ``model`` labels hold the model id
and ``version`` labels the version number.

- **Requests**: a counter by model, version and status (the gRPC code's name),
  and the latency of successful ones from arrival to answer as a histogram by
  model and version (a refusal answered at once would flatter it; the counter
  gives the error rate).
- **Batches**: how long requests waited in the queue, how long each
  computation took, and how many rows each batch held; the queue depth now.
- **Models**: how many versions of each model are in each state.
- **Prediction log and shadow traffic**: records sent and dropped (and why),
  requests mirrored to a shadow version, disagreements, drops and errors.
- **GPU memory**: used and total bytes per device, read from NVML when a
  scrape comes; nothing at all where there is no NVIDIA driver.

Each :class:`InferenceMetrics` owns its registry, so several servers in one
process (tests) never collide. A version's series are removed when it is
unloaded, so the exposition does not grow with every version ever served.

**Several processes.** When ``PROMETHEUS_MULTIPROC_DIR`` is set, prometheus-
client keeps every value in memory-mapped files in that directory (it decides
so, process-wide, when it is imported), and a scrape of any process must show
the sum over all of them. The registry then holds a ``MultiProcessCollector``
that reads those files instead of the process's own metrics. Gauges need a
rule for combining processes. Queue depth is ``livesum``: each process queues
its own requests, so the depth of the whole server is the sum. Loaded versions
are ``livemax``: processes are replicas that each load the same versions, so
a sum would count one version once per process. Both take live processes only,
once the supervisor calls ``prometheus_client.multiprocess.mark_process_dead(pid)``
for a worker that died (its files stay until then). Series cannot be
removed from those files, so an unloaded version's queue depth is set to 0
instead.
"""

from __future__ import annotations

import ctypes
import logging
import os
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Final

import grpc
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
)
from prometheus_client.gc_collector import GCCollector
from prometheus_client.metrics_core import GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector

from conveyor.shared import metrics_http
from conveyor.shared.metrics_http import MetricsServer as MetricsServer

logger = logging.getLogger(__name__)

PREFIX: Final = "conveyor_inference_"

MULTIPROCESS_ENV: Final = "PROMETHEUS_MULTIPROC_DIR"
"""prometheus-client's switch to multiprocess mode (read by the library itself)."""

LATENCY_BUCKETS: Final = (
    0.00005,
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)
"""Seconds, 50 µs to 10 s: a small model on a GPU answers in well under a
millisecond, a large one on a CPU in seconds."""

BATCH_SIZE_BUCKETS: Final = tuple(float(2**power) for power in range(13))
"""Rows per batch: 1, 2, 4, … 4096."""

NVML_LIBRARY: Final = "libnvidia-ml.so.1"
"""The NVIDIA driver's management library (present wherever the driver is)."""


class InferenceMetrics:
    """The inference service's metrics and the registry they are exposed from.

    Every method is cheap and thread-safe, so it can be called on the serving
    path from the event loop or from worker threads.
    """

    def __init__(self, *, nvml_library: str = NVML_LIBRARY) -> None:
        directory = multiprocess_directory()
        self.multiprocess = directory is not None
        """Whether values live in the shared multiprocess files."""
        self.registry = CollectorRegistry()
        """What ``/metrics`` exposes."""
        # In multiprocess mode the metrics belong to no registry: their values
        # are in the files, which the MultiProcessCollector below reads.
        own = None if self.multiprocess else self.registry
        per_version = ("model", "version")
        self._requests = Counter(
            f"{PREFIX}requests",
            "Inference requests answered, by gRPC status code.",
            (*per_version, "status"),
            registry=own,
        )
        self._latency = Histogram(
            f"{PREFIX}request_duration_seconds",
            "Time from a successful request's arrival to its answer.",
            per_version,
            buckets=LATENCY_BUCKETS,
            registry=own,
        )
        self._queue_wait = Histogram(
            f"{PREFIX}queue_duration_seconds",
            "Time requests waited in the batch queue before their batch ran.",
            per_version,
            buckets=LATENCY_BUCKETS,
            registry=own,
        )
        self._compute = Histogram(
            f"{PREFIX}compute_duration_seconds",
            "Time each batch's computation took.",
            per_version,
            buckets=LATENCY_BUCKETS,
            registry=own,
        )
        self._batch_size = Histogram(
            f"{PREFIX}batch_size",
            "Rows in each computed batch.",
            per_version,
            buckets=BATCH_SIZE_BUCKETS,
            registry=own,
        )
        self._queue_depth = Gauge(
            f"{PREFIX}queue_depth",
            "Requests waiting in the batch queue now.",
            per_version,
            registry=own,
            multiprocess_mode="livesum",
        )
        self._loaded = Gauge(
            f"{PREFIX}loaded_versions",
            "Versions of each model in each state.",
            ("model", "state"),
            registry=own,
            multiprocess_mode="livemax",
        )
        self._log_sent = Counter(
            f"{PREFIX}prediction_log_sent_records",
            "Prediction records the monitor took.",
            ("model",),
            registry=own,
        )
        self._log_dropped = Counter(
            f"{PREFIX}prediction_log_dropped_records",
            "Prediction records dropped (buffer full, send failed, log closed).",
            ("model", "reason"),
            registry=own,
        )
        self._shadow = {
            kind: Counter(
                f"{PREFIX}shadow_{kind}",
                description,
                ("model",),
                registry=own,
            )
            for kind, description in _SHADOW_COUNTERS.items()
        }
        self._statuses: dict[tuple[str, str], set[str]] = {}
        # Labelled series looked up once: the serving path observes several
        # per request, and a label lookup costs as much as the observation.
        self._request_series: dict[tuple[str, str, str], tuple[Any, Any]] = {}
        self._lock = threading.Lock()
        if directory is not None:
            MultiProcessCollector(self.registry, path=directory)  # type: ignore[no-untyped-call]
        else:
            ProcessCollector(registry=self.registry)
            PlatformCollector(registry=self.registry)
            GCCollector(registry=self.registry)
        self.registry.register(GpuMemoryCollector(nvml_library))

    def observe_request(
        self, model: str, version: str | int, status: grpc.StatusCode | str, latency_s: float
    ) -> None:
        """Counts one answered request; its latency is counted only when it
        succeeded, so fast refusals do not flatter the latency."""
        code = status.name if isinstance(status, grpc.StatusCode) else status
        key = (model, str(version), code)
        series = self._request_series.get(key)
        if series is None:
            labels = key[:2]
            with self._lock:
                self._statuses.setdefault(labels, set()).add(code)
            latency = self._latency.labels(*labels) if code == grpc.StatusCode.OK.name else None
            series = (self._requests.labels(*key), latency)
            self._request_series[key] = series
        series[0].inc()
        if series[1] is not None:
            series[1].observe(latency_s)

    def batch_observer(
        self, model: str, version: str | int
    ) -> Callable[[int, Sequence[float], float], None]:
        """What counts each batch ``version`` of ``model`` computes: its rows,
        how long each of its requests waited, how long it computed (seconds).
        The labelled series are looked up once, here."""
        labels = (model, str(version))
        batch_size = self._batch_size.labels(*labels)
        compute = self._compute.labels(*labels)
        queue_wait = self._queue_wait.labels(*labels)

        def observe(rows: int, waits: Sequence[float], compute_s: float) -> None:
            batch_size.observe(rows)
            compute.observe(compute_s)
            for wait in waits:
                queue_wait.observe(wait)

        return observe

    def set_queue_depth(self, model: str, version: str | int, depth: int) -> None:
        """Requests waiting now in the version's batch queue."""
        self._queue_depth.labels(model, str(version)).set(depth)

    def set_loaded(self, model: str, state: str, count: int) -> None:
        """How many of ``model``'s versions are in ``state`` (e.g. ``READY``)."""
        self._loaded.labels(model, state).set(count)

    def remove_version(self, model: str, version: str | int) -> None:
        """Forgets an unloaded version's series (see the module on multiprocess mode)."""
        labels = (model, str(version))
        for key in [k for k in self._request_series if k[:2] == labels]:
            del self._request_series[key]
        if self.multiprocess:
            self._queue_depth.labels(*labels).set(0)
            return
        with self._lock:
            statuses = self._statuses.pop(labels, set())
        for code in statuses:
            self._requests.remove(*labels, code)
        for metric in (self._latency, self._queue_wait, self._compute, self._batch_size):
            metric.remove(*labels)
        self._queue_depth.remove(*labels)

    def count_prediction_log_sent(self, model: str, count: int = 1) -> None:
        """Prediction records of ``model`` the monitor took."""
        self._log_sent.labels(model).inc(count)

    def count_prediction_log_dropped(self, model: str, reason: str, count: int = 1) -> None:
        """Prediction records of ``model`` dropped; ``reason`` is ``full``,
        ``failed`` or ``closed`` (the prediction log's outcomes)."""
        self._log_dropped.labels(model, reason).inc(count)

    def count_shadow(
        self,
        model: str,
        *,
        mirrored: int = 0,
        disagreements: int = 0,
        dropped: int = 0,
        errors: int = 0,
    ) -> None:
        """Shadow traffic of ``model``: requests mirrored to its shadow version,
        answers that disagreed with the primary's, mirrors dropped (the shadow
        busy), and mirrors that failed."""
        counts = {
            "mirrored": mirrored,
            "disagreements": disagreements,
            "dropped": dropped,
            "errors": errors,
        }
        for kind, count in counts.items():
            if count:
                self._shadow[kind].labels(model).inc(count)


_SHADOW_COUNTERS: Final = {
    "mirrored": "Requests mirrored to the model's shadow version.",
    "disagreements": "Shadow answers that disagreed with the primary's.",
    "dropped": "Mirrored requests dropped because the shadow was busy.",
    "errors": "Mirrored requests the shadow version failed.",
}


def multiprocess_directory() -> str | None:
    """The multiprocess directory, when prometheus-client is in that mode.

    Read from the environment, unlike the service's settings, because it is
    prometheus-client's own switch: the library reads it once when imported to
    choose where values live, so a setting could only disagree with it.
    """
    return os.environ.get(MULTIPROCESS_ENV) or None


def start_metrics_server(listen: str, metrics: InferenceMetrics) -> MetricsServer:
    """Serves ``metrics`` at ``http://{listen}/metrics`` (see
    :func:`conveyor.shared.metrics_http.start_metrics_server`)."""
    return metrics_http.start_metrics_server(listen, metrics.registry)


class GpuMemoryCollector:
    """GPU memory used and total, per device, read through NVML on each scrape.

    NVML comes with the NVIDIA driver, so it is loaded through ctypes rather
    than a Python binding (one less dependency; nothing to install on CPU
    machines). Where it is absent or fails to start, the collector yields
    nothing: no GPU, no GPU series. ``loader`` opens the library (tests pass a
    fake).
    """

    def __init__(self, library: str = NVML_LIBRARY, *, loader: Any = ctypes.CDLL) -> None:
        self._nvml = _Nvml.load(library, loader)

    @property
    def available(self) -> bool:
        return self._nvml is not None

    def collect(self) -> Iterator[Metric]:
        if self._nvml is None:
            return
        devices = self._nvml.memory()
        if not devices:
            return
        used = GaugeMetricFamily(
            f"{PREFIX}gpu_memory_used_bytes", "GPU memory in use, per device.", labels=["device"]
        )
        total = GaugeMetricFamily(
            f"{PREFIX}gpu_memory_total_bytes",
            "GPU memory installed, per device.",
            labels=["device"],
        )
        for index, used_bytes, total_bytes in devices:
            used.add_metric([str(index)], used_bytes)
            total.add_metric([str(index)], total_bytes)
        yield used
        yield total


# -- helpers --------------------------------------------------------------------------

_NVML_SUCCESS: Final = 0


class _MemoryInfo(ctypes.Structure):
    """NVML's ``nvmlMemory_t``: total, free and used bytes."""

    _fields_ = (
        ("total", ctypes.c_ulonglong),
        ("free", ctypes.c_ulonglong),
        ("used", ctypes.c_ulonglong),
    )


class _Nvml:
    """The four NVML calls this module needs, on a loaded library."""

    def __init__(self, library: Any) -> None:
        self._lib = library

    @classmethod
    def load(cls, name: str, loader: Any) -> _Nvml | None:
        try:
            library = loader(name)
            library.nvmlInit_v2.restype = ctypes.c_int
            library.nvmlInit_v2.argtypes = ()
            library.nvmlDeviceGetCount_v2.restype = ctypes.c_int
            library.nvmlDeviceGetCount_v2.argtypes = (ctypes.POINTER(ctypes.c_uint),)
            library.nvmlDeviceGetHandleByIndex_v2.restype = ctypes.c_int
            library.nvmlDeviceGetHandleByIndex_v2.argtypes = (
                ctypes.c_uint,
                ctypes.POINTER(ctypes.c_void_p),
            )
            library.nvmlDeviceGetMemoryInfo.restype = ctypes.c_int
            library.nvmlDeviceGetMemoryInfo.argtypes = (
                ctypes.c_void_p,
                ctypes.POINTER(_MemoryInfo),
            )
        except (OSError, AttributeError):
            logger.debug("NVML (%s) is not available: no GPU memory metrics", name)
            return None
        result = library.nvmlInit_v2()
        if result != _NVML_SUCCESS:
            logger.info("NVML did not start (error %s): no GPU memory metrics", result)
            return None
        return cls(library)

    def memory(self) -> list[tuple[int, int, int]]:
        """``(index, used, total)`` bytes of each device that answered."""
        count = ctypes.c_uint(0)
        if self._lib.nvmlDeviceGetCount_v2(ctypes.pointer(count)) != _NVML_SUCCESS:
            return []
        devices = []
        for index in range(count.value):
            handle = ctypes.c_void_p()
            if self._lib.nvmlDeviceGetHandleByIndex_v2(index, ctypes.pointer(handle)):
                continue
            info = _MemoryInfo()
            if self._lib.nvmlDeviceGetMemoryInfo(handle, ctypes.pointer(info)):
                continue
            devices.append((index, int(info.used), int(info.total)))
        return devices
