"""Alert actions against real servers: a rollback moves the alias back through
the registry only while it points at the alert's version; a retraining
uploads the labelled reference rows plus the recent labelled predictions in
the original dataset's schema to a real trainer, which trains the original
spec on them and registers the result; a second run for the same alert
creates nothing new; and the failures say why."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
import numpy as np
import numpy.typing as npt
import pytest
from sklearn.datasets import load_breast_cancer

from conveyor.monitor.v1 import resources_pb2 as pb
from conveyor.registry.v1 import registry_messages_pb2 as registry_rpc
from conveyor.services.monitor import config as configs
from conveyor.services.monitor.actions import ActionRunner, _refusal_decision
from conveyor.services.monitor.ingest import SubjectHasher, prepare
from conveyor.services.monitor.migrate import upgrade_to_head
from conveyor.services.monitor.profiles import VersionProfiles, build_reference
from conveyor.services.monitor.references import FeatureSchema, ReferenceData
from conveyor.services.monitor.store import MonitorStore
from conveyor.services.trainer.loaded import LoadedDataset
from conveyor.shared.auth.principal import Principal
from conveyor.shared.errors import (
    AbortedError,
    FailedPreconditionError,
    PermissionDeniedError,
    UnavailableError,
)
from conveyor.shared.registry_client import RegistryClient
from conveyor.shared.storage import create_engine
from conveyor.shared.storage.database import sqlite_url
from conveyor.shared.workers import WorkerThreads
from conveyor.trainer.v1 import resources_pb2 as trainer_pb
from conveyor.trainer.v1 import trainer_messages_pb2 as trainer_rpc
from tests.support.policy import governed_model
from tests.support.registry import create_model, create_version, set_alias
from tests.support.suite import ALICE, MALLORY
from tests.support.suite import Suite as PolicySuite
from tests.support.suite import running_suite as running_policy_suite
from tests.support.trainer import (
    TERMINAL,
    Running,
    breast_cancer_spec,
    create_job,
    get_job,
    running_trainer,
    wait_until,
)

if TYPE_CHECKING:
    from conveyor.registry.v1.registry_service_pb2_grpc import RegistryServiceAsyncStub
    from conveyor.trainer.v1.trainer_service_pb2_grpc import TrainerServiceAsyncStub

TRAINING_TIMEOUT_S = 240
CANCER = load_breast_cancer()
NAMES = [str(n) for n in CANCER.feature_names]
CLASSES = [str(n) for n in CANCER.target_names]


@dataclass
class Harness:
    """A registry and a trainer, and an action runner on a monitor store."""

    running: Running
    runner: ActionRunner
    store: MonitorStore
    profiles: VersionProfiles
    hasher: SubjectHasher

    @property
    def registry(self) -> RegistryServiceAsyncStub:
        assert self.running.registry is not None
        return self.running.registry

    @property
    def trainer(self) -> TrainerServiceAsyncStub:
        return self.running.trainer


@asynccontextmanager
async def harness(tmp_path: Path, **trainer_settings: Any) -> AsyncIterator[Harness]:
    async with running_trainer(tmp_path, **trainer_settings) as running:
        assert running.registry_server is not None
        registry_channel = grpc.aio.insecure_channel(f"127.0.0.1:{running.registry_server.port}")
        trainer_channel = grpc.aio.insecure_channel(running.trainer_target)
        (tmp_path / "monitor").mkdir()
        engine = create_engine(sqlite_url(tmp_path / "monitor" / "monitor.db"))
        upgrade_to_head(engine)
        store = MonitorStore(engine)
        workers = WorkerThreads(2, name="test-actions")
        registry = RegistryClient(registry_channel)
        hasher = SubjectHasher(b"test-key")
        profiles = VersionProfiles(store, registry, workers, hasher)
        runner = ActionRunner(
            registry, trainer_channel, store, profiles, workers, call_timeout=timedelta(seconds=60)
        )
        try:
            yield Harness(running, runner, store, profiles, hasher)
        finally:
            await workers.shutdown()
            engine.dispose()
            await registry_channel.close(None)
            await trainer_channel.close(None)


@pytest.fixture
async def paused(tmp_path: Path) -> AsyncIterator[Harness]:
    """A trainer that queues jobs without running them."""
    async with harness(tmp_path, max_running_jobs=0) as running:
        yield running


@pytest.fixture
async def training(tmp_path: Path) -> AsyncIterator[Harness]:
    async with harness(tmp_path, max_running_jobs=1) as running:
        yield running


def an_alert(model_version: str, name: str = "alerts/a1b2c3", **fields: Any) -> pb.Alert:
    fields.setdefault("summary", "accuracy 0.71 < 0.90")
    alert = pb.Alert(name=name, model_version=model_version, **fields)
    alert.open_time.GetCurrentTime()
    alert.open_time.seconds += 1  # after every prediction logged before the test opens it
    return alert


def rollback(alias: str = "") -> pb.AlertAction:
    return pb.AlertAction(rollback=pb.RollbackAction(alias=alias))


def retrain(training_job: str = "", window: timedelta | None = None) -> pb.AlertAction:
    action = pb.AlertAction(retrain=pb.RetrainAction(training_job=training_job))
    if window is not None:
        action.retrain.labelled_data_window.FromTimedelta(window)
    return action


def assert_finished(execution: pb.ActionExecution, state: int) -> None:
    assert execution.state == state, execution.message
    assert execution.HasField("start_time")
    assert execution.HasField("end_time")
    assert execution.end_time.ToNanoseconds() >= execution.start_time.ToNanoseconds()


async def alias_target(harness: Harness, name: str) -> str:
    reply = await harness.registry.GetModelVersion(
        registry_rpc.GetModelVersionRequest(name=name), timeout=10
    )
    return str(reply.model_version.name)


# -- rollback --------------------------------------------------------------------


async def test_rollback_moves_the_alias_back_to_the_previous_version(paused: Harness) -> None:
    await create_model(paused.registry, "fraud")
    v1 = (await create_version(paused.registry, "fraud")).name
    v2 = (await create_version(paused.registry, "fraud")).name
    await set_alias(paused.registry, "models/fraud/aliases/production", v1)
    await set_alias(paused.registry, "models/fraud/aliases/production", v2)

    execution = await paused.runner.run(an_alert(v2), rollback())

    assert_finished(execution, pb.ACTION_STATE_SUCCEEDED)
    assert execution.kind == pb.ACTION_KIND_ROLLBACK
    assert list(execution.resources) == ["models/fraud@production"]
    assert execution.message == f"models/fraud@production moved back from {v2} to {v1}"
    assert await alias_target(paused, "models/fraud@production") == v1
    aliases = (
        await paused.registry.ListAliases(
            registry_rpc.ListAliasesRequest(parent="models/fraud"), timeout=10
        )
    ).aliases
    (production,) = aliases
    assert production.reason == "rollback: alerts/a1b2c3: accuracy 0.71 < 0.90"
    assert execution.decision == production.decision


async def test_rollback_of_a_custom_alias_caps_the_reason(paused: Harness) -> None:
    await create_model(paused.registry, "fraud")
    v1 = (await create_version(paused.registry, "fraud")).name
    v2 = (await create_version(paused.registry, "fraud")).name
    await set_alias(paused.registry, "models/fraud/aliases/canary", v1)
    await set_alias(paused.registry, "models/fraud/aliases/canary", v2)
    alert = an_alert(v2, summary="é" * 2000)

    execution = await paused.runner.run(alert, rollback("canary"))

    assert_finished(execution, pb.ACTION_STATE_SUCCEEDED)
    assert list(execution.resources) == ["models/fraud@canary"]
    assert await alias_target(paused, "models/fraud@canary") == v1
    (canary,) = (
        await paused.registry.ListAliases(
            registry_rpc.ListAliasesRequest(parent="models/fraud"), timeout=10
        )
    ).aliases
    assert canary.reason.startswith("rollback: alerts/a1b2c3: éé")
    assert len(canary.reason.encode()) <= 1024


async def test_rollback_fails_when_the_alias_points_elsewhere(paused: Harness) -> None:
    await create_model(paused.registry, "fraud")
    v1 = (await create_version(paused.registry, "fraud")).name
    v2 = (await create_version(paused.registry, "fraud")).name
    await set_alias(paused.registry, "models/fraud/aliases/production", v1)
    await set_alias(paused.registry, "models/fraud/aliases/production", v2)

    execution = await paused.runner.run(an_alert(v1), rollback())

    assert_finished(execution, pb.ACTION_STATE_FAILED)
    assert execution.kind == pb.ACTION_KIND_ROLLBACK
    assert f"points at {v2}, not at the alert's version {v1}" in execution.message
    assert list(execution.resources) == []
    assert await alias_target(paused, "models/fraud@production") == v2


async def test_rollback_fails_without_a_previous_version_or_an_alias(paused: Harness) -> None:
    await create_model(paused.registry, "fraud")
    v1 = (await create_version(paused.registry, "fraud")).name
    await set_alias(paused.registry, "models/fraud/aliases/production", v1)

    first = await paused.runner.run(an_alert(v1), rollback())
    assert_finished(first, pb.ACTION_STATE_FAILED)
    assert first.message == "models/fraud@production has no earlier version to go back to"
    assert await alias_target(paused, "models/fraud@production") == v1

    missing = await paused.runner.run(an_alert(v1), rollback("canary"))
    assert_finished(missing, pb.ACTION_STATE_FAILED)
    assert "models/fraud has no alias 'canary'" in missing.message

    unknown = await paused.runner.run(an_alert("models/nope/versions/1"), rollback())
    assert_finished(unknown, pb.ACTION_STATE_FAILED)
    assert unknown.message.startswith("reading models/nope@production: ")


def test_policy_refusals_name_their_decision() -> None:
    denied = PermissionDeniedError("no", metadata={"decision_id": "d-1"})
    gated = FailedPreconditionError(
        "gate", reason="PROMOTION_REFUSED", metadata={"decision": "decisions/d-2"}
    )
    assert _refusal_decision(denied) == "decisions/d-1"
    assert _refusal_decision(gated) == "decisions/d-2"
    assert _refusal_decision(PermissionDeniedError("no")) == ""
    assert _refusal_decision(FailedPreconditionError("archived")) is None
    assert _refusal_decision(AbortedError("moved")) is None
    assert _refusal_decision(UnavailableError("down")) is None


# -- retraining ------------------------------------------------------------------


def monitor_schema() -> FeatureSchema:
    """The breast-cancer features in reverse order: the retraining data must
    put them back in the dataset's order, by name."""
    return FeatureSchema(
        tuple(pb.FeatureSpec(name=n, type=pb.FEATURE_TYPE_NUMERICAL) for n in reversed(NAMES))
    )


