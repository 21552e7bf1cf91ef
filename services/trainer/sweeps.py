"""Hyperparameter sweeps: trials as training jobs, the best one registered.

:class:`SweepManager` drives every QUEUED and RUNNING sweep of this trainer:

- **Trials.** A sweep's trials (:mod:`.search_space` lays them out) are
  ordinary training jobs in the trainer's queue, named
  ``trainingJobs/{sweep}-trial-{n}`` and carrying ``sweep_job``. At most
  ``max_parallel_trials`` of them are QUEUED or RUNNING at once; when the queue
  is full the sweep waits and tries again.
- **Progress.** The job manager tells the sweep manager of every state change
  of a trial; the sweep records the trial's state and its objective (the
  trial's validation metric of the kept epoch), keeps ``best_trial``, and
  publishes TRIAL_UPDATED and STATE_CHANGED events to its watchers.
- **Outcome.** Once every trial has ended: FAILED when none succeeded,
  otherwise the best trial (ties: the earliest) is registered with the
  sweep's registration (when it has one) and the sweep SUCCEEDED.
- **Cancel** cancels the running trials; the sweep ends CANCELLED when they
  have stopped, and registers nothing.
- **Restart.** Every step reads the sweep from the store and writes it back in
  one transaction, so a restarted trainer picks each active sweep up where it
  was; registration is idempotent (:mod:`.registration`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Final

import grpc
from google.protobuf import json_format, struct_pb2

from conveyor.services.trainer import search_space
from conveyor.services.trainer.datasets import DatasetSchema
from conveyor.services.trainer.jobs import JobManager
from conveyor.services.trainer.registration import Registrar, RegistrationError
from conveyor.services.trainer.settings import TrainerSettings
from conveyor.services.trainer.specs import METRICS, metric_maximized, validate_training_spec
from conveyor.services.trainer.store import (
    ACTIVE_STATES,
    QUEUED,
    TERMINAL_STATES,
    now,
    state_name,
    timestamp,
)
from conveyor.services.trainer.sweep_store import SweepStore
from conveyor.services.trainer.watch import SweepWatchHub, sweep_event
from conveyor.shared.errors import (
    FailedPreconditionError,
    FieldViolation,
    InvalidArgumentError,
    NotFoundError,
    ResourceExhaustedError,
)
from conveyor.shared.workers import WorkerThreads
from conveyor.trainer.v1 import resources_pb2 as pb

logger = logging.getLogger(__name__)

RETRY_S: Final = 1.0
"""How long a sweep waits before trying again when the queue is full or the
store failed."""
MAX_DISPLAY_NAME_CHARS: Final = 128


MAX_PARALLEL_TRIALS: Final = 64
MAX_REPORTED_TRIALS: Final = 5
"""How many invalid trials a refused CreateSweepJob names."""


def sweep_violations(spec: pb.SweepJobSpec, field: str) -> list[FieldViolation]:
    """What is wrong with the sweep's own fields (not its parameters, base
    spec or objective, which need the data's schema)."""
    violations = []
    if spec.algorithm not in (pb.SEARCH_ALGORITHM_GRID, pb.SEARCH_ALGORITHM_RANDOM):
        violations.append(FieldViolation(f"{field}.algorithm", "required: GRID or RANDOM"))
    if not 1 <= spec.max_trials <= search_space.MAX_TRIALS:
        violations.append(
            FieldViolation(f"{field}.max_trials", f"from 1 to {search_space.MAX_TRIALS}")
        )
    if not 0 <= spec.max_parallel_trials <= MAX_PARALLEL_TRIALS:
        violations.append(
            FieldViolation(
                f"{field}.max_parallel_trials", f"from 0 (meaning 1) to {MAX_PARALLEL_TRIALS}"
            )
        )
    if not spec.objective_metric:
        violations.append(
            FieldViolation(
                f"{field}.objective_metric", "required: the validation metric to rank by"
            )
        )
    if spec.objective_goal not in pb.MetricGoal.values():
        violations.append(FieldViolation(f"{field}.objective_goal", "MAXIMIZE or MINIMIZE"))
    return violations


def objective_violations(
    spec: pb.SweepJobSpec, schema: DatasetSchema, field: str
) -> list[FieldViolation]:
    """The objective must be a validation metric the data's task has."""
    metrics = METRICS if schema.num_classes == 2 else tuple(m for m in METRICS if m != "roc_auc")
    if not spec.objective_metric or spec.objective_metric in metrics:
        return []  # a missing one is named by sweep_violations
    return [
        FieldViolation(
            f"{field}.objective_metric",
            f"required: a validation metric, one of {', '.join(metrics)} for this dataset",
        )
    ]


