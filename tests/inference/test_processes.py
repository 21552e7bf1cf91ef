"""Several serving processes on one port (``SO_REUSEPORT``), as
``conveyor serve inference`` runs them: each process listens on the port,
a deployment created through one is served by all, the metrics endpoint sums
over them, a killed process is started again, and SIGTERM ends them all."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path

import grpc
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from conveyor.inference.v1 import inference_messages_pb2 as inference_rpc
from conveyor.inference.v1 import inference_service_pb2_grpc
from conveyor.inference.v1 import resources_pb2 as inference_pb
from conveyor.oip.v2 import grpc_service_pb2 as oip
from conveyor.oip.v2 import grpc_service_pb2_grpc
from conveyor.registry.v1 import registry_service_pb2_grpc
from conveyor.services.registry.server import build_server as build_registry
from conveyor.services.registry.settings import RegistrySettings
from conveyor.shared.server import ConveyorServer
from tests.inference.conftest import (
    FEATURES,
    expected,
    infer_request,
    linear_classifier,
    probabilities,
    weights,
)
from tests.support.registry import a_version, create_model, set_alias, upload_requests
from tests.support.suite import free_port

pytestmark = pytest.mark.timeout(180)
X = np.random.default_rng(3).normal(size=(2, FEATURES)).astype(np.float32)


def children(pid: int) -> list[int]:
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        text = (task / "children").read_text().split()
        found += [int(child) for child in text]
    return found


def listening_pids(port: int) -> set[int]:
    """The processes holding a socket that listens on ``port`` (from /proc)."""
    inodes: set[str] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            local, state, inode = fields[1], fields[3], fields[9]
            if state == "0A" and int(local.rsplit(":", 1)[1], 16) == port:
                inodes.add(inode)
    holders: set[int] = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            links = [os.readlink(fd) for fd in (entry / "fd").iterdir()]
        except OSError:
            continue
        if any(link.startswith("socket:[") and link[8:-1] in inodes for link in links):
            holders.add(int(entry.name))
    return holders


def scrape(port: int) -> bytes:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics") as response:
        body: bytes = response.read()
    return body


async def wait_for(condition: object, timeout_s: float = 60) -> None:
    give_up = time.monotonic() + timeout_s
    while not condition():  # type: ignore[operator]
        if time.monotonic() > give_up:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.1)


@pytest.fixture
async def registry(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[ConveyorServer]:
    monkeypatch.setenv("CONVEYOR_AUTH_MODE", "off")
    monkeypatch.setenv("CONVEYOR_REGISTRY_PROMOTION_GATE", "off")
    server = await build_registry(
        RegistrySettings(data_dir=tmp_path, shutdown_grace=timedelta(seconds=1))
    )
    yield server
    await server.shutdown()


async def test_serving_processes_share_the_port(tmp_path: Path, registry: ConveyorServer) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{registry.port}") as channel:
        stub = registry_service_pb2_grpc.RegistryServiceStub(channel)
        await create_model(stub, "shared")
        w = weights(50)
        reply = await stub.CreateModelVersion(
            upload_requests("models/shared", linear_classifier(w), version=a_version())
        )
        await set_alias(stub, "models/shared/aliases/production", reply.model_version.name)

    port, metrics_port = free_port(), free_port()
    environment = dict(os.environ)
    environment.pop("PROMETHEUS_MULTIPROC_DIR", None)
    environment.update(
        CONVEYOR_INFERENCE_PROCESSES="2",
        CONVEYOR_INFERENCE_METRICS_LISTEN=f"127.0.0.1:{metrics_port}",
        CONVEYOR_INFERENCE_CONFIG_POLL_INTERVAL="PT0.1S",
        CONVEYOR_INFERENCE_SHUTDOWN_GRACE="PT1S",
        CONVEYOR_REGISTRY_ADDR=f"127.0.0.1:{registry.port}",
        CONVEYOR_MONITOR_ADDR=f"127.0.0.1:{free_port()}",
        CONVEYOR_LOG_LEVEL="WARNING",
    )
    server = await asyncio.to_thread(
        subprocess.Popen,
        [
            sys.executable, "-m", "conveyor.services.cli", "serve", "inference",
            "--listen", f"127.0.0.1:{port}", "--data-dir", str(tmp_path),
        ],
        env=environment,
    )  # fmt: skip
    try:
        await wait_for(lambda: len(listening_pids(port)) == 2)
        [first_child] = children(server.pid)
        assert listening_pids(port) == {server.pid, first_child}

        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            management = inference_service_pb2_grpc.InferenceManagementServiceStub(channel)
            await management.CreateDeployment(
                inference_rpc.CreateDeploymentRequest(
                    deployment=inference_pb.Deployment(model="models/shared")
                )
            )
        # New connections land on either process; every one answers.
        for _ in range(20):
            async with grpc.aio.insecure_channel(
                f"127.0.0.1:{port}", options=[("grpc.use_local_subchannel_pool", 1)]
            ) as channel:
                stub = grpc_service_pb2_grpc.GRPCInferenceServiceStub(channel)
                response = await stub.ModelInfer(
                    infer_request("shared", X), timeout=30, wait_for_ready=True
                )
                np.testing.assert_allclose(probabilities(response), expected(X, w), rtol=1e-5)

        scraped = await asyncio.to_thread(scrape, metrics_port)
        served = sum(
            sample.value
            for family in text_string_to_metric_families(scraped.decode())
            for sample in family.samples
            if sample.name == "conveyor_inference_requests_total"
            and sample.labels.get("status") == "OK"
        )
        assert served == 20
        # Statistics count every process's requests, whichever process answers
        # (the others' counts arrive within a publishing interval).
        counted: list[int] = []
        for _ in range(8):
            async with grpc.aio.insecure_channel(
                f"127.0.0.1:{port}", options=[("grpc.use_local_subchannel_pool", 1)]
            ) as channel:
                stub = grpc_service_pb2_grpc.GRPCInferenceServiceStub(channel)
                for _ in range(50):
                    reply = await stub.ModelStatistics(
                        oip.ModelStatisticsRequest(name="shared"), timeout=10
                    )
                    [stats] = reply.model_stats
                    if stats.inference_stats.success.count == 20:
                        break
                    await asyncio.sleep(0.1)
                counted.append(stats.inference_stats.success.count)
                assert stats.inference_stats.compute_infer.count == 20
                assert stats.inference_count == 20 * len(X)
        assert counted == [20] * 8

        os.kill(first_child, signal.SIGKILL)
        await wait_for(
            lambda: len(listening_pids(port)) == 2 and first_child not in listening_pids(port)
        )
    finally:
        server.send_signal(signal.SIGTERM)
        exit_code = await asyncio.to_thread(server.wait, 60)
    assert exit_code == 0
    assert listening_pids(port) == set()