async def put_reference(harness: Harness, version: str, rows: slice, labelled: int) -> None:
    """Reference rows from the breast-cancer set, the first ``labelled`` with labels."""
    schema = monitor_schema()
    features = CANCER.data[rows][:, ::-1].astype(np.float64)
    labels = np.full(len(features), -1, dtype=np.int64)
    labels[:labelled] = CANCER.target[rows][:labelled]
    data = ReferenceData(
        numerical=features,
        categorical=np.empty((len(features), 0), dtype=np.str_),
        outputs=np.tile([0.5, 0.5], (len(features), 1)),
        labels=labels,
    )
    reference = build_reference(
        version,
        schema,
        data,
        output_type=pb.OUTPUT_TYPE_PROBABILITIES,
        source=pb.REFERENCE_SOURCE_DATASET,
        row_count=len(features),
    )
    method = configs.resolve(configs.default_config(version.split("/versions/")[0]))
    harness.store.put_reference(
        version, reference, data.to_bytes(), None, method.outlier_method.value
    )
    harness.profiles.forget_version(version)


async def log_predictions(
    harness: Harness, version: str, rows: slice, labelled: int, *, prefix: str = "r"
) -> None:
    """Predictions of the breast-cancer rows, the first ``labelled`` of them labelled."""
    profile = await harness.profiles.get(version)
    features: npt.NDArray[np.float64] = CANCER.data[rows][:, ::-1]
    records = []
    for i, row in enumerate(features):
        record = pb.PredictionRecord(
            model_version=version,
            request_id=f"{prefix}{i}",
            features=pb.FeatureValues(numerical=row.tolist()),
            outputs=[0.3, 0.7],
        )
        record.latency.FromMilliseconds(5)
        records.append((i, record))
    stamp = time.time_ns() // 1000
    prepared, violations = prepare(
        profile, records, hasher=harness.hasher, now_us=stamp, max_violations=10
    )
    assert violations == []
    harness.store.ingest([prepared], {version: profile.config.window}, now_us=stamp)
    model = version.split("/versions/")[0]
    labels = CANCER.target[rows][:labelled]
    harness.store.record_feedback(
        [(model, f"{prefix}{i}", int(label), stamp) for i, label in enumerate(labels)],
        now_us=stamp,
    )