def trial_violations(
    spec: pb.SweepJobSpec,
    parameters: list[search_space.Parameter],
    schema: DatasetSchema,
    *,
    cuda_available: bool,
    field: str,
) -> list[FieldViolation]:
    """Every trial's spec checked as CreateTrainingJob would check it; the
    first few bad trials named with their parameter values."""
    found: list[FieldViolation] = []
    for index, values in enumerate(search_space.plan_trials(spec, parameters)):
        trial = search_space.apply(spec.base_spec, values)
        try:
            validate_training_spec(
                trial, schema, cuda_available=cuda_available, field=f"{field}.base_spec"
            )
        except InvalidArgumentError as error:
            first = error.violations[0]
            shown = json_format.MessageToJson(values, indent=None, sort_keys=True)
            found.append(
                FieldViolation(
                    f"{field}.parameters",
                    f"trial {index + 1} {shown} is invalid: {first.field}: {first.description}",
                )
            )
            if len(found) == MAX_REPORTED_TRIALS:
                break
    return found


def trial_plan(spec: pb.SweepJobSpec) -> list[struct_pb2.Struct]:
    """Every trial's parameters (``spec`` was validated at creation)."""
    violations: list[FieldViolation] = []
    parameters = search_space.search_space(spec, "spec", violations)
    if violations:
        raise ValueError(f"a stored sweep spec is invalid: {violations[0]}")
    return search_space.plan_trials(spec, parameters)


def trial_job(sweep: pb.SweepJob, index: int, parameters: struct_pb2.Struct) -> pb.TrainingJob:
    """The training job of the sweep's ``index``-th trial (from 0): the base
    spec with the trial's parameters, registering nothing."""
    spec = search_space.apply(sweep.spec.base_spec, parameters)
    spec.ClearField("registration")
    sweep_id = sweep.name.removeprefix("sweepJobs/")
    created = timestamp(now())
    title = f"{sweep.display_name or sweep_id} trial {index + 1}"
    return pb.TrainingJob(
        name=f"trainingJobs/{sweep_id[:48]}-trial-{index + 1}",
        display_name=title[:MAX_DISPLAY_NAME_CHARS],
        spec=spec,
        labels=sweep.labels,
        state=QUEUED,
        sweep_job=sweep.name,
        create_time=created,
        update_time=created,
        created_by=sweep.created_by,
    )


def best_trial(sweep: pb.SweepJob) -> pb.SweepTrial | None:
    """The succeeded trial with the best objective (ties: the earliest)."""
    maximize = metric_maximized(sweep.spec.objective_metric, sweep.spec.objective_goal)
    best: pb.SweepTrial | None = None
    for trial in sweep.trials:
        if trial.state != pb.JOB_STATE_SUCCEEDED or not trial.HasField("objective_value"):
            continue
        if best is None:
            best = trial
            continue
        better = (
            trial.objective_value > best.objective_value
            if maximize
            else trial.objective_value < best.objective_value
        )
        if better:
            best = trial
    return best


def record_trials(sweep: pb.SweepJob, jobs: dict[str, pb.TrainingJob]) -> bool:
    """Copy each trial job's state and objective into ``sweep`` and update
    ``best_trial``; whether anything changed."""
    changed = False
    for trial in sweep.trials:
        job = jobs.get(trial.training_job)
        if job is None or trial.state in TERMINAL_STATES:
            continue
        if job.state != trial.state:
            trial.state = job.state
            changed = True
        objective = job.result.validation_metrics.get(sweep.spec.objective_metric)
        if job.state == pb.JOB_STATE_SUCCEEDED and objective is not None:
            trial.objective_value = objective
            changed = True
    best = best_trial(sweep)
    best_name = best.training_job if best is not None else ""
    if best_name != sweep.best_trial:
        sweep.best_trial = best_name
        changed = True
    return changed


def _active(sweep: pb.SweepJob) -> int:
    return sum(trial.state in ACTIVE_STATES for trial in sweep.trials)


def _finish(
    sweep: pb.SweepJob,
    state: pb.JobState.ValueType,
    *,
    error: pb.JobError | None = None,
    model_version: str = "",
) -> None:
    sweep.state = state
    sweep.end_time.CopyFrom(timestamp(now()))
    if error is not None:
        sweep.error.CopyFrom(error)
    if model_version:
        sweep.model_version = model_version


def _no_trial_succeeded(sweep: pb.SweepJob) -> pb.JobError:
    counts: dict[str, int] = {}
    for trial in sweep.trials:
        counts[state_name(trial.state).lower()] = counts.get(state_name(trial.state).lower(), 0) + 1
    summary = ", ".join(f"{count} {state}" for state, count in sorted(counts.items()))
    return pb.JobError(
        code=grpc.StatusCode.FAILED_PRECONDITION.value[0],
        reason="NO_TRIAL_SUCCEEDED",
        message=(
            f"none of the {len(sweep.trials)} trials succeeded with a "
            f"{sweep.spec.objective_metric!r} validation metric ({summary}); "
            "their training jobs say why"
        ),
    )


