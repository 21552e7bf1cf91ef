"""The inference service's Prometheus metrics, scraped over HTTP as Prometheus
would: counts, sums and buckets after observations; an unloaded version's
series removed; GPU memory only where NVML answers; two servers in one process
kept apart; and several processes summed in multiprocess mode."""

from __future__ import annotations

import ctypes
import os
import subprocess
import sys
import textwrap
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from conveyor.services.inference.metrics import (
    GpuMemoryCollector,
    InferenceMetrics,
    MetricsServer,
    start_metrics_server,
)

ABSENT = "libnvidia-ml-absent.so.1"
"""A library name no machine has: tests of everything but GPUs run the same everywhere."""

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(port: int) -> Samples:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        assert response.headers["Content-Type"].startswith("text/plain")
        return parse(response.read().decode())


def parse(text: str) -> Samples:
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((f"conveyor_inference_{name}", tuple(sorted(labels.items()))))


@pytest.fixture
def metrics() -> InferenceMetrics:
    return InferenceMetrics(nvml_library=ABSENT)


@pytest.fixture
def server(metrics: InferenceMetrics) -> Iterator[MetricsServer]:
    served = start_metrics_server("127.0.0.1:0", metrics)
    yield served
    served.close()


def test_observations_are_scraped_with_their_counts_sums_and_buckets(
    metrics: InferenceMetrics, server: MetricsServer
) -> None:
    metrics.observe_request("churn", 3, grpc.StatusCode.OK, 0.0002)
    metrics.observe_request("churn", 3, grpc.StatusCode.OK, 0.003)
    metrics.observe_request("churn", 3, grpc.StatusCode.RESOURCE_EXHAUSTED, 0.00001)
    observe_batch = metrics.batch_observer("churn", 3)
    observe_batch(5, [0.001, 0.002], 0.004)
    observe_batch(1, [0.5], 0.02)
    metrics.set_queue_depth("churn", 3, 7)
    metrics.set_loaded("churn", "READY", 2)
    metrics.set_loaded("churn", "LOADING", 1)
    metrics.count_prediction_log_sent("churn", 30)
    metrics.count_prediction_log_dropped("churn", "full", 4)
    metrics.count_shadow("churn", mirrored=3, disagreements=1)
    metrics.count_shadow("churn", mirrored=1, errors=1)

    samples = scrape(server.port)
    version = {"model": "churn", "version": "3"}
    assert value(samples, "requests_total", **version, status="OK") == 2
    assert value(samples, "requests_total", **version, status="RESOURCE_EXHAUSTED") == 1
    # Latency counts successful requests only.
    assert value(samples, "request_duration_seconds_count", **version) == 2
    assert value(samples, "request_duration_seconds_sum", **version) == pytest.approx(0.0032)
    assert value(samples, "request_duration_seconds_bucket", **version, le="0.0001") == 0
    assert value(samples, "request_duration_seconds_bucket", **version, le="0.00025") == 1
    assert value(samples, "request_duration_seconds_bucket", **version, le="0.005") == 2
    assert value(samples, "request_duration_seconds_bucket", **version, le="+Inf") == 2
    assert value(samples, "queue_duration_seconds_count", **version) == 3
    assert value(samples, "queue_duration_seconds_sum", **version) == pytest.approx(0.503)
    assert value(samples, "compute_duration_seconds_count", **version) == 2
    assert value(samples, "compute_duration_seconds_sum", **version) == pytest.approx(0.024)
    assert value(samples, "batch_size_bucket", **version, le="1.0") == 1
    assert value(samples, "batch_size_bucket", **version, le="4.0") == 1
    assert value(samples, "batch_size_bucket", **version, le="8.0") == 2
    assert value(samples, "batch_size_bucket", **version, le="4096.0") == 2
    assert value(samples, "batch_size_sum", **version) == 6
    assert value(samples, "queue_depth", **version) == 7
    assert value(samples, "loaded_versions", model="churn", state="READY") == 2
    assert value(samples, "loaded_versions", model="churn", state="LOADING") == 1
    assert value(samples, "prediction_log_sent_records_total", model="churn") == 30
    assert value(samples, "prediction_log_dropped_records_total", model="churn", reason="full") == 4
    assert value(samples, "shadow_mirrored_total", model="churn") == 4
    assert value(samples, "shadow_disagreements_total", model="churn") == 1
    assert value(samples, "shadow_errors_total", model="churn") == 1
    assert value(samples, "shadow_dropped_total", model="churn") is None


