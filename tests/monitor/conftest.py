"""A registry and a monitor server, with stubs and helpers to feed the monitor."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import numpy.typing as npt
import pytest

from conveyor.monitor.v1 import monitor_messages_pb2 as rpc
from conveyor.monitor.v1 import monitor_service_pb2_grpc
from conveyor.monitor.v1 import resources_pb2 as pb
from conveyor.registry.v1 import registry_service_pb2_grpc
from conveyor.registry.v1 import resources_pb2 as registry_pb
from conveyor.services.monitor.server import Monitor, build_monitor
from conveyor.services.monitor.settings import MonitorSettings
from conveyor.services.registry.server import build_server as build_registry
from conveyor.services.registry.settings import RegistrySettings
from conveyor.shared.server import ConveyorServer
from tests.support.registry import a_version, create_model, set_alias, upload_requests
from tests.support.suite import free_port

FEATURES = 4


def a_schema(numerical: int = FEATURES, categorical: Sequence[str] = ()) -> list[pb.FeatureSpec]:
    specs = [pb.FeatureSpec(name=f"x{i}", type=pb.FEATURE_TYPE_NUMERICAL) for i in range(numerical)]
    specs += [pb.FeatureSpec(name=name, type=pb.FEATURE_TYPE_CATEGORICAL) for name in categorical]
    return specs


def records(
    model_version: str,
    numerical: npt.NDArray[np.float64],
    *,
    categorical: Sequence[Sequence[str]] | None = None,
    outputs: npt.NDArray[np.float64] | None = None,
    prefix: str = "r",
    start: int = 0,
    latency_ms: float = 5.0,
    status_code: int = 0,
    time_s: float | None = None,
    subject: str = "",
) -> list[pb.PredictionRecord]:
    """One record per row (request ids ``{prefix}{start + i}``); outputs default
    to a binary model's probabilities from the first feature."""
    rows = numerical.shape[0]
    if outputs is None:
        p1 = 1 / (1 + np.exp(-numerical[:, 0]))
        outputs = np.stack([1 - p1, p1], axis=1)
    found = []
    for i in range(rows):
        record = pb.PredictionRecord(
            model_version=model_version,
            request_id=f"{prefix}{start + i}",
            features=pb.FeatureValues(
                numerical=numerical[i].tolist(),
                categorical=list(categorical[i]) if categorical is not None else [],
            ),
            outputs=outputs[i].tolist() if status_code == 0 else [],
            status_code=status_code,
            subject_key=subject,
        )
        record.latency.FromMicroseconds(round(latency_ms * 1000))
        if time_s is not None:
            record.time.FromMicroseconds(round((time_s + i * 0.001) * 1e6))
        found.append(record)
    return found


def reference_rows(
    numerical: npt.NDArray[np.float64],
    *,
    categorical: Sequence[Sequence[str]] | None = None,
    outputs: npt.NDArray[np.float64] | None = None,
) -> list[rpc.ReferenceRow]:
    if outputs is None:
        p1 = 1 / (1 + np.exp(-numerical[:, 0]))
        outputs = np.stack([1 - p1, p1], axis=1)
    return [
        rpc.ReferenceRow(
            features=pb.FeatureValues(
                numerical=numerical[i].tolist(),
                categorical=list(categorical[i]) if categorical is not None else [],
            ),
            outputs=outputs[i].tolist(),
        )
        for i in range(numerical.shape[0])
    ]


async def reference_stream(
    name: str,
    features: list[pb.FeatureSpec],
    rows: list[rpc.ReferenceRow],
    *,
    output_type: int = pb.OUTPUT_TYPE_PROBABILITIES,
    chunk: int = 5_000,
) -> AsyncIterator[rpc.SetReferenceRequest]:
    yield rpc.SetReferenceRequest(
        reference=pb.Reference(name=name, features=features, output_type=output_type)  # type: ignore[arg-type]
    )
    for start in range(0, len(rows), chunk):
        yield rpc.SetReferenceRequest(rows=rpc.ReferenceRows(rows=rows[start : start + chunk]))