def expected_digest(*parts: tuple[slice, int]) -> str:
    """The digest of the labelled rows of each (rows, labelled) part, in order."""
    features = np.concatenate([CANCER.data[rows][:labelled] for rows, labelled in parts])
    labels = np.concatenate([CANCER.target[rows][:labelled] for rows, labelled in parts])
    return LoadedDataset.create(
        name="datasets/expected",
        features=features,
        labels=labels,
        feature_names=NAMES,
        class_names=CLASSES,
        modality=trainer_pb.DATA_MODALITY_TABULAR,
        source=trainer_pb.DATASET_SOURCE_UPLOADED,
    ).digest


async def list_jobs(harness: Harness) -> list[str]:
    reply = await harness.trainer.ListTrainingJobs(
        trainer_rpc.ListTrainingJobsRequest(page_size=100), timeout=10
    )
    return sorted(job.name for job in reply.training_jobs)


async def get_dataset(harness: Harness, name: str) -> trainer_pb.Dataset:
    reply = await harness.trainer.GetDataset(trainer_rpc.GetDatasetRequest(name=name), timeout=10)
    return reply.dataset


@pytest.mark.timeout(TRAINING_TIMEOUT_S)
async def test_retraining_trains_the_original_spec_on_reference_and_labelled_rows(
    training: Harness,
) -> None:
    await create_model(training.registry, "cancer")
    original = await create_job(
        training.trainer, breast_cancer_spec(epochs=2, model="models/cancer"), "cancer-mlp"
    )
    trained = await wait_until(
        training.trainer, original.name, lambda e: e.training_job.state in TERMINAL
    )
    assert trained.state == trainer_pb.JOB_STATE_SUCCEEDED, trained.error
    version = trained.result.model_version
    # 100 reference rows, 80 labelled; 90 predictions, 60 labelled.
    await put_reference(training, version, slice(0, 100), labelled=80)
    await log_predictions(training, version, slice(100, 190), labelled=60)
    alert = an_alert(version)

    execution = await training.runner.run(alert, retrain())

    assert_finished(execution, pb.ACTION_STATE_SUCCEEDED)
    assert execution.kind == pb.ACTION_KIND_RETRAIN
    dataset_name, job_name = execution.resources
    assert dataset_name.startswith("datasets/retrain-")
    assert job_name.startswith("trainingJobs/retrain-")
    assert "80 reference rows and 60 labelled predictions" in execution.message
    dataset = await get_dataset(training, dataset_name)
    assert dataset.example_count == 140
    assert list(dataset.feature_names) == NAMES
    assert list(dataset.class_names) == CLASSES
    assert dataset.source == trainer_pb.DATASET_SOURCE_UPLOADED
    assert dataset.digest == expected_digest((slice(0, 100), 80), (slice(100, 190), 60))
    job = await get_job(training.trainer, job_name)
    expected_spec = trainer_pb.TrainingJobSpec()
    expected_spec.CopyFrom(original.spec)
    expected_spec.data.dataset = dataset_name
    assert job.spec == expected_spec
    assert job.labels["monitor_alert"] == "a1b2c3"
    assert job.labels["retrained_from"] == "cancer-mlp"

    # Running it again (more labels arrived meanwhile) creates nothing new.
    await log_predictions(training, version, slice(190, 220), labelled=30, prefix="s")
    again = await training.runner.run(alert, retrain())
    assert_finished(again, pb.ACTION_STATE_SUCCEEDED)
    assert list(again.resources) == [dataset_name, job_name]
    assert await list_jobs(training) == sorted([original.name, job_name])
    assert (await get_dataset(training, dataset_name)).example_count == 140

    # The new data trains, and the result is registered as a new version.
    retrained = await wait_until(
        training.trainer,
        job_name,
        lambda e: e.training_job.state in TERMINAL,
        seconds=TRAINING_TIMEOUT_S,
    )
    assert retrained.state == trainer_pb.JOB_STATE_SUCCEEDED, retrained.error
    assert retrained.result.model_version == "models/cancer/versions/2"
    registered = (
        await training.registry.GetModelVersion(
            registry_rpc.GetModelVersionRequest(name="models/cancer/versions/2"), timeout=10
        )
    ).model_version
    assert registered.lineage.training_job == job_name
    assert registered.lineage.dataset == dataset_name


