"""What a served prediction leaves behind: a record in the monitor's
prediction log (shadow answers marked), Prometheus metrics on the metrics
port, and queue and compute spans under the call's span."""

from __future__ import annotations

import asyncio
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client.parser import text_string_to_metric_families

from conveyor.inference.v1 import resources_pb2 as pb
from conveyor.monitor.v1 import monitor_messages_pb2, monitor_service_pb2_grpc
from conveyor.monitor.v1.resources_pb2 import PredictionRecord
from conveyor.oip.v2 import grpc_service_pb2 as oip
from tests.inference.conftest import (
    FEATURES,
    Suite,
    expected,
    infer_request,
    running_suite,
    weights,
)
from tests.support.suite import free_port

pytestmark = pytest.mark.timeout(120)
X = np.random.default_rng(11).normal(size=(2, FEATURES)).astype(np.float32)


class Monitor(monitor_service_pb2_grpc.MonitorServiceServicer):
    """The monitor's ingest RPC as its contract defines it, keeping what arrives
    (the monitor service itself comes with its own issue)."""

    def __init__(self) -> None:
        self.records: list[PredictionRecord] = []
        self.arrived = asyncio.Event()

    async def BatchLogPredictions(
        self, request: monitor_messages_pb2.BatchLogPredictionsRequest, context: Any
    ) -> monitor_messages_pb2.BatchLogPredictionsResponse:
        self.records.extend(request.records)
        self.arrived.set()
        return monitor_messages_pb2.BatchLogPredictionsResponse(accepted_count=len(request.records))

    async def wait_for(self, count: int) -> list[PredictionRecord]:
        while len(self.records) < count:
            self.arrived.clear()
            await asyncio.wait_for(self.arrived.wait(), 30)
        return self.records


@pytest.fixture
async def monitored(tmp_path: Path) -> AsyncIterator[tuple[Suite, Monitor, int]]:
    monitor = Monitor()
    server = grpc.aio.server()
    monitor_service_pb2_grpc.add_MonitorServiceServicer_to_server(monitor, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    metrics_port = free_port()
    try:
        async for suite in running_suite(
            tmp_path,
            monitor_addr=f"127.0.0.1:{port}",
            metrics_listen=f"127.0.0.1:{metrics_port}",
            prediction_log_batch_size=4,
        ):
            yield suite, monitor, metrics_port
    finally:
        await server.stop(None)


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics") as response:
        text = response.read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


async def test_served_and_shadow_predictions_reach_the_monitor(
    monitored: tuple[Suite, Monitor, int],
) -> None:
    suite, monitor, _ = monitored
    w = weights(60)
    await suite.register("logged", w)
    shadow = await suite.register("logged", weights(61), alias="", create=False)
    await suite.deploy(
        pb.Deployment(model="models/logged", shadow=pb.ShadowConfig(model_version=shadow))
    )
    await suite.oip.ModelInfer(infer_request("logged", X, id="order-7"))
    records = await monitor.wait_for(4)  # two rows served, two shadowed
    served = sorted((r for r in records if not r.shadow), key=lambda r: r.request_id)
    assert [r.request_id for r in served] == ["order-7#0", "order-7#1"]
    for row, record in enumerate(served):
        assert record.model_version == "models/logged/versions/1"
        np.testing.assert_allclose(record.features.numerical, X[row], rtol=1e-6)
        np.testing.assert_allclose(record.outputs, expected(X, w)[row], rtol=1e-5)
        assert record.latency.ToNanoseconds() > 0
        assert record.status_code == 0
    shadowed = [r for r in records if r.shadow]
    assert {r.model_version for r in shadowed} == {shadow}
    assert sorted(r.request_id for r in shadowed) == ["order-7#0", "order-7#1"]
    # A refused request is logged too, without features or outputs: the
    # monitor's error rates count it.
    refused = infer_request("logged", X[:, :3], id="bad-shape")
    with pytest.raises(grpc.aio.AioRpcError):
        await suite.oip.ModelInfer(refused)
    records = await monitor.wait_for(5)
    [failed] = [r for r in records if r.request_id == "bad-shape"]
    assert failed.status_code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert not failed.outputs
    assert failed.model_version == "models/logged/versions/1"


async def test_sampling_zero_logs_nothing(monitored: tuple[Suite, Monitor, int]) -> None:
    suite, monitor, _ = monitored
    await suite.register("quiet", weights(62))
    await suite.register("loud", weights(63))
    await suite.deploy(pb.Deployment(model="models/quiet", prediction_log_sample_rate=0.0))
    for _ in range(5):
        await suite.oip.ModelInfer(infer_request("quiet", X))
    await suite.oip.ModelInfer(infer_request("loud", X, id="last"))
    records = await monitor.wait_for(2)
    assert {r.model_version for r in records} == {"models/loud/versions/1"}


async def test_metrics_count_requests_batches_and_loaded_versions(
    monitored: tuple[Suite, Monitor, int],
) -> None:
    suite, monitor, metrics_port = monitored
    await suite.register("metered", weights(64))
    await asyncio.gather(*(suite.oip.ModelInfer(infer_request("metered", X)) for _ in range(6)))
    with pytest.raises(grpc.aio.AioRpcError):
        await suite.oip.ModelInfer(infer_request("metered", X[:, :3]))
    await monitor.wait_for(13)  # 6 requests of 2 rows, and the refused one
    await asyncio.sleep(1.2)  # the gauges are sampled every second
    samples = await asyncio.to_thread(scrape, metrics_port)

    def value(name: str, **labels: str) -> float:
        return samples[(f"conveyor_inference_{name}", tuple(sorted(labels.items())))]

    version = {"model": "metered", "version": "1"}
    assert value("requests_total", status="OK", **version) == 6
    assert value("requests_total", status="INVALID_ARGUMENT", **version) == 1
    assert value("request_duration_seconds_count", **version) == 6
    batches = value("batch_size_count", **version)
    assert 1 <= batches <= 6
    assert value("batch_size_sum", **version) == 12  # rows, over every batch
    assert value("compute_duration_seconds_count", **version) == batches
    assert value("queue_duration_seconds_count", **version) == 6  # one wait per request
    assert value("loaded_versions", model="metered", state="READY") == 1
    assert value("prediction_log_sent_records_total", model="metered") == 13


async def test_queue_and_compute_spans_name_the_version_and_provider(
    suite: Suite, spans: InMemorySpanExporter
) -> None:
    await suite.register("traced", weights(65))
    await suite.oip.RepositoryModelLoad(oip.RepositoryModelLoadRequest(model_name="traced"))
    spans.clear()
    await suite.oip.ModelInfer(infer_request("traced", X))
    finished = {span.name: span for span in spans.get_finished_spans()}
    call = finished["/inference.GRPCInferenceService/ModelInfer"]
    for name in ("inference.queue", "inference.compute"):
        span = finished[name]
        assert span.parent is not None
        assert span.parent.span_id == call.context.span_id
        assert span.context.trace_id == call.context.trace_id
        attributes = dict(span.attributes or {})
        assert attributes["conveyor.model_version"] == "models/traced/versions/1"
        assert attributes["conveyor.execution_provider"] == "CPUExecutionProvider"
        assert attributes["conveyor.device"] == "cpu"
        assert attributes["conveyor.batch_size"] == 2
    assert finished["inference.queue"].end_time <= finished["inference.compute"].start_time + 1000