class SweepManager:
    """Runs this trainer's sweeps: creates their trials, follows them, and
    registers the best."""

    def __init__(
        self,
        settings: TrainerSettings,
        store: SweepStore,
        jobs: JobManager,
        workers: WorkerThreads,
        hub: SweepWatchHub,
        registrar: Registrar,
    ) -> None:
        self._settings = settings
        self._store = store
        self._jobs = jobs
        self._workers = workers
        self._hub = hub
        self._registrar = registrar
        self._plans: dict[str, list[struct_pb2.Struct]] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._again: set[str] = set()
        self._closing = False
        jobs.state_listeners.append(self._trial_changed)

    async def start(self) -> None:
        """Pick up the sweeps a previous trainer left unfinished."""
        for sweep in await self._workers.run(self._store.active_sweeps):
            self.poke(sweep.name)

    async def close(self) -> None:
        self._closing = True
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def get(self, sweep_id: str) -> pb.SweepJob:
        return await self._workers.run(self._store.get_sweep, sweep_id)

    def poke(self, name: str) -> None:
        """Look at sweep ``name`` again soon (one look at a time per sweep)."""
        if self._closing:
            return
        if name in self._tasks:
            self._again.add(name)
            return
        self._tasks[name] = asyncio.create_task(self._follow(name), name=f"sweep {name}")

    def _trial_changed(self, job: pb.TrainingJob) -> None:
        if job.sweep_job:
            self.poke(job.sweep_job)

    async def cancel(self, sweep_id: str) -> pb.SweepJob:
        """Cancel a sweep: CANCELLED at once when no trial is QUEUED or RUNNING,
        otherwise once its trials have stopped. A CANCELLED sweep is returned
        unchanged; SUCCEEDED and FAILED ones are FAILED_PRECONDITION."""

        def request_cancel(sweep: pb.SweepJob) -> bool:
            if sweep.state == pb.JOB_STATE_CANCELLED:
                return False
            if sweep.state in TERMINAL_STATES:
                raise FailedPreconditionError(
                    f"{sweep.name} already {state_name(sweep.state)}; only unfinished sweeps "
                    "can be cancelled",
                    reason="SWEEP_JOB_ENDED",
                    metadata={"name": sweep.name, "state": state_name(sweep.state)},
                )
            changed = not sweep.cancel_requested
            sweep.cancel_requested = True
            if not _active(sweep):
                _finish(sweep, pb.JOB_STATE_CANCELLED)
                changed = True
            return changed

        before, after = await self._workers.run(self._store.update_sweep, sweep_id, request_cancel)
        self._publish_changes(before, after)
        if after.state not in TERMINAL_STATES:
            logger.info("cancelling a sweep", extra={"sweep_job": after.name})
            self.poke(after.name)
        return after

    # -- following a sweep ---------------------------------------------------

    async def _follow(self, name: str) -> None:
        try:
            while not self._closing:
                self._again.discard(name)
                try:
                    retry = await self._advance(name)
                except (asyncio.CancelledError, NotFoundError):
                    raise
                except Exception:  # the store may be down: look again soon
                    logger.exception("could not advance a sweep", extra={"sweep_job": name})
                    retry = True
                if name in self._again:
                    continue
                if not retry:
                    return
                await asyncio.sleep(RETRY_S)
        except NotFoundError:
            logger.warning("a sweep disappeared", extra={"sweep_job": name})
        finally:
            self._tasks.pop(name, None)

    async def _advance(self, name: str) -> bool:
        """One look at the sweep: record its trials, cancel or start trials,
        end it when every trial has ended. Whether to look again later."""
        sweep_id = name.removeprefix("sweepJobs/")
        sweep = await self.get(sweep_id)
        if sweep.state in TERMINAL_STATES:
            self._plans.pop(name, None)
            return False
        jobs = await self._trial_jobs(sweep)
        if sweep.cancel_requested:
            for job in jobs.values():
                if job.state in ACTIVE_STATES and not job.cancel_requested:
                    with contextlib.suppress(FailedPreconditionError, NotFoundError):
                        jobs[job.name] = await self._jobs.cancel(
                            job.name.removeprefix("trainingJobs/")
                        )
            await self._update(sweep_id, jobs)
            return False
        sweep = await self._update(sweep_id, jobs)
        retry = await self._start_trials(sweep)
        sweep = await self.get(sweep_id)
        plan = self._plan(sweep)
        if sweep.state in TERMINAL_STATES or sweep.cancel_requested or _active(sweep):
            return retry
        if len(sweep.trials) < len(plan):
            return True  # nothing running and trials left: the queue was full
        await self._conclude(sweep)
        return False

    async def _trial_jobs(self, sweep: pb.SweepJob) -> dict[str, pb.TrainingJob]:
        """The trial jobs the sweep has not yet seen end, as they are now."""
        jobs: dict[str, pb.TrainingJob] = {}
        for trial in sweep.trials:
            if trial.state in TERMINAL_STATES:
                continue
            try:
                jobs[trial.training_job] = await self._jobs.get(
                    trial.training_job.removeprefix("trainingJobs/")
                )
            except NotFoundError:  # cannot happen while jobs are never deleted
                logger.warning("a trial's job is missing", extra={"job": trial.training_job})
        return jobs

    async def _update(self, sweep_id: str, jobs: dict[str, pb.TrainingJob]) -> pb.SweepJob:
        def record(sweep: pb.SweepJob) -> bool:
            changed = record_trials(sweep, jobs)
            if sweep.cancel_requested and not _active(sweep) and sweep.state not in TERMINAL_STATES:
                _finish(sweep, pb.JOB_STATE_CANCELLED)
                changed = True
            return changed

        before, after = await self._workers.run(self._store.update_sweep, sweep_id, record)
        self._publish_changes(before, after)
        return after

    def _plan(self, sweep: pb.SweepJob) -> list[struct_pb2.Struct]:
        plan = self._plans.get(sweep.name)
        if plan is None:
            plan = self._plans[sweep.name] = trial_plan(sweep.spec)
        return plan

    async def _start_trials(self, sweep: pb.SweepJob) -> bool:
        """Queue trials up to the sweep's parallelism; whether the queue was full."""
        plan = self._plan(sweep)
        parallel = max(sweep.spec.max_parallel_trials, 1)
        sweep_id = sweep.name.removeprefix("sweepJobs/")
        while _active(sweep) < parallel and len(sweep.trials) < len(plan):
            index = len(sweep.trials)
            job = trial_job(sweep, index, plan[index])
            try:
                added = await self._workers.run(
                    self._store.add_trial,
                    sweep_id,
                    job,
                    plan[index],
                    max_queued=self._settings.max_queued_jobs,
                )
            except ResourceExhaustedError:
                return True
            if added is None:  # cancelled or ended meanwhile
                return False
            before, sweep = added
            logger.info("trial queued", extra={"sweep_job": sweep.name, "training_job": job.name})
            self._publish_changes(before, sweep)
            self._jobs.notify()
        return False

    async def _conclude(self, sweep: pb.SweepJob) -> None:
        """End a sweep whose trials have all ended: register the best trial."""
        best = best_trial(sweep)
        error: pb.JobError | None = None
        model_version = ""
        if best is None:
            error = _no_trial_succeeded(sweep)
        elif sweep.spec.base_spec.registration.model:
            job = await self._jobs.get(best.training_job.removeprefix("trainingJobs/"))
            try:
                model_version = await self._registrar.register(
                    job,
                    self._jobs.job_dir(job.name),
                    registration=sweep.spec.base_spec.registration,
                )
            except RegistrationError as failed:
                error = failed.error

        def conclude(stored: pb.SweepJob) -> bool:
            if stored.state in TERMINAL_STATES:
                return False
            if error is not None:
                _finish(stored, pb.JOB_STATE_FAILED, error=error)
            else:
                _finish(stored, pb.JOB_STATE_SUCCEEDED, model_version=model_version)
            return True

        sweep_id = sweep.name.removeprefix("sweepJobs/")
        before, after = await self._workers.run(self._store.update_sweep, sweep_id, conclude)
        self._publish_changes(before, after)
        logger.info(
            "sweep ended",
            extra={
                "sweep_job": after.name,
                "state": state_name(after.state),
                "best_trial": after.best_trial,
                "model_version": after.model_version,
            },
        )

    def _publish_changes(self, before: pb.SweepJob, after: pb.SweepJob) -> None:
        """TRIAL_UPDATED for each trial that changed, then STATE_CHANGED when
        the sweep's state, cancellation or best trial changed."""
        for index, trial in enumerate(after.trials):
            if index >= len(before.trials) or before.trials[index] != trial:
                self._hub.publish(
                    after.name, sweep_event(pb.SWEEP_JOB_EVENT_TYPE_TRIAL_UPDATED, trial=trial)
                )
        if (before.state, before.cancel_requested, before.best_trial) != (
            after.state,
            after.cancel_requested,
            after.best_trial,
        ):
            self._hub.publish(
                after.name, sweep_event(pb.SWEEP_JOB_EVENT_TYPE_STATE_CHANGED, sweep=after)
            )