async def registered_version(harness: Harness, training_job: str = "") -> str:
    await create_model(harness.registry, "cancer")
    version = await create_version(
        harness.registry, "cancer", lineage={"training_job": training_job}
    )
    return str(version.name)


async def test_retraining_a_named_job_uses_labelled_predictions_alone(paused: Harness) -> None:
    original = await create_job(paused.trainer, breast_cancer_spec(epochs=2), "cancer-mlp")
    version = await registered_version(paused)  # no lineage: the action names the job
    await put_reference(paused, version, slice(0, 50), labelled=0)
    await log_predictions(paused, version, slice(50, 130), labelled=55)

    execution = await paused.runner.run(
        an_alert(version), retrain(original.name, window=timedelta(hours=2))
    )

    assert_finished(execution, pb.ACTION_STATE_SUCCEEDED)
    dataset_name, job_name = execution.resources
    dataset = await get_dataset(paused, dataset_name)
    assert dataset.example_count == 55
    assert dataset.digest == expected_digest((slice(50, 130), 55))
    job = await get_job(paused.trainer, job_name)
    assert job.spec.data.dataset == dataset_name
    assert job.spec.hyperparameters == original.spec.hyperparameters
    assert job.spec.architecture == original.spec.architecture


async def test_retraining_fails_with_too_few_labelled_predictions(paused: Harness) -> None:
    original = await create_job(paused.trainer, breast_cancer_spec(epochs=2), "cancer-mlp")
    version = await registered_version(paused, original.name)
    await put_reference(paused, version, slice(0, 100), labelled=100)
    await log_predictions(paused, version, slice(100, 140), labelled=12)

    execution = await paused.runner.run(an_alert(version), retrain())

    assert_finished(execution, pb.ACTION_STATE_FAILED)
    assert execution.message == (
        f"too few labelled predictions to retrain {version}: 12 in the last 7 days, "
        "at least 50 are needed"
    )
    assert list(execution.resources) == []
    assert await list_jobs(paused) == [original.name]


