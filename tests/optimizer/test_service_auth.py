"""The optimizer with authentication on, beside a registry and the policy
service that decides every call: a data scientist optimises her team's model
and the optimizer, as ``service:optimizer``, reads the source (its signature
verified) and registers the result; another team's data scientist may read
the job but neither create one on that model nor cancel it; no credentials,
no call."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
import pytest

from conveyor.optimizer.v1 import optimizer_messages_pb2 as rpc
from conveyor.optimizer.v1 import optimizer_service_pb2_grpc
from conveyor.optimizer.v1 import resources_pb2 as pb
from conveyor.registry.v1 import registry_messages_pb2 as registry_rpc
from conveyor.registry.v1 import resources_pb2 as registry_pb
from conveyor.services.optimizer.server import build_server as build_optimizer
from conveyor.services.optimizer.settings import OptimizerSettings
from conveyor.shared.auth.principal import Principal
from conveyor.shared.auth.settings import AuthSettings
from conveyor.shared.channel import create_channel
from tests.support.registry import create_model, refused, upload_requests
from tests.support.suite import ALICE, ERIN, MALLORY, Suite, running_suite
from tests.support.trained import Trained

if TYPE_CHECKING:
    from conveyor.optimizer.v1.optimizer_service_pb2_grpc import OptimizerServiceAsyncStub

TEST_TIMEOUT_S = 300


def optimizer_as(suite: Suite, port: int, principal: Principal | None) -> OptimizerServiceAsyncStub:
    token = suite.token(principal, ("optimizer",)) if principal is not None else None
    channel = create_channel(
        f"127.0.0.1:{port}", bearer_token=token, default_timeout=timedelta(seconds=60)
    )
    suite._channels.append(channel)
    return optimizer_service_pb2_grpc.OptimizerServiceStub(channel)


@pytest.mark.timeout(TEST_TIMEOUT_S)
async def test_a_team_optimises_its_own_model_and_the_optimizer_registers(
    tmp_path: Path, mlp: Trained
) -> None:
    async with running_suite(tmp_path) as suite:
        registry = suite.registry(ERIN)
        await create_model(registry, "cancer", owner_team="team-a")
        version = registry_pb.ModelVersion()
        version.CopyFrom(mlp.source.version)
        version.ClearField("name")
        await registry.CreateModelVersion(
            upload_requests("models/cancer", mlp.source.artifact, version=version), timeout=60
        )
        server = await build_optimizer(
            OptimizerSettings(
                data_dir=tmp_path,
                auth=AuthSettings(mode="enforce", policy_addr=suite.policy_target),
                registry_addr=suite.registry_target,
                shutdown_grace=timedelta(seconds=1),
            ),
            secret_store=suite.secret_store,
        )
        try:
            alice = optimizer_as(suite, server.port, ALICE)
            mallory = optimizer_as(suite, server.port, MALLORY)
            anonymous = optimizer_as(suite, server.port, None)
            request = rpc.CreateOptimizationJobRequest(
                optimization_job=pb.OptimizationJob(
                    source_model_version="models/cancer/versions/1",
                    techniques=[pb.TechniqueSpec(onnx_export=pb.OnnxExportOptions())],
                    gate=pb.OptimizationGate(latency_tolerance=1000.0),
                    measurement=pb.MeasurementConfig(warmup_runs=1, timed_runs=10),
                ),
                optimization_job_id="export",
            )
            await refused(anonymous.CreateOptimizationJob(request), grpc.StatusCode.UNAUTHENTICATED)
            denied = await refused(
                mallory.CreateOptimizationJob(request),
                grpc.StatusCode.PERMISSION_DENIED,
            )
            assert denied.reason == "POLICY_DENIED"
            job = (await alice.CreateOptimizationJob(request)).optimization_job
            await refused(
                mallory.CancelOptimizationJob(rpc.CancelOptimizationJobRequest(name=job.name)),
                grpc.StatusCode.PERMISSION_DENIED,
            )
            watch = alice.WatchOptimizationJob(
                rpc.WatchOptimizationJobRequest(name=job.name), timeout=TEST_TIMEOUT_S
            )
            final = [update.optimization_job async for update in watch][-1]
            assert final.state == pb.OPTIMIZATION_JOB_STATE_SUCCEEDED, final.error
            [result] = final.results
            assert result.state == pb.TECHNIQUE_STATE_SUCCEEDED, result.error
            read = await mallory.GetOptimizationJob(rpc.GetOptimizationJobRequest(name=job.name))
            assert read.optimization_job.name == job.name
            registered = (
                await suite.registry(ALICE).GetModelVersion(
                    registry_rpc.GetModelVersionRequest(name=result.model_version)
                )
            ).model_version
            assert registered.created_by == "service:optimizer"
            assert registered.lineage.parent_version == "models/cancer/versions/1"
        finally:
            await server.shutdown()
