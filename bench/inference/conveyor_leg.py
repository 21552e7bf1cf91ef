"""Conveyor's inference service, set up as a user would, for perf_analyzer.

1. ``conveyor serve registry`` (authentication and the promotion gate off,
   log level WARNING); each ONNX file registered as a model version
   (``MODEL_FORMAT_ONNX_FP32``, its signature with batch dimension -1) of its
   own registry model, and the ``production`` alias set to it.
2. ``conveyor serve inference`` once per ``processes`` setting
   (``CONVEYOR_INFERENCE_PROCESSES``), each with its own data directory, the
   registry's secret store (to verify artifact signatures), metrics off.
3. One deployment per (model, batching) through
   ``InferenceManagementService/CreateDeployment`` (prediction log sample rate
   0 by default: no monitor runs here, so its records could only be dropped),
   polled with
   ``GetDeploymentStatus`` until READY; then ServerLive and ModelReady over
   several fresh connections (with several processes each connection may land
   on another one).

The OIP model name is the registry model's id: ``mlp``, ``resnet18``, and
``<model>-b<max>-d<delay µs>`` for further batching settings of the same file.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from google.protobuf.duration_pb2 import Duration
from procs import Server, oip_models_ready, started, wait_for
from servables import ModelSpec

from conveyor.inference.v1 import inference_messages_pb2 as inference_rpc
from conveyor.inference.v1 import inference_service_pb2_grpc
from conveyor.inference.v1 import resources_pb2 as inference_pb
from conveyor.registry.v1 import registry_service_pb2_grpc
from conveyor.registry.v1 import resources_pb2 as registry_pb
from conveyor.shared.health import wait_until_serving

REPO_ROOT = Path(__file__).resolve().parents[2]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from bench.benchkit import free_port  # noqa: E402
from tests.support.registry import create_model, set_alias, upload_requests  # noqa: E402

READY_TIMEOUT_S = 180.0


@dataclass(frozen=True)
class Batching:
    max_batch_size: int
    max_queue_delay_us: int
    instance_count: int = 0
    """Model instances computing batches in parallel; 0: the server's default (1)."""

    @classmethod
    def parse(cls, text: str) -> Batching:
        """``MAX:DELAY_US[:INSTANCES]``, e.g. ``64:200`` or ``32:0:2``."""
        size, delay, *instances = text.split(":")
        return cls(int(size), int(delay), int(instances[0]) if instances else 0)

    @property
    def label(self) -> str:
        label = f"b{self.max_batch_size}-d{self.max_queue_delay_us}"
        return f"{label}-i{self.instance_count}" if self.instance_count else label


@dataclass(frozen=True)
class Deployment:
    """One OIP model name on the Conveyor servers: a file and a batching setting."""

    name: str
    spec: ModelSpec
    batching: Batching


@dataclass
class ConveyorStack:
    registry: Server
    servers: dict[int, Server] = field(default_factory=dict)
    """The inference servers by ``processes``."""
    deployments: list[Deployment] = field(default_factory=list)
    statuses: dict[str, Any] = field(default_factory=dict)


def plan(specs: Sequence[ModelSpec], batching: dict[str, list[Batching]]) -> list[Deployment]:
    """The deployments: the first batching setting of a model under its own name."""
    deployments = []
    for spec in specs:
        for index, setting in enumerate(batching[spec.name]):
            name = spec.name if index == 0 else f"{spec.name}-{setting.label}"
            deployments.append(Deployment(name, spec, setting))
    return deployments


@contextlib.contextmanager
def conveyor_stack(
    root: Path,
    deployments: Sequence[Deployment],
    processes: Sequence[int],
    extra_env: dict[str, str],
    prediction_log_rate: float,
) -> Iterator[ConveyorStack]:
    """The registry and one inference server per ``processes`` value, deployed and READY."""
    root = root.resolve()  # the servers run in the repository root
    data = root / "data"
    base_env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("CONVEYOR_", "OTEL_"))},
        "CONVEYOR_AUTH_MODE": "off",
        "CONVEYOR_REGISTRY_PROMOTION_GATE": "off",
        "CONVEYOR_REGISTRY_LOG_LEVEL": "WARNING",
        "CONVEYOR_INFERENCE_LOG_LEVEL": "WARNING",
        "CONVEYOR_SECRETS_LOCAL_DIR": str(data / "secrets"),
    }
    registry_address = f"127.0.0.1:{free_port()}"
    command = [sys.executable, "-m", "conveyor.services.cli", "serve"]
    with contextlib.ExitStack() as stack:
        registry = stack.enter_context(
            started(
                "conveyor-registry",
                [*command, "registry", "--listen", registry_address, "--data-dir", str(data)],
                address=registry_address,
                log=root / "registry.log",
                env=base_env,
                cwd=REPO_ROOT,
            )
        )
        wait_until_serving(registry_address, process=registry.process, timeout_s=60)
        asyncio.run(_register(registry_address, deployments))
        result = ConveyorStack(registry, deployments=list(deployments))
        for count in processes:
            address = f"127.0.0.1:{free_port()}"
            env = {
                **base_env,
                "CONVEYOR_REGISTRY_ADDR": registry_address,
                "CONVEYOR_INFERENCE_PROCESSES": str(count),
                "CONVEYOR_INFERENCE_METRICS_LISTEN": "",
                **extra_env,
            }
            server = stack.enter_context(
                started(
                    f"conveyor-p{count}",
                    [
                        *command,
                        "inference",
                        "--listen",
                        address,
                        "--data-dir",
                        str(root / f"inference-p{count}"),
                    ],
                    address=address,
                    log=root / f"inference-p{count}.log",
                    env=env,
                    cwd=REPO_ROOT,
                )
            )
            wait_for(server, oip_live, timeout_s=READY_TIMEOUT_S)
            result.statuses[server.label] = asyncio.run(
                _deploy(address, deployments, prediction_log_rate)
            )
            for _ in range(3 * count + 2):  # fresh connections: every process ready
                wait_for(
                    server,
                    oip_models_ready([d.name for d in deployments]),
                    timeout_s=READY_TIMEOUT_S,
                )
            result.servers[count] = server
        yield result