async def test_predictions_outside_the_window_do_not_count(paused: Harness) -> None:
    original = await create_job(paused.trainer, breast_cancer_spec(epochs=2), "cancer-mlp")
    version = await registered_version(paused, original.name)
    await put_reference(paused, version, slice(0, 100), labelled=100)
    await log_predictions(paused, version, slice(100, 200), labelled=100)
    alert = an_alert(version)
    alert.open_time.seconds += 3 * 3600  # opened three hours after the predictions

    execution = await paused.runner.run(alert, retrain(window=timedelta(hours=2)))

    assert_finished(execution, pb.ACTION_STATE_FAILED)
    assert "0 in the last 2 hours" in execution.message


async def test_retraining_fails_without_a_known_training_job(paused: Harness) -> None:
    version = await registered_version(paused)
    await put_reference(paused, version, slice(0, 100), labelled=100)

    no_lineage = await paused.runner.run(an_alert(version), retrain())
    assert_finished(no_lineage, pb.ACTION_STATE_FAILED)
    assert execution_kind(no_lineage) == "RETRAIN"
    assert no_lineage.message == (
        f"no training job to reuse: the action names none and {version} has no lineage.training_job"
    )

    unknown = await paused.runner.run(an_alert(version), retrain("trainingJobs/nope"))
    assert_finished(unknown, pb.ACTION_STATE_FAILED)
    assert unknown.message.startswith("reading trainingJobs/nope: ")
    assert await list_jobs(paused) == []

    short = await paused.runner.run(
        an_alert(version), retrain("trainingJobs/nope", window=timedelta(minutes=5))
    )
    assert_finished(short, pb.ACTION_STATE_FAILED)
    assert "at least 1 hour" in short.message


