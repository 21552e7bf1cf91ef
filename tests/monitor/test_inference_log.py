"""The inference service's prediction log arrives in the real monitor: every
served prediction stored under its version and request id, with its features,
outputs and latency, and counted in the monitor's windows."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from pathlib import Path

import grpc
import numpy as np

from conveyor.monitor.v1 import monitor_messages_pb2 as rpc
from conveyor.monitor.v1 import resources_pb2 as pb
from conveyor.oip.v2 import grpc_service_pb2_grpc
from conveyor.services.inference.server import build_server as build_inference
from conveyor.services.inference.settings import InferenceSettings
from tests.inference.conftest import (
    expected,
    infer_request,
    linear_classifier,
    signature,
    weights,
)
from tests.monitor.conftest import Suite
from tests.support.registry import a_version, create_model, set_alias, upload_requests
from tests.support.suite import free_port


async def test_served_predictions_are_logged_to_the_monitor(suite: Suite, tmp_path: Path) -> None:
    w = weights(3)
    await create_model(suite.registry, "scorer")
    created = await suite.registry.CreateModelVersion(
        upload_requests(
            "models/scorer", linear_classifier(w), version=a_version(signature=signature())
        ),
        timeout=30,
    )
    version = str(created.model_version.name)
    await set_alias(suite.registry, "models/scorer/aliases/production", version)
    await suite.configure(
        "models/scorer", ["window"], window=pb.WindowSpec(row_count=10, min_rows=10)
    )
    inference = await build_inference(
        InferenceSettings(
            data_dir=tmp_path,  # the registry's secret store: its signing key
            listen=f"127.0.0.1:{free_port()}",
            shutdown_grace=timedelta(seconds=1),
            registry_addr=f"127.0.0.1:{suite.registry_server.port}",
            monitor_addr=f"127.0.0.1:{suite.parts.server.port}",
            metrics_listen="",
            prediction_log_flush_interval=timedelta(milliseconds=50),
        )
    )
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{inference.port}")
    try:
        oip = grpc_service_pb2_grpc.GRPCInferenceServiceStub(channel)
        x = np.random.default_rng(4).normal(size=(12, 4)).astype(np.float32)
        answers = []
        for i in range(12):
            answers.append(
                await oip.ModelInfer(
                    infer_request("scorer", x[i : i + 1], id=f"call-{i}"), timeout=30
                )
            )
        listed = await _wait_for_records(suite, version, 12)
    finally:
        await channel.close(None)
        await inference.shutdown()

    by_id = {p.request_id: p for p in listed}
    assert set(by_id) == {f"call-{i}" for i in range(12)}
    first = by_id["call-0"]
    assert np.allclose(first.features.numerical, x[0], atol=1e-6)
    assert np.allclose(first.outputs, expected(x[:1], w)[0], atol=1e-5)
    assert first.latency.ToNanoseconds() > 0
    assert answers[0].id == "call-0"
    operations = await suite.monitor.GetOperationsReport(
        rpc.GetOperationsReportRequest(model_version=version), timeout=10
    )
    assert operations.operations_report.prediction_count == 10  # the first window closed
    assert operations.operations_report.error_count == 0


async def _wait_for_records(suite: Suite, version: str, count: int) -> list[pb.PredictionRecord]:
    """The version's stored records once ``count`` have arrived (the log is
    sent in the background, within its flush interval)."""
    for _ in range(200):
        listed = await suite.monitor.ListPredictions(
            rpc.ListPredictionsRequest(parent=version, page_size=100), timeout=10
        )
        if len(listed.predictions) >= count:
            await suite.parts.evaluator.settled()
            return list(listed.predictions)
        await asyncio.sleep(0.05)
    raise AssertionError(f"only {len(listed.predictions)} of {count} records arrived")