def oip_live(channel: grpc.Channel) -> bool:
    return oip_models_ready([])(channel)


async def _register(address: str, deployments: Sequence[Deployment]) -> None:
    async with grpc.aio.insecure_channel(
        address, options=[("grpc.max_send_message_length", 64 * 1024 * 1024)]
    ) as channel:
        registry = registry_service_pb2_grpc.RegistryServiceStub(channel)
        for deployment in deployments:
            spec = deployment.spec
            await create_model(registry, deployment.name)
            binary = spec.outputs[0].shape[-1] == 2
            version = registry_pb.ModelVersion(
                format=registry_pb.MODEL_FORMAT_ONNX_FP32,
                task=registry_pb.TASK_TYPE_BINARY_CLASSIFICATION
                if binary
                else registry_pb.TASK_TYPE_MULTICLASS_CLASSIFICATION,
                signature=registry_pb.ModelSignature(
                    inputs=[_tensor(t) for t in spec.inputs],
                    outputs=[_tensor(t) for t in spec.outputs],
                ),
                description=f"bench/inference: {spec.name}",
            )
            requests = upload_requests(
                f"models/{deployment.name}", spec.onnx_path.read_bytes(), version=version
            )
            reply = await registry.CreateModelVersion(requests, timeout=120)
            await set_alias(
                registry,
                f"models/{deployment.name}/aliases/production",
                reply.model_version.name,
                "bench/inference",
            )


def _tensor(tensor: Any) -> registry_pb.TensorSpec:
    return registry_pb.TensorSpec(
        name=tensor.name, dtype=registry_pb.TENSOR_DATA_TYPE_FP32, shape=list(tensor.shape)
    )


async def _deploy(
    address: str, deployments: Sequence[Deployment], prediction_log_rate: float
) -> dict[str, Any]:
    """Create every deployment, wait until each is READY; their statuses."""
    from google.protobuf.json_format import MessageToDict

    statuses: dict[str, Any] = {}
    async with grpc.aio.insecure_channel(address) as channel:
        management = inference_service_pb2_grpc.InferenceManagementServiceStub(channel)
        for deployment in deployments:
            delay = Duration()
            delay.FromMicroseconds(deployment.batching.max_queue_delay_us)
            request = inference_rpc.CreateDeploymentRequest(
                deployment=inference_pb.Deployment(
                    model=f"models/{deployment.name}",
                    batching=inference_pb.BatchingConfig(
                        max_batch_size=deployment.batching.max_batch_size,
                        max_queue_delay=delay,
                    ),
                    runtime=inference_pb.RuntimeConfig(
                        instance_count=deployment.batching.instance_count
                    ),
                    prediction_log_sample_rate=prediction_log_rate,
                )
            )
            await management.CreateDeployment(request, timeout=60)
        for deployment in deployments:
            status = await _ready_status(management, deployment.name)
            statuses[deployment.name] = MessageToDict(status)
    return statuses


async def _ready_status(management: Any, name: str) -> inference_pb.DeploymentStatus:
    deadline = time.monotonic() + READY_TIMEOUT_S
    request = inference_rpc.GetDeploymentStatusRequest(name=f"deployments/{name}/status")
    while True:
        reply = await management.GetDeploymentStatus(request, timeout=10)
        status: inference_pb.DeploymentStatus = reply.status
        if status.state == inference_pb.DEPLOYMENT_STATE_READY:
            return status
        if status.state == inference_pb.DEPLOYMENT_STATE_FAILED:
            raise RuntimeError(f"deployment {name} FAILED: {status}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"deployment {name} not READY after {READY_TIMEOUT_S} s: {status}")
        await asyncio.sleep(0.2)