async def test_an_action_without_a_kind_fails(paused: Harness) -> None:
    execution = await paused.runner.run(an_alert("models/m/versions/1"), pb.AlertAction())
    assert_finished(execution, pb.ACTION_STATE_FAILED)
    assert execution.message == "the action names neither a rollback nor a retraining"


def execution_kind(execution: pb.ActionExecution) -> str:
    return pb.ActionKind.Name(execution.kind).removeprefix("ACTION_KIND_")


# -- policy ----------------------------------------------------------------------


@asynccontextmanager
async def runner_as(suite: PolicySuite, principal: Principal) -> AsyncIterator[ActionRunner]:
    """An action runner whose registry calls carry ``principal``'s token."""
    channel = suite._channel(suite.registry_target, principal)
    workers = WorkerThreads(1, name="test-actions")
    engine = create_engine(sqlite_url(suite.data_dir / "monitor.db"))
    upgrade_to_head(engine)
    store = MonitorStore(engine)
    registry = RegistryClient(channel)
    profiles = VersionProfiles(store, registry, workers, SubjectHasher(b"test-key"))
    try:
        yield ActionRunner(registry, channel, store, profiles, workers)
    finally:
        await workers.shutdown()
        engine.dispose()


async def test_a_rollback_policy_refuses_is_denied_with_its_decision(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CONVEYOR_REGISTRY_PROMOTION_GATE", "policy")  # decisions on alias moves
    async with running_policy_suite(tmp_path) as suite:
        await governed_model(suite)
        v1 = (await create_version(suite.registry(ALICE), "fraud", b"v1")).name
        v2 = (await create_version(suite.registry(ALICE), "fraud", b"v2")).name
        await set_alias(suite.registry(ALICE), "models/fraud/aliases/staging", v1)
        await set_alias(suite.registry(ALICE), "models/fraud/aliases/staging", v2)

        async with runner_as(suite, MALLORY) as outsider:
            denied = await outsider.run(an_alert(v2), rollback("staging"))
        assert_finished(denied, pb.ACTION_STATE_DENIED)
        assert denied.decision.startswith("decisions/")
        assert denied.message.startswith(f"moving models/fraud@staging back to {v1}: ")
        assert list(denied.resources) == []

        async with runner_as(suite, ALICE) as owner:
            allowed = await owner.run(an_alert(v2), rollback("staging"))
        assert_finished(allowed, pb.ACTION_STATE_SUCCEEDED)
        assert allowed.decision.startswith("decisions/")
        assert allowed.decision != denied.decision
        reply = await suite.registry(ALICE).GetModelVersion(
            registry_rpc.GetModelVersionRequest(name="models/fraud@staging")
        )
        assert reply.model_version.name == v1
