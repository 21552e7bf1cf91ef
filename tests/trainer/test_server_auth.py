"""The trainer with authentication on, beside a registry and the policy
service that decides every call: a data scientist trains a model for her
team's registry model and the trainer, as ``service:trainer``, registers the
version with her as its author; another team's data scientist may read the
job but neither create one for that model nor cancel it, and the same holds
for sweeps; no credentials, no call."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest

from conveyor.registry.v1 import registry_messages_pb2 as registry_rpc
from conveyor.trainer.v1 import resources_pb2 as pb
from conveyor.trainer.v1 import trainer_messages_pb2 as rpc
from tests.support.registry import create_model
from tests.support.suite import ALICE, ERIN, MALLORY
from tests.support.trainer import (
    create_job,
    get_job,
    job_request,
    refused,
    running_suite_with_trainer,
    synthetic_spec,
    trainer_as,
    watch,
)

TEST_TIMEOUT_S = 240


@pytest.mark.timeout(TEST_TIMEOUT_S)
async def test_a_data_scientist_trains_and_the_trainer_registers(tmp_path: Path) -> None:
    async with running_suite_with_trainer(tmp_path) as (suite, server):
        await create_model(suite.registry(ERIN), "fraud", owner_team="team-a")
        alice = trainer_as(suite, server, ALICE)
        mallory = trainer_as(suite, server, MALLORY)
        anonymous = trainer_as(suite, server, None)
        spec = synthetic_spec(epochs=2, model="models/fraud")

        await refused(
            anonymous.CreateTrainingJob(job_request(spec)), grpc.StatusCode.UNAUTHENTICATED
        )
        denied = await refused(
            mallory.CreateTrainingJob(job_request(spec)), grpc.StatusCode.PERMISSION_DENIED
        )
        assert denied.reason == "POLICY_DENIED"

        job = await create_job(alice, spec, "fraud-mlp")
        assert job.created_by == "user:alice"
        # Anyone of a modelling role reads jobs; only the owning team cancels them.
        assert (await get_job(mallory, job.name)).name == job.name
        await refused(
            mallory.CancelTrainingJob(rpc.CancelTrainingJobRequest(name=job.name)),
            grpc.StatusCode.PERMISSION_DENIED,
        )
        events = await watch(alice, job.name, seconds=TEST_TIMEOUT_S)
        final = events[-1].training_job
        assert final.state == pb.JOB_STATE_SUCCEEDED, final.error
        assert final.result.model_version == "models/fraud/versions/1"

        version = (
            await suite.registry(ALICE).GetModelVersion(
                registry_rpc.GetModelVersionRequest(name=final.result.model_version)
            )
        ).model_version
        assert version.created_by == "service:trainer"
        assert list(version.authors) == ["user:alice"]
        assert version.lineage.training_job == job.name
        attachments = await suite.registry(ALICE).ListAttachments(
            registry_rpc.ListAttachmentsRequest(parent=version.name)
        )
        assert [a.created_by for a in attachments.attachments] == ["service:trainer"]

        # A sweep is owned through its base spec's registration model, as a job is.
        sweep_spec = pb.SweepJobSpec(
            base_spec=spec,
            parameters=[
                pb.ParameterSpec(
                    path="hyperparameters.epochs", integer_range=pb.IntegerRange(min=1, max=2)
                )
            ],
            algorithm=pb.SEARCH_ALGORITHM_GRID,
            max_trials=2,
            objective_metric="loss",
        )
        sweep_request = rpc.CreateSweepJobRequest(
            sweep_job_id="epochs", sweep_job=pb.SweepJob(spec=sweep_spec)
        )
        await refused(mallory.CreateSweepJob(sweep_request), grpc.StatusCode.PERMISSION_DENIED)
        sweep = (await alice.CreateSweepJob(sweep_request)).sweep_job
        assert sweep.created_by == "user:alice"
        await refused(
            mallory.CancelSweepJob(rpc.CancelSweepJobRequest(name=sweep.name)),
            grpc.StatusCode.PERMISSION_DENIED,
        )
        read = await mallory.GetSweepJob(rpc.GetSweepJobRequest(name=sweep.name))
        assert read.sweep_job.name == sweep.name
        cancelled = await alice.CancelSweepJob(rpc.CancelSweepJobRequest(name=sweep.name))
        assert cancelled.sweep_job.cancel_requested