@dataclass
class Suite:
    """A registry and a monitor, with stubs to both."""

    registry_server: ConveyorServer
    parts: Monitor
    registry: Any
    monitor: Any
    settings: MonitorSettings

    async def register(
        self,
        model_id: str,
        *,
        features: int = FEATURES,
        create: bool = True,
        alias: str = "production",
        **fields: Any,
    ) -> str:
        """Register a version of ``model_id`` whose signature takes ``features``
        inputs; its name."""
        if create:
            await create_model(self.registry, model_id)
        fields.setdefault(
            "signature",
            registry_pb.ModelSignature(
                inputs=[
                    registry_pb.TensorSpec(
                        name="input", dtype=registry_pb.TENSOR_DATA_TYPE_FP32, shape=[-1, features]
                    )
                ],
                outputs=[
                    registry_pb.TensorSpec(
                        name="probabilities", dtype=registry_pb.TENSOR_DATA_TYPE_FP32, shape=[-1, 2]
                    )
                ],
            ),
        )
        reply = await self.registry.CreateModelVersion(
            upload_requests(f"models/{model_id}", b"onnx-bytes", version=a_version(**fields)),
            timeout=30,
        )
        name = str(reply.model_version.name)
        if alias:
            await set_alias(self.registry, f"models/{model_id}/aliases/{alias}", name)
        return name

    async def set_reference(
        self,
        model_version: str,
        numerical: npt.NDArray[np.float64],
        *,
        features: list[pb.FeatureSpec] | None = None,
        categorical: Sequence[Sequence[str]] | None = None,
    ) -> pb.Reference:
        reply = await self.monitor.SetReference(
            reference_stream(
                f"{model_version}/reference",
                features or a_schema(numerical.shape[1]),
                reference_rows(numerical, categorical=categorical),
            ),
            timeout=60,
        )
        return reply.reference

    async def log(self, batch: list[pb.PredictionRecord]) -> rpc.BatchLogPredictionsResponse:
        reply = await self.monitor.BatchLogPredictions(
            rpc.BatchLogPredictionsRequest(records=batch), timeout=60
        )
        await self.parts.evaluator.settled()
        return reply

    async def configure(self, model: str, mask: list[str], **fields: Any) -> pb.MonitoringConfig:
        config = pb.MonitoringConfig(name=f"{model}/monitoringConfig", **fields)
        reply = await self.monitor.UpdateMonitoringConfig(
            rpc.UpdateMonitoringConfigRequest(
                monitoring_config=config, update_mask={"paths": mask}
            ),
            timeout=10,
        )
        return reply.monitoring_config


@pytest.fixture(autouse=True)
def alone(monkeypatch: pytest.MonkeyPatch) -> None:
    """The monitor and the registry by themselves: no authentication, no gates."""
    monkeypatch.setenv("CONVEYOR_AUTH_MODE", "off")
    monkeypatch.setenv("CONVEYOR_REGISTRY_PROMOTION_GATE", "off")


async def running_suite(tmp_path: Path, **settings: Any) -> AsyncIterator[Suite]:
    registry_server = await build_registry(
        RegistrySettings(data_dir=tmp_path, shutdown_grace=timedelta(seconds=1))
    )
    values: dict[str, Any] = {
        "data_dir": tmp_path,
        "shutdown_grace": timedelta(seconds=1),
        "registry_addr": f"127.0.0.1:{registry_server.port}",
        "trainer_addr": f"127.0.0.1:{free_port()}",
        "metrics_listen": "127.0.0.1:0",
        "evaluation_interval": timedelta(milliseconds=200),
    }
    values.update(settings)
    monitor_settings = MonitorSettings(**values)
    parts = await build_monitor(monitor_settings)
    channels = [
        grpc.aio.insecure_channel(f"127.0.0.1:{registry_server.port}"),
        grpc.aio.insecure_channel(f"127.0.0.1:{parts.server.port}"),
    ]
    try:
        yield Suite(
            registry_server,
            parts,
            registry_service_pb2_grpc.RegistryServiceStub(channels[0]),
            monitor_service_pb2_grpc.MonitorServiceStub(channels[1]),
            monitor_settings,
        )
    finally:
        for channel in channels:
            await channel.close(None)
        await parts.server.shutdown()
        await registry_server.shutdown()


@pytest.fixture
async def suite(tmp_path: Path) -> AsyncIterator[Suite]:
    async for running in running_suite(tmp_path):
        yield running