def test_only_the_metrics_path_is_served(server: MetricsServer) -> None:
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(f"http://127.0.0.1:{server.port}/other", timeout=10)
    assert refused.value.code == 404
    refused.value.close()


def test_an_unloaded_versions_series_are_removed(
    metrics: InferenceMetrics, server: MetricsServer
) -> None:
    for version in (3, 4):
        metrics.observe_request("churn", version, grpc.StatusCode.OK, 0.001)
        metrics.observe_request("churn", version, grpc.StatusCode.INTERNAL, 0.001)
        metrics.batch_observer("churn", version)(2, [0.001], 0.002)
        metrics.set_queue_depth("churn", version, 1)

    metrics.remove_version("churn", 3)

    samples = scrape(server.port)
    labelled = [dict(labels) for _, labels in samples]
    assert not [labels for labels in labelled if labels.get("version") == "3"]
    assert value(samples, "requests_total", model="churn", version="4", status="INTERNAL") == 1
    assert value(samples, "batch_size_count", model="churn", version="4") == 1
    assert value(samples, "queue_depth", model="churn", version="4") == 1
    # A version loaded again starts from zero.
    metrics.observe_request("churn", 3, grpc.StatusCode.OK, 0.001)
    samples = scrape(server.port)
    assert value(samples, "requests_total", model="churn", version="3", status="OK") == 1
    assert value(samples, "requests_total", model="churn", version="3", status="INTERNAL") is None


def test_without_nvml_there_are_no_gpu_samples(server: MetricsServer) -> None:
    collector = GpuMemoryCollector(ABSENT)
    assert not collector.available
    assert list(collector.collect()) == []
    assert not [name for name, _ in scrape(server.port) if "gpu" in name]


def test_gpu_memory_is_read_per_device_through_nvml() -> None:
    nvml = FakeNvml(devices=[(1 << 30, 80 << 30), None, (5 << 30, 80 << 30)])
    collector = GpuMemoryCollector("libnvidia-ml.so.1", loader=nvml.open)
    assert nvml.opened == ["libnvidia-ml.so.1"]
    samples = {
        (sample.name, sample.labels["device"]): sample.value
        for family in collector.collect()
        for sample in family.samples
    }
    # Device 1 did not answer: it is left out, the others are reported.
    assert samples == {
        ("conveyor_inference_gpu_memory_used_bytes", "0"): 1 << 30,
        ("conveyor_inference_gpu_memory_used_bytes", "2"): 5 << 30,
        ("conveyor_inference_gpu_memory_total_bytes", "0"): 80 << 30,
        ("conveyor_inference_gpu_memory_total_bytes", "2"): 80 << 30,
    }


def test_nvml_that_does_not_start_means_no_gpu_samples() -> None:
    nvml = FakeNvml(devices=[(1, 2)], init_error=9)  # NVML_ERROR_DRIVER_NOT_LOADED
    collector = GpuMemoryCollector("libnvidia-ml.so.1", loader=nvml.open)
    assert not collector.available
    assert list(collector.collect()) == []


def test_the_real_nvml_when_this_machine_has_one() -> None:
    """Holds on any machine: a GPU's samples are sane, no GPU gives none."""
    collector = GpuMemoryCollector()
    families = {family.name: family for family in collector.collect()}
    if not collector.available:
        assert families == {}
        return
    used = families["conveyor_inference_gpu_memory_used_bytes"].samples
    total = families["conveyor_inference_gpu_memory_total_bytes"].samples
    assert len(used) == len(total) >= 1
    for used_sample, total_sample in zip(used, total, strict=True):
        assert 0 < used_sample.value <= total_sample.value


def test_two_servers_in_one_process_keep_their_own_metrics() -> None:
    first, second = InferenceMetrics(nvml_library=ABSENT), InferenceMetrics(nvml_library=ABSENT)
    first_server = start_metrics_server("127.0.0.1:0", first)
    second_server = start_metrics_server("localhost:0", second)
    try:
        first.observe_request("churn", 1, grpc.StatusCode.OK, 0.001)
        for _ in range(3):
            second.observe_request("churn", 1, grpc.StatusCode.OK, 0.001)
        labels = {"model": "churn", "version": "1", "status": "OK"}
        assert value(scrape(first_server.port), "requests_total", **labels) == 1
        assert value(scrape(second_server.port), "requests_total", **labels) == 3
    finally:
        first_server.close()
        second_server.close()


def test_a_listen_address_without_a_port_is_refused(metrics: InferenceMetrics) -> None:
    with pytest.raises(ValueError, match="host:port"):
        start_metrics_server("127.0.0.1", metrics)


