"""Every contract is servable: reflection lists and describes all of them.

The servicers here are the generated base classes (every method answers
UNIMPLEMENTED): this checks the contracts and the runtime, not the services.
`grpcurl` is the independent client.
"""

from __future__ import annotations

import asyncio
import shutil
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from conveyor.explainer.v1 import explainer_service_pb2_grpc as explainer
from conveyor.inference.v1 import inference_service_pb2_grpc as serving
from conveyor.monitor.v1 import monitor_service_pb2_grpc as monitor
from conveyor.oip.v2 import grpc_service_pb2_grpc as oip
from conveyor.optimizer.v1 import optimizer_service_pb2_grpc as optimizer
from conveyor.policy.v1 import policy_service_pb2_grpc as policy
from conveyor.registry.v1 import registry_service_pb2_grpc as registry
from conveyor.shared.client import SERVICE_DESCRIPTORS
from conveyor.shared.server import ConveyorServer, ServiceRegistration, create_server
from conveyor.trainer.v1 import trainer_service_pb2_grpc as trainer
from tests.support.settings import TestServerSettings

GRPCURL = shutil.which("grpcurl", path=str(Path(sys.executable).parent))

CONTRACTS: dict[str, tuple[type, Callable[[Any, Any], None]]] = {
    "conveyor.registry.v1.RegistryService": (
        registry.RegistryServiceServicer,
        registry.add_RegistryServiceServicer_to_server,
    ),
    "conveyor.trainer.v1.TrainerService": (
        trainer.TrainerServiceServicer,
        trainer.add_TrainerServiceServicer_to_server,
    ),
    "conveyor.optimizer.v1.OptimizerService": (
        optimizer.OptimizerServiceServicer,
        optimizer.add_OptimizerServiceServicer_to_server,
    ),
    "inference.GRPCInferenceService": (
        oip.GRPCInferenceServiceServicer,
        oip.add_GRPCInferenceServiceServicer_to_server,
    ),
    "conveyor.inference.v1.InferenceManagementService": (
        serving.InferenceManagementServiceServicer,
        serving.add_InferenceManagementServiceServicer_to_server,
    ),
    "conveyor.monitor.v1.MonitorService": (
        monitor.MonitorServiceServicer,
        monitor.add_MonitorServiceServicer_to_server,
    ),
    "conveyor.explainer.v1.ExplainerService": (
        explainer.ExplainerServiceServicer,
        explainer.add_ExplainerServiceServicer_to_server,
    ),
    "conveyor.policy.v1.PolicyService": (
        policy.PolicyServiceServicer,
        policy.add_PolicyServiceServicer_to_server,
    ),
}


def registration(name: str) -> ServiceRegistration:
    servicer_class, add = CONTRACTS[name]
    servicer = servicer_class()
    return ServiceRegistration(full_name=name, add_to_server=lambda s: add(servicer, s))


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[ConveyorServer]:
    started = await create_server(
        TestServerSettings(data_dir=tmp_path), [registration(n) for n in CONTRACTS]
    )
    yield started
    await started.server.stop(None)


async def grpcurl(*args: str) -> tuple[int, str]:
    assert GRPCURL is not None, "grpcurl is installed by `make install`"
    process = await asyncio.create_subprocess_exec(
        GRPCURL, *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    output, _ = await process.communicate()
    return process.returncode or 0, output.decode()


def test_the_client_knows_every_contract() -> None:
    known = {d.full_name for descriptors in SERVICE_DESCRIPTORS.values() for d in descriptors}
    assert known == set(CONTRACTS)


async def test_reflection_lists_every_service(server: ConveyorServer) -> None:
    code, output = await grpcurl("-plaintext", f"127.0.0.1:{server.port}", "list")
    assert code == 0, output
    assert set(output.split()) == {
        *CONTRACTS,
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
    }


@pytest.mark.parametrize("service", sorted(CONTRACTS))
async def test_reflection_describes_every_service(server: ConveyorServer, service: str) -> None:
    code, output = await grpcurl("-plaintext", f"127.0.0.1:{server.port}", "describe", service)
    assert code == 0, output
    assert f"{service} is a service" in output
    descriptor = next(
        d for ds in SERVICE_DESCRIPTORS.values() for d in ds if d.full_name == service
    )
    for method in descriptor.methods:
        assert f"rpc {method.name}" in output


async def test_health_answers_per_contract(server: ConveyorServer) -> None:
    for service in CONTRACTS:
        code, output = await grpcurl(
            "-plaintext",
            "-d",
            f'{{"service": "{service}"}}',
            f"127.0.0.1:{server.port}",
            "grpc.health.v1.Health/Check",
        )
        assert code == 0, output
        assert '"status": "SERVING"' in output
