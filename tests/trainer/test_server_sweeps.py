"""Hyperparameter sweeps through a real trainer: creation with every trial's
spec checked first, trials as queued training jobs (bounded by the sweep's
parallelism), listing, cancelling, a sweep whose every trial failed, and a
real grid search that survives a trainer restart, trains its trials, and
registers the best of them with the sweep's registration."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import json_format, struct_pb2

from conveyor.registry.v1 import registry_messages_pb2 as registry_rpc
from conveyor.shared.health import serving_status
from conveyor.trainer.v1 import resources_pb2 as pb
from conveyor.trainer.v1 import trainer_messages_pb2 as rpc
from tests.support.registry import create_model
from tests.support.trainer import (
    Running,
    breast_cancer_spec,
    get_job,
    invalid,
    refused,
    running_trainer,
)
from tests.trainer.conftest import make_spec

TRAINING_TIMEOUT_S = 300


@pytest.fixture(autouse=True)
def alone(monkeypatch: pytest.MonkeyPatch) -> None:
    """The trainer and the registry by themselves: no authentication, no gates."""
    monkeypatch.setenv("CONVEYOR_AUTH_MODE", "off")
    monkeypatch.setenv("CONVEYOR_REGISTRY_PROMOTION_GATE", "off")


@pytest.fixture
async def paused(tmp_path: Path) -> AsyncIterator[Running]:
    async with running_trainer(tmp_path, max_running_jobs=0, max_queued_jobs=4) as running:
        yield running


def values(*items: Any) -> pb.CategoricalValues:
    found = pb.CategoricalValues()
    for item in items:
        json_format.ParseDict(item, found.values.add())
    return found


def learning_rate_sweep(
    rates: tuple[float, ...] = (1e-3, 3e-3, 1e-2), **fields: Any
) -> pb.SweepJobSpec:
    fields.setdefault("max_trials", len(rates))
    return pb.SweepJobSpec(
        base_spec=breast_cancer_spec(epochs=2),
        parameters=[
            pb.ParameterSpec(path="hyperparameters.learning_rate", categorical=values(*rates))
        ],
        algorithm=pb.SEARCH_ALGORITHM_GRID,
        objective_metric="accuracy",
        **fields,
    )


def sweep_request(
    spec: pb.SweepJobSpec, sweep_id: str = "", **fields: Any
) -> rpc.CreateSweepJobRequest:
    return rpc.CreateSweepJobRequest(
        sweep_job_id=sweep_id, sweep_job=pb.SweepJob(spec=spec), **fields
    )


async def create_sweep(
    running: Running, spec: pb.SweepJobSpec, sweep_id: str = "", **fields: Any
) -> pb.SweepJob:
    reply = await running.trainer.CreateSweepJob(
        sweep_request(spec, sweep_id, **fields), timeout=60
    )
    return reply.sweep_job


async def get_sweep(running: Running, name: str) -> pb.SweepJob:
    reply = await running.trainer.GetSweepJob(rpc.GetSweepJobRequest(name=name), timeout=30)
    return reply.sweep_job


async def watch_sweep(
    running: Running, name: str, *, seconds: float = 60
) -> list[rpc.WatchSweepJobResponse]:
    request = rpc.WatchSweepJobRequest(name=name)
    return [event async for event in running.trainer.WatchSweepJob(request, timeout=seconds)]


async def sweep_when(
    running: Running, name: str, until: Any, *, seconds: float = 60
) -> pb.SweepJob:
    """The sweep once ``until(sweep)`` holds (polled: sweeps change rarely)."""
    async with asyncio.timeout(seconds):
        while True:
            sweep = await get_sweep(running, name)
            if until(sweep):
                return sweep
            await asyncio.sleep(0.05)


def sweep_event_types(events: list[rpc.WatchSweepJobResponse]) -> list[str]:
    return [pb.SweepJobEventType.Name(e.type).removeprefix("SWEEP_JOB_EVENT_TYPE_") for e in events]


async def test_a_sweep_queues_its_trials_as_training_jobs(paused: Running) -> None:
    sweep = await create_sweep(
        paused,
        learning_rate_sweep(max_parallel_trials=2),
        "lr",
        request_id="6a1c3d9e-4f3b-4c55-9d0e-1b2a3c4d5e6f",
    )
    assert (sweep.name, sweep.state, sweep.created_by) == (
        "sweepJobs/lr",
        pb.JOB_STATE_QUEUED,
        "user:anonymous",
    )
    sweep = await sweep_when(paused, sweep.name, lambda s: len(s.trials) == 2)
    assert sweep.state == pb.JOB_STATE_RUNNING
    assert sweep.HasField("start_time")
    assert [t.training_job for t in sweep.trials] == [
        "trainingJobs/lr-trial-1",
        "trainingJobs/lr-trial-2",
    ]
    assert [json_format.MessageToDict(t.parameters) for t in sweep.trials] == [
        {"hyperparameters.learning_rate": 1e-3},
        {"hyperparameters.learning_rate": 3e-3},
    ]
    # Two at a time: the third trial waits for one of them to end.
    await asyncio.sleep(0.3)
    assert len((await get_sweep(paused, sweep.name)).trials) == 2
    job = await get_job(paused.trainer, "trainingJobs/lr-trial-2")
    assert (job.state, job.sweep_job, job.display_name) == (
        pb.JOB_STATE_QUEUED,
        "sweepJobs/lr",
        "lr trial 2",
    )
    assert job.spec.hyperparameters.learning_rate == 3e-3
    assert not job.spec.HasField("registration")
    listed = await paused.trainer.ListTrainingJobs(
        rpc.ListTrainingJobsRequest(filter='sweep_job="sweepJobs/lr"'), timeout=30
    )
    assert sorted(j.name for j in listed.training_jobs) == [
        "trainingJobs/lr-trial-1",
        "trainingJobs/lr-trial-2",
    ]
    # The same request again is the same sweep, not a second one.
    again = await create_sweep(
        paused,
        learning_rate_sweep(max_parallel_trials=2),
        "lr",
        request_id="6a1c3d9e-4f3b-4c55-9d0e-1b2a3c4d5e6f",
    )
    assert again.name == sweep.name
    assert len(again.trials) == 2
    exists = await refused(
        paused.trainer.CreateSweepJob(sweep_request(learning_rate_sweep(), "lr")),
        grpc.StatusCode.ALREADY_EXISTS,
    )
    assert exists.reason == "SWEEP_JOB_EXISTS"

    # Cancelling a trial ends it; the sweep moves on to its third trial.
    await paused.trainer.CancelTrainingJob(
        rpc.CancelTrainingJobRequest(name="trainingJobs/lr-trial-1")
    )
    sweep = await sweep_when(paused, sweep.name, lambda s: len(s.trials) == 3)
    assert [t.state for t in sweep.trials] == [
        pb.JOB_STATE_CANCELLED,
        pb.JOB_STATE_QUEUED,
        pb.JOB_STATE_QUEUED,
    ]


async def test_cancelling_a_sweep_cancels_its_trials_and_is_watched_to_the_end(
    paused: Running,
) -> None:
    sweep = await create_sweep(paused, learning_rate_sweep(max_parallel_trials=2), "stop")
    await sweep_when(paused, sweep.name, lambda s: len(s.trials) == 2)
    watcher = asyncio.create_task(watch_sweep(paused, sweep.name))
    await asyncio.sleep(0.2)
    cancelled = (
        await paused.trainer.CancelSweepJob(rpc.CancelSweepJobRequest(name=sweep.name), timeout=30)
    ).sweep_job
    assert cancelled.cancel_requested
    events = await watcher
    types = sweep_event_types(events)
    assert types[0] == "SNAPSHOT"
    assert types[-1] == "STATE_CHANGED"
    assert types.count("TRIAL_UPDATED") == 2
    final = events[-1].sweep_job
    assert final.state == pb.JOB_STATE_CANCELLED
    assert [t.state for t in final.trials] == [pb.JOB_STATE_CANCELLED] * 2
    assert final.model_version == ""
    assert final.HasField("end_time")
    for trial in final.trials:
        assert (await get_job(paused.trainer, trial.training_job)).state == pb.JOB_STATE_CANCELLED
    # No third trial starts; cancelling again changes nothing.
    again = (
        await paused.trainer.CancelSweepJob(rpc.CancelSweepJobRequest(name=sweep.name))
    ).sweep_job
    assert (again.state, len(again.trials)) == (pb.JOB_STATE_CANCELLED, 2)
    # A watch of an ended sweep is its snapshot alone.
    assert sweep_event_types(await watch_sweep(paused, sweep.name)) == ["SNAPSHOT"]


async def test_a_sweep_cancelled_before_any_trial_ends_at_once(paused: Running) -> None:
    # The queue (4 places) is full, so no trial can be queued yet.
    for index in range(4):
        await paused.trainer.CreateTrainingJob(
            rpc.CreateTrainingJobRequest(
                training_job_id=f"filler-{index}",
                training_job=pb.TrainingJob(spec=breast_cancer_spec(epochs=1)),
            )
        )
    sweep = await create_sweep(paused, learning_rate_sweep(), "waiting")
    await asyncio.sleep(0.3)
    waiting = await get_sweep(paused, sweep.name)
    assert (waiting.state, len(waiting.trials)) == (pb.JOB_STATE_QUEUED, 0)
    cancelled = (
        await paused.trainer.CancelSweepJob(rpc.CancelSweepJobRequest(name=sweep.name))
    ).sweep_job
    assert (cancelled.state, cancelled.cancel_requested) == (pb.JOB_STATE_CANCELLED, True)
    # Room in the queue does not revive it.
    await paused.trainer.CancelTrainingJob(
        rpc.CancelTrainingJobRequest(name="trainingJobs/filler-0")
    )
    await asyncio.sleep(0.3)
    assert len((await get_sweep(paused, sweep.name)).trials) == 0


async def test_a_sweep_whose_trials_all_failed_fails_and_says_why(paused: Running) -> None:
    sweep = await create_sweep(paused, learning_rate_sweep((1e-3,)), "doomed")
    await sweep_when(paused, sweep.name, lambda s: len(s.trials) == 1)
    await paused.trainer.CancelTrainingJob(
        rpc.CancelTrainingJobRequest(name="trainingJobs/doomed-trial-1")
    )
    failed = await sweep_when(paused, sweep.name, lambda s: s.state == pb.JOB_STATE_FAILED)
    assert (failed.error.code, failed.error.reason) == (
        grpc.StatusCode.FAILED_PRECONDITION.value[0],
        "NO_TRIAL_SUCCEEDED",
    )
    assert "none of the 1 trials succeeded" in failed.error.message
    assert "1 cancelled" in failed.error.message
    ended = await refused(
        paused.trainer.CancelSweepJob(rpc.CancelSweepJobRequest(name=sweep.name)),
        grpc.StatusCode.FAILED_PRECONDITION,
    )
    assert ended.reason == "SWEEP_JOB_ENDED"


async def test_sweeps_are_listed_filtered_and_paged(paused: Running) -> None:
    for sweep_id, team in (("s1", "a"), ("s2", "b"), ("s3", "a")):
        await paused.trainer.CreateSweepJob(
            rpc.CreateSweepJobRequest(
                sweep_job_id=sweep_id,
                sweep_job=pb.SweepJob(spec=learning_rate_sweep((1e-3,)), labels={"team": team}),
            )
        )
    await paused.trainer.CancelSweepJob(rpc.CancelSweepJobRequest(name="sweepJobs/s2"))
    await sweep_when(paused, "sweepJobs/s2", lambda s: s.state == pb.JOB_STATE_CANCELLED)

    async def listed(**fields: Any) -> list[str]:
        reply = await paused.trainer.ListSweepJobs(rpc.ListSweepJobsRequest(**fields), timeout=30)
        return [s.name for s in reply.sweep_jobs]

    assert await listed() == ["sweepJobs/s3", "sweepJobs/s2", "sweepJobs/s1"]
    assert await listed(order_by="create_time") == ["sweepJobs/s1", "sweepJobs/s2", "sweepJobs/s3"]
    assert await listed(filter='labels.team="a"') == ["sweepJobs/s3", "sweepJobs/s1"]
    assert await listed(filter="state=CANCELLED") == ["sweepJobs/s2"]
    first = await paused.trainer.ListSweepJobs(rpc.ListSweepJobsRequest(page_size=2))
    second = await paused.trainer.ListSweepJobs(
        rpc.ListSweepJobsRequest(page_size=2, page_token=first.next_page_token)
    )
    assert [s.name for s in second.sweep_jobs] == ["sweepJobs/s1"]
    assert not second.next_page_token
    await invalid(
        paused.trainer.ListSweepJobs(rpc.ListSweepJobsRequest(filter="spec.x=1")), "filter"
    )
    await invalid(
        paused.trainer.ListSweepJobs(rpc.ListSweepJobsRequest(order_by="name")), "order_by"
    )


async def test_bad_sweeps_are_refused_before_anything_is_created(paused: Running) -> None:
    trainer = paused.trainer
    await invalid(
        trainer.CreateSweepJob(sweep_request(pb.SweepJobSpec())), "sweep_job.spec.base_spec"
    )
    await invalid(
        trainer.CreateSweepJob(sweep_request(learning_rate_sweep(), "Bad_Id")), "sweep_job_id"
    )
    empty = pb.SweepJobSpec(base_spec=breast_cancer_spec())
    await invalid(
        trainer.CreateSweepJob(sweep_request(empty)),
        "sweep_job.spec.parameters",
        "sweep_job.spec.algorithm",
        "sweep_job.spec.max_trials",
        "sweep_job.spec.objective_metric",
    )
    # The base spec is checked as CreateTrainingJob checks a spec.
    broken = learning_rate_sweep()
    broken.base_spec.hyperparameters.epochs = 0
    broken.parameters.add(path="data.split_seed", categorical=values(1))
    await invalid(
        trainer.CreateSweepJob(sweep_request(broken)),
        "sweep_job.spec.base_spec.hyperparameters.epochs",
        "sweep_job.spec.parameters[1].path",
    )
    # ...and so is every trial's spec.
    too_fast = learning_rate_sweep((1e-3, 20.0))
    error = await invalid(
        trainer.CreateSweepJob(sweep_request(too_fast)), "sweep_job.spec.parameters"
    )
    assert "trial 2" in error.violations[0].description
    roc = learning_rate_sweep()
    roc.base_spec.CopyFrom(make_spec("datasets/digits", "small_cnn", {"channels": [4]}, epochs=1))
    roc.objective_metric = "roc_auc"
    await invalid(trainer.CreateSweepJob(sweep_request(roc)), "sweep_job.spec.objective_metric")
    unknown_data = learning_rate_sweep()
    unknown_data.base_spec.data.dataset = "datasets/nowhere"
    await refused(trainer.CreateSweepJob(sweep_request(unknown_data)), grpc.StatusCode.NOT_FOUND)
    unknown_model = learning_rate_sweep()
    unknown_model.base_spec.registration.model = "models/nowhere"
    await refused(trainer.CreateSweepJob(sweep_request(unknown_model)), grpc.StatusCode.NOT_FOUND)
    await invalid(trainer.GetSweepJob(rpc.GetSweepJobRequest(name="trainingJobs/x")), "name")
    await refused(
        trainer.GetSweepJob(rpc.GetSweepJobRequest(name="sweepJobs/none")),
        grpc.StatusCode.NOT_FOUND,
    )
    await refused(
        trainer.CancelSweepJob(rpc.CancelSweepJobRequest(name="sweepJobs/none")),
        grpc.StatusCode.NOT_FOUND,
    )
    await refused(watch_sweep(paused, "sweepJobs/none"), grpc.StatusCode.NOT_FOUND)

    # validate_only answers the sweep it would create, and creates nothing.
    checked = await create_sweep(paused, learning_rate_sweep(), "dry", validate_only=True)
    assert (checked.name, checked.state) == ("sweepJobs/dry", pb.JOB_STATE_QUEUED)
    listed = await trainer.ListSweepJobs(rpc.ListSweepJobsRequest())
    jobs = await trainer.ListTrainingJobs(rpc.ListTrainingJobsRequest())
    assert (list(listed.sweep_jobs), list(jobs.training_jobs)) == ([], [])
    assert await asyncio.to_thread(serving_status, paused.trainer_target) == "SERVING"


@pytest.mark.timeout(TRAINING_TIMEOUT_S)
async def test_a_grid_search_survives_a_restart_and_registers_its_best_trial(
    tmp_path: Path,
) -> None:
    spec = learning_rate_sweep((1e-4, 1e-2), max_parallel_trials=2)
    spec.base_spec.registration.model = "models/cancer"
    spec.base_spec.registration.description = "the best learning rate"
    spec.base_spec.registration.labels["stage"] = "sweep"
    async with running_trainer(tmp_path, max_running_jobs=0) as paused:
        assert paused.registry is not None
        await create_model(paused.registry, "cancer")
        sweep = await create_sweep(paused, spec, "grid")
        await sweep_when(paused, sweep.name, lambda s: len(s.trials) == 2)
    # A new trainer over the same data picks the sweep up and runs its trials.
    async with running_trainer(tmp_path, max_running_jobs=2) as served:
        events = await watch_sweep(served, sweep.name, seconds=TRAINING_TIMEOUT_S)
        final = events[-1].sweep_job
        assert final.state == pb.JOB_STATE_SUCCEEDED, final.error
        assert [t.state for t in final.trials] == [pb.JOB_STATE_SUCCEEDED] * 2
        objectives = [t.objective_value for t in final.trials]
        jobs = [await get_job(served.trainer, t.training_job) for t in final.trials]
        assert objectives == [j.result.validation_metrics["accuracy"] for j in jobs]
        best = max(range(2), key=lambda i: (objectives[i], -i))
        assert final.best_trial == final.trials[best].training_job
        assert final.model_version == "models/cancer/versions/1"
        assert all(not j.result.model_version for j in jobs)  # trials register nothing
        assert "TRIAL_UPDATED" in sweep_event_types(events)

        assert served.registry is not None
        version = (
            await served.registry.GetModelVersion(
                registry_rpc.GetModelVersionRequest(name=final.model_version)
            )
        ).model_version
        assert version.lineage.training_job == final.best_trial
        assert version.description == "the best learning rate"
        assert dict(version.labels) == {"stage": "sweep", "sweep_job": "grid"}
        assert version.hyperparameters["learning_rate"] == (1e-4, 1e-2)[best]
        assert version.metrics["validation/accuracy"] == objectives[best]
        versions = await served.registry.ListModelVersions(
            registry_rpc.ListModelVersionsRequest(parent="models/cancer")
        )
        assert len(versions.model_versions) == 1


async def test_values_in_a_sweep_are_what_the_trial_jobs_train_with(paused: Running) -> None:
    spec = pb.SweepJobSpec(
        base_spec=make_spec("datasets/breast-cancer", args={"hidden_sizes": [8]}, epochs=1),
        parameters=[
            pb.ParameterSpec(path="architecture.args.hidden_sizes", categorical=values([16, 8])),
            pb.ParameterSpec(path="hyperparameters.optimizer", categorical=values("sgd")),
            pb.ParameterSpec(
                path="hyperparameters.batch_size", integer_range=pb.IntegerRange(min=16, max=16)
            ),
        ],
        algorithm=pb.SEARCH_ALGORITHM_RANDOM,
        max_trials=1,
        objective_metric="loss",
        seed=5,
    )
    sweep = await create_sweep(paused, spec, "typed")
    sweep = await sweep_when(paused, sweep.name, lambda s: len(s.trials) == 1)
    job = await get_job(paused.trainer, sweep.trials[0].training_job)
    assert json_format.MessageToDict(job.spec.architecture.args) == {"hidden_sizes": [16, 8]}
    assert job.spec.hyperparameters.optimizer == pb.OPTIMIZER_ALGORITHM_SGD
    assert job.spec.hyperparameters.batch_size == 16
    assert sweep.trials[0].parameters.fields["hyperparameters.optimizer"] == struct_pb2.Value(
        string_value="SGD"
    )