WRITER = textwrap.dedent(
    """
    import sys

    import grpc

    from conveyor.services.inference.metrics import InferenceMetrics

    metrics = InferenceMetrics(nvml_library="{absent}")
    assert metrics.multiprocess
    requests = int(sys.argv[1])
    for _ in range(requests):
        metrics.observe_request("churn", 3, grpc.StatusCode.OK, 0.001)
    metrics.batch_observer("churn", 3)(requests, [0.001], 0.002)
    metrics.set_queue_depth("churn", 3, requests)
    metrics.set_loaded("churn", "READY", 1)
    if sys.argv[2:] == ["unload"]:
        metrics.remove_version("churn", 3)
    """
).format(absent=ABSENT)

READER = textwrap.dedent(
    """
    import urllib.request

    from conveyor.services.inference.metrics import InferenceMetrics, start_metrics_server

    server = start_metrics_server("127.0.0.1:0", InferenceMetrics(nvml_library="{absent}"))
    url = f"http://127.0.0.1:{{server.port}}/metrics"
    with urllib.request.urlopen(url, timeout=10) as response:
        print(response.read().decode())
    server.close()
    """
).format(absent=ABSENT)


@pytest.mark.slow
def test_multiprocess_mode_sums_the_processes(tmp_path: Path) -> None:
    environment = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}

    def python(script: str, *args: str) -> str:
        done = subprocess.run(
            [sys.executable, "-W", "error", "-c", script, *args],
            env=environment,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert done.returncode == 0, done.stderr
        return done.stdout

    writers = [
        subprocess.Popen(
            [sys.executable, "-W", "error", "-c", WRITER, *args],
            env=environment,
            stderr=subprocess.PIPE,
            text=True,
        )
        for args in (["3"], ["4", "unload"])
    ]
    for writer in writers:
        _, errors = writer.communicate(timeout=60)
        assert writer.returncode == 0, errors

    samples = parse(python(READER))
    version = {"model": "churn", "version": "3"}
    assert value(samples, "requests_total", **version, status="OK") == 7
    assert value(samples, "request_duration_seconds_count", **version) == 7
    assert value(samples, "batch_size_count", **version) == 2
    assert value(samples, "batch_size_sum", **version) == 7
    # Queue depth is summed over the processes (the unloaded version's is 0);
    # loaded versions are the most any process has, as processes are replicas.
    assert value(samples, "queue_depth", **version) == 3
    assert value(samples, "loaded_versions", model="churn", state="READY") == 1


class FakeNvml:
    """NVML's four calls, answering as a driver would through ctypes pointers;
    ``None`` for a device that fails to answer its memory info."""

    def __init__(self, devices: list[tuple[int, int] | None], init_error: int = 0) -> None:
        self.devices = devices
        self.init_error = init_error
        self.opened: list[str] = []

    def open(self, name: str) -> Any:
        self.opened.append(name)
        return FakeLibrary(self)


class FakeLibrary:
    """What ``ctypes.CDLL`` returns, for :class:`FakeNvml`; functions take
    ``argtypes``/``restype`` attributes like ctypes functions do."""

    def __init__(self, nvml: FakeNvml) -> None:
        self.nvml = nvml
        for name in (
            "nvmlInit_v2",
            "nvmlDeviceGetCount_v2",
            "nvmlDeviceGetHandleByIndex_v2",
            "nvmlDeviceGetMemoryInfo",
        ):
            setattr(self, name, Function(getattr(self, f"_{name}")))

    def _nvmlInit_v2(self) -> int:
        return self.nvml.init_error

    def _nvmlDeviceGetCount_v2(self, count: Any) -> int:
        count.contents.value = len(self.nvml.devices)
        return 0

    def _nvmlDeviceGetHandleByIndex_v2(self, index: int, handle: Any) -> int:
        handle.contents.value = 0x1000 + index
        return 0

    def _nvmlDeviceGetMemoryInfo(self, handle: ctypes.c_void_p, info: Any) -> int:
        device = self.nvml.devices[(handle.value or 0) - 0x1000]
        if device is None:
            return 15  # NVML_ERROR_GPU_IS_LOST
        info.contents.used, info.contents.total = device
        info.contents.free = device[1] - device[0]
        return 0


class Function:
    def __init__(self, call: Any) -> None:
        self.call = call
        self.argtypes: tuple[Any, ...] = ()
        self.restype: Any = None

    def __call__(self, *args: Any) -> int:
        result: int = self.call(*args)
        return result
