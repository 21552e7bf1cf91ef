"""Training jobs through a real trainer that queues them without starting any
(``max_running_jobs=0``): creation with full validation before queueing,
idempotency, Get, List with paging, filters and order, the bounded queue,
cancelling queued jobs, watching them, and the refusals, after which the
server still serves."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path

import grpc
import pytest
import torch
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect

from conveyor.registry.v1 import registry_messages_pb2 as registry_rpc
from conveyor.services.trainer import schema
from conveyor.services.trainer.migrate import VERSION_TABLE, upgrade_to_head
from conveyor.shared.health import serving_status
from conveyor.shared.storage import create_engine
from conveyor.shared.storage.database import sqlite_url
from conveyor.trainer.v1 import resources_pb2 as pb
from conveyor.trainer.v1 import trainer_messages_pb2 as rpc
from tests.support.registry import create_model
from tests.support.trainer import (
    Running,
    breast_cancer_spec,
    create_job,
    event_types,
    get_job,
    invalid,
    job_request,
    refused,
    running_trainer,
    watch,
)
from tests.trainer.conftest import make_spec


@pytest.fixture(autouse=True)
def alone(monkeypatch: pytest.MonkeyPatch) -> None:
    """The trainer and the registry by themselves: no authentication, no gates."""
    monkeypatch.setenv("CONVEYOR_AUTH_MODE", "off")
    monkeypatch.setenv("CONVEYOR_REGISTRY_PROMOTION_GATE", "off")


@pytest.fixture
async def paused(tmp_path: Path) -> AsyncIterator[Running]:
    async with running_trainer(tmp_path, max_running_jobs=0, max_queued_jobs=3) as running:
        yield running


def digits_spec() -> pb.TrainingJobSpec:
    return make_spec("datasets/digits", "small_cnn", {"channels": [4]}, epochs=1)


async def test_jobs_are_created_queued_and_listed(paused: Running) -> None:
    trainer = paused.trainer
    assert paused.registry is not None
    await create_model(paused.registry, "digits")
    first = (
        await trainer.CreateTrainingJob(
            rpc.CreateTrainingJobRequest(
                training_job_id="first",
                training_job=pb.TrainingJob(
                    spec=breast_cancer_spec(),
                    display_name="Breast cancer MLP",
                    labels={"team": "a"},
                ),
            ),
            timeout=60,
        )
    ).training_job
    assert first.name == "trainingJobs/first"
    assert (first.state, first.queue_position) == (pb.JOB_STATE_QUEUED, 0)
    assert (first.display_name, dict(first.labels)) == ("Breast cancer MLP", {"team": "a"})
    assert first.spec == breast_cancer_spec()
    assert first.created_by == "user:anonymous"
    assert first.HasField("create_time")
    assert not first.HasField("start_time")
    second = await create_job(trainer, breast_cancer_spec(epochs=5))
    assert second.name.startswith("trainingJobs/job-")
    assert second.queue_position == 1
    spec = digits_spec()
    spec.registration.model = "models/digits"
    third = await create_job(trainer, spec, "third")
    assert third.queue_position == 2
    assert await get_job(trainer, first.name) == first
    assert (await get_job(trainer, third.name)).queue_position == 2

    async def listed(**fields: object) -> list[str]:
        reply = await trainer.ListTrainingJobs(rpc.ListTrainingJobsRequest(**fields))  # type: ignore[arg-type]
        return [job.name for job in reply.training_jobs]

    assert await listed() == [third.name, second.name, first.name]
    assert await listed(order_by="create_time") == [first.name, second.name, third.name]
    assert await listed(filter='spec.data.dataset="datasets/digits"') == [third.name]
    assert await listed(filter='spec.architecture.name="mlp" AND labels.team="a"') == [first.name]
    assert await listed(filter='spec.registration.model="models/digits"') == [third.name]
    assert await listed(filter="state=RUNNING") == []
    assert len(await listed(filter='state=QUEUED AND created_by="user:anonymous"')) == 3
    assert len(await listed(filter='create_time>"2020-01-01T00:00:00Z"')) == 3
    page = await trainer.ListTrainingJobs(rpc.ListTrainingJobsRequest(page_size=2))
    assert len(page.training_jobs) == 2
    rest = await trainer.ListTrainingJobs(
        rpc.ListTrainingJobsRequest(page_size=2, page_token=page.next_page_token)
    )
    assert [j.name for j in rest.training_jobs] == [first.name]
    assert rest.training_jobs[0].queue_position == 0
    assert rest.next_page_token == ""

    await invalid(
        trainer.ListTrainingJobs(rpc.ListTrainingJobsRequest(order_by="name")), "order_by"
    )
    await invalid(
        trainer.ListTrainingJobs(rpc.ListTrainingJobsRequest(filter="epochs>3")), "filter"
    )
    await invalid(
        trainer.ListTrainingJobs(rpc.ListTrainingJobsRequest(filter="state=DONE")), "filter"
    )
    await invalid(trainer.ListTrainingJobs(rpc.ListTrainingJobsRequest(page_size=-5)), "page_size")
    await invalid(
        trainer.ListTrainingJobs(
            rpc.ListTrainingJobsRequest(page_token=page.next_page_token, order_by="create_time")
        ),
        "page_token",
    )
    await invalid(trainer.GetTrainingJob(rpc.GetTrainingJobRequest(name="first")), "name")
    await refused(
        trainer.GetTrainingJob(rpc.GetTrainingJobRequest(name="trainingJobs/none")),
        grpc.StatusCode.NOT_FOUND,
    )


async def test_creation_is_idempotent_and_validate_only_creates_nothing(paused: Running) -> None:
    trainer = paused.trainer
    checked = (
        await trainer.CreateTrainingJob(
            job_request(breast_cancer_spec(), "dry", validate_only=True)
        )
    ).training_job
    assert (checked.name, checked.state) == ("trainingJobs/dry", pb.JOB_STATE_QUEUED)
    await refused(
        trainer.GetTrainingJob(rpc.GetTrainingJobRequest(name="trainingJobs/dry")),
        grpc.StatusCode.NOT_FOUND,
    )
    created = await create_job(trainer, breast_cancer_spec(), request_id="req-1")
    again = await create_job(trainer, breast_cancer_spec(), request_id="req-1")
    assert again.name == created.name
    conflict = await refused(
        trainer.CreateTrainingJob(job_request(breast_cancer_spec(epochs=3), request_id="req-1")),
        grpc.StatusCode.ALREADY_EXISTS,
    )
    assert conflict.reason == "REQUEST_ID_CONFLICT"
    await create_job(trainer, breast_cancer_spec(), "taken")
    taken = await refused(
        trainer.CreateTrainingJob(job_request(breast_cancer_spec(), "taken")),
        grpc.StatusCode.ALREADY_EXISTS,
    )
    assert taken.reason == "TRAINING_JOB_EXISTS"
    reply = await trainer.ListTrainingJobs(rpc.ListTrainingJobsRequest())
    assert len(reply.training_jobs) == 2


async def test_bad_jobs_are_refused_before_anything_is_queued(paused: Running) -> None:
    trainer = paused.trainer
    assert paused.registry is not None

    def spec_with(**changes: object) -> pb.TrainingJobSpec:
        spec = breast_cancer_spec()
        for path, value in changes.items():
            *parents, leaf = path.split("__")
            target = spec
            for parent in parents:
                target = getattr(target, parent)
            setattr(target, leaf, value)
        return spec

    spec_field = "training_job.spec"
    await invalid(trainer.CreateTrainingJob(rpc.CreateTrainingJobRequest()), "training_job.spec")
    await invalid(
        trainer.CreateTrainingJob(job_request(breast_cancer_spec(), "Not_An_Id")),
        "training_job_id",
    )
    await invalid(
        trainer.CreateTrainingJob(
            job_request(
                spec_with(
                    hyperparameters__epochs=0,
                    hyperparameters__learning_rate=-1.0,
                    hyperparameters__batch_size=0,
                    hyperparameters__dropout=1.5,
                )
            )
        ),
        f"{spec_field}.hyperparameters.epochs",
        f"{spec_field}.hyperparameters.learning_rate",
        f"{spec_field}.hyperparameters.batch_size",
        f"{spec_field}.hyperparameters.dropout",
    )
    await invalid(
        trainer.CreateTrainingJob(
            job_request(spec_with(architecture__name="transformer", hyperparameters__dropout=0.0))
        ),
        f"{spec_field}.architecture.name",
    )
    bad_args = breast_cancer_spec()
    bad_args.architecture.args.update({"hidden_sizes": [0], "depth": 3})
    await invalid(
        trainer.CreateTrainingJob(job_request(bad_args)),
        f"{spec_field}.architecture.args.hidden_sizes",
        f"{spec_field}.architecture.args.depth",
    )
    await invalid(
        trainer.CreateTrainingJob(job_request(spec_with(data__dataset="breast-cancer"))),
        f"{spec_field}.data.dataset",
    )
    await invalid(
        trainer.CreateTrainingJob(job_request(spec_with(data__dataset=""))),
        f"{spec_field}.data.dataset",
    )
    await invalid(
        trainer.CreateTrainingJob(
            job_request(spec_with(data__train_fraction=0.9, data__test_fraction=0.5))
        ),
        f"{spec_field}.data.train_fraction",
        f"{spec_field}.data.test_fraction",
    )
    generator = breast_cancer_spec()
    generator.data.generator_args.update({"num_samples": 10})
    await invalid(
        trainer.CreateTrainingJob(job_request(generator)), f"{spec_field}.data.generator_args"
    )
    synthetic = make_spec(epochs=1)
    synthetic.data.generator_args.update({"num_samples": -5})
    await invalid(
        trainer.CreateTrainingJob(job_request(synthetic)),
        f"{spec_field}.data.generator_args.num_samples",
    )
    mixed = breast_cancer_spec()
    mixed.data.additional_datasets.append("datasets/digits")
    await invalid(
        trainer.CreateTrainingJob(job_request(mixed)),
        f"{spec_field}.data.additional_datasets[0]",
    )
    labelled = pb.TrainingJob(
        spec=breast_cancer_spec(), labels={"Bad Key": "v"}, display_name="x" * 200
    )
    await invalid(
        trainer.CreateTrainingJob(rpc.CreateTrainingJobRequest(training_job=labelled)),
        "training_job.labels",
        "training_job.display_name",
    )
    await invalid(
        trainer.CreateTrainingJob(job_request(breast_cancer_spec(model="fraud"))),
        f"{spec_field}.registration.model",
    )
    unknown = await refused(
        trainer.CreateTrainingJob(job_request(spec_with(data__dataset="datasets/unknown"))),
        grpc.StatusCode.NOT_FOUND,
    )
    assert unknown.reason == "DATASET_NOT_FOUND"
    no_model = await refused(
        trainer.CreateTrainingJob(job_request(breast_cancer_spec(model="models/absent"))),
        grpc.StatusCode.NOT_FOUND,
    )
    assert no_model.reason == "MODEL_NOT_FOUND"
    await create_model(paused.registry, "old")
    await paused.registry.ArchiveModel(registry_rpc.ArchiveModelRequest(name="models/old"))
    archived = await refused(
        trainer.CreateTrainingJob(job_request(breast_cancer_spec(model="models/old"))),
        grpc.StatusCode.FAILED_PRECONDITION,
    )
    assert archived.reason == "MODEL_ARCHIVED"
    if not torch.cuda.is_available():
        on_cuda = breast_cancer_spec()
        on_cuda.compute.device = pb.DEVICE_CUDA
        no_gpu = await refused(
            trainer.CreateTrainingJob(job_request(on_cuda)), grpc.StatusCode.FAILED_PRECONDITION
        )
        assert no_gpu.reason == "NO_GPU"
    assert list((await trainer.ListTrainingJobs(rpc.ListTrainingJobsRequest())).training_jobs) == []
    assert await asyncio.to_thread(serving_status, paused.trainer_target) == "SERVING"


async def test_an_unreachable_registry_is_unavailable(tmp_path: Path) -> None:
    async with running_trainer(
        tmp_path, with_registry=False, max_running_jobs=0, registry_addr="127.0.0.1:9"
    ) as running:
        down = await refused(
            running.trainer.CreateTrainingJob(job_request(breast_cancer_spec(model="models/m"))),
            grpc.StatusCode.UNAVAILABLE,
        )
        assert down.reason == "REGISTRY_UNAVAILABLE"


async def test_the_queue_is_bounded_and_queued_jobs_cancel_at_once(paused: Running) -> None:
    trainer = paused.trainer
    jobs = [await create_job(trainer, breast_cancer_spec(), f"queued-{i}") for i in range(3)]
    full = await refused(
        trainer.CreateTrainingJob(job_request(breast_cancer_spec(), "one-too-many")),
        grpc.StatusCode.RESOURCE_EXHAUSTED,
    )
    assert full.reason == "QUEUE_FULL"

    cancelled = (
        await trainer.CancelTrainingJob(rpc.CancelTrainingJobRequest(name=jobs[0].name))
    ).training_job
    assert cancelled.state == pb.JOB_STATE_CANCELLED
    assert cancelled.cancel_requested
    assert cancelled.HasField("end_time")
    again = (
        await trainer.CancelTrainingJob(rpc.CancelTrainingJobRequest(name=jobs[0].name))
    ).training_job
    assert again == cancelled
    assert (await get_job(trainer, jobs[1].name)).queue_position == 0
    assert (await create_job(trainer, breast_cancer_spec(), "fits-now")).queue_position == 2
    await refused(
        trainer.CancelTrainingJob(rpc.CancelTrainingJobRequest(name="trainingJobs/none")),
        grpc.StatusCode.NOT_FOUND,
    )
    await invalid(trainer.CancelTrainingJob(rpc.CancelTrainingJobRequest(name="jobs/x")), "name")


async def test_watchers_of_a_queued_job_see_it_cancelled(paused: Running) -> None:
    trainer = paused.trainer
    job = await create_job(trainer, breast_cancer_spec(), "watched")

    async def follow(subscribed: asyncio.Event) -> list[rpc.WatchTrainingJobResponse]:
        events = []
        async for response in trainer.WatchTrainingJob(
            rpc.WatchTrainingJobRequest(name=job.name), timeout=60
        ):
            events.append(response)
            subscribed.set()  # the snapshot comes once the watcher is registered
        return events

    subscribed = [asyncio.Event() for _ in range(3)]
    watchers = [asyncio.create_task(follow(ready)) for ready in subscribed]
    await asyncio.gather(*(ready.wait() for ready in subscribed))
    await trainer.CancelTrainingJob(rpc.CancelTrainingJobRequest(name=job.name))
    for events in await asyncio.gather(*watchers):
        assert event_types(events) == ["SNAPSHOT", "STATE_CHANGED"]
        assert events[0].training_job.state == pb.JOB_STATE_QUEUED
        assert events[1].training_job.state == pb.JOB_STATE_CANCELLED
        assert events[1].HasField("event_time")
    late = await watch(trainer, job.name)
    assert event_types(late) == ["SNAPSHOT"]
    assert late[0].training_job.state == pb.JOB_STATE_CANCELLED

    await refused(watch(trainer, "trainingJobs/none"), grpc.StatusCode.NOT_FOUND)
    await invalid(watch(trainer, "watched"), "name")
    await invalid(watch(trainer, job.name, interval=timedelta(seconds=-1)), "progress_interval")
    assert await asyncio.to_thread(serving_status, paused.trainer_target) == "SERVING"


def test_the_migrations_build_exactly_the_schema(tmp_path: Path) -> None:
    engine = create_engine(sqlite_url(tmp_path / "trainer.db"))
    upgrade_to_head(engine)
    upgrade_to_head(engine)  # a second run finds nothing to do
    with engine.connect() as connection:
        context = MigrationContext.configure(connection, opts={"version_table": VERSION_TABLE})
        differences = compare_metadata(context, schema.metadata)
        tables = set(inspect(connection).get_table_names())
    engine.dispose()
    assert differences == []
    assert tables == set(schema.metadata.tables) | {VERSION_TABLE}
